"""Task ids of a run's training and held-out split, for each environment that can generate them:
TextWorld games made with tw-make, TextWorld-Express ids, ALFWorld game folders. Environment
names (and their aliases) are spo3.actors.envs.registry's.

`task_lists(split, default_dir)` takes any object with the fields of `TaskSplit` (the run's
`games:` section, spo3.app.train_config.GamesConfig).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from spo3.actors.envs.registry import canonical_name

HELD_OUT_OFFSET = (
    10_000  # TextWorld's held-out game seeds start here within a seed's block (TWX's at twice it)
)


class TaskSplit(Protocol):
    """What a split is made from (the fields of the run's `games:` section)."""

    @property
    def env(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def train(self) -> int: ...
    @property
    def eval(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def seed_stride(self) -> int: ...
    @property
    def settings(self) -> Mapping[str, Any]: ...
    @property
    def tasks(self) -> Sequence[str]: ...
    @property
    def eval_tasks(self) -> Sequence[str]: ...
    @property
    def cache_dir(self) -> str | None: ...


Split = tuple[list[str], list[str]]  # (training task ids, held-out task ids)


def task_seeds(split: TaskSplit) -> tuple[list[int], list[int]]:
    """(training, held-out) game seeds of a generated split (TextWorld; TWX adds HELD_OUT_OFFSET
    to the held-out ones, in its test fold): a block of its own per `split.seed`."""
    base = split.seed * split.seed_stride
    return (
        [base + i for i in range(split.train)],
        [base + HELD_OUT_OFFSET + i for i in range(split.eval)],
    )


def _textworld_tasks(split: TaskSplit, default_dir: Path) -> Split:
    from spo3.actors.envs.textworld_env import generate_games

    out = Path(split.cache_dir) if split.cache_dir else default_dir
    train_seeds, held_seeds = task_seeds(split)
    settings = dict(split.settings)
    train = generate_games(out, split.kind, split.train, seed=train_seeds[0], **settings)
    held_out = generate_games(out, split.kind, split.eval, seed=held_seeds[0], **settings)
    return train, held_out


def _twx_tasks(split: TaskSplit, default_dir: Path) -> Split:
    params = ",".join(f"{k}={int(v)}" for k, v in split.settings.items())
    suffix = f":{params}" if params else ""
    train_seeds, held_seeds = task_seeds(split)
    train = [f"{split.kind}:seed={s}:fold=train{suffix}" for s in train_seeds]
    held_out = [f"{split.kind}:seed={s + HELD_OUT_OFFSET}:fold=test{suffix}" for s in held_seeds]
    return train, held_out


def _alfworld_tasks(split: TaskSplit, default_dir: Path) -> Split:
    from spo3.actors.envs.alfworld_env import list_games

    task_types = split.settings.get("task_types")
    found = list_games(split.settings.get("data_dir"), task_types=task_types)
    rng = random.Random(split.seed)
    if split.settings.get("eval_data_dir"):  # a held-out split of its own (spo3 make-games)
        held = list_games(split.settings["eval_data_dir"], task_types=task_types)
        rng.shuffle(found)
        rng.shuffle(held)
        return found[: split.train], held[: split.eval]
    if len(found) < split.train + split.eval:  # too few games for a split: evaluate in distribution
        return found, found
    rng.shuffle(found)
    return found[: split.train], found[split.train : split.train + split.eval]


GENERATORS: dict[str, Callable[[TaskSplit, Path], Split]] = {
    "textworld": _textworld_tasks,
    "twx": _twx_tasks,
    "alfworld": _alfworld_tasks,
}


def task_lists(split: TaskSplit, default_dir: Path) -> Split:
    """(training task ids, held-out task ids) for `split`: explicit lists, else generated ones
    (TextWorld games are written under `split.cache_dir`, else `default_dir`)."""
    if split.tasks:
        # files and folders given relative to here become absolute: actor processes start elsewhere
        def absolute(ts: Sequence[str]) -> list[str]:
            return [str(Path(t).resolve()) if Path(t).exists() else t for t in ts]

        return absolute(split.tasks), absolute(split.eval_tasks or split.tasks)
    generate = GENERATORS.get(canonical_name(split.env))
    if generate is None:
        raise ValueError(
            f"games.env={split.env!r}: no task generator; give the task ids in games.tasks "
            "(and games.eval_tasks)"
        )
    return generate(split, default_dir)
