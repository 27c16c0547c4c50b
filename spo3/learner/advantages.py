"""Advantage estimators: 3SPO step groups, and the GRPO / GiGPO baselines (docs/algorithm.md "Step groups", "Baselines").

Pure numpy on purpose: actors and tests use these without importing torch.

Normalisations (`Norm`, docs/algorithm.md "Step groups"): `std` divides the centred values by the
group's std (+ 1e-6), `mean` only centres them, `floor` divides by max(std, floor), and `batch`
only centres them here: the caller (spo3.learner.batch.batch_rows) divides all of an update's rows
of that algorithm by one batch-level scale.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import numpy as np

from spo3.learner.config import Norm, StdKind

# Rewards closer than this are treated as equal: float noise must not turn into +-1 advantages.
_SPREAD_TOL = 1e-12


def _spread(r: np.ndarray) -> float:
    return float(r.max() - r.min()) if r.size else 0.0


def is_informative(rewards: Sequence[float] | np.ndarray) -> bool:
    """True iff the group carries a relative signal (size > 1, non-zero spread).

    The learner sends only informative groups to the optimizer: the others would contribute a zero
    gradient while still costing a forward/backward pass.
    """
    r = np.asarray(rewards, dtype=np.float64)
    return r.size > 1 and _spread(r) > _SPREAD_TOL


def _norm(mean_only: bool, norm: Norm | None) -> Norm:
    return norm if norm is not None else ("mean" if mean_only else "std")


def _normalise(
    values: np.ndarray,
    pool: np.ndarray,
    *,
    norm: Norm,
    floor: float,
    std: StdKind,
    eps: float,
) -> np.ndarray:
    """(values - mean(pool)) / scale(pool); zeros when the pool has no relative signal."""
    if not is_informative(pool):
        return np.zeros_like(values)
    centered = values - pool.mean()
    if norm in ("mean", "batch"):
        return centered
    sd = float(pool.std(ddof=1 if std == "sample" else 0))
    if norm == "floor":
        return centered / max(sd, floor)
    return centered / (sd + eps)


def group_advantages(
    rewards: Sequence[float],
    *,
    mean_only: bool = False,
    eps: float = 1e-6,
    norm: Norm | None = None,
    floor: float = 0.1,
    std: StdKind = "population",
) -> np.ndarray:
    """Group-relative advantages A_i = (r_i - mean) / (std + eps), population std by default.

    Uninformative groups (singletons, zero spread) get all zeros rather than 0/eps noise.
    `norm` picks the normalisation (module docstring); None follows `mean_only`, which drops the
    std division as the authors' code does. `std`: population (n) or sample (n - 1) std.
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    return _normalise(r, r, norm=_norm(mean_only, norm), floor=floor, std=std, eps=eps)


def step_group_advantages(
    rewards: Sequence[float],
    *,
    mean_only: bool = False,
    eps: float = 1e-6,
    norm: Norm | None = None,
    floor: float = 0.1,
) -> np.ndarray:
    """3SPO advantages for one step group: the children of one parent in one expansion.

    Each child's step reward is compared with its siblings only, so the credit is local to the state.
    """
    return group_advantages(rewards, mean_only=mean_only, eps=eps, norm=norm, floor=floor)


def grpo_advantages(
    episode_returns: Sequence[float],
    *,
    mean_only: bool = False,
    eps: float = 1e-6,
    norm: Norm | None = None,
    floor: float = 0.1,
    std: StdKind = "population",
) -> np.ndarray:
    """GRPO: one advantage per episode of a task's group, broadcast by the caller to all its steps.

    Trajectory-level credit: every step of an episode shares the episode's advantage.
    """
    return group_advantages(
        episode_returns, mean_only=mean_only, eps=eps, norm=norm, floor=floor, std=std
    )


