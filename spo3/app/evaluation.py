"""Held-out evaluation of a training run: how its episodes are played (`EvalSettings`), the
env-step checkpoints at which the published weights are kept (`checkpoint_steps`,
`CheckpointKeeper`), and the evaluation of the kept versions after training, spread over the
run's actor processes (`evaluate_checkpoints`)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from spo3.actors.envs.base import Env
from spo3.actors.evaluate import EvalResult, action_shares, evaluate
from spo3.app.train_config import TrainConfig
from spo3.policy.interface import Policy
from spo3.transport.redis_names import RedisNames

MIN_CHECKPOINTS = 8


def checkpoint_steps(budget: int, n: int = MIN_CHECKPOINTS) -> list[int]:
    """`n` + 1 evenly spaced env-step checkpoints from 0 (before training) to `budget` inclusive."""
    if budget < n or n < 1:
        raise ValueError(f"need budget >= n >= 1 (budget {budget}, n {n})")
    return [round(budget * i / n) for i in range(n + 1)]


@dataclass(frozen=True)
class EvalSettings:
    """How a run's held-out episodes are played: as its rollouts are (steps, choice mode, reply
    length, the history the prompt shows), at the `eval:` section's temperature."""

    max_steps: int
    choice_mode: bool
    max_tokens: int
    history_len: int
    temperature: float
    episodes: int

    @classmethod
    def of_run(cls, cfg: TrainConfig) -> EvalSettings:
        return cls(
            max_steps=cfg.rollout.max_steps,
            choice_mode=cfg.rollout.choice_mode,
            max_tokens=cfg.rollout.max_tokens,
            history_len=cfg.rollout.history_len,
            temperature=cfg.eval.temperature,
            episodes=cfg.eval.episodes,
        )

    def run(self, env: Env, policy: Policy, tasks: Sequence[str]) -> EvalResult:
        """`episodes` episodes of every task in `tasks` (spo3.actors.evaluate.evaluate)."""
        return evaluate(
            env,
            policy,
            tasks,
            max_steps=self.max_steps,
            temperature=self.temperature,
            choice_mode=self.choice_mode,
            max_tokens=self.max_tokens,
            history_len=self.history_len,
            episodes=self.episodes,
        )


@dataclass(frozen=True)
class KeptVersion:
    """The published version current when the run's env steps crossed a checkpoint."""

    env_steps: int  # the checkpoint
    version: int  # 0: nothing published yet (the initial model)
    at_env_steps: int  # the env steps when it was seen crossed


def keep_published_weights(
    client: Any, names: RedisNames, weights_root: Path, keep_root: Path
) -> int:
    """Hard-link the weights of the currently published version into `keep_root` (v00000012.safetensors)
    and return that version (0: nothing published yet, the initial model). The publisher keeps only its
    last few versions; a link keeps this one when it rotates away."""
    from spo3.policy.publish import version_dir

    keep_root.mkdir(parents=True, exist_ok=True)
    for _ in range(10):
        version = int(client.get(names.policy_version) or 0)
        if version == 0:
            return 0
        dst = keep_root / f"v{version:08d}.safetensors"
        if dst.exists():
            return version
        src = version_dir(weights_root, version) / "model.safetensors"
        try:
            os.link(src, dst)
        except FileNotFoundError:  # rotated away since the version was read: a newer one is there
            continue
        except OSError:  # another filesystem
            shutil.copyfile(src, dst)
        return version
    raise RuntimeError(f"could not keep a published version from {weights_root}")


@dataclass
class CheckpointKeeper:
    """Keeps the published weights at each planned checkpoint as the run's env steps cross it."""

    planned: list[int]
    client: Any
    names: RedisNames
    weights_root: Path
    keep_root: Path
    kept: list[KeptVersion] = field(default_factory=list)

    def observe(self, env_steps: int) -> None:
        while len(self.kept) < len(self.planned) and env_steps >= self.planned[len(self.kept)]:
            version = keep_published_weights(
                self.client, self.names, self.weights_root, self.keep_root
            )
            self.kept.append(KeptVersion(self.planned[len(self.kept)], version, env_steps))


class EvalUnit(NamedTuple):
    """One held-out episode: the version's weights file (None: the initial model) on `task`."""

    version: int
    weights: str | None
    task: str


@dataclass
class UnitResult:
    """The episodes of one unit, with its invalid and total actions (to pool invalid rates)."""

    version: int
    per_task: list[dict]
    invalid: float
    actions: int


