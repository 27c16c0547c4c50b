"""TextWorld-Express 1.1 (`textworld-express`) adapter: 8 fast text games on a bundled Java engine.

Task id format (documented and parsed strictly):

    GAME:seed=N[:fold=train|dev|test][:PARAMS]

- GAME: cookingworld, coin, twc, mapreader, arithmetic, sorting, simonsays, peckingorder.
- seed=N: the game seed (required: the rollout replays by resetting, so the game must be
  reproducible). TWX's own splits use seeds 0-999 (train), 10000+ (dev), 20000+ (test).
- fold: the object split of the game (default train).
- PARAMS: the engine's generation properties, comma-separated `key=int`, e.g.
  `numLocations=1,numIngredients=2,numDistractorItems=0,includeDoors=0,limitInventorySize=0`.
  Keys are checked by the engine (unknown keys give an EnvError); values must be integers.
  The segments after GAME may come in any order.

Example: `cookingworld:seed=3:numLocations=1,numIngredients=2,numDistractorItems=0,includeDoors=0,limitInventorySize=0`

Texts: `text` is the observation (on reset: the task description, then the observation).
`state_text` is the engine's `look` + `inventory` (both are computed on every step by the engine
and do not depend on the step count). For the games whose state is not visible in the room
(`simonsays`, `arithmetic`, `sorting`, `peckingorder`: progress in a sequence, a problem read or
not) the observation is appended to the state text, so distinct states are not merged.

success = 1.0 if the engine reports `tasksuccess`, else 0.0. done = tasksuccess or taskfailure.
Admissible actions: the engine's `validActions` (sorted for a stable prompt order).

Snapshots: not supported (the engine has no state copy; the Python package's `clone()` starts a
new JVM and replays). `snapshot()` returns None and the rollout resets and replays, which is cheap
here (thousands of steps/s). One JVM per adapter instance, reused across resets; the step path
calls the engine directly (one call + one JSON parse per step).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

from actors.envs.base import EnvError, Observation, StepResult

GAMES = ("cookingworld", "coin", "twc", "mapreader", "arithmetic", "sorting", "simonsays", "peckingorder")
ROOM_GAMES = frozenset({"cookingworld", "coin", "twc", "mapreader"})
FOLDS = ("train", "dev", "test")

_PARAM = re.compile(r"^[A-Za-z][A-Za-z0-9_]*=-?\d+$")


@dataclass(frozen=True)
class TwxTask:
    game: str
    seed: int
    fold: str = "train"
    params: str = ""

    @property
    def task_id(self) -> str:
        out = f"{self.game}:seed={self.seed}"
        if self.fold != "train":
            out += f":fold={self.fold}"
        return out + (f":{self.params}" if self.params else "")


def parse_task_id(task_id: str) -> TwxTask:
    """Parse `GAME:seed=N[:fold=F][:k=v,k=v...]`; raise EnvError with the reason otherwise."""
    if not isinstance(task_id, str) or not task_id.strip():
        raise EnvError("twx: empty task id; expected GAME:seed=N[:fold=train|dev|test][:key=int,...]")
    parts = [p.strip() for p in task_id.strip().split(":")]
    game = parts[0]
    if game not in GAMES:
        raise EnvError(f"twx: unknown game {game!r} in task id {task_id!r}; one of {', '.join(GAMES)}")
    seed: int | None = None
    fold = "train"
    params: list[str] = []
    for part in parts[1:]:
        if not part:
            raise EnvError(f"twx: empty segment in task id {task_id!r}")
        if part.startswith("seed="):
            if seed is not None:
                raise EnvError(f"twx: seed given twice in {task_id!r}")
            try:
                seed = int(part[5:])
            except ValueError:
                raise EnvError(f"twx: seed must be an integer in {task_id!r}") from None
            if seed < 0:
                raise EnvError(f"twx: seed must be >= 0 in {task_id!r}")
        elif part.startswith("fold="):
            fold = part[5:]
            if fold not in FOLDS:
                raise EnvError(f"twx: fold must be one of {FOLDS} in {task_id!r}")
        else:
            for kv in part.split(","):
                kv = kv.strip()
                if not _PARAM.match(kv):
                    raise EnvError(f"twx: bad generation property {kv!r} in {task_id!r}; expected key=integer")
                params.append(kv)
    if seed is None:
        raise EnvError(f"twx: task id {task_id!r} has no seed=N (needed for reproducible resets)")
    keys = [p.split("=")[0] for p in params]
    if len(set(keys)) != len(keys):
        raise EnvError(f"twx: a generation property is given twice in {task_id!r}")
    return TwxTask(game, seed, fold, ",".join(params))


class TwxEnv:
    name = "twx"

    def __init__(self, *, include_task_in_reset_text: bool = True) -> None:
        try:
            from textworld_express import TextWorldExpressEnv
        except ImportError as e:  # pragma: no cover - depends on the install
            raise EnvError("twx: textworld-express is not installed (pip install textworld-express)") from e
        try:
            import orjson

            self._loads = orjson.loads
        except ImportError:  # pragma: no cover
            import json

            self._loads = json.loads
        self.include_task_in_reset_text = include_task_in_reset_text
        try:
            self._env = TextWorldExpressEnv(envStepLimit=10**9)  # the rollout enforces max steps
        except Exception as e:
            raise EnvError(f"twx: cannot start the TextWorld-Express engine (Java 11+ needed): {e}") from e
        self._server = self._env.server
        self._loaded: tuple[str, str] | None = None
        self._task: TwxTask | None = None
        self._done = False
        self._task_description = ""
        self._gold: list[str] | None = None

    # --- protocol ---------------------------------------------------------------------
    def reset(self, task_id: str, *, gold: bool = False) -> Observation:
        task = parse_task_id(task_id)
        if self._server is None:
            raise EnvError("twx: reset() after close()")
        if self._loaded != (task.game, task.params):
            msg = self._server.load(task.game, task.params)
            if msg:
                self._loaded = None
                raise EnvError(f"twx: bad task id {task_id!r}: {str(msg).strip()}")
            self._loaded = (task.game, task.params)
        try:
            info = self._loads(self._server.generateNewGameJSON(task.seed, task.fold, bool(gold)))
        except Exception as e:
            raise EnvError(f"twx: cannot generate {task_id!r}: {e}") from e
        self._task, self._done = task, False
        self._task_description = str(self._server.getTaskDescription() or "").strip()
        self._gold = list(self._server.getGoldActionSequence()) if gold else None
        obs = self._observation(info)
        if self.include_task_in_reset_text and self._task_description:
            obs = Observation(f"{self._task_description}\n\n{obs.text}", obs.state_text, obs.admissible_actions)
        return obs

    def step(self, action: str) -> StepResult:
        if self._task is None:
            raise EnvError("twx: step() before reset()")
        if self._done:
            raise EnvError("twx: step() after the episode ended; reset() first")
        try:
            info = self._loads(self._server.stepJSON(action))
        except Exception as e:
            raise EnvError(f"twx: step({action!r}) failed: {e}") from e
        won, failed = bool(info.get("tasksuccess")), bool(info.get("taskfailure"))
        self._done = won or failed
        return StepResult(
            observation=self._observation(info),
            done=self._done,
            success=1.0 if won else 0.0,
            raw_reward=float(info.get("score") or 0.0),
            info={"tasksuccess": won, "taskfailure": failed, "score": info.get("score"),
                  "score_raw": info.get("scoreRaw")},
        )

    def snapshot(self) -> None:
        return None

    def restore(self, snapshot: Any) -> Observation:
        raise EnvError("twx: snapshots are not supported (snapshot() returns None); reset and replay")

    def close(self) -> None:
        if self._env is not None:
            with contextlib.suppress(Exception):
                self._env.close()
        self._env = self._server = None
        self._task = None

    def __del__(self) -> None:  # the package also registers its own cleanup; be idempotent
        with contextlib.suppress(Exception):
            self.close()

    # --- extras -----------------------------------------------------------------------
    def walkthrough(self) -> list[str]:
        """The engine's gold action sequence for the current task (resets it: call first)."""
        if self._task is None:
            raise EnvError("twx: walkthrough() before reset()")
        if self._gold is None:
            self.reset(self._task.task_id, gold=True)
        return list(self._gold or [])

    @property
    def task_description(self) -> str:
        return self._task_description

    # --- internals --------------------------------------------------------------------
    def _observation(self, info: dict[str, Any]) -> Observation:
        obs = str(info.get("observation") or "").strip()
        look = str(info.get("look") or "").strip()
        inventory = str(info.get("inventory") or "").strip()
        state_text = f"{look}\n{inventory}"
        if self._task is not None and self._task.game not in ROOM_GAMES:
            state_text += f"\n{obs}"
        actions = tuple(sorted(set(info.get("validActions") or ())))
        return Observation(text=obs, state_text=state_text, admissible_actions=actions)
