"""TextWorld (Microsoft TextWorld 1.7, `textworld[pddl]`) adapter, plus offline game generation.

Task id: the path of a game compiled by TextWorld (`.z8`, or any `.z1`-`.z8`) with its `.json`
sidecar next to it (tw-make writes both; the sidecar is what gives admissible commands, the
walkthrough and won/lost detection). Glulx `.ulx` games are not supported by TextWorld >= 1.7.

Texts:
- `text`: what the agent sees: the game's feedback (the Inform7 status line and prompt stripped,
  the ASCII-art banner of the first observation dropped), followed by the room description when
  the feedback does not already contain it.
- `state_text`: the room description + the inventory (what defines the state), never the
  feedback ("You open the fridge." is the same state as looking at the open fridge).
  What the text does not show is not in it: unlocking a door that stays "closed" in the room
  description keeps the key. `state="facts"` appends TextWorld's true state (the sorted logical
  facts its quest tracker holds: at, in, on, open/closed/locked, ...), so such changes count.

success = 1.0 if the game is won, else 0.0 (raw_reward carries the game's score).
done = won or lost; the rollout enforces the step limit itself.

Snapshots are supported: the Z-machine state (jericho get_state/set_state) plus a copy of
TextWorld's quest tracker, about 1 ms; falls back to `env.copy()` (tens of ms) if the wrapper
stack ever differs from the one this module knows.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spo3.actors.envs.base import EnvError, Observation, StepResult, close_engines

GAME_KINDS = ("tw-coin_collector", "tw-treasure_hunter", "tw-simple", "tw-cooking")

# Small games by default (a few rooms, short quests); every key can be overridden in
# generate_games(**settings).
DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "tw-coin_collector": {"level": 5},
    "tw-treasure_hunter": {"level": 5},
    "tw-simple": {"rewards": "dense", "goal": "detailed", "test": False},
    "tw-cooking": {
        "recipe": 1,
        "take": 1,
        "go": 1,
        "open": False,
        "cook": False,
        "cut": False,
        "drop": False,
        "recipe_seed": 0,
        "split": "train",
    },
}

_PROMPT_TAIL = re.compile(r"\n>[^\n]*\Z")  # "\n>   ...   -= Kitchen =-0/3" at the end of a feedback
_BANNER_LINE = re.compile(r"^[\s$|\\/_<>()=~`'.,:-]+$")


def _clean_feedback(text: str, first: bool = False) -> str:
    text = _PROMPT_TAIL.sub("", text or "")
    if first:
        # Drop the ASCII-art title (lines made of $ | \ / _ only).
        text = "\n".join(line for line in text.split("\n") if not _BANNER_LINE.match(line))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _norm(text: str) -> str:
    return " ".join((text or "").split())


_KEPT = (
    "feedback",
    "description",
    "inventory",
    "admissible_commands",
    "won",
    "lost",
    "done",
    "score",
    "max_score",
    "objective",
    "extra.walkthrough",
)


def _light(state: Any, facts: bool = False) -> dict[str, Any]:
    """The fields of a TextWorld GameState this adapter uses (GameState.copy() is a deep copy of
    the whole game: tens of ms)."""
    out = {k: state.get(k) for k in _KEPT}
    if facts:
        out["facts"] = "\n".join(sorted(str(f) for f in (state.get("_facts") or ())))
    return out


@dataclass
class _Snapshot:
    game: str
    mode: str  # "fast" or "copy"
    payload: Any
    last: dict[str, Any]  # _light() of the GameState at the snapshot
    steps: int


class TextWorldEnv:
    """One adapter instance holds one game process at a time (a few recently used games are kept
    loaded so that switching tasks is cheap)."""

    name = "textworld"

    def __init__(
        self,
        *,
        include_description: bool = True,
        max_loaded_games: int = 4,
        fast_snapshot: bool = True,
        state: str = "description",
    ) -> None:
        import textworld  # noqa: F401  (fail early with a clear error if missing)

        if state not in ("description", "facts"):
            raise EnvError(f"textworld: state must be 'description' or 'facts', got {state!r}")
        self.state_mode = state
        self.include_description = include_description
        self.max_loaded_games = max(1, max_loaded_games)
        self.fast_snapshot = fast_snapshot
        self._envs: OrderedDict[str, Any] = OrderedDict()
        self._env: Any = None
        self._game: str | None = None
        self._last: dict[str, Any] | None = None  # _light() of the last GameState
        self._steps = 0

    # --- protocol ---------------------------------------------------------------------
    def reset(self, task_id: str) -> Observation:
        env = self._load(task_id)
        try:
            state = env.reset()
        except Exception as e:
            raise EnvError(f"textworld: cannot reset {task_id}: {e}") from e
        self._last, self._steps = _light(state, self.state_mode == "facts"), 0
        return self._observation(self._last, first=True)

    def step(self, action: str) -> StepResult:
        if self._env is None or self._last is None:
            raise EnvError("textworld: step() before reset()")
        if self._last.get("done") or self._last.get("won") or self._last.get("lost"):
            raise EnvError("textworld: step() after the game ended; reset() first")
        try:
            state, score, done = self._env.step(action)
        except Exception as e:
            raise EnvError(f"textworld: step({action!r}) failed: {e}") from e
        self._last = state = _light(state, self.state_mode == "facts")
        self._steps += 1
        won, lost = bool(state.get("won")), bool(state.get("lost"))
        return StepResult(
            observation=self._observation(state),
            done=bool(won or lost or done),
            success=1.0 if won else 0.0,
            raw_reward=float(score or 0),
            info={
                "won": won,
                "lost": lost,
                "score": state.get("score"),
                "max_score": state.get("max_score"),
                "moves": self._steps,
            },
        )

    def snapshot(self) -> _Snapshot | None:
        if self._env is None or self._last is None or self._game is None:
            return None
        if self.fast_snapshot:
            payload = _fast_save(self._env)
            if payload is not None:
                return _Snapshot(self._game, "fast", payload, dict(self._last), self._steps)
        return _Snapshot(self._game, "copy", self._env.copy(), dict(self._last), self._steps)

    def restore(self, snapshot: _Snapshot) -> Observation:
        if not isinstance(snapshot, _Snapshot):
            raise EnvError("textworld: restore() needs a snapshot taken by this adapter")
        if snapshot.mode == "fast":
            env = self._load(snapshot.game)
            if not _fast_load(env, snapshot.payload):
                raise EnvError("textworld: snapshot does not fit the loaded game")
        else:
            env = snapshot.payload.copy()  # keep the snapshot reusable
            old = self._envs.pop(snapshot.game, None)
            if old is not None:
                with contextlib.suppress(Exception):
                    old.close()
            self._envs[snapshot.game] = env
            self._env, self._game = env, snapshot.game
        self._last, self._steps = dict(snapshot.last), snapshot.steps
        return self._observation(self._last, first=snapshot.steps == 0)

    def close(self) -> None:
        close_engines(self._envs.values())
        self._envs.clear()
        self._env = self._last = self._game = None

    # --- extras -----------------------------------------------------------------------
    def walkthrough(self) -> list[str]:
        """The game's own solution (tw-make's walkthrough metadata), from the initial state."""
        if self._last is None:
            raise EnvError("textworld: walkthrough() before reset()")
        wt = self._last.get("extra.walkthrough")
        if not wt:
            raise EnvError(f"textworld: game {self._game} has no walkthrough")
        return list(wt)

    @property
    def objective(self) -> str:
        return (self._last.get("objective") if self._last is not None else None) or ""

    # --- internals --------------------------------------------------------------------
    def _load(self, task_id: str) -> Any:
        import textworld

        path = os.path.abspath(os.path.expanduser(str(task_id)))
        if path in self._envs:
            self._envs.move_to_end(path)
            self._env, self._game = self._envs[path], path
            return self._env
        if path.endswith(".ulx"):
            raise EnvError(
                f"textworld: {task_id}: Glulx (.ulx) games are not supported by TextWorld >= 1.7; "
                "generate .z8 games (tw-make ... --format z8)"
            )
        if not re.search(r"\.z[1-8]$", path):
            raise EnvError(
                f"textworld: task id must be the path of a .z8 game made by tw-make, got {task_id!r}"
            )
        if not os.path.isfile(path):
            raise EnvError(f"textworld: no game file at {task_id!r}")
        if not os.path.isfile(os.path.splitext(path)[0] + ".json"):
            raise EnvError(
                f"textworld: {task_id!r} has no .json sidecar (tw-make writes it next to the game); "
                "it is needed for admissible commands and the walkthrough"
            )
        # The walkthrough comes with the game's metadata (state["extra.walkthrough"]); asking for it
        # in `extras` would also make jericho look for one of its own and warn.
        infos = textworld.EnvInfos(
            admissible_commands=True,
            description=True,
            inventory=True,
            won=True,
            lost=True,
            score=True,
            max_score=True,
            objective=True,
        )
        try:
            env = textworld.start(path, infos)
        except Exception as e:
            raise EnvError(f"textworld: cannot load {task_id!r}: {e}") from e
        _skip_jericho_admissible(env)
        self._envs[path] = env
        while len(self._envs) > self.max_loaded_games:
            _, old = self._envs.popitem(last=False)
            with contextlib.suppress(Exception):
                old.close()
        self._env, self._game = env, path
        return env

    def _observation(self, state: dict[str, Any], first: bool = False) -> Observation:
        description = (state.get("description") or "").strip()
        inventory = (state.get("inventory") or "").strip()
        feedback = _clean_feedback(state.get("feedback") or "", first=first)
        text = feedback
        if self.include_description and description and _norm(description) not in _norm(feedback):
            text = f"{feedback}\n\n{description}" if feedback else description
        state_text = f"{description}\n{inventory}"
        if self.state_mode == "facts":
            state_text += "\n" + (state.get("facts") or "")
        return Observation(
            text=text,
            state_text=state_text,
            admissible_actions=tuple(state.get("admissible_commands") or ()),
        )


def _skip_jericho_admissible(env: Any) -> None:
    """TextWorld computes admissible commands from its game logic (StateTracking); the Z-machine
    layer would also ask jericho, which has no action templates for TextWorld games and only warns
    ("Unable to find valid actions in an unsupported game"). Hide the flag from that layer."""
    base = _layers(env)[-1]
    if type(base).__name__ != "JerichoEnv" or "_gather_infos" in base.__dict__:
        return
    gather = base._gather_infos

    def _gather_infos() -> None:
        infos = base.request_infos
        wanted = infos.admissible_commands
        infos.admissible_commands = False
        try:
            gather()
        finally:
            infos.admissible_commands = wanted

    base._gather_infos = _gather_infos


# --- fast snapshot: Z-machine state + TextWorld's quest tracker -----------------------------
_TRACKER_COPY = {"_game_progression"}
_NOT_SAVED = {"_wrapped_env", "_jericho", "_gather_infos"}  # the process and our per-instance patch


def _layers(env: Any) -> list[Any]:
    out = []
    while env is not None:
        out.append(env)
        env = env.__dict__.get("_wrapped_env")
    return out


def _fast_save(env: Any) -> Any | None:
    layers = _layers(env)
    base = layers[-1]
    jericho = getattr(base, "_jericho", None)
    if jericho is None or type(base).__name__ != "JerichoEnv":
        return None
    saved = []
    for layer in layers:
        d = {}
        for k, v in layer.__dict__.items():
            if k in _NOT_SAVED:
                continue
            if k in _TRACKER_COPY and v is not None:
                v = v.copy()
            elif isinstance(v, list):
                v = list(v)
            d[k] = v
        saved.append((type(layer).__name__, d))
    return jericho.get_state(), saved


def _fast_load(env: Any, payload: Any) -> bool:
    z_state, saved = payload
    layers = _layers(env)
    if len(layers) != len(saved) or any(
        type(layer).__name__ != n for layer, (n, _) in zip(layers, saved)
    ):
        return False
    for layer, (_, d) in zip(layers, saved, strict=True):
        for k, v in d.items():
            if k in _TRACKER_COPY and v is not None:
                v = v.copy()
            elif isinstance(v, list):
                v = list(v)
            layer.__dict__[k] = v
    layers[-1]._jericho.set_state(z_state)
    return True


# --- game generation ------------------------------------------------------------------------
def challenge_settings(kind: str, **overrides: Any) -> dict[str, Any]:
    """The settings tw-make would use for `kind` (its argparse defaults + ours + overrides)."""
    import textworld.challenges

    if kind not in textworld.challenges.CHALLENGES:
        raise EnvError(
            f"textworld: unknown game kind {kind!r}; one of {sorted(textworld.challenges.CHALLENGES)}"
        )
    _, _, add_arguments = textworld.challenges.CHALLENGES[kind]
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    merged = {**DEFAULT_SETTINGS.get(kind, {}), **overrides}
    for action in parser._actions:  # fill required arguments so that parse_args([]) works
        if action.required and action.dest not in merged:
            raise EnvError(f"textworld: {kind} needs setting {action.dest!r}")
        action.required = False
    settings = vars(parser.parse_args([]))
    unknown = set(merged) - set(settings)
    if unknown:
        raise EnvError(
            f"textworld: unknown settings for {kind}: {sorted(unknown)}; known: {sorted(settings)}"
        )
    settings.update(merged)
    return settings


def generate_games(
    out_dir: str | os.PathLike,
    kind: str,
    n: int,
    seed: int = 0,
    *,
    force: bool = False,
    **settings: Any,
) -> list[str]:
    """Generate `n` games of `kind` with tw-make's generators (in process, offline).

    Game i uses seed `seed + i` and is written to `out_dir/{kind}-{settings digest}-s{seed+i}.z8`
    (plus its .json sidecar): the same arguments always give the same games, and a game that
    already exists is reused unless `force`. Returns the game paths. About 0.5-1 s per small game
    on this machine (the first call also pays the Inform7 start-up).
    """
    import hashlib
    import json

    import textworld
    import textworld.challenges
    from textworld.generator import compile_game

    if kind not in GAME_KINDS and kind not in textworld.challenges.CHALLENGES:
        raise EnvError(f"textworld: unknown game kind {kind!r}; one of {GAME_KINDS}")
    full = challenge_settings(kind, **settings)
    digest = hashlib.blake2b(
        json.dumps(full, sort_keys=True, default=str).encode(), digest_size=4
    ).hexdigest()
    _, make_game, _ = textworld.challenges.CHALLENGES[kind]
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        game_seed = seed + i
        path = out / f"{kind}-{digest}-s{game_seed}.z8"
        if not force and path.is_file() and path.with_suffix(".json").is_file():
            paths.append(str(path))
            continue
        options = textworld.GameOptions()
        options.seeds = game_seed
        options.path = str(path)
        options.file_ext = ".z8"
        options.force_recompile = True
        try:
            with warnings.catch_warnings():
                # Compiling checks the walkthrough with jericho, which warns about TextWorld games.
                warnings.filterwarnings("ignore", message=".*not fully supported.*")
                warnings.filterwarnings("ignore", message="Unable to .*")
                game = make_game(settings=dict(full), options=options)
                game_file = compile_game(game, options)
        except Exception as e:
            raise EnvError(f"textworld: cannot generate {kind} seed {game_seed}: {e}") from e
        paths.append(str(game_file))
    return paths
