"""How VLLMPolicy samples, against mock servers (httpx.MockTransport): two calls (render +
generate) where the server has vLLM's token-in/token-out routes, the version read from the
weight_versions of the output tokens; the three-call path (GET /weight_info around POST
/v1/chat/completions) where it has not, found once per server."""

from __future__ import annotations

import logging

import httpx
import pytest

from spo3.policy.interface import PolicyError
from spo3.policy.vllm_client import VLLMPolicy
from spo3.transport.contracts import ChatMessage, SamplingParams
from spo3.transport.metrics import policy_client_metrics

MESSAGES = [ChatMessage(role="user", content="hi")]
PARAMS = SamplingParams(n=2, max_tokens=3, temperature=1.0)
URL = "http://policy.invalid"
PROMPT = [7, 8, 9]


class Server:
    """A vLLM as this client sees it. `routes`: 'tokens' (started with --enable-scale-out),
    'disabled' (vLLM's 403 stub without the flag), 'missing' (404: an older vLLM, or a proxy
    that does not pass them), 'unversioned' (a generate route without weight_versions), 'old'
    (one that answers token ids only: no versions, no text, no logprobs).
    `spans`: the weight versions each generate labels its completions' 3 tokens with."""

    def __init__(self, routes: str = "tokens", version: int = 4) -> None:
        self.routes, self.version = routes, version
        self.spans: list[list[tuple[int, int, int]]] = []
        self.calls: list[str] = []
        self.bodies: dict[str, dict] = {}

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls.append(f"{request.method} {path}")
        if request.content:
            self.bodies[path] = httpx.Response(200, content=request.content).json()
        choice = {
            "token_ids": [1, 2, 3],
            "logprobs": {"content": [{"logprob": -0.5}, {"logprob": -0.25}, {"logprob": 0.0}]},
            "finish_reason": "length",
        }
        if path == "/weight_info":
            return httpx.Response(200, json={"weight_version": str(self.version)})
        if path == "/v1/chat/completions":
            n = self.bodies[path]["n"]
            return httpx.Response(
                200,
                json={
                    "choices": [{"message": {"content": "abc"}, **choice}] * n,
                    "prompt_token_ids": PROMPT,
                },
            )
        if path in ("/v1/chat/completions/render", "/inference/v1/generate"):
            if self.routes == "missing":
                return httpx.Response(404, json={"detail": "Not Found"})
            if self.routes == "disabled":
                message = (
                    "Scale-out endpoints are disabled. Restart vllm serve with --enable-scale-out"
                )
                return httpx.Response(
                    403, json={"error": {"message": message, "type": "PermissionDeniedError"}}
                )
        if path == "/v1/chat/completions/render":
            body = self.bodies[path]
            params = {"n": body["n"], "temperature": body["temperature"], "logprobs": 0}
            return httpx.Response(
                200,
                json={"request_id": "chatcmpl-1", "token_ids": PROMPT, "sampling_params": params},
            )
        if path == "/inference/v1/generate":
            n = self.bodies[path]["sampling_params"]["n"]
            spans = self.spans.pop(0) if self.spans else [(self.version, 0, 3)]
            versions = [{"version": str(v), "start": s, "end": e} for v, s, e in spans]
            if self.routes == "old":  # a generate route of its own time: tokens, nothing else
                bare = {"index": 0, "token_ids": [1, 2, 3], "finish_reason": "length"}
                return httpx.Response(200, json={"choices": [bare] * n})
            if self.routes == "unversioned":
                versions = None
            return httpx.Response(
                200,
                json={
                    "output_mode": "text",
                    "choices": [
                        {"index": i, "text": "abc", "weight_versions": versions, **choice}
                        for i in range(n)
                    ],
                },
            )
        return httpx.Response(404, json={"detail": "Not Found"})


def policy_on(server: Server, **kw) -> VLLMPolicy:
    p = VLLMPolicy(URL, **kw)
    p.http._client = httpx.Client(base_url=URL, transport=httpx.MockTransport(server.handler))
    p.refresh(force=True)  # the health check, so that sampling counts sampling calls only
    server.calls.clear()
    return p


