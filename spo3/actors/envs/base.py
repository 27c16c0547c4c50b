"""The environment protocol every adapter implements.

Observations carry two texts: `text`, what the agent is shown, and `state_text`, the
canonical description of the state the state key is computed from (volatile parts such as
step counters or scores removed; richer when the adapter knows more, e.g. room + inventory).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Observation:
    text: str
    state_text: str
    admissible_actions: tuple[str, ...] = ()


@dataclass(frozen=True)
class StepResult:
    observation: Observation
    done: bool
    success: float = 0.0
    """Task success in [0, 1] (1 = won). Never the raw environment reward."""
    raw_reward: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


class EnvError(RuntimeError):
    """The environment could not be created, reset or stepped (bad task id, missing data...)."""


class Env(Protocol):
    name: str

    def reset(self, task_id: str) -> Observation:
        """Start task `task_id` from its initial state."""
        ...

    def step(self, action: str) -> StepResult:
        """Apply one action (any string: inadmissible ones are the engine's business)."""
        ...

    def snapshot(self) -> Any | None:
        """An opaque copy of the current state to `restore` later, or None if the engine
        cannot copy its state (the rollout then resets and replays the action prefix)."""
        ...

    def restore(self, snapshot: Any) -> Observation: ...

    # Optional, used by the rollout when an adapter has them (engines without cheap snapshots):
    # replay(task_id, actions) -> Observation: reset and apply `actions` (e.g. in one engine call);
    # replay_step(task_id, actions, action) -> (Observation, StepResult): replay, then step `action`;
    # step_from(snapshot | None, action, save=True) -> (StepResult, snapshot | None): restore (None:
    #   from the current state), step and (if `save`) snapshot the new state, in one engine call.

    def close(self) -> None: ...


def close_engines(engines: Iterable[Any]) -> None:
    """Close an adapter's cached engines (None entries skipped): a close never fails, because an engine
    whose process already died must not stop the others from closing."""
    for engine in engines:
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.close()
