"""Advantage estimators: 3SPO step groups, and the GRPO / GiGPO baselines (docs/algorithm.md "Step groups", "Baselines").

Pure numpy on purpose: actors and tests use these without importing torch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

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


def group_advantages(
    rewards: Sequence[float], *, mean_only: bool = False, eps: float = 1e-6
) -> np.ndarray:
    """Group-relative advantages A_i = (r_i - mean) / (std + eps), population std.

    Uninformative groups (singletons, zero spread) get all zeros rather than 0/eps noise.
    `mean_only` drops the std division, as the authors' code does.
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if not is_informative(r):
        return np.zeros_like(r)
    centered = r - r.mean()
    if mean_only:
        return centered
    return centered / (r.std() + eps)


def step_group_advantages(
    rewards: Sequence[float], *, mean_only: bool = False, eps: float = 1e-6
) -> np.ndarray:
    """3SPO advantages for one step group: the children of one parent in one expansion.

    Each child's step reward is compared with its siblings only, so the credit is local to the state.
    """
    return group_advantages(rewards, mean_only=mean_only, eps=eps)


def grpo_advantages(
    episode_returns: Sequence[float], *, mean_only: bool = False, eps: float = 1e-6
) -> np.ndarray:
    """GRPO: one advantage per episode of a task's group, broadcast by the caller to all its steps.

    Trajectory-level credit: every step of an episode shares the episode's advantage.
    """
    return group_advantages(episode_returns, mean_only=mean_only, eps=eps)


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
) -> list[np.ndarray]:
    """GiGPO (arXiv 2505.10978): episode advantage + omega * anchor-state step advantage.

    `episodes[i]` lists `(anchor_state_key, step_reward)` per step of episode i. Steps of all G
    episodes that start from the same anchor state form a step group; each member is scored by its
    discounted return from that step on and normalized within the group, which gives step-level credit
    without extra rollouts. Anchors seen once get no step term, only the episode term.
    """
    if len(episodes) != len(episode_returns):
        raise ValueError(f"{len(episodes)} episodes but {len(episode_returns)} episode returns")
    episode_adv = grpo_advantages(episode_returns, mean_only=mean_only, eps=eps)
    returns = [discounted_returns([r for _, r in ep], gamma) for ep in episodes]

    # anchor key -> positions (episode, step) of every step taken from that state
    anchors: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for i, ep in enumerate(episodes):
        for t, (key, _) in enumerate(ep):
            anchors[key].append((i, t))

    step_adv = [np.zeros(len(ep), dtype=np.float64) for ep in episodes]
    for positions in anchors.values():
        adv = group_advantages([returns[i][t] for i, t in positions], mean_only=mean_only, eps=eps)
        for (i, t), a in zip(positions, adv):
            step_adv[i][t] = a

    return [episode_adv[i] + omega * step_adv[i] for i in range(len(episodes))]
