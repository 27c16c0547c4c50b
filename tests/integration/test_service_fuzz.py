"""Property-based fuzzing of the service from its own OpenAPI schema (schemathesis).

Every generated request, valid or not, must get a non-5xx answer that matches the schema,
and a request that was rejected must not have changed any count.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import negative_data_rejection

from spo3.score_store.service import create_app
from spo3.score_store.settings import ServiceSettings
from spo3.transport.connection import LocalRedisServer

pytestmark = [pytest.mark.redis, pytest.mark.slow]

TOKEN = "fuzz-token"
# The app is built at import (it connects to Redis lazily) so schemathesis can read its schema;
# the real redis-server behind it runs for this module only.
_server = LocalRedisServer()
_app = create_app(ServiceSettings(redis_url=_server.url, api_token=TOKEN, run="fuzz"))
schema = schemathesis.openapi.from_asgi("/openapi.json", _app)


@pytest.fixture(scope="module", autouse=True)
def _redis():
    _server.start()
    yield
    _server.stop()


def _schema_violating(case) -> bool:
    """Negative mode sometimes produces data the schema still accepts; only a body that our
    request models refuse must be rejected."""
    from pydantic import ValidationError

    from spo3.score_store.service import BatchRequest, LeafRequest, ScoresRequest

    model = {"/v1/scores": ScoresRequest, "/v1/leaves": LeafRequest, "/v1/batch": BatchRequest}.get(
        case.path
    )
    if model is None:
        return False
    try:
        model.model_validate(case.body, strict=False)
    except ValidationError:
        return True
    return False


def _counts(app):
    s = app.state.get_store().stats()
    return (s.t, s.n_states, s.leaves_counted)


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_rejections_change_nothing(case):
    app = _app
    before = _counts(app)
    # Our own rule replaces schemathesis' negative-data check: it does not count 413
    # (batch too large) as a rejection, and we do.
    response = case.call_and_validate(
        headers={"Authorization": f"Bearer {TOKEN}"}, excluded_checks=[negative_data_rejection]
    )
    assert response.status_code < 500, response.text
    if (
        case.meta is not None
        and case.meta.generation.mode.name == "NEGATIVE"
        and case.path != "/healthz"
    ):
        assert 400 <= response.status_code < 500 or not _schema_violating(case), response.text
    if response.status_code >= 400:
        assert _counts(app) == before, (
            f"{case.method} {case.path} -> {response.status_code} changed counts"
        )


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_without_token_nothing_changes(case):
    app = _app
    before = _counts(app)
    response = case.call()
    assert response.status_code < 500, response.text
    if case.path in ("/v1/leaves", "/v1/batch") and case.method.upper() == "POST":
        assert response.status_code in (400, 401, 413, 422)
    assert _counts(app) == before
