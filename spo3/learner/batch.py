"""From groups to training rows: the advantage of every transition, by algorithm.

3SPO: members of a step group are compared by their step rewards. GRPO: episodes of a task by
their returns, broadcast to every step. GiGPO: GRPO's episode advantage plus a step advantage
among steps that share an anchor state. Rows with zero advantage are left out: they would cost
a forward/backward pass and add no gradient.

Prompts: a group read from the stream (schema 3) carries each distinct prompt once; reading it
fills every transition's `prompt_token_ids` from that table (the same list object for the members
that share it), so the rows, and schema 2 groups' rows, are built the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from spo3.learner.advantages import (
    episode_row_advantages,
    gigpo_advantages,
    step_group_advantages,
)
from spo3.learner.config import AdvantageConfig
from spo3.transport.contracts import Group


@dataclass(frozen=True)
class Row:
    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float
    sampler_logprobs: list[float]
    """Behaviour log-probs of the response tokens (the sampler's); the importance weight's denominator."""
    policy_version: int
    group_id: str
    choices: list[str] | None = None
    """Choice mode: the admissible choices the response was drawn from (None: free-form)."""
    choice_token_ids: list[list[int]] | None = None
    """The choices as the sampler tokenized them (None with `choices` set: guided-decoder semantics)."""
    temperature: float = 1.0
    """The sampling temperature: the learner scores the policy as logits / temperature."""


def step_advantages(group: Group, cfg: AdvantageConfig = AdvantageConfig()) -> list[list[float]]:
    """The advantage of every transition of every member, before a batch-level scale
    (`norm_<algo>: batch` leaves them centred only; docs/algorithm.md "Step groups", "Baselines")."""
    how = cfg.norm(group.algo)
    scores = [m.score for m in group.members]
    if group.algo == "3spo":
        per_member = step_group_advantages(scores, norm=how, floor=cfg.norm_floor)
        return [[float(a)] * len(m.transitions) for a, m in zip(per_member, group.members)]
    # GRPO/GiGPO. Under `baseline_invalid: row` an invalid reply's reward (-invalid_penalty) is
    # taken out of the episode return and the step rewards and put back on its own row only.
    penalties = None
    rewards = [[t.reward for t in m.transitions] for m in group.members]
    if cfg.baseline_invalid == "row":
        penalties = [[t.reward if t.invalid else 0.0 for t in m.transitions] for m in group.members]
        scores = [sc - sum(p) for sc, p in zip(scores, penalties)]
        rewards = [[0.0 if t.invalid else t.reward for t in m.transitions] for m in group.members]
    if group.algo == "grpo":
        adv = episode_row_advantages(
            scores,
            [len(m.transitions) for m in group.members],
            row_penalties=penalties,
            stats=cfg.baseline_stats,
            norm=how,
            floor=cfg.norm_floor,
            std=cfg.baseline_std,
        )
    else:
        episodes = [
            [(t.state_key, r) for t, r in zip(m.transitions, rs)]
            for m, rs in zip(group.members, rewards)
        ]
        adv = gigpo_advantages(
            episodes,
            scores,
            gamma=cfg.gamma,
            omega=cfg.omega,
            norm=how,
            floor=cfg.norm_floor,
            std=cfg.baseline_std,
            stats=cfg.baseline_stats,
            row_penalties=penalties,
        )
    return [[float(a) for a in x] for x in adv]


def batch_scale(per_group: Sequence[Sequence[Sequence[float]]]) -> float:
    """`norm_<algo>: batch`: one divisor for all of an update's rows of that algorithm, the root mean
    square of their centred advantages over the groups with a signal (+ 1e-6); 1 when none has one."""
    values = [
        a for group in per_group if any(a for m in group for a in m) for m in group for a in m
    ]
    if not values:
        return 1.0
    return math.sqrt(sum(a * a for a in values) / len(values)) + 1e-6


def group_rows(
    group: Group, cfg: AdvantageConfig = AdvantageConfig(), *, scale: float | None = None
) -> list[Row]:
    """The group's training rows. Under `norm_<algo>: batch`, `scale` is the update's batch scale
    (batch_rows); None: the group alone is the batch."""
    per_step = step_advantages(group, cfg)
    if cfg.norm(group.algo) == "batch":
        s = scale if scale is not None else batch_scale([per_step])
        per_step = [[a / s for a in m] for m in per_step]
    rows = []
    for member, advantages in zip(group.members, per_step):
        for t, a in zip(member.transitions, advantages):
            if a != 0.0 and t.token_ids:
                rows.append(
                    Row(
                        t.prompt_token_ids,
                        t.token_ids,
                        float(a),
                        t.logprobs,
                        t.policy_version,
                        group.group_id,
                        t.choices,
                        t.choice_token_ids,
                        t.temperature,
                    )
                )
    return rows


def batch_rows(groups: Sequence[Group], cfg: AdvantageConfig = AdvantageConfig()) -> list[Row]:
    scales = {
        algo: batch_scale([step_advantages(g, cfg) for g in groups if g.algo == algo])
        for algo in {g.algo for g in groups}
        if cfg.norm(algo) == "batch"
    }
    return [row for g in groups for row in group_rows(g, cfg, scale=scales.get(g.algo))]


def row_stats(rows: Sequence[Row], version: int) -> dict[str, float]:
    """Per-update diagnostics of the rows themselves: how many, their advantages, how stale
    (versions between the policy that sampled a row and the learner's), how many were choice mode."""
    if not rows:
        return {}
    adv = [r.advantage for r in rows]
    mean = sum(adv) / len(adv)
    stale = [version - r.policy_version for r in rows]
    return {
        "adv_mean": mean,
        "adv_std": math.sqrt(sum((a - mean) ** 2 for a in adv) / len(adv)),
        "staleness_mean": sum(stale) / len(stale),
        "staleness_max": float(max(stale)),
        "choice_rows_frac": sum(r.choices is not None for r in rows) / len(rows),
    }
