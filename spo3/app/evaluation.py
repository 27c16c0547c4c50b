"""Held-out evaluation of a training run: the env-step checkpoints at which the published
weights are kept and later evaluated."""

from __future__ import annotations

MIN_CHECKPOINTS = 8


def checkpoint_steps(budget: int, n: int = MIN_CHECKPOINTS) -> list[int]:
    """`n` + 1 evenly spaced env-step checkpoints from 0 (before training) to `budget` inclusive."""
    if budget < n or n < 1:
        raise ValueError(f"need budget >= n >= 1 (budget {budget}, n {n})")
    return [round(budget * i / n) for i in range(n + 1)]