def evaluate_units(
    env_name: str, model_dir: str, units: Sequence[EvalUnit], settings: EvalSettings, seed: int
) -> list[UnitResult]:
    """Held-out episodes of `units`, in version order, with one engine and one policy that moves
    forward through the versions (runs in an actor process)."""
    import torch
    from safetensors.torch import load_file

    from spo3.actors.envs.registry import make_env
    from spo3.policy.inprocess import InProcessPolicy

    torch.manual_seed(seed)
    policy = InProcessPolicy(model_dir, threads=1)
    env = make_env(env_name)
    out = []
    try:
        for version, weights, task in units:
            if version != policy.version and weights is not None:
                policy.publish(version, load_file(weights))
            r = settings.run(env, policy, [task])
            actions = sum(t["steps"] for t in r.per_task)
            out.append(UnitResult(version, r.per_task, r.invalid_rate * actions, actions))
    finally:
        env.close()
    return out


@dataclass
class CheckpointResults:
    """The evaluation of a run's kept versions: one pooled result per distinct version."""

    kept: list[KeptVersion]
    results: dict[int, EvalResult]  # by version
    wall_s: float
    workers: int

    def of(self, kept: KeptVersion) -> EvalResult:
        return self.results[kept.version]

    def checkpoints(self) -> list[dict[str, Any]]:
        """heldout.json's `checkpoints`: each kept version with its success and episodes."""
        return [
            {
                **dataclasses.asdict(k),
                "success": self.of(k).success_rate,
                "episodes": len(self.of(k).per_task),
            }
            for k in self.kept
        ]

    def to_json(self) -> dict[str, Any]:
        """heldout.json's content (without what the run adds: planned checkpoints, train_eval)."""
        return {
            "checkpoints": self.checkpoints(),
            "evaluations": {
                str(v): {
                    "successes": [t["success"] for t in r.per_task],
                    "steps": [t["steps"] for t in r.per_task],
                    "invalid_rate": r.invalid_rate,
                    "actions": action_shares(r.per_task),
                }
                for v, r in self.results.items()
            },
            "eval_wall_s": self.wall_s,
            "eval_workers": self.workers,
            "eval_episodes": sum(len(r.per_task) for r in self.results.values()),
            "eval_env_steps": sum(t["steps"] for r in self.results.values() for t in r.per_task),
        }


def _pooled(units: list[UnitResult], tasks: int) -> EvalResult:
    per_task = [t for u in units for t in u.per_task]
    actions = sum(u.actions for u in units)
    n = max(len(per_task), 1)
    return EvalResult(
        tasks=tasks,
        success_rate=sum(t["success"] for t in per_task) / n,
        mean_steps=sum(t["steps"] for t in per_task) / n,
        invalid_rate=sum(u.invalid for u in units) / max(actions, 1),
        per_task=per_task,
    )


def evaluate_checkpoints(
    kept: list[KeptVersion],
    tasks: list[str],
    settings: EvalSettings,
    *,
    env_name: str,
    seed: int,
    model_dir: Path,
    keep_root: Path,
    actors: Sequence[Any],
) -> CheckpointResults:
    """Evaluate every distinct version in `kept` on `tasks`, spread over the (stopped, already warm)
    actor processes (Ray handles whose `evaluate` runs `evaluate_units`)."""
    import ray

    versions = sorted({k.version for k in kept})
    units = [
        EvalUnit(v, str(keep_root / f"v{v:08d}.safetensors") if v else None, t)
        for v in versions
        for t in tasks
        for _ in range(settings.episodes)
    ]
    one = dataclasses.replace(settings, episodes=1)  # one unit per episode: the work splits evenly
    workers = max(1, min(len(actors), len(units)))
    start = time.monotonic()
    parts: list[list[UnitResult]] = ray.get(
        [
            actors[i].evaluate.remote(
                env_name, str(model_dir), units[i::workers], one, seed * 1000 + i
            )
            for i in range(workers)
        ]
    )
    wall = time.monotonic() - start
    by_version: dict[int, list[UnitResult]] = {v: [] for v in versions}
    for part in parts:
        for u in part:
            by_version[u.version].append(u)
    results = {v: _pooled(us, len(tasks)) for v, us in by_version.items()}
    return CheckpointResults(kept=kept, results=results, wall_s=wall, workers=workers)
