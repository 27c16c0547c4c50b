"""VLLMPolicy over several servers, against mock servers (httpx.MockTransport): requests are
spread, a server behind the newest version or unreachable is out of rotation, and back in once
it has caught up."""

from __future__ import annotations

import httpx

from spo3.policy.vllm_client import VLLMPolicy, policy_urls
from spo3.transport.contracts import ChatMessage, SamplingParams

MESSAGES = [ChatMessage(role="user", content="hi")]
PARAMS = SamplingParams(n=1, max_tokens=2, temperature=1.0)


class FakeServer:
    def __init__(self, version: int = 0) -> None:
        self.version, self.up, self.completions = version, True, 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        if not self.up:
            raise httpx.ConnectError("down", request=request)
        if request.url.path == "/weight_info":
            return httpx.Response(200, json={"weight_version": str(self.version)})
        self.completions += 1
        return httpx.Response(
            200,
            json={
                "choices": [
                    {
                        "message": {"content": "x"},
                        "token_ids": [1],
                        "logprobs": {"content": [{"logprob": -0.1}]},
                        "finish_reason": "stop",
                    }
                ],
                "prompt_token_ids": [5],
            },
        )


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


def test_requests_spread_and_a_server_behind_is_skipped_until_it_catches_up():
    a, b = FakeServer(3), FakeServer(3)
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


def test_an_unreachable_server_is_skipped_and_rejoins():
    a, b = FakeServer(1), FakeServer(1)
    p = policy_over([a, b])
    b.up = False
    assert all(p.sample(MESSAGES, PARAMS)[0].policy_version == 1 for _ in range(4))
    assert a.completions == 4 and p.in_rotation() == ["http://s0.invalid"]
    b.up = True
    p.refresh(force=True)
    assert len(p.in_rotation()) == 2
