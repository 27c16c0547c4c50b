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

Snapshots: the engine has no state copy of its own (the Python package's `clone()` starts a new
JVM and replays), so a small helper compiled into the JVM does it (spo3/actors/envs/java/TwxReplay.java,
compiled once per machine into $SPO3_CACHE_DIR, default ~/.cache/spo3, when a JDK's `javac` is on
the PATH): `snapshot()` deep-copies the game's object graph inside the JVM and keeps it under an id
(one Py4J call, ~0.1 ms), `restore()` copies it back, and `step_from(snapshot, action)` restores,
steps and snapshots the new state in one call, so a new step from any node costs one round trip
like a plain step. A reset() releases the adapter's snapshots (a rollout resets once, at its
root), and at most `max_snapshots` are kept (the memory bound; beyond it `snapshot()` is None and
the rollout replays). Without the helper (no JDK, `snapshots=False`), `snapshot()` is None and the
rollout restores a node with `replay()` / `replay_step()`: reset and replay the action prefix,
inside the JVM in one call when the helper is there (`fast_replay`), else step by step from Python
(~40 us per step, almost all of it the Py4J round trip). One JVM per adapter instance, reused across
resets; the step path calls the engine directly (one call + one JSON parse per step).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spo3.actors.envs.base import EnvError, Observation, StepResult, close_engines

GAMES = (
    "cookingworld",
    "coin",
    "twc",
    "mapreader",
    "arithmetic",
    "sorting",
    "simonsays",
    "peckingorder",
)
ROOM_GAMES = frozenset({"cookingworld", "coin", "twc", "mapreader"})
FOLDS = ("train", "dev", "test")

_PARAM = re.compile(r"^[A-Za-z][A-Za-z0-9_]*=-?\d+$")
_REPLAY_SOURCE = Path(__file__).with_name("java") / "TwxReplay.java"
log = logging.getLogger("spo3.twx")


