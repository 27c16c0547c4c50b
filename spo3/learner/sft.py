"""Supervised fine-tuning on (prompt, target) token pairs: the warm start before RL.

The examples are the policy's own view of an expert's step: `prompt_ids` is the chat prompt the
actor sends (system + user message, generation prompt included), `target_ids` the reply the
expert would have given, ending with EOS, as the sampler tokenizes it. Only target tokens are in
the loss (token mean over the batch). A choice-mode example carries the admissible choices'
tokenizations: its target is scored under the distribution the in-process sampler draws from
(the model's next-token distribution restricted to the choices' trie, spo3/learner/restricted.py), so
the SFT objective raises exactly the probability that choice mode picks the expert's action.

Layout as in the RL trainer: prompt then target, right-padded; a prompt longer than
`max_len - len(target)` loses its oldest tokens. Nothing here knows about environments.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from spo3.learner.restricted import allowed_index, allowed_tokens, restricted_logprobs


@dataclass(frozen=True)
class SftExample:
    prompt_ids: list[int]
    """The prompt exactly as the policy tokenizes it for sampling."""
    target_ids: list[int]
    """The expert's reply tokens (ending with EOS): the only tokens in the loss."""
    choice_token_ids: list[list[int]] | None = None
    """Choice mode: every admissible choice as the sampler tokenizes it (the target is one of
    them); the target is then scored under the trie-restricted distribution. None: free-form."""


@dataclass
class SftBatch:
    ids: Tensor
    """[B, T] prompt + target, right-padded."""
    attn: Tensor
    """[B, T] 1 on real tokens."""
    targets: Tensor
    """[B, T-1] the next token at each logits position (ids shifted by one)."""
    loss_mask: Tensor
    """[B, T-1] 1.0 where the next token is a target token, else 0."""
    allowed_ids: Tensor | None = None
    """[B, T-1, K] the allowed tokens of choice-mode positions (spo3.learner.restricted.allowed_index)."""
    allowed_valid: Tensor | None = None


def build_batch(examples: Sequence[SftExample], pad_id: int, max_len: int = 2048) -> SftBatch:
    """Pad `examples` into one batch. Pure: no model."""
    if not examples:
        raise ValueError("build_batch needs at least one example")
    seqs, starts = [], []
    for ex in examples:
        if not ex.target_ids:
            raise ValueError("an SFT example has an empty target")
        if len(ex.target_ids) >= max_len:
            raise ValueError(
                f"a target of {len(ex.target_ids)} tokens does not fit max_len={max_len}"
            )
        prompt = list(ex.prompt_ids)[-(max_len - len(ex.target_ids)) :]
        if not prompt:
            raise ValueError("an SFT example has an empty prompt")
        seqs.append(prompt + list(ex.target_ids))
        starts.append(len(prompt))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    restricted: list[list[tuple[int, list[int]]]] = []
    for b, (seq, start, ex) in enumerate(zip(seqs, starts, examples)):
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[b, : len(seq)] = 1
        # logits position t predicts token t+1: the target's tokens are predicted at start-1 ...
        mask[b, start - 1 : len(seq) - 1] = 1.0
        if ex.choice_token_ids is not None:
            if list(ex.target_ids) not in [list(c) for c in ex.choice_token_ids]:
                raise ValueError("a choice-mode example's target is not one of its choices")
            steps = allowed_tokens(ex.target_ids, ex.choice_token_ids)
            restricted.append([(start - 1 + j, a) for j, a in enumerate(steps)])
        else:
            restricted.append([])
    allowed_ids = allowed_valid = None
    if any(restricted):
        allowed_ids, allowed_valid = allowed_index(restricted, (len(seqs), width - 1))
    return SftBatch(
        ids=ids,
        attn=attn,
        targets=ids[:, 1:],
        loss_mask=mask,
        allowed_ids=allowed_ids,
        allowed_valid=allowed_valid,
    )


