"""Log-probs of the distribution the actor sampled from (docs/algorithm.md "Policy loss").

In constrained choice mode the sampler draws each token from the model's distribution
renormalized over the tokens that continue some admissible choice, given the tokens drawn so far
(the choices' trie; a choice's end is its EOS token). The learner must score the same
distribution, else the ratio, the importance weight and the KL are about another policy: with a
negative advantage the full-vocabulary gradient moves mass onto tokens choice mode never samples.

Which tokens "continue a choice" depends on the sampler. The in-process engine walks the trie of
the choices' own tokenizations (it sends them along: `allowed_tokens`). A guided decoder (vLLM's
guided choice, xgrammar) admits every token whose text keeps the output a prefix of some choice,
whatever the tokenization (`guided_allowed_tokens`, with a `VocabText` of the tokenizer): a random
small model samples "look" as "lo" + "o" + "k" as readily as "look".

`allowed_tokens` / `guided_allowed_tokens` give the allowed ids for one row (no torch), and
`restricted_logprobs` turns logits [B, T, V] plus a padded index of the allowed tokens [B, T, K]
into log-probs and entropies; positions without an index (free-form rows, prompt, padding) get the
full-vocabulary ones. `response_logprobs` does the same for the logits of the response positions
alone ([N, V]), a chunk of positions at a time, so that no float32 copy of them all exists at once
(with a 151,936-token vocabulary the float32 logits of every position of a batch were the learner's
largest allocation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def allowed_tokens(
    response_ids: Sequence[int], choice_token_ids: Sequence[Sequence[int]]
) -> list[list[int]]:
    """For each position j of the response, the token ids that continue some choice whose first j
    tokens equal response[:j] (sorted, unique). The sampled sequence is part of the trie too: a
    sampler that tokenized a choice differently from `choice_token_ids` (a guided decoder may) still
    has its drawn token counted in the numerator."""
    response = list(response_ids)
    paths = [list(c) for c in choice_token_ids] + [response]
    out: list[list[int]] = []
    for j in range(len(response)):
        prefix = response[:j]
        nxt = {p[j] for p in paths if len(p) > j and p[:j] == prefix}
        out.append(sorted(nxt))
    return out


class VocabText:
    """Each token's text and a character trie over them, for guided-choice admissibility. Special
    tokens other than EOS are never admissible (a guided decoder masks them)."""

    def __init__(self, tokenizer) -> None:
        self.eos = tokenizer.eos_token_id
        special = set(tokenizer.all_special_ids)
        self.text: dict[int, str] = {}
        self.trie: dict = {}
        for i in range(len(tokenizer)):
            if i in special:
                continue
            t = tokenizer.decode([i], clean_up_tokenization_spaces=False)
            if not t or "\ufffd" in t:  # empty, or a piece of a multi-byte character
                continue
            self.text[i] = t
            node = self.trie
            for ch in t:
                node = node.setdefault(ch, {})
            node.setdefault("", []).append(i)

    def prefixes_of(self, text: str) -> set[int]:
        """Ids of every token whose text is a non-empty prefix of `text`."""
        out: set[int] = set()
        node = self.trie
        for ch in text:
            child = node.get(ch)
            if child is None:
                break
            node = child
            out.update(node.get("", ()))
        return out


def guided_allowed_tokens(
    response_ids: Sequence[int], choices: Sequence[str], vocab: VocabText
) -> list[list[int]]:
    """For each position of the response, the tokens a guided-choice decoder admits: those whose
    text extends the text so far to a prefix of some choice, and EOS where it equals a choice. The
    sampled token is always included (a tokenizer quirk must not make a drawn token impossible)."""
    out: list[list[int]] = []
    text = ""
    for tok in response_ids:
        allowed = {tok}
        for c in choices:
            if c.startswith(text):
                rest = c[len(text) :]
                allowed.update(vocab.prefixes_of(rest) if rest else {vocab.eos})
        out.append(sorted(allowed))
        text += vocab.text.get(tok, "")
    return out


def allowed_index(
    per_row: Sequence[Sequence[tuple[int, Sequence[int]]]],
    shape: tuple[int, int],
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Pad the allowed tokens into index tensors. `per_row[b]` lists (position t, allowed ids) of
    row b's restricted positions (t indexes the logits' time axis). Returns (ids [B, T, K] long,
    valid [B, T, K] bool); K >= 1, all-False where a position is not restricted."""
    batch, width = shape
    k = max((len(ids) for row in per_row for _, ids in row), default=1)
    ids = torch.zeros((batch, width, k), dtype=torch.long)
    valid = torch.zeros((batch, width, k), dtype=torch.bool)
    for b, row in enumerate(per_row):
        for t, allowed in row:
            ids[b, t, : len(allowed)] = torch.tensor(list(allowed), dtype=torch.long)
            valid[b, t, : len(allowed)] = True
    return ids.to(device), valid.to(device)


def restricted_logprobs(
    logits: Tensor,
    targets: Tensor,
    allowed_ids: Tensor | None = None,
    allowed_valid: Tensor | None = None,
) -> Tensor:
    """Log-prob of each target token under the sampled distribution: [B, T, V], [B, T] -> [B, T].

    allowed_ids / allowed_valid [B, T, K] from `allowed_index`. Where a position has allowed tokens:
    log-softmax over those only (the target is one of them); elsewhere: the full vocabulary.
    Computed in float32.
    """
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if allowed_ids is None or allowed_valid is None or not bool(allowed_valid.any()):
        return logp
    sub = _allowed_logits(logits, allowed_ids, allowed_valid)
    target_logit = logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return torch.where(allowed_valid.any(-1), target_logit - torch.logsumexp(sub, dim=-1), logp)


