"""The score store as actors reach it: a client of the state-score HTTP service (spo3.score_store.service).

`ServiceScoreStore` implements the same `ScoreStore` protocol as `RedisScoreStore`, so the rollout
cannot tell them apart. It keeps one keep-alive HTTP connection and sends one request per
`scores` call: POST /v1/batch with the leaves finished since the last request, then the keys to
score. The leaves are counted before the keys are scored, in the same order the direct path
would have run them, so a rollout sees the same scores either way. `commit_leaf` only queues its
leaf (the result says so: `counted=None`); the next `scores`, `stats` or an explicit `flush()`
sends it. Call `flush()` when a task ends.

Failures: connection errors, timeouts and 502/503/504 answers are retried with jittered
exponential backoff for at most `retry_s` seconds (tenacity), then `ScoreServiceUnavailable` is
raised. A request that may or may not have landed is sent again unchanged: the store counts a
leaf id once (its Lua keeps a marker per leaf id), so a retry never counts a leaf twice, and a
leaf stays queued until an answer confirms it, so none is lost. Other 4xx answers are errors of
this client or its settings and raise `ScoreServiceError` at once, with the service's message.

Parameters: `params()` reads GET /v1/params; `reconcile_params` decides what an actor uses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential, wait_random

from spo3.score_store.score_math import ScoreParams
from spo3.score_store.service import MAX_LEAVES_PER_REQUEST
from spo3.score_store.store import CommitResult, LeafOutcome, ScoreBatch, StoreStats
from spo3.transport.connection import StoreUnavailable
from spo3.transport.metrics import score_client_metrics

log = logging.getLogger("spo3.score_client")

_RETRY_STATUS = (502, 503, 504)


class ScoreServiceError(RuntimeError):
    """The score service refused a request (bad token, invalid or too large batch; not retried),
    or it serves another run than the actor's."""


class ScoreServiceUnavailable(StoreUnavailable):
    """The score service could not be reached (or kept answering 5xx) for the whole retry window."""


class ParamsMismatch(ValueError):
    """Score parameters given to the actor differ from the ones the score service serves."""


