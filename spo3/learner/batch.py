"""From groups to training rows: the advantage of every transition, by algorithm.

3SPO: members of a step group are compared by their step rewards. GRPO: episodes of a task by
their returns, broadcast to every step. GiGPO: GRPO's episode advantage plus a step advantage
among steps that share an anchor state. Rows with zero advantage are left out: they would cost
a forward/backward pass and add no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from spo3.learner.advantages import gigpo_advantages, grpo_advantages, step_group_advantages
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


def group_rows(group: Group, cfg: AdvantageConfig = AdvantageConfig()) -> list[Row]:
    scores = [m.score for m in group.members]
    if group.algo == "3spo":
        per_member = step_group_advantages(scores, mean_only=cfg.mean_only)
        per_step = [[a] * len(m.transitions) for a, m in zip(per_member, group.members)]
    elif group.algo == "grpo":
        per_member = grpo_advantages(scores, mean_only=cfg.mean_only)
        per_step = [[a] * len(m.transitions) for a, m in zip(per_member, group.members)]
    else:
        episodes = [[(t.state_key, t.reward) for t in m.transitions] for m in group.members]
        per_step = [
            list(a)
            for a in gigpo_advantages(
                episodes, scores, gamma=cfg.gamma, omega=cfg.omega, mean_only=cfg.mean_only
            )
        ]
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
    return [row for g in groups for row in group_rows(g, cfg)]


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