def episode_row_advantages(
    episode_returns: Sequence[float],
    lengths: Sequence[int],
    *,
    row_penalties: Sequence[Sequence[float]] | None = None,
    stats: Literal["steps", "episodes"] = "episodes",
    norm: Norm = "std",
    floor: float = 0.1,
    std: StdKind = "population",
    eps: float = 1e-6,
) -> list[np.ndarray]:
    """GRPO's episode term per step row (docs/algorithm.md "Baselines").

    Row t of episode i scores `episode_returns[i] + row_penalties[i][t]` (no penalties: the return).
    `stats: episodes` takes the mean and std over one value per episode (its return); `steps` over
    every step row, so a long episode weighs as many times as it has steps (verl-agent's
    `compute_mean_std_cross_steps`). A pool without spread gives zeros.
    """
    if len(episode_returns) != len(lengths):
        raise ValueError(f"{len(episode_returns)} episode returns but {len(lengths)} lengths")
    rows = []
    for i, (ret, n) in enumerate(zip(episode_returns, lengths)):
        pen = np.zeros(n) if row_penalties is None else np.asarray(row_penalties[i], np.float64)
        if pen.shape != (n,):
            raise ValueError(f"episode {i}: {n} steps but {pen.size} row penalties")
        rows.append(float(ret) + pen)
    if stats == "steps":
        pool = np.concatenate(rows) if rows else np.zeros(0)
    else:
        pool = np.asarray(episode_returns, dtype=np.float64)
    return [_normalise(r, pool, norm=norm, floor=floor, std=std, eps=eps) for r in rows]


def discounted_returns(rewards: Sequence[float], gamma: float) -> np.ndarray:
    """G_t = r_t + gamma * G_{t+1} (reverse cumulative sum); GiGPO's per-step return."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    out = np.empty_like(r)
    running = 0.0
    for t in range(r.size - 1, -1, -1):
        running = r[t] + gamma * running
        out[t] = running
    return out


def gigpo_advantages(
    episodes: Sequence[Sequence[tuple[str, float]]],
    episode_returns: Sequence[float],
    *,
    gamma: float = 0.95,
    omega: float = 1.0,
    mean_only: bool = False,
    eps: float = 1e-6,
    norm: Norm | None = None,
    floor: float = 0.1,
    std: StdKind = "population",
    stats: Literal["steps", "episodes"] = "episodes",
    row_penalties: Sequence[Sequence[float]] | None = None,
) -> list[np.ndarray]:
    """GiGPO (arXiv 2505.10978): episode advantage + omega * anchor-state step advantage.

    `episodes[i]` lists `(anchor_state_key, step_reward)` per step of episode i. Steps of all G
    episodes that start from the same anchor state form a step group; each member is scored by its
    discounted return from that step on and normalized within the group, which gives step-level credit
    without extra rollouts. Anchors seen once get no step term, only the episode term.

    `norm` (None: follows `mean_only`) applies to both terms, as GiGPO's `mean_norm` /
    `mean_std_norm` do; `std`, `stats`: see `group_advantages`, `episode_row_advantages`.
    `row_penalties[i][t]` is added to row t's episode score and to its step return after the
    returns are computed (the reference's invalid-action penalty); the step rewards then leave it out.
    """
    if len(episodes) != len(episode_returns):
        raise ValueError(f"{len(episodes)} episodes but {len(episode_returns)} episode returns")
    how = _norm(mean_only, norm)
    episode_adv = episode_row_advantages(
        episode_returns,
        [len(ep) for ep in episodes],
        row_penalties=row_penalties,
        stats=stats,
        norm=how,
        floor=floor,
        std=std,
        eps=eps,
    )
    returns = [discounted_returns([r for _, r in ep], gamma) for ep in episodes]
    if row_penalties is not None:
        returns = [g + np.asarray(p, np.float64) for g, p in zip(returns, row_penalties)]

    # anchor key -> positions (episode, step) of every step taken from that state
    anchors: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for i, ep in enumerate(episodes):
        for t, (key, _) in enumerate(ep):
            anchors[key].append((i, t))

    step_adv = [np.zeros(len(ep), dtype=np.float64) for ep in episodes]
    for positions in anchors.values():
        adv = group_advantages(
            [returns[i][t] for i, t in positions], eps=eps, norm=how, floor=floor, std=std
        )
        for (i, t), a in zip(positions, adv):
            step_adv[i][t] = a

    return [episode_adv[i] + omega * step_adv[i] for i in range(len(episodes))]
