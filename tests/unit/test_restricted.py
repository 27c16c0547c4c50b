"""Restricted log-probs (the distribution choice mode samples from) against a direct torch
computation on a hand-made trie, and the decoupled-PPO importance weight on a known toy."""

from __future__ import annotations

import math

import pytest
import torch

from spo3.learner.loss import LossConfig, importance_weight, policy_loss
from spo3.learner.restricted import (
    allowed_index,
    allowed_tokens,
    restricted_entropy,
    restricted_logprobs,
)

EOS = 9
# Shared prefixes (1 / 1,2), a choice that ends where another goes on (1,2 + EOS vs 1,2,3), an
# EOS-only continuation (after 1,2,3 only EOS), and a lone first token (5).
CHOICES = [[1, 2, EOS], [1, 2, 3, EOS], [1, 4, EOS], [5, EOS]]


def test_allowed_tokens_walk_the_trie():
    assert allowed_tokens([1, 2, 3, EOS], CHOICES) == [[1, 5], [2, 4], [3, EOS], [EOS]]
    assert allowed_tokens([1, 2, EOS], CHOICES) == [[1, 5], [2, 4], [3, EOS]]
    assert allowed_tokens([5, EOS], CHOICES) == [[1, 5], [EOS]]
    assert allowed_tokens([7, 8, EOS], [[7, 8, EOS]]) == [[7], [8], [EOS]]  # one choice: no freedom
    # A sampler that tokenized a choice differently still has its own tokens in the trie.
    assert allowed_tokens([1, 6, EOS], CHOICES) == [[1, 5], [2, 4, 6], [EOS]]


def direct(logits: torch.Tensor, response: list[int], choices: list[list[int]], start: int):
    """Per position: mask every token outside the trie to -inf, log-softmax, pick the target."""
    out_lp, out_ent = [], []
    for j, tok in enumerate(response):
        allowed = {c[j] for c in choices + [response] if len(c) > j and c[:j] == response[:j]}
        mask = torch.full((logits.shape[-1],), float("-inf"))
        mask[list(allowed)] = 0.0
        lp = torch.log_softmax(logits[start + j] + mask, dim=-1)
        out_lp.append(lp[tok])
        p = lp.exp()
        out_ent.append(-(p[list(allowed)] * lp[list(allowed)]).sum())
    return torch.stack(out_lp), torch.stack(out_ent)


def test_restricted_logprobs_and_gradients_match_direct_computation():
    torch.manual_seed(0)
    vocab, width = 12, 6
    responses = [[1, 2, 3, EOS], [1, 2, EOS], [5, EOS], [7, 8, EOS]]
    choice_sets = [CHOICES, CHOICES, CHOICES, [[7, 8, EOS]]]
    starts = [1, 2, 0, 2]  # logits index of each row's first response token
    free_row = [4, 3, 2]  # a free-form row: full vocabulary
    logits = torch.randn(5, width, vocab, dtype=torch.float64) * 3
    targets = torch.zeros(5, width, dtype=torch.long)
    per_row = []
    for b, (resp, ch, s) in enumerate(zip(responses, choice_sets, starts)):
        targets[b, s : s + len(resp)] = torch.tensor(resp)
        per_row.append([(s + j, a) for j, a in enumerate(allowed_tokens(resp, ch))])
    targets[4, 1:4] = torch.tensor(free_row)
    per_row.append([])
    ids, valid = allowed_index(per_row, (5, width))

    mine = logits.clone().requires_grad_(True)
    theirs = logits.clone().requires_grad_(True)
    lp = restricted_logprobs(mine, targets, ids, valid)
    ent = restricted_entropy(mine, ids, valid)
    ref_lp, ref_ent = [], []
    for b, (resp, ch, s) in enumerate(zip(responses, choice_sets, starts)):
        l, e = direct(theirs[b], resp, ch, s)
        ref_lp.append(l)
        ref_ent.append(e)
        torch.testing.assert_close(
            lp[b, s : s + len(resp)].double(), l.float().double(), rtol=0, atol=1e-5
        )
        torch.testing.assert_close(
            ent[b, s : s + len(resp)].double(), e.float().double(), rtol=0, atol=1e-5
        )
    full = torch.log_softmax(theirs[4].float(), -1)
    free_lp = full[torch.arange(1, 4), torch.tensor(free_row)]
    torch.testing.assert_close(lp[4, 1:4], free_lp, rtol=0, atol=1e-5)

    # A choice with one continuation has probability 1 there: log-prob 0, entropy 0, no gradient.
    assert lp[0, 4].item() == pytest.approx(0.0, abs=1e-6)  # after 1,2,3 only EOS
    assert lp[3, 2:5].abs().max().item() < 1e-6  # the lone choice
    assert ent[3, 2:5].abs().max().item() < 1e-6

    # Gradients: the same weighted sum of the restricted log-probs and entropies, both ways.
    w = torch.randn(5, width, dtype=torch.float32)
    sel = [
        (b, s + j) for b, (resp, s) in enumerate(zip(responses, starts)) for j in range(len(resp))
    ]
    (
        sum(w[b, t] * (lp[b, t] + 0.3 * ent[b, t]) for b, t in sel) + (w[4, 1:4] * lp[4, 1:4]).sum()
    ).backward()
    total = 0.0
    for b, (resp, s) in enumerate(zip(responses, starts)):
        for j in range(len(resp)):
            total = total + w[b, s + j].double() * (ref_lp[b][j] + 0.3 * ref_ent[b][j])
    total = total + (w[4, 1:4].double() * free_lp.double()).sum()
    total.backward()
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5)
    # No gradient reaches tokens outside a restricted row's trie.
    outside = torch.ones(vocab, dtype=torch.bool)
    outside[[1, 5]] = False
    assert mine.grad[0, 1, outside].abs().max().item() == 0.0


