"""ALFWorld 0.4.2 adapter on its real text engine.

The engine is the one `alfworld.agents.environment.AlfredTWEnv` builds: TextWorld's PDDL engine
(`textworld.envs.PddlEnv`, Fast Downward underneath) playing a `game.tw-pddl`, wrapped in ALFWorld's
`AlfredDemangler` (object ids such as `Apple_bar__plus_01_dot_10_...` become "apple 1") and
`AlfredInfos`, without domain randomization (AlfredTWEnv's evaluation setting). AlfredTWEnv itself is
not used because it only exposes a batched gym interface over a whole split.

Task id: the path of an ALFWorld game folder (the folder holding `traj_data.json` and
`game.tw-pddl`, as in ALFWorld's `json_2.1.1/<split>/<task>/<trial>/`), or of its `game.tw-pddl`.
A relative path is resolved against the adapter's data directory (`data_dir`, else `$ALFWORLD_DATA`).
`list_games()` enumerates a directory the way AlfredTWEnv does (solvable games only, movable and
sliced trajectories skipped) and raises EnvError when there are none: AlfredTWEnv spins forever on
an empty game list, this adapter refuses instead. A folder with `traj_data.json` and
`initial_state.pddl` but no `game.tw-pddl` needs ALFWorld's `alfworld-generate` first.

Texts: `text` is ALFWorld's observation (on reset the intro: the receptacles in view and "Your
task is to: ..."; the "-= Welcome to TextWorld, ALFRED! =-" banner is dropped).
`state_text` (the state key's text, docs/algorithm.md "State key") is by default (`state="facts"`) the
world state: the engine's sorted PDDL facts (the agent's location, what it holds, where every object
is, which receptacles are open, which devices are on), bookkeeping facts (`checked`, `examined`)
excluded, so `look`, `inventory`, `help`, `examine` and invalid actions ("Nothing happens.") keep
the key, two routes to the same world state share it, and two world states with the same feedback
("You arrive at fridge 1." with and without the apple in hand) get different keys. Objects are the
engine's own ids, so two apples are never merged. `state="observation"` keys on the action's
feedback instead (without the banner and the task sentence): it merges and splits world states
as just described, and is kept only for comparison.

success = 1.0 if the game is won (the PDDL goal holds), else 0.0. raw_reward = 10.0 when won (the
ALFWorld reward of verl-agent/GiGPO; TextWorld's own score is info["score"]), never the success.
done = won (ALFWorld has no losing state; the rollout enforces max steps).

Snapshots (`snapshots=True`, the default): the engine's state lives in two places, Fast Downward's
state registry (a C library, one copy per loaded game) and TextWorld's Python objects (the facts,
the last game state with its admissible commands). A snapshot holds the registry's id of the
current state (the library's `get_state_id`, which textworld's binding does not declare) and copies
of the Python side; `restore` sets the id back, recomputes the library's applicable operators and
puts the Python side back: microseconds, against ~0.2 s for a reset (textworld translates the PDDL
problem again) plus ~0.1 s per replayed step (the admissible commands' text generation). A reset
starts a new state registry, so a snapshot is valid until the next `reset()` of its game (the
rollout resets once per task, at its root); restoring an older one is an EnvError. With
`snapshots=False` (or a library without `get_state_id`), `snapshot()` returns None and the rollout
resets and replays.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spo3.actors.envs.base import EnvError, Observation, StepResult, close_engines

TASK_TYPES = {
    1: "pick_and_place_simple",
    2: "look_at_obj_in_light",
    3: "pick_clean_then_place_in_recep",
    4: "pick_heat_then_place_in_recep",
    5: "pick_cool_then_place_in_recep",
    6: "pick_two_obj_and_place",
}
GAME_FILE = "game.tw-pddl"
_BANNER = re.compile(r"^\s*-=\s*Welcome to TextWorld, ALFRED!\s*=-\s*", re.IGNORECASE)
_TASK_LINE = re.compile(r"\n*\s*Your task is to:[^\n]*", re.IGNORECASE)
_TASK_SENTENCE = re.compile(r"Your task is to:\s*([^\n]*)", re.IGNORECASE)
_BOOKKEEPING = {"checked", "examined"}


def default_data_dir() -> str | None:
    return os.environ.get("ALFWORLD_DATA") or None


def has_games(data_dir: str | os.PathLike[str]) -> bool:
    """True as soon as one game.tw-pddl exists under `data_dir` (stops at the first)."""
    for _root, _dirs, files in os.walk(data_dir):
        if GAME_FILE in files:
            return True
    return False


def list_games(
    data_dir: str | os.PathLike | None = None,
    *,
    task_types: Iterable[int | str] | None = None,
    solvable_only: bool = True,
) -> list[str]:
    """The game folders under `data_dir` that AlfredTWEnv would play, sorted.

    Skips folders with 'movable' or 'Sliced' in their path (not supported by ALFWorld's text engine),
    task types not in `task_types` (ids 1-6 or names; default all), games without a game.tw-pddl,
    and (with `solvable_only`) games not marked solvable by alfworld-generate.
    Raises EnvError when the result is empty (AlfredTWEnv would spin forever on zero games).
    """
    data_dir = data_dir or default_data_dir()
    if not data_dir:
        raise EnvError("alfworld: no data directory: pass data_dir or set $ALFWORLD_DATA")
    root_dir = Path(data_dir).expanduser()
    if not root_dir.is_dir():
        raise EnvError(f"alfworld: data directory {str(root_dir)!r} does not exist")
    wanted = None
    if task_types is not None:
        wanted = {TASK_TYPES[t] if isinstance(t, int) else str(t) for t in task_types}
    out = []
    for root, _dirs, files in os.walk(root_dir):
        if "traj_data.json" not in files or GAME_FILE not in files:
            continue
        if "movable" in root or "Sliced" in root:
            continue
        if wanted is not None:
            with open(os.path.join(root, "traj_data.json")) as f:
                if json.load(f).get("task_type") not in wanted:
                    continue
        if solvable_only:
            with open(os.path.join(root, GAME_FILE)) as f:
                if not json.load(f).get("solvable"):
                    continue
        out.append(str(Path(root).resolve()))
    if not out:
        raise EnvError(
            f"alfworld: no playable games (traj_data.json + solvable {GAME_FILE}) under {str(root_dir)!r}. "
            "Download ALFWorld's data (alfworld-download, needs the internet) and point $ALFWORLD_DATA at it, "
            "or run alfworld-generate on folders holding traj_data.json and initial_state.pddl."
        )
    return sorted(out)


@dataclass(frozen=True)
class _Snapshot:
    game: str
    generation: int
    """Resets of the game's engine when the snapshot was taken (a reset invalidates it)."""
    state_id: int
    python: tuple
    """PddlState facts and variables, the PddlEnv's game states, last action and moves."""
    last: Any
    won: bool
    task_description: str


def _state_ids(env: Any) -> Any | None:
    """The engine's Fast Downward library with get_state_id/set_state_id declared, or None."""
    lib = getattr(env.unwrapped, "downward_lib", None)
    if lib is None or not hasattr(lib, "get_state_id") or not hasattr(lib, "set_state_id"):
        return None
    lib.get_state_id.argtypes, lib.get_state_id.restype = [], ctypes.c_int
    lib.set_state_id.argtypes, lib.set_state_id.restype = [ctypes.c_int], None
    return lib


class AlfWorldEnv:
    name = "alfworld"

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        *,
        state: str = "facts",
        check_data: bool = True,
        max_loaded_games: int = 8,
        snapshots: bool = True,
    ) -> None:
        try:
            import textworld  # noqa: F401
            from alfworld.agents.environment.alfred_tw_env import (  # noqa: F401
                AlfredDemangler,
                AlfredInfos,
            )
        except ImportError as e:  # pragma: no cover - depends on the install
            raise EnvError(f"alfworld: alfworld/textworld[pddl] not importable: {e}") from e
        if state not in ("observation", "facts"):
            raise EnvError(f"alfworld: state must be 'observation' or 'facts', got {state!r}")
        self.state_mode = state
        self.snapshots = snapshots
        self.data_dir = str(Path(data_dir).expanduser()) if data_dir else default_data_dir()
        if data_dir is not None and check_data:
            if self.data_dir is None or not Path(self.data_dir).is_dir():
                raise EnvError(f"alfworld: data directory {self.data_dir!r} does not exist")
            if not has_games(self.data_dir):
                raise EnvError(
                    f"alfworld: no {GAME_FILE} under {self.data_dir!r} (zero games: AlfredTWEnv would "
                    "hang); download ALFWorld's data or run alfworld-generate"
                )
        self.max_loaded_games = max(1, max_loaded_games)
        self._envs: OrderedDict[str, Any] = OrderedDict()
        self._env: Any = None
        self._game: str | None = None
        self._game_data: dict[str, Any] = {}
        self._last: Any = None
        self._won = False
        self._task_description = ""

    # --- protocol ---------------------------------------------------------------------
    def reset(self, task_id: str) -> Observation:
        env = self._load(task_id)
        try:
            state = env.reset()
        except Exception as e:
            raise EnvError(f"alfworld: cannot reset {task_id!r}: {e}") from e
        self._last, self._won = state, False
        env.__dict__["_spo3_generation"] = env.__dict__.get("_spo3_generation", 0) + 1
        m = _TASK_SENTENCE.search(state.get("feedback") or "")
        self._task_description = m.group(1).strip() if m else ""
        return self._observation(state)

    def step(self, action: str) -> StepResult:
        if self._env is None or self._last is None:
            raise EnvError("alfworld: step() before reset()")
        if self._won:
            raise EnvError("alfworld: step() after the task was completed; reset() first")
        try:
            state, score, _done = self._env.step(action)
        except Exception as e:
            raise EnvError(f"alfworld: step({action!r}) failed: {e}") from e
        self._last = state
        won = bool(state.get("won"))
        self._won = won
        return StepResult(
            observation=self._observation(state),
            done=won,
            success=1.0 if won else 0.0,
            raw_reward=10.0 if won else 0.0,
            info={"won": won, "score": score, "valid": state.get("_last_action") is not None},
        )

    def snapshot(self) -> _Snapshot | None:
        if not self.snapshots or self._env is None or self._last is None or self._game is None:
            return None
        lib = _state_ids(self._env)
        if lib is None:
            return None
        pddl = self._env.unwrapped
        ps = pddl._pddl_state
        python = (
            {k: set(v) for k, v in ps._facts.items()},
            dict(ps._vars_by_name),
            {k: set(v) for k, v in ps._vars_by_type.items()},
            ps._var_counts.copy(),
            ps._operators,
            pddl.state,
            pddl.prev_state,
            pddl._last_action,
            pddl._moves,
        )
        return _Snapshot(
            self._game,
            self._env.__dict__.get("_spo3_generation", 0),
            lib.get_state_id(),
            python,
            self._last,
            self._won,
            self._task_description,
        )

    def restore(self, snapshot: _Snapshot) -> Observation:
        if not isinstance(snapshot, _Snapshot):
            raise EnvError("alfworld: restore() needs a snapshot taken by this adapter")
        env = self._envs.get(snapshot.game)
        if env is None or env.__dict__.get("_spo3_generation", 0) != snapshot.generation:
            raise EnvError(
                "alfworld: the snapshot's game was reset (or unloaded) since it was taken"
            )
        self._envs.move_to_end(snapshot.game)
        self._env, self._game = env, snapshot.game
        self._game_data = env.__dict__.get("_spo3_game_data", {})
        pddl = env.unwrapped
        ps = pddl._pddl_state
        facts, by_name, by_type, counts, operators, state, prev_state, last_action, moves = (
            snapshot.python
        )
        lib = _state_ids(env)
        if lib is None:  # the snapshot was taken with this engine's library: not expected
            raise EnvError("alfworld: the engine of the snapshot's game has no state ids")
        lib.set_state_id(snapshot.state_id)
        ps.all_applicable_actions()  # the library's applicable operators of the restored state
        ps._facts.clear()
        ps._facts.update({k: set(v) for k, v in facts.items()})
        ps._vars_by_name = dict(by_name)
        ps._vars_by_type.clear()
        ps._vars_by_type.update({k: set(v) for k, v in by_type.items()})
        ps._var_counts = counts.copy()
        ps._operators = operators
        pddl.state, pddl.prev_state, pddl._last_action, pddl._moves = (
            state,
            prev_state,
            last_action,
            moves,
        )
        self._last, self._won, self._task_description = (
            snapshot.last,
            snapshot.won,
            snapshot.task_description,
        )
        return self._observation(self._last)

    def close(self) -> None:
        close_engines(self._envs.values())
        self._envs.clear()
        self._env = self._last = self._game = None

    # --- extras -----------------------------------------------------------------------
    def walkthrough(self) -> list[str]:
        """The expert trajectory alfworld-generate stored in the game (ALFWorld's hand-coded expert),
        else a Fast Downward plan from the initial state. Call right after reset()."""
        if self._env is None:
            raise EnvError("alfworld: walkthrough() before reset()")
        stored = self._game_data.get("walkthrough")
        return list(stored) if stored else self.plan()

    def plan(self) -> list[str]:
        """A Fast Downward plan from the current state (ALFWorld's 'planner' expert)."""
        if self._env is None:
            raise EnvError("alfworld: plan() before reset()")
        pddl = self._env.unwrapped
        return list(pddl._pddl_state.replan(pddl._entity_infos))

    @property
    def task_description(self) -> str:
        """The goal sentence of the current game ("put a apple in fridge.")."""
        return self._task_description

    # --- internals --------------------------------------------------------------------
    def resolve(self, task_id: str) -> str:
        """The absolute path of the game.tw-pddl a task id names (EnvError if there is none)."""
        if not isinstance(task_id, str) or not task_id.strip():
            raise EnvError("alfworld: empty task id; expected the path of a game folder")
        p = Path(task_id).expanduser()
        if not p.is_absolute() and self.data_dir and not p.exists():
            p = Path(self.data_dir) / p
        if p.is_dir():
            if not (p / GAME_FILE).is_file():
                hint = (
                    " (it has traj_data.json + initial_state.pddl: run alfworld-generate)"
                    if (p / "initial_state.pddl").is_file()
                    else ""
                )
                raise EnvError(f"alfworld: game folder {str(p)!r} has no {GAME_FILE}{hint}")
            p = p / GAME_FILE
        if not p.is_file() or p.name != GAME_FILE:
            raise EnvError(
                f"alfworld: task id {task_id!r} is not an ALFWorld game folder or {GAME_FILE}"
            )
        return str(p.resolve())

    def _load(self, task_id: str) -> Any:
        import textworld
        from alfworld.agents.environment.alfred_tw_env import (
            AlfredDemangler,
            AlfredInfos,
        )

        path = self.resolve(task_id)
        if path in self._envs:
            self._envs.move_to_end(path)
            self._env, self._game = self._envs[path], path
            self._game_data = self._env.__dict__.get("_spo3_game_data", {})
            return self._env
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise EnvError(f"alfworld: cannot read {path!r}: {e}") from e
        for k in ("pddl_domain", "grammar", "pddl_problem"):
            if k not in data:
                raise EnvError(f"alfworld: {path!r} is not a game.tw-pddl (no {k!r})")
        if data.get("solvable") is False:
            raise EnvError(f"alfworld: {path!r} is marked unsolvable by alfworld-generate")
        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
        try:
            env = textworld.start(
                path, infos, wrappers=[AlfredDemangler(shuffle=False), AlfredInfos]
            )
        except Exception as e:
            raise EnvError(f"alfworld: cannot load {path!r}: {e}") from e
        env.__dict__["_spo3_game_data"] = {"walkthrough": data.get("walkthrough")}
        self._envs[path] = env
        while len(self._envs) > self.max_loaded_games:
            _, old = self._envs.popitem(last=False)
            with contextlib.suppress(Exception):
                old.close()
        self._env, self._game, self._game_data = env, path, env.__dict__["_spo3_game_data"]
        return env

    def _observation(self, state: Any) -> Observation:
        raw = state.get("feedback") or ""
        text = _BANNER.sub("", raw).strip()
        if self.state_mode == "facts":
            facts = sorted(
                str(f)
                for f in (state.get("_facts") or ())
                if f.name not in _BOOKKEEPING and not f.name.startswith("new-axiom@")
            )
            state_text = "\n".join(facts)
        else:
            state_text = _TASK_LINE.sub("", text).strip()
        return Observation(
            text=text,
            state_text=state_text,
            admissible_actions=tuple(state.get("admissible_commands") or ()),
        )
