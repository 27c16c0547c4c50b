"""The HTTP service on a real Redis: auth, validation with named fields, scores, failures."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from spo3.score_store.score_math import Counts, ScoreParams, state_score
from spo3.score_store.service import (
    MAX_BODY_BYTES,
    MAX_KEY_LENGTH,
    MAX_KEYS_PER_REQUEST,
    MAX_LEAVES_PER_REQUEST,
    ServiceSettings,
    create_app,
)
from spo3.transport.connection import LocalRedisServer

pytestmark = pytest.mark.redis

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(redis_url):
    app = create_app(ServiceSettings(redis_url=redis_url, api_token=TOKEN, run="svc"))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def commit(client, leaf_id, path, success, headers=AUTH):
    return client.post(
        "/v1/leaves", json={"leaf_id": leaf_id, "path": path, "success": success}, headers=headers
    )


def test_refuses_to_start_without_token(redis_url, monkeypatch):
    monkeypatch.delenv("SPO3_API_TOKEN", raising=False)
    with pytest.raises(ValueError, match="SPO3_API_TOKEN"):
        create_app(ServiceSettings(redis_url=redis_url))


def test_settings_come_from_environment(monkeypatch, redis_url):
    monkeypatch.setenv("SPO3_ALPHA", "50")
    monkeypatch.setenv("SPO3_XI", "3")
    monkeypatch.setenv("SPO3_API_TOKEN", "from-env")
    s = ServiceSettings(redis_url=redis_url)
    assert (s.score_params.alpha, s.score_params.xi) == (50.0, 3)
    with TestClient(create_app(s)) as c:
        assert (
            commit(c, "l", ["r"], 1.0, headers={"Authorization": "Bearer from-env"}).status_code
            == 200
        )


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic dGVzdA=="},
        {"Authorization": f"bearer{TOKEN}"},
    ],
)
def test_mutating_route_needs_the_token(client, headers):
    r = commit(client, "l1", ["r", "a"], 1.0, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/stats").json()["t"] == 1  # nothing counted


def test_commit_and_scores_round_trip(client):
    assert commit(client, "l1", ["r", "a", "a"], 1.0).json() == {"counted": True, "t": 2}
    assert commit(client, "l1", ["r", "a"], 1.0).json() == {"counted": False, "t": 2}
    assert commit(client, "l2", ["r", "b"], 0).json() == {"counted": True, "t": 3}
    body = client.post("/v1/scores", json={"keys": ["b", "a", "new", "a"]}).json()
    assert body["t"] == 3
    assert [s["key"] for s in body["scores"]] == ["b", "a", "new", "a"]  # request order
    expect_a = state_score(Counts(1, 1), 3, ServiceSettings(api_token="x").score_params)
    a = body["scores"][1]
    assert (a["n_total"], a["n_success"]) == (1, 1)
    assert a["score"] == pytest.approx(expect_a, rel=1e-12)
    assert a["n_rollouts"] == 3  # S = exp(-ln 3 * 1/(1+1e-6)) = 0.33333; ceil(8 * 0.33333) = 3
    assert body["scores"][2] == {
        "key": "new",
        "score": 1.0,
        "n_rollouts": 8,
        "n_total": 0,
        "n_success": 0,
    }
    stats = client.get("/v1/stats").json()
    assert stats["n_states"] == 3 and stats["duplicate_commits"] == 1 and stats["run"] == "svc"


@pytest.mark.parametrize(
    "body,field,status",
    [
        ({"keys": []}, "keys", 422),
        ({"keys": [""]}, "keys.0", 422),
        ({"keys": ["a", "x" * (MAX_KEY_LENGTH + 1)]}, "keys.1", 422),
        ({"keys": ["k"] * (MAX_KEYS_PER_REQUEST + 1)}, "keys", 413),
        ({"keys": [1, 2]}, "keys.0", 422),
        ({"keys": "abc"}, "keys", 422),
        ({"key": ["a"]}, "keys", 422),
        ({"keys": ["a"], "extra": 1}, "extra", 422),
    ],
)
def test_bad_score_requests_name_the_field(client, body, field, status):
    r = client.post("/v1/scores", json=body)
    assert r.status_code == status, r.text
    assert field in r.json()["fields"], r.json()


@pytest.mark.parametrize(
    "raw,field,status",
    [
        ('{"leaf_id": "l", "path": ["r"], "success": NaN}', "success", 422),
        ('{"leaf_id": "l", "path": ["r"], "success": Infinity}', "success", 422),
        ('{"leaf_id": "l", "path": ["r"], "success": 1.5}', "success", 422),
        ('{"leaf_id": "l", "path": ["r"], "success": -0.1}', "success", 422),
        ('{"leaf_id": "l", "path": ["r"], "success": true}', "success", 422),
        ('{"leaf_id": "l", "path": ["r"], "success": "1"}', "success", 422),
        ('{"leaf_id": "l", "path": [], "success": 1}', "path", 422),
        ('{"leaf_id": "", "path": ["r"], "success": 1}', "leaf_id", 422),
        ('{"path": ["r"], "success": 1}', "leaf_id", 422),
        ('{"leaf_id": "l", "path": ["r", null], "success": 1}', "path.1", 422),
        ('{"leaf_id": "l", "path": ' + json.dumps(["s"] * 1025) + ', "success": 1}', "path", 413),
        ("not json", "body", 422),
        ("[1, 2]", "body", 422),
    ],
)
def test_bad_leaf_requests_name_the_field_and_change_nothing(client, raw, field, status):
    r = client.post("/v1/leaves", content=raw, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == status, r.text
    assert any(
        f == field or f.startswith(field + ".") or field == "body" for f in r.json()["fields"]
    ), r.json()
    stats = client.get("/v1/stats").json()
    assert (stats["t"], stats["n_states"]) == (1, 0)


def test_batch_commits_leaves_then_scores_in_one_request(client):
    leaves = [
        {"leaf_id": "b1", "path": ["r", "a"], "success": 1.0},
        {"leaf_id": "b2", "path": ["r", "b"], "success": 0.0},
        {"leaf_id": "b1", "path": ["r", "a"], "success": 1.0},
    ]  # a retry of b1 in the same batch
    body = client.post(
        "/v1/batch", json={"leaves": leaves, "keys": ["a", "b", "c"]}, headers=AUTH
    ).json()
    assert body["committed"] == [
        {"counted": True, "t": 2},
        {"counted": True, "t": 3},
        {"counted": False, "t": 3},
    ]
    assert body["scores"]["t"] == 3  # the scores include this request's leaves
    assert [(s["key"], s["n_total"], s["n_success"]) for s in body["scores"]["scores"]] == [
        ("a", 1, 1),
        ("b", 1, 0),
        ("c", 0, 0),
    ]
    only_leaves = client.post("/v1/batch", json={"leaves": leaves[:1]}, headers=AUTH).json()
    assert only_leaves == {"committed": [{"counted": False, "t": 3}], "scores": None}
    assert client.post("/v1/batch", json={"keys": ["a"]}, headers=AUTH).json()["committed"] == []
    text = client.get("/metrics").text
    assert (
        'spo3_score_leaves_total{counted="false"} 2.0' in text
        and "spo3_score_keys_scored_total 4.0" in text
    )


@pytest.mark.parametrize(
    "body,field,status",
    [
        (
            {
                "leaves": [{"leaf_id": "l", "path": ["r"], "success": 1}]
                * (MAX_LEAVES_PER_REQUEST + 1)
            },
            "leaves",
            413,
        ),
        ({"keys": ["k"] * (MAX_KEYS_PER_REQUEST + 1)}, "keys", 413),
        ({"leaves": [{"leaf_id": "l", "path": ["s"] * 1025, "success": 1}]}, "leaves.0.path", 413),
        (
            {
                "leaves": [
                    {"leaf_id": "ok", "path": ["r"], "success": 1},
                    {"leaf_id": "l", "path": ["r"], "success": 2},
                ]
            },
            "leaves.1.success",
            422,
        ),
        ({"leaves": [{"leaf_id": "l", "path": [], "success": 1}]}, "leaves.0.path", 422),
        ({"keys": [""]}, "keys.0", 422),
        ({"leaves": [], "keys": ["a"], "extra": 1}, "extra", 422),
    ],
)
def test_bad_batches_name_the_field_and_change_nothing(client, body, field, status):
    r = client.post("/v1/batch", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert field in r.json()["fields"], r.json()
    stats = client.get("/v1/stats").json()
    assert (stats["t"], stats["n_states"]) == (1, 0)  # not even the valid first leaf counted


def test_batch_needs_the_token(client):
    r = client.post("/v1/batch", json={"leaves": [{"leaf_id": "l", "path": ["r"], "success": 1}]})
    assert r.status_code == 401 and client.get("/v1/stats").json()["t"] == 1


def test_params_serve_the_whole_model(redis_url):
    settings = ServiceSettings(redis_url=redis_url, api_token=TOKEN, alpha=50, xi=3)
    with TestClient(create_app(settings)) as c:
        served = c.get("/v1/params").json()
    assert set(served) == set(ScoreParams.model_fields)  # every field, including ones added later
    assert ScoreParams.model_validate(served) == settings.score_params
    assert (served["alpha"], served["xi"]) == (50.0, 3)


def test_oversized_body_is_refused_before_parsing(client):
    big = json.dumps({"keys": ["k" * 200] * (MAX_BODY_BYTES // 200 + 10)})
    r = client.post("/v1/scores", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["fields"] == ["body"]


def test_health_metrics_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    commit(client, "m", ["r", "a"], 1.0)
    client.post("/v1/scores", json={"keys": ["a"]})
    text = client.get("/metrics").text
    assert 'spo3_score_requests_total{route="/v1/leaves",status="200"} 1.0' in text
    assert "spo3_score_keys_scored_total 1.0" in text
    assert "spo3_store_leaves 1.0" in text
    schema = client.get("/openapi.json").json()
    assert {"/v1/scores", "/v1/leaves", "/v1/stats", "/healthz"} <= set(schema["paths"])


def test_redis_down_gives_503_not_a_crash():
    srv = LocalRedisServer().start()
    app = create_app(ServiceSettings(redis_url=srv.url, api_token=TOKEN))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.post("/v1/scores", json={"keys": ["a"]}).status_code == 200
        srv.stop()
        r = c.post("/v1/scores", json={"keys": ["a"]})
        assert r.status_code == 503 and "unreachable" in r.json()["detail"]
        assert commit(c, "l", ["r"], 1.0).status_code == 503
        assert "spo3_score_store_errors_total 2.0" in c.get("/metrics").text


def test_embedded_redis_when_no_url():
    app = create_app(ServiceSettings(redis_url="", api_token=TOKEN))
    with TestClient(app) as c:
        assert commit(c, "l", ["r", "a"], 1.0).json()["counted"] is True
        assert c.post("/v1/scores", json={"keys": ["a"]}).json()["scores"][0]["n_total"] == 1