def test_two_calls_render_then_generate_and_the_version_of_the_tokens():
    server = Server(version=4)
    p = policy_on(server)
    outs = p.sample(MESSAGES, PARAMS)
    assert server.calls == ["POST /v1/chat/completions/render", "POST /inference/v1/generate"]
    assert len(outs) == 2
    for c in outs:
        assert (c.text, c.token_ids, c.logprobs) == ("abc", [1, 2, 3], [-0.5, -0.25, 0.0])
        assert (c.policy_version, c.prompt_token_ids, c.finish_reason) == (4, PROMPT, "length")
    # the rendered request goes to generate as it came, asking for text, named by vLLM
    sent = server.bodies["/inference/v1/generate"]
    assert sent["token_ids"] == PROMPT and sent["sampling_params"]["n"] == 2
    assert sent["output_mode"] == "text" and "request_id" not in sent
    # the chat request rendered is the one the three-call path would post
    assert server.bodies["/v1/chat/completions/render"]["logprobs"] is True
    # greedy: one sample, copied n times, still two calls
    server.calls.clear()
    greedy = p.sample(MESSAGES, SamplingParams(n=3, max_tokens=3, temperature=0.0))
    assert len(greedy) == 3 and len(server.calls) == 2


def test_tokens_of_two_versions_are_sampled_again_without_rendering_again():
    server = Server(version=5)
    server.spans = [[(4, 0, 1), (5, 1, 3)]]  # a publish let the first generation run on
    p = policy_on(server)
    outs = p.sample(MESSAGES, PARAMS)
    assert {c.policy_version for c in outs} == {5}
    assert server.calls == [
        "POST /v1/chat/completions/render",
        "POST /inference/v1/generate",
        "POST /inference/v1/generate",
    ]
    resamples = policy_client_metrics().resamples
    before = resamples._value.get()
    server.spans = [[(5, 0, 1), (6, 1, 3)]] * 10
    with pytest.raises(PolicyError, match="weights changed during each of 5 attempts"):
        p.sample(MESSAGES, PARAMS)
    assert resamples._value.get() - before >= 5  # every attempt counted


def test_completions_without_tokens_take_the_servers_known_version():
    """Nothing to label and nothing to train on: the version the server last reported."""
    server = Server(version=6)
    p = policy_on(server)

    def empty(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/inference/v1/generate":
            server.calls.append("POST /inference/v1/generate")
            c = {"index": 0, "text": "", "token_ids": [], "logprobs": {"content": []}}
            return httpx.Response(200, json={"choices": [{**c, "weight_versions": []}] * 2})
        return server.handler(request)

    p.http._client = httpx.Client(base_url=URL, transport=httpx.MockTransport(empty))
    outs = p.sample(MESSAGES, PARAMS)
    assert [(c.token_ids, c.policy_version) for c in outs] == [([], 6), ([], 6)]


def test_spans_that_do_not_cover_the_tokens_are_malformed():
    server = Server()
    server.spans = [[(4, 0, 2)]]
    with pytest.raises(PolicyError, match="do not cover its 3 tokens"):
        policy_on(server).sample(MESSAGES, PARAMS)


@pytest.mark.parametrize("routes", ["missing", "disabled", "unversioned", "old"])
def test_a_server_without_the_routes_is_sampled_with_three_calls_found_once(routes, caplog):
    server = Server(routes, version=3)
    p = policy_on(server)
    with caplog.at_level(logging.WARNING, logger="spo3.policy"):
        first = p.sample(MESSAGES, PARAMS)
        server.calls.clear()
        for _ in range(3):
            again = p.sample(MESSAGES, PARAMS)
    three = ["GET /weight_info", "POST /v1/chat/completions", "GET /weight_info"]
    assert server.calls == three * 3  # the routes are not tried again
    for c in first + again:
        assert (c.text, c.token_ids, c.logprobs) == ("abc", [1, 2, 3], [-0.5, -0.25, 0.0])
        assert (c.policy_version, c.prompt_token_ids) == (3, PROMPT)
    warnings = [r for r in caplog.records if "sampling with three calls" in r.getMessage()]
    assert len(warnings) == 1 and URL in warnings[0].getMessage()


def test_an_unknown_model_is_an_error_not_a_missing_route():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/weight_info":
            return httpx.Response(200, json={"weight_version": "1"})
        message = "The model `policy` does not exist."
        return httpx.Response(404, json={"error": {"message": message, "type": "NotFoundError"}})

    p = VLLMPolicy(URL)
    p.http._client = httpx.Client(base_url=URL, transport=httpx.MockTransport(handler))
    with pytest.raises(PolicyError, match="404 to POST /v1/chat/completions/render.*not exist"):
        p.sample(MESSAGES, PARAMS)
    assert next(iter(p.servers.values())).tokens_route is None
