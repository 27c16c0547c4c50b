"""Process helpers shared by every part that starts a server process: a free loopback port,
a child that dies with its parent, and a bounded wait until a started server answers."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable

from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_fixed,
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """Run in the child before exec: the kernel stops the child if its owner dies (even SIGKILL)."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class NotReady(Exception):
    """The process answered, but not yet that it is ready (retried by `wait_ready`)."""


def wait_ready(
    check: Callable[[], object],
    *,
    timeout_s: float,
    interval_s: float,
    proc: subprocess.Popen | None = None,
    retry_on: tuple[type[BaseException], ...] = (),
) -> bool:
    """Call `check` every `interval_s` until it returns without raising one of `retry_on` (or
    NotReady); False if `proc` exited or `timeout_s` passed first. Any other error propagates."""
    late = stop_after_delay(timeout_s)

    def stop(state: RetryCallState) -> bool:
        return late(state) or (proc is not None and proc.poll() is not None)

    try:
        for attempt in Retrying(
            retry=retry_if_exception_type((NotReady, *retry_on)),
            stop=stop,
            wait=wait_fixed(interval_s),
        ):
            with attempt:
                check()
    except RetryError:
        return False
    return True
