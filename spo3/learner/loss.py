"""Decoupled PPO-clip policy loss with a k3 KL penalty to the reference model (docs/algorithm.md "Policy loss").

Three policies per token (AReaL's decoupled PPO for asynchronous RL):
- behaviour: the sampler's log-probs, of exactly the distribution it drew from (possibly a few
  versions old);
- proximal: the learner's recomputation with the weights before this update (no gradient);
- current: the weights being optimized.

    loss = token-mean( -w * min(r * A, clip(r, 1 - clip, 1 + clip) * A) ) + kl_coef * k3 KL(cur || ref)
    r = pi / pi_prox,   w = min(pi_prox / pi_behav, behav_imp_weight_cap)

The clip is taken around the proximal policy, which the learner knows exactly; the importance
weight w corrects the data for having been drawn by another policy. On fresh data in the first
pass w = r = 1 and this is plain policy gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spo3.learner.config import LossConfig


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Elementwise k3 estimator of KL(policy || ref): exp(d) - d - 1 with d = ref - logprobs.

    Unbiased, low-variance and never negative (unlike the plain log-ratio). expm1 keeps precision
    for small d; the clamp only removes rounding below zero.
    """
    d = ref_logprobs - logprobs
    return (torch.expm1(d) - d).clamp_min(0.0)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Token-mean over all response tokens of the batch: sum(x * mask) / max(sum(mask), 1).

    `where` rather than a bare product so that inf/NaN in masked slots cannot leak into the sum.
    """
    m = mask.to(x.dtype)
    return torch.where(m != 0, x * m, torch.zeros_like(x)).sum() / m.sum().clamp(min=1.0)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    entropy: Tensor | None = None,
    behav_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Importance-weighted clipped surrogate + kl_coef * k3 KL - entropy_coef * entropy, token-mean
    over `mask`.

    All tensors are [B, T]; `advantages` may be [B] (one per action, broadcast to its tokens).
    `old_logprobs` are the proximal policy's (the clip's reference); `behav_logprobs` the sampler's
    (None: the proximal policy sampled, weight 1). `mask` is 1 on generated tokens and 0 on
    prompt/padding, which contribute neither loss nor gradient.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    advantages = advantages.to(logprobs.dtype).expand_as(logprobs)
    valid = mask != 0

    # Zero every input on masked slots first: garbage there (-inf log-probs of padding) would
    # otherwise turn into 0 * inf = NaN in the backward pass even though the loss ignores it.
    zero = torch.zeros_like(logprobs)
    logprobs = torch.where(valid, logprobs, zero)
    old_logprobs = torch.where(valid, old_logprobs, zero)
    ref_logprobs = torch.where(valid, ref_logprobs, zero)
    advantages = torch.where(valid, advantages, zero)
    behav_logprobs = (
        old_logprobs if behav_logprobs is None else torch.where(valid, behav_logprobs, zero)
    )
    imp_weight, imp_clipped = importance_weight(
        old_logprobs, behav_logprobs, cfg.behav_imp_weight_cap
    )

    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - cfg.clip, 1.0 + cfg.clip)
    surrogate = -torch.minimum(ratio * advantages, clipped_ratio * advantages) * imp_weight
    pg_loss = masked_mean(surrogate, mask)

    kl = k3_kl(logprobs, ref_logprobs)
    kl_mean = masked_mean(kl, mask)
    loss = pg_loss + cfg.kl_coef * kl_mean

    # Diagnostics stay on the device as 0-dim tensors: reading each one here would stall a GPU
    # once per metric and micro-batch (callers sum them and read once per update).
    metrics: dict[str, Tensor] = {}
    if entropy is not None:
        ent_mean = masked_mean(entropy, mask)
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * ent_mean
        metrics["entropy"] = ent_mean.detach()

    with torch.no_grad():
        # The clipped branch wins (and the gradient vanishes) only when the ratio has moved past the
        # clip range in the direction the advantage pushes it.
        clip_active = ((advantages > 0) & (ratio > 1.0 + cfg.clip)) | (
            (advantages < 0) & (ratio < 1.0 - cfg.clip)
        )
        metrics.update(
            pg_loss=pg_loss.detach(),
            kl=kl_mean.detach(),
            clip_frac=masked_mean(clip_active.to(ratio.dtype), mask),
            ratio_mean=masked_mean(ratio, mask),
            approx_kl_old=masked_mean(0.5 * log_ratio**2, mask),
            imp_weight_mean=masked_mean(imp_weight, mask),
            imp_weight_max=torch.where(valid, imp_weight, zero).max(),  # 0 when nothing is valid
            imp_weight_clipped_frac=masked_mean(imp_clipped.to(ratio.dtype), mask),
            behav_kl=masked_mean(k3_kl(old_logprobs, behav_logprobs), mask),
            n_tokens=valid.sum().to(ratio.dtype),
        )
    return loss, metrics


def importance_weight(
    prox_logprobs: Tensor, behav_logprobs: Tensor, cap: float | None
) -> tuple[Tensor, Tensor]:
    """pi_prox / pi_behav per token, truncated at `cap`, with no gradient (both policies are fixed),
    and where the truncation acted. Staleness correction of decoupled PPO: a token the current
    policy now prefers more than the sampler did counts more, one it has moved away from less."""
    with torch.no_grad():
        w = torch.exp(prox_logprobs.detach() - behav_logprobs.detach())
        if cap is None:
            return w, torch.zeros_like(w, dtype=torch.bool)
        return w.clamp(max=cap), w > cap


def token_logprobs(logits: Tensor, token_ids: Tensor) -> Tensor:
    """Log-probability of each chosen token: [B, T, V], [B, T] -> [B, T], computed in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution at each position: [B, T, V] -> [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
