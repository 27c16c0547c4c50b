"""3SPO state score, branching factor and step reward (docs/algorithm.md) as pure functions.

Everything here is arithmetic on counts; the store and the actors call these so the same
formula is used everywhere and can be unit-tested without Redis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ScoreParams(BaseModel):
    """Hyperparameters of the state score. Defaults: docs/algorithm.md "Settings"."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha: float = Field(
        1.0, ge=0, description="lambda(t) = alpha * ln(t); the authors' scripts use 50."
    )
    xi: int = Field(10, ge=1, description="A state is truncated once N_fail >= xi ...")
    zeta: float = Field(0.1, ge=0, le=1, description="... and its success rate is <= zeta.")
    g_max: int = Field(
        8, ge=1, le=1024, description="Most actions sampled at one state: n = ceil(g_max * S)."
    )
    omega_k: float = Field(
        0.1, ge=0, description="Decay of the novelty weight w(N) = 0.5 exp(-omega_k N)."
    )
    eps: float = Field(1e-6, gt=0, description="Keeps SR = N_success / (N_total + eps) finite.")
    invalid_penalty: float = Field(
        0.1, ge=0, description="Subtracted from the step reward of an unparseable action."
    )
    reward_score: Literal["raw", "truncated"] = Field(
        "raw",
        description=(
            "Score in the step reward's difference S(s_t) - S(s_t+1): raw = S~ = exp(-lambda(t) SR), without the "
            "truncation indicator (a dead end scores like the hard state it is); truncated = S, which scores a "
            "hopeless state 0 like a solved one and so pays most for stepping into it."
        ),
    )
    novelty: Literal["path", "parent", "none"] = Field(
        "path",
        description=(
            "R_novel = 1 when the next state is not already on the path from the root (path), or merely differs "
            "from the current state (parent: also pays for walking back to the previous room); none: R_novel = 0 "
            "always, the step reward without its novelty term (a diagnostic: what the score term and success "
            "alone teach)."
        ),
    )
    count: Literal["leaf", "rollout"] = Field(
        "leaf",
        description=(
            'How a leaf commit counts (docs/algorithm.md "Leaf commit"): leaf = every leaf adds 1 to N of each '
            "state on its path and 1 to N_s if it won; rollout = one rollout (the leaf ids <work item>:a<attempt>:*) "
            "adds at most 1 to a state's N, and at most 1 to its N_s if any of its leaves below the state won, so "
            "that the correlated leaves of one DFS do not count as independent paths. t counts leaves either way."
        ),
    )
    truncate_won: bool = Field(
        True,
        description=(
            "true: a state that has had successes is truncated like any other once N_fail >= xi and SR <= zeta; "
            "false: a state with N_s > 0 is never truncated (a rare winning path stays open)."
        ),
    )
    sr_prior_a: float = Field(
        0.0,
        ge=0,
        description=(
            "Pseudo-successes a of a Beta prior on the success rate in the step reward's score: "
            "SR = (N_s + a) / (N + a + b + eps), so a well-explored dead end scores S~ above an unexplored state "
            "and stepping into it pays less. 0 (with b = 0): no prior. Branching and truncation keep the raw SR."
        ),
    )
    sr_prior_b: float = Field(
        0.0,
        ge=0,
        description="Pseudo-failures b of the success-rate prior of the step reward (see sr_prior_a).",
    )
    dead_end_novelty: bool = Field(
        True,
        description=(
            "true: stepping into a losing terminal, a truncated or a depth-cut state earns novelty like any new "
            "state; false: R_novel = 0 for such a step (a path that ends there went nowhere worth exploring)."
        ),
    )
    novelty_use: Literal["reward", "order"] = Field(
        "reward",
        description=(
            'reward: the novelty term is part of the step reward that the group\'s advantages come from (docs/algorithm.md "Step reward"); '
            "order: it only orders the DFS (which child is expanded first), and the advantages come from the step "
            "reward without it, so that exploring does not also train the policy to change state for its own sake."
        ),
    )


@dataclass(frozen=True)
class Counts:
    """Statistics of one state: finished paths through it and how many of those succeeded."""

    n_total: int = 0
    n_success: int = 0

    @property
    def n_fail(self) -> int:
        return self.n_total - self.n_success


def success_rate(c: Counts, eps: float = 1e-6) -> float:
    return c.n_success / (c.n_total + eps)


def lambda_t(t: int, alpha: float) -> float:
    """lambda(t) = alpha ln t; t counts completed trajectories + 1, so t = 1 gives 0 (no history yet)."""
    if t < 1:
        raise ValueError(f"t starts at 1, got {t}")
    return alpha * math.log(t)


def is_truncated(c: Counts, p: ScoreParams, *, is_root: bool = False) -> bool:
    """Hopeless state: failed at least xi times and rarely succeeds. A task's root never is,
    otherwise a hard task would drop out of training for good; under `truncate_won: false` neither
    is a state that has had a success. (Same rule as lua/commit_leaf.lua's `hopeless`.)"""
    if is_root or (not p.truncate_won and c.n_success > 0):
        return False
    return c.n_fail >= p.xi and success_rate(c, p.eps) <= p.zeta