def token_logprobs(model, batch: SftBatch) -> Tensor:
    """[B, T-1] log-prob of each next token under the model (restricted where the batch says so)."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch.ids.to(device), attention_mask=batch.attn.to(device)).logits[
        :, :-1
    ]
    allowed = (
        (None, None)
        if batch.allowed_ids is None or batch.allowed_valid is None
        else (batch.allowed_ids.to(device), batch.allowed_valid.to(device))
    )
    return restricted_logprobs(logits, batch.targets.to(device), *allowed)


def sft_loss(logp: Tensor, loss_mask: Tensor) -> Tensor:
    """Negative log-likelihood, token mean over the target tokens of the batch. Pure."""
    mask = loss_mask.to(logp.device)
    return -(logp * mask).sum() / mask.sum().clamp_min(1.0)


@dataclass(frozen=True)
class SftConfig:
    lr: float = 1e-3
    """AdamW learning rate."""
    epochs: int = 3
    """Passes over the examples (ignored when `steps` is set)."""
    steps: int | None = None
    """Optimizer steps in all; the examples are cycled (reshuffled each pass). None: `epochs` passes."""
    batch_rows: int = 16
    """Examples per optimizer step."""
    max_len: int = 2048
    """Longest prompt + target; longer prompts lose their oldest tokens (then the example is no
    longer what the engine sampled from: keep it above the longest prompt, see `truncated`)."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    """Seeds the example order (and torch's generator)."""


@dataclass
class SftResult:
    steps: int = 0
    examples: int = 0
    target_tokens: int = 0
    """Target tokens seen, over all steps."""
    losses: list[float] = field(default_factory=list)
    """The loss of every step, in order."""


def truncated(examples: Sequence[SftExample], max_len: int) -> int:
    """How many examples lose prompt tokens to `max_len`."""
    return sum(len(e.prompt_ids) + len(e.target_ids) > max_len for e in examples)


def planned_steps(n_examples: int, cfg: SftConfig) -> int:
    """How many optimizer steps `train_sft` takes on `n_examples` examples."""
    if cfg.steps is not None:
        return cfg.steps
    return cfg.epochs * math.ceil(n_examples / cfg.batch_rows)


def _order(n: int, cfg: SftConfig) -> list[list[int]]:
    """The batches of example indices, seeded; each pass over the examples is a fresh shuffle.
    With `epochs`, a pass ends with its own (possibly short) batch; with `steps`, passes run on
    into each other and every batch is full."""
    rng = random.Random(cfg.seed)
    total = planned_steps(n, cfg)
    batches: list[list[int]] = []
    pending: list[int] = []
    while len(batches) < total:
        perm = list(range(n))
        rng.shuffle(perm)
        if cfg.steps is None:
            batches += [perm[i : i + cfg.batch_rows] for i in range(0, n, cfg.batch_rows)]
            continue
        pending += perm
        while len(pending) >= cfg.batch_rows and len(batches) < total:
            batches.append(pending[: cfg.batch_rows])
            pending = pending[cfg.batch_rows :]
    return batches[:total]


def train_sft(
    model,
    examples: Sequence[SftExample],
    cfg: SftConfig,
    pad_id: int,
    on_step: Callable[[int, float], None] | None = None,
) -> SftResult:
    """Fine-tune `model` (a causal LM, trained in place) on `examples`; `on_step(step, loss)` after each step."""
    if not examples:
        raise ValueError("no SFT examples to train on")
    if (
        cfg.batch_rows < 1
        or cfg.lr <= 0
        or (cfg.steps is not None and cfg.steps < 0)
        or cfg.epochs < 0
    ):
        raise ValueError(f"bad SFT settings: {cfg}")
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    result = SftResult(examples=len(examples))
    model.train()
    for step, idx in enumerate(_order(len(examples), cfg), start=1):
        batch = build_batch([examples[i] for i in idx], pad_id, cfg.max_len)
        loss = sft_loss(token_logprobs(model, batch), batch.loss_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        result.steps = step
        result.target_tokens += int(batch.loss_mask.sum())
        result.losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, result.losses[-1])
    model.eval()
    return result


@torch.no_grad()
def target_logprobs(
    model, examples: Sequence[SftExample], pad_id: int, *, max_len: int = 2048, batch_rows: int = 16
) -> list[float]:
    """The log-prob of each example's whole target (sum over its tokens) under `model`."""
    was_training = model.training
    model.eval()
    out: list[float] = []
    for i in range(0, len(examples), batch_rows):
        batch = build_batch(examples[i : i + batch_rows], pad_id, max_len)
        logp = token_logprobs(model, batch).float().cpu()
        out.extend((logp * batch.loss_mask).sum(-1).tolist())
    model.train(was_training)
    return out