def replay_classpath(jar: str) -> str | None:
    """The directory holding spo3/TwxReplay.class compiled against `jar` (compiled on first use,
    cached per source and jar), or None when no `javac` is available or compiling fails."""
    javac = shutil.which("javac")
    if javac is None or not _REPLAY_SOURCE.is_file():
        return None
    digest = hashlib.blake2b(
        _REPLAY_SOURCE.read_bytes() + str(os.path.getsize(jar)).encode(), digest_size=8
    ).hexdigest()
    cache = (
        Path(os.environ.get("SPO3_CACHE_DIR") or Path.home() / ".cache" / "spo3")
        / f"twx-replay-{digest}"
    )
    if (cache / "spo3" / "TwxReplay.class").is_file():
        return str(cache)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache.parent, prefix=".build-")
        subprocess.run(
            [
                javac,
                "--release",
                "17",
                "-nowarn",
                "-XDignore.symbol.file",
                "-cp",
                jar,
                "-d",
                tmp,
                str(_REPLAY_SOURCE),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        try:
            os.rename(tmp, cache)  # atomic: concurrent actors either win or find it there
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("twx: cannot compile the in-JVM replay (%s); replaying from Python", e)
        return None
    return str(cache) if (cache / "spo3" / "TwxReplay.class").is_file() else None


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
        raise EnvError(
            "twx: empty task id; expected GAME:seed=N[:fold=train|dev|test][:key=int,...]"
        )
    parts = [p.strip() for p in task_id.strip().split(":")]
    game = parts[0]
    if game not in GAMES:
        raise EnvError(
            f"twx: unknown game {game!r} in task id {task_id!r}; one of {', '.join(GAMES)}"
        )
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
                    raise EnvError(
                        f"twx: bad generation property {kv!r} in {task_id!r}; expected key=integer"
                    )
                params.append(kv)
    if seed is None:
        raise EnvError(f"twx: task id {task_id!r} has no seed=N (needed for reproducible resets)")
    keys = [p.split("=")[0] for p in params]
    if len(set(keys)) != len(keys):
        raise EnvError(f"twx: a generation property is given twice in {task_id!r}")
    return TwxTask(game, seed, fold, ",".join(params))


@dataclass(frozen=True)
class _Snapshot:
    task: TwxTask
    id: int
    """The id of the JVM's copy of the game and its last step (TwxReplay.save)."""
    generation: int
    """Resets of the adapter when it was taken: a reset releases every snapshot."""
    observation: Observation
    task_description: str


class TwxEnv:
    name = "twx"

    def __init__(
        self,
        *,
        include_task_in_reset_text: bool = True,
        fast_replay: bool = True,
        snapshots: bool = True,
        max_snapshots: int = 4096,
    ) -> None:
        try:
            from py4j.java_gateway import JavaClass
            from textworld_express import TextWorldExpressEnv
            from textworld_express.textworld_express import JAR_PATH
        except ImportError as e:  # pragma: no cover - depends on the install
            raise EnvError(
                "twx: textworld-express is not installed (pip install textworld-express)"
            ) from e
        self._loads: Callable[[str], Any]
        try:
            import orjson

            self._loads = orjson.loads
        except ImportError:  # pragma: no cover
            import json

            self._loads = json.loads
        self.include_task_in_reset_text = include_task_in_reset_text
        extra = replay_classpath(JAR_PATH) if fast_replay else None
        try:  # the rollout enforces max steps
            self._env = TextWorldExpressEnv(
                serverPath=f"{JAR_PATH}{os.pathsep}{extra}" if extra else None, envStepLimit=10**9
            )
        except Exception as e:
            raise EnvError(
                f"twx: cannot start the TextWorld-Express engine (Java 11+ needed): {e}"
            ) from e
        self._server = self._env.server
        helper = self._env._gateway.jvm.spo3.TwxReplay if extra else None
        if helper is not None and not isinstance(helper, JavaClass):  # not loadable (Java < 17)
            log.warning("twx: the JVM cannot load the in-JVM replay helper; replaying from Python")
            helper = None
        # Bound once: each attribute lookup on a Py4J class is a round trip of its own.
        self._replay: Callable[..., str] | None
        self._replay_step: Callable[..., str] | None
        self._save: Callable[..., Any] | None
        self._load: Callable[..., Any] | None
        self._step_from: Callable[..., str] | None
        self._replay = helper.replay if helper is not None else None
        self._replay_step = helper.replayStep if helper is not None else None
        self._save = helper.save if helper is not None and snapshots else None
        self._load = helper.restore if helper is not None and snapshots else None
        self._step_from = helper.stepFrom if helper is not None and snapshots else None
        self._clear = helper.clear if helper is not None else None
        self.max_snapshots = max(0, max_snapshots)
        """Most snapshots kept in the JVM at once (the memory bound); beyond it snapshot() is None."""
        self._generation = 0
        self._saved = 0
        self.fast_replay = self._replay is not None
        """True when replay() runs inside the JVM (one Py4J call per restore)."""
        self.snapshots = self._save is not None
        """True when snapshot() copies the game inside the JVM (else None: the rollout replays)."""
        self._last_obs: Observation | None = None
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
        self._release()
        self._task_description = str(self._server.getTaskDescription() or "").strip()
        self._gold = list(self._server.getGoldActionSequence()) if gold else None
        obs = self._observation(info)
        if self.include_task_in_reset_text and self._task_description:
            obs = Observation(
                f"{self._task_description}\n\n{obs.text}", obs.state_text, obs.admissible_actions
            )
        self._last_obs = obs
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
        return self._result(info)

    def _result(self, info: dict[str, Any]) -> StepResult:
        won, failed = bool(info.get("tasksuccess")), bool(info.get("taskfailure"))
        self._done = won or failed
        self._last_obs = self._observation(info)
        return StepResult(
            observation=self._last_obs,
            done=self._done,
            success=1.0 if won else 0.0,
            raw_reward=float(info.get("score") or 0.0),
            info={
                "tasksuccess": won,
                "taskfailure": failed,
                "score": info.get("score"),
                "score_raw": info.get("scoreRaw"),
            },
        )

    def replay(self, task_id: str, actions: list[str]) -> Observation:
        """Reset `task_id` and apply `actions`; the observation after the last one (the rollout's
        restore of a node: one engine call when `fast_replay`). A replayed prefix never ends the
        episode before its last action (the rollout only extends live paths)."""
        replay = self._replay
        if replay is None or not self._can_replay(task_id, actions):
            obs = self.reset(task_id)
            for a in actions:
                obs = self.step(a).observation
            return obs
        task = parse_task_id(task_id)
        try:
            info = self._loads(replay(self._server, task.seed, task.fold, "\n".join(actions)))
        except Exception as e:
            raise EnvError(f"twx: cannot replay {len(actions)} actions of {task_id!r}: {e}") from e
        return self._replayed(task, info, bool(actions))

    def replay_step(
        self, task_id: str, actions: list[str], action: str
    ) -> tuple[Observation, StepResult]:
        """`replay(task_id, actions)` then `step(action)`: (the observation the prefix reached, the new
        step's result), in one engine call when `fast_replay` (a new step from any node costs one
        Py4J round trip, like a step from the current state)."""
        replay_step = self._replay_step  # set exactly when self._replay is
        if replay_step is None or not self._can_replay(task_id, actions + [action]):
            obs = self.replay(task_id, actions)
            return obs, self.step(action)
        task = parse_task_id(task_id)
        try:
            before, after = replay_step(
                self._server, task.seed, task.fold, "\n".join(actions), action
            ).split("\0", 1)
        except Exception as e:
            raise EnvError(
                f"twx: cannot replay {len(actions)} actions of {task_id!r} and step: {e}"
            ) from e
        obs = self._replayed(task, self._loads(before), bool(actions))
        if self._done:
            raise EnvError(
                f"twx: the replayed prefix of {task_id!r} ended the episode; cannot step {action!r}"
            )
        return obs, self._result(self._loads(after))

    def _can_replay(self, task_id: str, actions: list[str]) -> bool:
        if self._replay is None or any("\n" in a or "\0" in a for a in actions):
            return False
        task = parse_task_id(task_id)
        if self._loaded != (task.game, task.params) or self._server is None:
            self.reset(task_id)  # loads the game (and checks the id) the slow way once
        return True

    def _replayed(self, task: TwxTask, info: dict[str, Any], stepped: bool) -> Observation:
        """The adapter's state after an in-JVM replay that ended with `info`."""
        if self._task != task:
            self._task_description = str(self._server.getTaskDescription() or "").strip()
        self._task, self._gold = task, None
        obs = self._observation(info)
        if stepped:
            self._done = bool(info.get("tasksuccess")) or bool(info.get("taskfailure"))
        else:
            self._done = False
            if self.include_task_in_reset_text and self._task_description:
                obs = Observation(
                    f"{self._task_description}\n\n{obs.text}",
                    obs.state_text,
                    obs.admissible_actions,
                )
        self._last_obs = obs
        return obs

    def snapshot(self) -> _Snapshot | None:
        """A deep copy of the game kept inside the JVM (one Py4J call), valid until the next reset();
        None without the helper, after the episode ended, or with max_snapshots kept already."""
        if self._save is None or self._task is None or self._done or self._last_obs is None:
            return None
        try:
            sid = int(self._save(self._server, self.max_snapshots))
        except Exception as e:
            raise EnvError(f"twx: cannot copy the game state: {e}") from e
        return self._snapshot(sid)

    def restore(self, snapshot: _Snapshot) -> Observation:
        load = self._check(snapshot)
        try:
            load(self._server, snapshot.id)
        except Exception as e:
            raise EnvError(f"twx: cannot restore the game state: {e}") from e
        self._restored(snapshot)
        return snapshot.observation

    def step_from(
        self, snapshot: _Snapshot | None, action: str, *, save: bool = True
    ) -> tuple[StepResult, _Snapshot | None]:
        """restore(snapshot) (None: from the current state), step(action), snapshot() if `save`: one
        Py4J call."""
        if self._step_from is None:
            if snapshot is not None:
                self.restore(snapshot)
            result = self.step(action)
            return result, None if result.done or not save else self.snapshot()
        if snapshot is not None:
            self._check(snapshot)
        elif self._task is None or self._done:
            raise EnvError("twx: step() before reset() or after the episode ended")
        try:
            sid, payload = self._step_from(
                self._server,
                snapshot.id if snapshot else -1,
                action,
                self.max_snapshots if save else 0,
            ).split("\0", 1)
        except Exception as e:
            raise EnvError(f"twx: step({action!r}) from a snapshot failed: {e}") from e
        if snapshot is not None:
            self._restored(snapshot)
        result = self._result(self._loads(payload))
        return result, None if result.done else self._snapshot(int(sid))

    def _snapshot(self, sid: int) -> _Snapshot | None:
        if sid < 0:
            return None
        task, obs = self._task, self._last_obs
        if task is None or obs is None:  # set by the step that saved it
            raise EnvError("twx: a game state was saved before reset()")
        self._saved += 1
        return _Snapshot(task, sid, self._generation, obs, self._task_description)

    def _check(self, snapshot: _Snapshot) -> Callable[..., Any]:
        """Refuse a snapshot this engine cannot restore; returns the in-JVM restore."""
        load = self._load
        if not isinstance(snapshot, _Snapshot) or load is None:
            raise EnvError("twx: restore() needs a snapshot taken by this adapter")
        if snapshot.generation != self._generation:
            raise EnvError("twx: the snapshot was released by a reset() since it was taken")
        return load

    def _restored(self, snapshot: _Snapshot) -> None:
        self._task, self._done, self._gold = snapshot.task, False, None
        self._task_description, self._last_obs = snapshot.task_description, snapshot.observation

    def _release(self) -> None:
        """A reset releases the JVM's snapshots (a rollout resets once, at its root)."""
        self._generation += 1
        if self._saved and self._clear is not None:
            self._clear(self._server)
            self._saved = 0

    def close(self) -> None:
        close_engines([self._env])
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
