"""The state-score HTTP service: FastAPI in front of the Redis score store.

Routes: POST /v1/scores, POST /v1/leaves and POST /v1/batch (bearer token), GET /v1/params,
GET /v1/stats, /healthz, /metrics. Actors use /v1/batch (the leaves they finished since their last
call, then the scores they need: one round trip) and take their parameters from /v1/params, so
the service is the one source of truth for both.
Every input is validated before it reaches Redis, so no request can crash the service or
change a count unless it is a well-formed, authorized commit.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException

from spo3.score_store.score_math import ScoreParams
from spo3.score_store.settings import ServiceSettings
from spo3.score_store.store import (
    CommitResult,
    LeafOutcome,
    RedisScoreStore,
    ScoreBatch,
    StoreStats,
)
from spo3.transport.connection import EmbeddedRedis, StoreUnavailable, check_reachable, connect
from spo3.transport.metrics import ScoreServiceMetrics

MAX_KEYS_PER_REQUEST = 4096
MAX_PATH_LENGTH = 1024
MAX_KEY_LENGTH = 256
MAX_LEAVES_PER_REQUEST = 256
MAX_BODY_BYTES = 2 * 1024 * 1024


StateKeyStr = Annotated[str, StringConstraints(min_length=1, max_length=MAX_KEY_LENGTH)]


class ScoresRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[StateKeyStr] = Field(min_length=1, max_length=MAX_KEYS_PER_REQUEST)


class LeafRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    leaf_id: Annotated[str, StringConstraints(min_length=1, max_length=MAX_KEY_LENGTH)]
    path: list[StateKeyStr] = Field(min_length=1, max_length=MAX_PATH_LENGTH)
    success: float = Field(ge=0.0, le=1.0, allow_inf_nan=False, strict=True)


class BatchRequest(BaseModel):
    """What an actor sends once per expansion: the leaves it finished since its last call, then
    the states it needs scored (both may be empty)."""

    model_config = ConfigDict(extra="forbid")
    leaves: list[LeafRequest] = Field(
        default_factory=list,
        max_length=MAX_LEAVES_PER_REQUEST,
        description="Finished root-to-leaf paths, committed in this order (idempotent per leaf_id).",
    )
    keys: list[StateKeyStr] = Field(
        default_factory=list,
        max_length=MAX_KEYS_PER_REQUEST,
        description="States to score after the leaves are counted (the scores include those leaves).",
    )


class BatchResponse(BaseModel):
    committed: list[CommitResult] = Field(description="One result per leaf, in request order.")
    scores: ScoreBatch | None = Field(
        description="Scores of `keys` in request order; null when none were asked."
    )


class ErrorBody(BaseModel):
    detail: str | list[dict]
    fields: list[str] = []
    message: str | None = None


class StatsResponse(StoreStats):
    run: str
    params: ScoreParams


def _field_names(errors) -> list[str]:
    names = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        names.append(".".join(loc) or "body")
    return names


class _BodyLimit:
    """ASGI middleware: refuse bodies over MAX_BODY_BYTES with 413 before they are parsed."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._reject(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope, receive, send):
        resp = JSONResponse(
            status_code=413,
            content={"detail": f"request body over {self.max_bytes} bytes", "fields": ["body"]},
        )
        await resp(scope, receive, send)


class _TooLarge(Exception):
    pass


class _Observe:
    """ASGI middleware: count and time every request by route template and status. Plain ASGI
    (not @app.middleware, which runs each request through an extra task and stream)."""

    def __init__(self, app, metrics: ScoreServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = scope.get("route")
            label = route.path if route is not None else "unmatched"
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)


class _Service:
    """What the routes share: the settings, the store (connected on first use), the metrics."""

    def __init__(self, settings: ServiceSettings, store: RedisScoreStore | None) -> None:
        if settings.api_token is None or not settings.api_token.get_secret_value():
            raise ValueError(
                "no API token: set SPO3_API_TOKEN (or pass --token) so that mutating routes are protected"
            )
        self.settings = settings
        self.token = settings.api_token.get_secret_value().encode()
        self.registry = CollectorRegistry()
        self.store = store
        self.embedded: EmbeddedRedis | None = None
        self.lock = threading.Lock()
        self.metrics = ScoreServiceMetrics(self.registry, lambda: self.get_store().stats())

    def get_store(self) -> RedisScoreStore:
        if self.store is None:
            with self.lock:
                if self.store is None:
                    settings = self.settings
                    url = settings.redis_url
                    if not url:
                        self.embedded = EmbeddedRedis()
                        url = self.embedded.url
                    client = connect(url)
                    check_reachable(client, url)
                    self.store = RedisScoreStore(
                        client,
                        settings.score_params,
                        run=settings.run,
                        success_threshold=settings.success_threshold,
                        leaf_ttl_s=settings.leaf_ttl_s,
                    )
        return self.store