def test_padding_slots_are_finite_and_inert():
    logits = torch.tensor([[[0.0, 1e4, -1e4, 2.0]]], requires_grad=True)
    ids, valid = allowed_index([[(0, [0, 3])]], (1, 1))
    lp = restricted_logprobs(logits, torch.tensor([[3]]), ids, valid)
    assert lp.item() == pytest.approx(2.0 - math.log(1 + math.exp(2.0)), abs=1e-6)
    lp.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 0, 1:3].abs().max() == 0


def test_importance_weight_is_one_on_policy_and_capped():
    lp = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    w, clipped = importance_weight(lp, lp.clone(), 5.0)
    assert torch.equal(w, torch.ones_like(w)) and not clipped.any()
    w, clipped = importance_weight(
        torch.log(torch.tensor([[0.9, 0.1]])), torch.log(torch.tensor([[0.1, 0.1]])), 5.0
    )
    assert w.tolist() == [[5.0, pytest.approx(1.0)]] and clipped.tolist() == [[True, False]]
    w, _ = importance_weight(
        torch.log(torch.tensor([[0.9]])), torch.log(torch.tensor([[0.1]])), None
    )
    assert w.item() == pytest.approx(9.0)


def test_on_policy_rows_get_plain_policy_gradient():
    """Fresh data, first pass: behaviour = proximal = current, so both ratios are 1."""
    torch.manual_seed(1)
    logp = torch.randn(3, 4).log_softmax(-1).requires_grad_(True)
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.ones(3, 4)
    loss, m = policy_loss(
        logp,
        logp.detach(),
        logp.detach(),
        adv,
        mask,
        LossConfig(kl_coef=0.0),
        behav_logprobs=logp.detach().clone(),
    )
    assert m["imp_weight_mean"] == pytest.approx(1.0) and m["imp_weight_max"] == pytest.approx(1.0)
    assert m["imp_weight_clipped_frac"] == 0.0 and m["clip_frac"] == 0.0
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv[:, None].expand(3, 4) / 12)


def test_importance_weight_corrects_a_stale_batch():
    """A two-version bandit: actions were drawn by version 0 (pi_old), the learner is at version 1
    (pi_new). The on-policy gradient of E_{pi_new}[A] is known exactly; the batch holds each action
    in proportion to pi_old. Weighted by pi_new / pi_old, the loss's gradient is the on-policy one;
    unweighted, it is the gradient of E_{pi_old}-weighted advantages, another direction."""
    theta = torch.tensor([1.5, 0.0, -1.0, 0.5], requires_grad=True)  # version 1's logits
    pi_new = torch.softmax(theta.detach(), -1)
    pi_old = torch.tensor([0.1, 0.5, 0.3, 0.1])  # version 0 sampled mostly actions 1 and 2
    reward = torch.tensor([1.0, 0.0, -1.0, 2.0])
    counts = (pi_old * 1000).round().long()  # the batch: exact proportions, no sampling noise
    actions = torch.repeat_interleave(torch.arange(4), counts)
    adv = reward[actions]

    expected = torch.autograd.grad((torch.softmax(theta, -1) * reward).sum(), theta)[
        0
    ]  # d E_new[A] / d theta

    def grad_of(behav: torch.Tensor | None) -> torch.Tensor:
        logp = torch.log_softmax(theta, -1)[actions][:, None]
        loss, m = policy_loss(
            logp,
            logp.detach(),
            logp.detach(),
            adv,
            torch.ones_like(logp),
            LossConfig(kl_coef=0.0, behav_imp_weight_cap=None),
            behav_logprobs=behav,
        )
        return -torch.autograd.grad(loss, theta)[0]  # ascent direction, per sample

    corrected = grad_of(torch.log(pi_old)[actions][:, None])
    uncorrected = grad_of(None)
    torch.testing.assert_close(corrected, expected, rtol=1e-3, atol=1e-4)
    assert (uncorrected - expected).abs().max() > 0.1  # without the weight the direction is wrong
    # And the weights are pi_new / pi_old per action.
    w, _ = importance_weight(torch.log(pi_new), torch.log(pi_old), None)
    torch.testing.assert_close(w, pi_new / pi_old)