def count_leaf(
    counts: Mapping[str, Counts],
    path: Sequence[str],
    won: bool,
    *,
    seen: MutableMapping[str, bool] | None = None,
) -> dict[str, Counts]:
    """The counts of the path's distinct states after one leaf commit (docs/algorithm.md "Leaf commit");
    the pure mirror of lua/commit_leaf.lua.

    `seen` None: `count: leaf`, every distinct state gets N + 1 and N_s + won. Otherwise `count:
    rollout`: `seen` is the rollout's record (state -> whether its N_s was counted), updated in place;
    a state gets N + 1 only on the rollout's first leaf through it, and N_s + 1 only on its first
    winning leaf through it.
    """
    out: dict[str, Counts] = {}
    for k in dict.fromkeys(path):
        c = counts.get(k, Counts())
        if seen is None:
            out[k] = Counts(c.n_total + 1, c.n_success + int(won))
        elif k not in seen:
            seen[k] = won
            out[k] = Counts(c.n_total + 1, c.n_success + int(won))
        elif won and not seen[k]:
            seen[k] = True
            out[k] = Counts(c.n_total, c.n_success + 1)
        else:
            out[k] = c
    return out


def state_score(c: Counts, t: int, p: ScoreParams, *, is_root: bool = False) -> float:
    """S(s) = exp(-lambda(t) SR(s)) * 1[not truncated]; unseen states score 1."""
    if c.n_total == 0:
        return 1.0
    if is_truncated(c, p, is_root=is_root):
        return 0.0
    return math.exp(-lambda_t(t, p.alpha) * success_rate(c, p.eps))


def n_rollouts(score: float, g_max: int) -> int:
    """n(s) = ceil(g_max * S). 0 truncates the path, 1 continues without a group.

    n is 0 only for a truncated state (S == 0): a tiny positive score (alpha = 50 makes
    them common) still continues the path. The 1e-9 slack keeps float noise such as
    8 * 0.37500000000000006 from adding a whole extra rollout.
    """
    if math.isnan(score) or not 0.0 <= score <= 1.0:
        raise ValueError(f"state score must lie in [0, 1], got {score}")
    if score == 0.0:
        return 0
    return max(1, math.ceil(g_max * score - 1e-9))


def novelty_weight(n_total: int, omega_k: float) -> float:
    """w(N) = 0.5 exp(-omega_k N): early visits are paid for novelty, later ones for score."""
    return 0.5 * math.exp(-omega_k * n_total)


def prior_success_rate(c: Counts, p: ScoreParams) -> float:
    """SR with the step reward's Beta prior: (N_s + a) / (N + a + b + eps); a = b = 0 is SR itself."""
    return (c.n_success + p.sr_prior_a) / (c.n_total + p.sr_prior_a + p.sr_prior_b + p.eps)


def raw_score(c: Counts, t: int, p: ScoreParams) -> float:
    """S~(s) = exp(-lambda(t) SR(s)): the state score without the truncation indicator (unseen: 1
    without a prior; with `sr_prior_a`/`sr_prior_b` SR is the prior's, docs/algorithm.md "Step reward")."""
    return math.exp(-lambda_t(t, p.alpha) * prior_success_rate(c, p))


def reward_score(c: Counts, t: int, p: ScoreParams, *, truncated: bool = False) -> float:
    """The score the step reward's difference uses: S~ under `reward_score: raw`; under `truncated`
    the state score S, 0 for a truncated state (`truncated`: S = 0 as the store scored it; the
    store knows which states are roots, which are never truncated)."""
    if p.reward_score == "truncated":
        return 0.0 if truncated else raw_score(c, t, p)
    return raw_score(c, t, p)


def is_novel(next_key: str, path: Sequence[str], p: ScoreParams) -> bool:
    """R_novel: `path` = the keys from the root to s_t (s_t last). novelty path: the next state is
    not on that path; novelty parent: it differs from s_t; novelty none: never."""
    if not path:
        raise ValueError("the path holds at least the current state")
    if p.novelty == "none":
        return False
    if p.novelty == "parent":
        return next_key != path[-1]
    return next_key not in path


def step_reward(
    *,
    path: Sequence[str],
    next_key: str,
    before: Counts,
    after: Counts,
    t: int,
    success: float | None,
    invalid: bool,
    p: ScoreParams,
    before_truncated: bool = False,
    after_truncated: bool = False,
    novelty: bool = True,
    dead_end: bool = False,
) -> float:
    """R = w(N) R_novel + (0.5 - w(N)) (S~(s_t) - S~(s_t+1)) + 0.5 R_success - invalid_penalty.

    `path`: the keys from the root to s_t (s_t last); `next_key`: s_t+1 (s_t itself for an invalid
    reply); `before`/`after`: the counts of s_t and s_t+1 at time t; N = before.n_total.
    `*_truncated`: whether the store scored the state 0 (used only under `reward_score: truncated`).
    `novelty`: False leaves the novelty term out (`novelty_use: order` rewards the group's members so).
    `dead_end`: s_t+1 ends the path as a losing terminal, a truncated or a depth-cut state; under
    `dead_end_novelty: false` such a step earns no novelty.
    `success` is the task's success in [0, 1] on the terminal transition and None before it;
    raw environment rewards (ALFWorld pays 10) must never be passed here.
    """
    if success is not None and not 0.0 <= success <= 1.0:
        raise ValueError(f"success must lie in [0, 1], got {success}")
    w = novelty_weight(before.n_total, p.omega_k)
    novel = novelty and not (dead_end and not p.dead_end_novelty) and is_novel(next_key, path, p)
    diff = reward_score(before, t, p, truncated=before_truncated) - reward_score(
        after, t, p, truncated=after_truncated
    )
    r = w * (1.0 if novel else 0.0) + (0.5 - w) * diff
    if success is not None:
        r += 0.5 * success
    if invalid:
        r -= p.invalid_penalty
    return r