def create_app(
    settings: ServiceSettings | None = None, store: RedisScoreStore | None = None
) -> FastAPI:
    """Build the service. Without `store`, it connects to settings.redis_url on first use
    (or starts an embedded Redis when that is empty)."""
    svc = _Service(settings or ServiceSettings(), store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if svc.embedded is not None:
            svc.embedded.close()

    app = FastAPI(
        title="3SPO state-score service", version="1", lifespan=lifespan, description=__doc__
    )

    app.add_middleware(_BodyLimit)
    app.add_middleware(_Observe, metrics=svc.metrics)  # outermost: it times the body limit too
    _add_error_handlers(app, svc.metrics)
    _add_store_routes(app, svc)
    _add_info_routes(app, svc)
    app.state.get_store = svc.get_store
    return app


def _add_error_handlers(app: FastAPI, metrics: ScoreServiceMetrics) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        fields = _field_names(errors)
        # A list over its bound (keys, leaves, a leaf's path) is a batch too large: 413.
        too_many = any(e.get("type") == "too_long" for e in errors)
        detail = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
            for e in errors
        ]
        return JSONResponse(
            status_code=413 if too_many else 422,
            content={
                "detail": detail,
                "fields": fields,
                "message": "invalid field(s): " + ", ".join(fields),
            },
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers 400 for bodies it cannot decode; say which field that is.
        content: dict[str, object] = {"detail": exc.detail}
        if exc.status_code == 400:
            content |= {
                "fields": ["body"],
                "message": "invalid field(s): body (not decodable JSON)",
            }
        return JSONResponse(status_code=exc.status_code, content=content, headers=exc.headers)

    @app.exception_handler(_Unauthorized)
    async def unauthorized(_: Request, __: Exception) -> JSONResponse:
        return JSONResponse(
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
            content={
                "detail": "missing or wrong bearer token (Authorization: Bearer $SPO3_API_TOKEN)"
            },
        )

    @app.exception_handler(StoreUnavailable)
    async def unavailable(_: Request, exc: StoreUnavailable) -> JSONResponse:
        metrics.store_errors.inc()
        return JSONResponse(
            status_code=503, headers={"Retry-After": "1"}, content={"detail": str(exc)}
        )


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Body is not decodable JSON"},
    413: {"model": ErrorBody, "description": "Batch or body too large"},
    422: {"model": ErrorBody, "description": "Invalid field(s), named in `fields`"},
    503: {"model": ErrorBody, "description": "Redis unreachable after retries"},
}
_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    401: {"model": ErrorBody, "description": "Missing or wrong bearer token"},
}


def _add_store_routes(app: FastAPI, svc: _Service) -> None:
    """The routes that read or count states: /v1/scores, /v1/leaves, /v1/batch."""
    metrics = svc.metrics
    bearer = HTTPBearer(auto_error=False, description="SPO3_API_TOKEN of the service")

    def require_token(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if cred is None or not secrets.compare_digest(cred.credentials.encode(), svc.token):
            raise _Unauthorized()

    @app.post(
        "/v1/scores",
        response_model=ScoreBatch,
        summary="Scores and n(s) of many states",
        responses=_ERRORS,
    )
    def scores(body: ScoresRequest) -> ScoreBatch:
        batch = svc.get_store().scores(body.keys)
        metrics.keys_scored.inc(len(body.keys))
        return batch

    @app.post(
        "/v1/leaves",
        response_model=CommitResult,
        dependencies=[Depends(require_token)],
        summary="Count one finished root-to-leaf path (idempotent per leaf_id)",
        responses=_AUTH_ERRORS,
    )
    def leaves(body: LeafRequest) -> CommitResult:
        result = svc.get_store().commit_leaf(body.leaf_id, body.path, body.success)
        metrics.leaves.labels(str(result.counted).lower()).inc()
        return result

    @app.post(
        "/v1/batch",
        response_model=BatchResponse,
        dependencies=[Depends(require_token)],
        summary="Commit leaves (idempotent per leaf_id), then score states: one round trip per expansion",
        responses=_AUTH_ERRORS,
    )
    def batch(body: BatchRequest) -> BatchResponse:
        store = svc.get_store()
        committed = (
            store.commit_leaves(
                [
                    LeafOutcome(leaf_id=x.leaf_id, path=x.path, success=x.success)
                    for x in body.leaves
                ]
            )
            if body.leaves
            else []
        )
        for result in committed:
            metrics.leaves.labels(str(result.counted).lower()).inc()
        scores = store.scores(body.keys) if body.keys else None
        metrics.keys_scored.inc(len(body.keys))
        return BatchResponse(committed=committed, scores=scores)


def _add_info_routes(app: FastAPI, svc: _Service) -> None:
    """The read-only routes: /v1/params, /v1/stats, /healthz, /metrics."""
    settings = svc.settings

    @app.get(
        "/v1/params",
        response_model=ScoreParams,
        summary="The score parameters of this run (actors take theirs from here)",
    )
    def params() -> ScoreParams:
        return settings.score_params

    @app.get("/v1/stats", response_model=StatsResponse, responses={503: _ERRORS[503]})
    def stats() -> StatsResponse:
        s = svc.get_store().stats()
        return StatsResponse(**s.model_dump(), run=settings.run, params=settings.score_params)

    @app.get("/healthz", responses={503: _ERRORS[503]})
    def healthz() -> dict:
        svc.get_store().client.ping()
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(svc.registry), media_type=CONTENT_TYPE_LATEST)


class _Unauthorized(Exception):
    pass
