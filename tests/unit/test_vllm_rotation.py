"""VLLMPolicy over several servers, against mock servers (httpx.MockTransport): requests are
spread, a server behind the newest version or unreachable is out of rotation, and back in once
it has caught up."""

from __future__ import annotations

import httpx
import pytest

from spo3.policy.vllm_client import VLLMPolicy, policy_urls
from spo3.transport.contracts import ChatMessage, SamplingParams

MESSAGES = [ChatMessage(role="user", content="hi")]
PARAMS = SamplingParams(n=1, max_tokens=2, temperature=1.0)


class FakeServer:
    """/weight_info and /v1/chat/completions (404 to anything else, as a vLLM without the
    token-in/token-out routes); with `tokens`, render and generate too, as a vLLM started with
    --enable-scale-out."""

    def __init__(self, version: int = 0, tokens: bool = False) -> None:
        self.version, self.up, self.completions, self.tokens = version, True, 0, tokens

    def handler(self, request: httpx.Request) -> httpx.Response:
        if not self.up:
            raise httpx.ConnectError("down", request=request)
        path = request.url.path
        if path == "/weight_info":
            return httpx.Response(200, json={"weight_version": str(self.version)})
        choice = {
            "token_ids": [1],
            "logprobs": {"content": [{"logprob": -0.1}]},
            "finish_reason": "stop",
        }
        if path == "/v1/chat/completions":
            self.completions += 1
            return httpx.Response(
                200,
                json={
                    "choices": [{"message": {"content": "x"}, **choice}],
                    "prompt_token_ids": [5],
                },
            )
        if self.tokens and path == "/v1/chat/completions/render":
            return httpx.Response(200, json={"token_ids": [5], "sampling_params": {"n": 1}})
        if self.tokens and path == "/inference/v1/generate":
            self.completions += 1
            span = {"version": str(self.version), "start": 0, "end": 1}
            return httpx.Response(
                200, json={"choices": [{"text": "x", "weight_versions": [span], **choice}]}
            )
        return httpx.Response(404, json={"detail": "Not Found"})


def policy_over(fakes: list[FakeServer]) -> VLLMPolicy:
    urls = [f"http://s{i}.invalid" for i in range(len(fakes))]
    p = VLLMPolicy(",".join(urls), health_every_s=0.0, timeout_s=1, attempts=1)
    for url, fake in zip(urls, fakes):
        p.servers[url].http._client = httpx.Client(
            base_url=url, transport=httpx.MockTransport(fake.handler)
        )
    return p


def test_urls_from_a_list_or_a_comma_separated_string():
    assert policy_urls("http://a:1, http://b:2/") == ["http://a:1", "http://b:2"]
    assert policy_urls(["http://a:1", "http://b:2,http://c:3"]) == [
        "http://a:1",
        "http://b:2",
        "http://c:3",
    ]


@pytest.mark.parametrize("tokens", [False, True], ids=["three_calls", "render_generate"])
def test_requests_spread_and_a_server_behind_is_skipped_until_it_catches_up(tokens):
    a, b = FakeServer(3, tokens), FakeServer(3, tokens)
    p = policy_over([a, b])
    for _ in range(10):
        assert p.sample(MESSAGES, PARAMS)[0].policy_version == 3
    assert a.completions == b.completions == 5
    a.version = 4  # b missed the publish of version 4
    p.refresh(force=True)
    assert p.in_rotation() == ["http://s0.invalid"]
    before = b.completions
    assert all(p.sample(MESSAGES, PARAMS)[0].policy_version == 4 for _ in range(6))
    assert b.completions == before
    b.version = 4  # the next publish reached it
    p.refresh(force=True)
    assert len(p.in_rotation()) == 2
    p.sample(MESSAGES, PARAMS), p.sample(MESSAGES, PARAMS)
    assert b.completions > before


@pytest.mark.parametrize("tokens", [False, True], ids=["three_calls", "render_generate"])
def test_an_unreachable_server_is_skipped_and_rejoins(tokens):
    a, b = FakeServer(1, tokens), FakeServer(1, tokens)
    p = policy_over([a, b])
    b.up = False
    assert all(p.sample(MESSAGES, PARAMS)[0].policy_version == 1 for _ in range(4))
    assert a.completions == 4 and p.in_rotation() == ["http://s0.invalid"]
    b.up = True
    p.refresh(force=True)
    assert len(p.in_rotation()) == 2