class _Transient(Exception):
    """A 502/503/504 answer: the service (or its Redis) is briefly away; retried."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}: {response.text[:300]}")


def _retryable(e: BaseException) -> bool:
    return isinstance(e, (httpx.TransportError, _Transient))


class ServiceScoreStore:
    """ScoreStore over the state-score service's HTTP API. One per thread (the leaf queue and the
    connection are not shared)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 2.0,
        retry_s: float = 30.0,
    ) -> None:
        """`url`: http(s)://host:port of `spo3 score-service`; `token`: its SPO3_API_TOKEN.
        `timeout_s`: per request (read/write); `retry_s`: how long transient failures are retried."""
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"score service url must start with http:// or https://, got {url!r}")
        if not token:
            raise ValueError(
                "no score service token: pass --score-token (the service's SPO3_API_TOKEN)"
            )
        self.url = url.rstrip("/")
        self.retry_s = retry_s
        self.pending: list[LeafOutcome] = []
        self.requests = 0
        self._metrics = score_client_metrics()
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )

    # --- transport ------------------------------------------------------------------------
    def _request(self, method: str, route: str, body: dict | None = None) -> dict:
        """One logical request: sent again (unchanged) on transient failures within retry_s."""
        m = self._metrics
        attempts = 0
        try:
            for attempt in Retrying(
                retry=retry_if_exception(_retryable),
                stop=stop_after_delay(self.retry_s),
                wait=wait_exponential(multiplier=0.05, max=2.0) + wait_random(0, 0.1),
                reraise=True,
            ):
                with attempt:
                    attempts += 1
                    self.requests += 1
                    m.requests.labels(route).inc()
                    start = time.perf_counter()
                    try:
                        r = self._http.request(method, route, json=body)
                    except httpx.TransportError:
                        m.errors.labels("transport").inc()
                        raise
                    finally:
                        m.latency.labels(route).observe(time.perf_counter() - start)
                    if r.status_code in _RETRY_STATUS:
                        m.errors.labels("unavailable").inc()
                        raise _Transient(r)
        except (httpx.TransportError, _Transient) as e:
            m.gave_up.inc()
            raise ScoreServiceUnavailable(
                f"score service at {self.url} unreachable: {method} {route} failed {attempts} times over "
                f"{self.retry_s:.0f} s ({type(e).__name__}: {e}). Is `spo3 score-service` running there "
                "(GET /healthz), and is its Redis up?"
            ) from e
        if r.status_code >= 400:
            m.errors.labels("refused").inc()
            hint = (
                " (--score-token must equal the service's SPO3_API_TOKEN)"
                if r.status_code == 401
                else ""
            )
            raise ScoreServiceError(
                f"score service at {self.url} refused {method} {route}: HTTP {r.status_code}"
                f"{hint}: {r.text[:500]}"
            )
        return r.json()

    def _batch(self, keys: Sequence[str]) -> tuple[list[CommitResult], ScoreBatch | None]:
        """Send the queued leaves (at most MAX_LEAVES_PER_REQUEST, oldest first) and score `keys`
        in one request. Leaves leave the queue only once the service has answered for them, so a
        failed request loses none; sent again, they are not counted twice."""
        leaves = self.pending[:MAX_LEAVES_PER_REQUEST]
        body = {"leaves": [x.model_dump() for x in leaves], "keys": list(keys)}
        out = self._request("POST", "/v1/batch", body)
        del self.pending[: len(leaves)]
        committed = [CommitResult.model_validate(c) for c in out["committed"]]
        scores = ScoreBatch.model_validate(out["scores"]) if out["scores"] is not None else None
        return committed, scores

    # --- the ScoreStore protocol -------------------------------------------------------------
    def scores(self, keys: Sequence[str]) -> ScoreBatch:
        if not keys:
            raise ValueError("scores() needs at least one key")
        while len(self.pending) > MAX_LEAVES_PER_REQUEST:
            self._batch(())
        _, batch = self._batch(keys)
        if batch is None:  # the service scores every key it is asked for
            raise ScoreServiceError(
                f"score service at {self.url} answered no scores for {len(keys)} keys"
            )
        return batch

    def commit_leaf(self, leaf_id: str, path: Sequence[str], success: float) -> CommitResult:
        """Queue one finished path; it is sent (and counted) with the next request."""
        self.pending.append(LeafOutcome(leaf_id=leaf_id, path=list(path), success=success))
        return CommitResult(counted=None, t=None)

    def commit_leaves(self, leaves: Sequence[LeafOutcome]) -> list[CommitResult]:
        """Send queued leaves and these now; returns these leaves' results."""
        self.pending.extend(leaves)
        committed = self.flush()
        return committed[len(committed) - len(leaves) :]

    def flush(self) -> list[CommitResult]:
        """Send every queued leaf now (no request when none); returns their results in order."""
        committed: list[CommitResult] = []
        while self.pending:
            committed += self._batch(())[0]
        return committed

    def stats(self) -> StoreStats:
        self.flush()
        return StoreStats.model_validate(self._request("GET", "/v1/stats"))

    # --- parameters ------------------------------------------------------------------------
    def params(self) -> ScoreParams:
        """The service's score parameters. Fields this actor's ScoreParams does not know are an
        error: the actor would compute rewards by another formula than the service's."""
        served = self._request("GET", "/v1/params")
        unknown = sorted(set(served) - set(ScoreParams.model_fields))
        if unknown:
            raise ParamsMismatch(
                f"score service at {self.url} serves parameters this actor does not know: "
                f"{', '.join(unknown)}; run an actor of the service's version"
            )
        return ScoreParams.model_validate(served)

    def served_run(self) -> str:
        """The run id whose statistics the service keeps (GET /v1/stats)."""
        return str(self._request("GET", "/v1/stats")["run"])

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServiceScoreStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def reconcile_params(
    local: ScoreParams, served: ScoreParams, *, source: str = "the score service"
) -> ScoreParams:
    """The parameters an actor runs with: always the service's (one source of truth per run).
    Fields set explicitly in `local` (pydantic's model_fields_set: given on the command line or in
    a config) must equal the served ones, else ParamsMismatch names each differing field."""
    differ = [f for f in sorted(local.model_fields_set) if getattr(local, f) != getattr(served, f)]
    if differ:
        detail = "; ".join(
            f"{f}: actor {getattr(local, f)!r}, service {getattr(served, f)!r}" for f in differ
        )
        raise ParamsMismatch(
            f"score parameters given to this actor differ from those of {source}: {detail}. "
            "Drop them from the actor's options (it takes the service's) or start the service "
            "with these values."
        )
    return served