def restricted_entropy(
    logits: Tensor, allowed_ids: Tensor | None = None, allowed_valid: Tensor | None = None
) -> Tensor:
    """Entropy of the sampled next-token distribution at each position: [B, T, V] -> [B, T]
    (restricted to the allowed tokens where there are any, else the full vocabulary)."""
    logits = logits.float()
    full = torch.log_softmax(logits, dim=-1)
    entropy = -(full.exp() * full).sum(-1)
    if allowed_ids is None or allowed_valid is None or not bool(allowed_valid.any()):
        return entropy
    sub_logp = torch.log_softmax(_allowed_logits(logits, allowed_ids, allowed_valid), dim=-1)
    r_ent = -torch.where(allowed_valid, sub_logp.exp() * sub_logp, torch.zeros_like(sub_logp)).sum(
        -1
    )
    return torch.where(allowed_valid.any(-1), r_ent, entropy)


# float32 elements of one chunk's logits in `response_logprobs`: 2**24 (64 MiB), i.e. 110 positions
# of a 151,936-token vocabulary.
CHUNK_ELEMENTS = 1 << 24


def response_logprobs(
    logits: Tensor,
    targets: Tensor,
    allowed_ids: Tensor | None = None,
    allowed_valid: Tensor | None = None,
    inv_temp: Tensor | None = None,
    *,
    entropy_grad: bool = False,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(log-prob of each target, entropy) under the sampled distribution, for N positions:
    logits [N, V] in the model's dtype, targets [N], allowed_ids / allowed_valid [N, K] (as
    `restricted_logprobs`), inv_temp [N] (1 / the row's temperature: the logits are scaled in
    their own dtype first, as the sampler saw them) -> [N], [N] float32.

    Computed `chunk_rows` positions at a time (default: CHUNK_ELEMENTS / V); with gradients and
    more than one chunk, each chunk is recomputed in the backward pass instead of keeping its
    float32 log-softmax, so the float32 working set is one chunk. The entropy carries a gradient
    only with `entropy_grad` (an entropy bonus), else it is a diagnostic.
    """
    n, vocab = logits.shape
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // max(vocab, 1))
    restricted = allowed_ids is not None and allowed_valid is not None
    recompute = torch.is_grad_enabled() and logits.requires_grad and n > rows
    logps, ents = [], []
    for a in range(0, n, rows):
        b = min(n, a + rows)
        args = (
            logits[a:b],
            targets[a:b],
            allowed_ids[a:b] if restricted else None,  # type: ignore[index]
            allowed_valid[a:b] if restricted else None,  # type: ignore[index]
            None if inv_temp is None else inv_temp[a:b],
        )
        if recompute:
            from torch.utils.checkpoint import checkpoint

            lp, ent = checkpoint(_chunk_logprobs, *args, entropy_grad, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args, entropy_grad)
        logps.append(lp)
        ents.append(ent)
    if not logps:
        empty = logits.new_zeros((0,), dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(ents)


def _chunk_logprobs(
    logits: Tensor,
    targets: Tensor,
    allowed_ids: Tensor | None,
    allowed_valid: Tensor | None,
    inv_temp: Tensor | None,
    entropy_grad: bool,
) -> tuple[Tensor, Tensor]:
    """`response_logprobs` of one chunk: the computation of `restricted_logprobs` and
    `restricted_entropy`, sharing the log-softmax."""
    if inv_temp is not None:
        logits = logits * inv_temp.to(logits.dtype).unsqueeze(-1)
    logits = logits.float()
    full = torch.log_softmax(logits, dim=-1)
    tgt = targets.long().unsqueeze(-1)
    logp = full.gather(-1, tgt).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        ent_in = full if entropy_grad else full.detach()
        entropy = -(ent_in.exp() * ent_in).sum(-1)
    if allowed_ids is None or allowed_valid is None:
        return logp, entropy
    where = allowed_valid.any(-1)
    sub = _allowed_logits(logits, allowed_ids, allowed_valid)
    target_logit = logits.gather(-1, tgt).squeeze(-1)
    logp = torch.where(where, target_logit - torch.logsumexp(sub, dim=-1), logp)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        sub_logp = torch.log_softmax(sub if entropy_grad else sub.detach(), dim=-1)
        r_ent = -torch.where(
            allowed_valid, sub_logp.exp() * sub_logp, torch.zeros_like(sub_logp)
        ).sum(-1)
        entropy = torch.where(where, r_ent, entropy)
    return logp, entropy


def _allowed_logits(logits: Tensor, allowed_ids: Tensor, allowed_valid: Tensor) -> Tensor:
    """[B, T, K]: the logits of the allowed tokens, the padding slots at the dtype's lowest value
    (finite, so that a softmax over them has a gradient of exactly 0 and no NaN)."""
    return logits.gather(-1, allowed_ids).masked_fill(~allowed_valid, torch.finfo(logits.dtype).min)


def tokenize_choices(tokenizer, choices: Sequence[str]) -> list[list[int]]:
    """The choices as the in-process engine tokenizes them: no special tokens, then EOS."""
    return [
        tokenizer.encode(c, add_special_tokens=False) + [tokenizer.eos_token_id] for c in choices
    ]
