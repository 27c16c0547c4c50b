"""Contract every Policy engine must meet; run by tests for the in-process engine and vLLM.

`reference` is a transformers model of the same weights, used to recompute logprobs of the
token ids an engine returned: the engine's logprobs must agree with it.
"""

from __future__ import annotations

import torch

from spo3.transport.contracts import ChatMessage, SamplingParams

MESSAGES = [
    ChatMessage(role="system", content="You are an agent in a text game."),
    ChatMessage(role="user", content="You are in the kitchen. You see a fridge. Exits: north."),
]


def recompute_logprobs(model, prompt_ids: list[int], token_ids: list[int]) -> list[float]:
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return (
        logits.log_softmax(-1)
        .gather(-1, torch.tensor(token_ids).unsqueeze(-1))
        .squeeze(-1)
        .tolist()
    )


def check_n_samples_with_ids_and_logprobs(policy, reference, tol: float) -> None:
    outs = policy.sample(MESSAGES, SamplingParams(n=4, max_tokens=12, temperature=1.0, seed=7))
    assert len(outs) == 4
    for c in outs:
        assert 1 <= len(c.token_ids) <= 12
        assert len(c.logprobs) == len(c.token_ids)
        assert c.finish_reason in ("stop", "length")
        assert all(lp <= 0.0 for lp in c.logprobs)
        assert c.prompt_token_ids, "the engine must say which prompt tokens it used"
        expect = recompute_logprobs(reference, c.prompt_token_ids, c.token_ids)
        worst = max(abs(a - b) for a, b in zip(c.logprobs, expect))
        assert worst <= tol, f"logprobs differ from transformers by {worst:.4f} > {tol}"
    # Sampling at temperature 1 from a random model: four identical samples would be a bug.
    assert len({tuple(c.token_ids) for c in outs}) > 1


def check_greedy_is_deterministic(policy) -> list[int]:
    a = policy.sample(MESSAGES, SamplingParams(n=2, max_tokens=8, temperature=0.0))
    b = policy.sample(MESSAGES, SamplingParams(n=1, max_tokens=8, temperature=0.0))
    assert a[0].token_ids == a[1].token_ids == b[0].token_ids
    return a[0].token_ids


def check_choice_mode(policy) -> None:
    choices = ["go north", "open fridge", "take apple from table"]
    outs = policy.sample(
        MESSAGES, SamplingParams(n=6, choices=choices, temperature=1.0, max_tokens=16)
    )
    assert len(outs) == 6
    for c in outs:
        assert c.text in choices
        assert len(c.logprobs) == len(c.token_ids) >= 1
    # Token-by-token constrained sampling: a random model does not pin every sample to the
    # choice with the fewest tokens (scoring whole sequences would).
    many = policy.sample(
        MESSAGES, SamplingParams(n=48, choices=choices, temperature=1.0, max_tokens=16, seed=3)
    )
    assert len({c.text for c in many}) >= 2