class _Tokenizer:
    """A tokenizer with several spellings of the same text (as byte-level BPE vocabularies have)."""

    eos_token_id = 0
    all_special_ids = [0, 1]
    pieces = {
        0: "<eos>",
        1: "<pad>",
        2: "l",
        3: "o",
        4: "k",
        5: "lo",
        6: "look",
        7: "go",
        8: " north",
        9: "g",
        10: " ",
        11: "north",
        12: "x",
    }

    def __len__(self) -> int:
        return len(self.pieces)

    def decode(self, ids, clean_up_tokenization_spaces=False) -> str:
        return "".join(self.pieces[i] for i in ids)


def test_guided_allowed_tokens_admit_every_spelling_of_a_choice():
    from spo3.learner.restricted import VocabText, guided_allowed_tokens

    vocab = VocabText(_Tokenizer())
    choices = ["look", "go north"]
    # "lo" + "o" + "k" + EOS: at the start any prefix of either choice; after "lo" only "o"; after
    # "loo" only "k"; after "look" only EOS (no choice goes on).
    assert guided_allowed_tokens([5, 3, 4, 0], choices, vocab) == [[2, 5, 6, 7, 9], [3], [4], [0]]
    # "g" + "o" + " north" + EOS; after "go" a space-led piece or a bare space.
    assert guided_allowed_tokens([9, 3, 8, 0], choices, vocab) == [
        [2, 5, 6, 7, 9],
        [3],
        [8, 10],
        [0],
    ]
    assert vocab.prefixes_of("xx") == {12} and vocab.prefixes_of("north") == {11}
    assert vocab.prefixes_of("look") == {2, 5, 6}


@pytest.mark.parametrize("chunk_rows", [None, 1, 3])
def test_response_logprobs_equal_the_full_logit_computation(chunk_rows):
    """The chunked response-only path (spo3.learner.restricted.response_logprobs) against
    restricted_logprobs / restricted_entropy on the full logits scaled by 1/T: values and
    gradients (entropy bonus on), with choice-mode and free-form rows at several temperatures;
    chunks of 1 and 3 positions take the recomputing (checkpointed) path."""
    from spo3.learner.restricted import response_logprobs

    torch.manual_seed(1)
    vocab, width = 12, 6
    responses = [[1, 2, 3, EOS], [5, EOS], [4, 3, 2]]
    choice_sets = [CHOICES, CHOICES, None]
    starts = [1, 3, 2]
    temps = torch.tensor([1.0, 0.7, 1.6])
    logits = torch.randn(3, width, vocab) * 3
    targets = torch.zeros(3, width, dtype=torch.long)
    per_row, flat = [], []
    for b, (resp, ch, s) in enumerate(zip(responses, choice_sets, starts)):
        targets[b, s : s + len(resp)] = torch.tensor(resp)
        per_row.append([] if ch is None else list(enumerate(allowed_tokens(resp, ch), s)))
        flat += [b * width + s + j for j in range(len(resp))]
    ids, valid = allowed_index(per_row, (3, width))
    index = torch.tensor(flat)

    old = logits.clone().requires_grad_(True)
    scaled = old * (1 / temps).view(-1, 1, 1)
    want_lp = restricted_logprobs(scaled, targets, ids, valid).reshape(-1)[index]
    want_ent = restricted_entropy(scaled, ids, valid).reshape(-1)[index]
    (want_lp.sum() + 0.1 * want_ent.sum()).backward()

    new = logits.clone().requires_grad_(True)
    picked = new.reshape(-1, vocab)[index]
    lp, ent = response_logprobs(
        picked,
        targets.reshape(-1)[index],
        ids.reshape(-1, ids.shape[-1])[index],
        valid.reshape(-1, valid.shape[-1])[index],
        (1 / temps).view(-1, 1).expand(3, width).reshape(-1)[index],
        entropy_grad=True,
        chunk_rows=chunk_rows,
    )
    (lp.sum() + 0.1 * ent.sum()).backward()
    torch.testing.assert_close(lp, want_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, want_ent, rtol=0, atol=1e-5)
    assert old.grad is not None and new.grad is not None
    torch.testing.assert_close(new.grad, old.grad, rtol=0, atol=1e-5)


def test_response_logprobs_entropy_is_a_diagnostic_without_the_bonus():
    from spo3.learner.restricted import response_logprobs

    logits = torch.randn(4, 7, requires_grad=True)
    lp, ent = response_logprobs(logits, torch.tensor([1, 2, 3, 4]), chunk_rows=2)
    assert lp.requires_grad and not ent.requires_grad
