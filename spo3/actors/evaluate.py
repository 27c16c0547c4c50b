"""Held-out evaluation: one episode per task with the policy, no branching and no learning."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spo3.actors.envs.base import Env
from spo3.actors.prompts import build_messages, parse_action
from spo3.policy.interface import Policy
from spo3.transport.contracts import SamplingParams


@dataclass
class EvalResult:
    tasks: int
    success_rate: float
    mean_steps: float
    invalid_rate: float
    per_task: list[dict]


def evaluate(
    env: Env,
    policy: Policy,
    tasks: Sequence[str],
    *,
    max_steps: int = 15,
    temperature: float = 0.4,
    choice_mode: bool = False,
    max_tokens: int = 64,
    history_len: int = 3,
    episodes: int = 1,
) -> EvalResult:
    """Success rate over `episodes` episodes of every task (temperature 0.4 as in the paper)."""
    per_task: list[dict[str, Any]] = []
    actions, invalid = 0, 0
    for task in tasks:
        for _ in range(episodes):
            obs = env.reset(task)
            goal, success, steps = obs.text, 0.0, 0
            history: list[tuple[str, str]] = []  # (action, observation that followed)
            taken: list[str | None] = []  # None: an invalid reply
            while steps < max_steps:
                admissible = list(obs.admissible_actions)
                messages = build_messages(
                    goal, history, obs.text, admissible, history_len=history_len
                )
                params = SamplingParams(
                    n=1,
                    temperature=temperature,
                    max_tokens=max_tokens,
                    choices=admissible if choice_mode and admissible else None,
                )
                reply = policy.sample(messages, params)[0]
                parsed = parse_action(reply.text, admissible, bare_ok=choice_mode)
                steps += 1
                actions += 1
                taken.append(parsed.action)
                if parsed.action is None:
                    invalid += 1
                    continue
                result = env.step(parsed.action)
                history.append((parsed.action, result.observation.text))
                obs = result.observation
                if result.done:
                    success = result.success
                    break
            per_task.append({"task": task, "success": success, "steps": steps, "actions": taken})
    n = max(len(per_task), 1)
    return EvalResult(
        tasks=len(tasks),
        success_rate=sum(t["success"] for t in per_task) / n,
        mean_steps=sum(t["steps"] for t in per_task) / n,
        invalid_rate=invalid / max(actions, 1),
        per_task=per_task,
    )


def action_shares(per_task: Sequence[dict]) -> dict[str, float]:
    """Share of each action verb (the action's first word) among the valid actions of evaluated episodes,
    most frequent first: what a policy does, e.g. {"go": 0.83, "close": 0.12, "open": 0.05}."""
    verbs = Counter(
        a.split()[0] if a.split() else a
        for t in per_task
        for a in t.get("actions", [])
        if a is not None
    )
    total = sum(verbs.values())
    return {v: n / total for v, n in verbs.most_common()} if total else {}
