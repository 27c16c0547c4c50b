"""ScienceWorld 1.2.3 adapter (bundled Scala/Java engine, Java 11+).

Task id: `TASK:VARIATION` (e.g. `boil:0`, `find-non-living-thing:3`), where TASK is one of the
30 ScienceWorld task names (or its id such as `1-1`, as ScienceWorld's `infer_task` accepts) and
VARIATION an index below the task's variation count. The simplification string is an adapter
option (`simplification="easy"` = teleport, open doors/containers, self-watering pots, no
electrical actions; or a comma list such as `"teleportAction,openDoors"`), so that one run uses
one setting for every task.

Texts: `text` is the engine's observation (on reset: the task description, then the look).
`state_text` = the free `look` + the free `inventory` (they cost no game time) + the task score
(progress is state: `focus on X` changes the score and nothing visible), plus the pending
question when the engine asks to disambiguate an action ("Ambiguous request: ... 0: ... 1: ...").

Success (precise): 1.0 iff the engine reports the task completed (`getCompleted()`, its
`isComplete`) with a score of 100 (`getScore() >= 1.0`); else 0.0. The engine ends a task with a
negative score when the agent does something that makes it impossible (e.g. focusing on the wrong
object): done = completed or score < 0. With `partial_credit=True` the success of a finished
episode is max(score, 0) / 100 instead (ScienceWorld's usual "score" metric). raw_reward is the
score (0-100).

Admissible actions: the engine's valid action-object combinations, which are huge (100-3000 per
state, mostly `move/pour/use X on Y` over every object pair). We keep a bounded, deterministic
list of at most `max_actions` (default 200; None = no bound):
  1. when the engine asks to disambiguate, the numbers it offers ("0", "1", ...) only;
  2. duplicates removed; actions on the agent itself ("focus on agent") and two-object actions
     involving the air ("move air to sink") dropped, and `reset task` dropped (it restarts the
     episode);
  3. ordered by: actions without objects first (look around, inventory, task, wait, wait1);
     then the core one-object actions (go to, teleport to, open, close, pick up, put down,
     focus on, activate, deactivate, read); then all the others (look at/in, eat, mix, and the
     two-object move/use/connect/pour/dunk ...). Inside the last two groups: actions naming more
     words of the task description first ("move X to red box" for "... move it to the red box"),
     then one-object before two-object actions whose first object is in the inventory before
     other two-object actions, then by verb (move, use, connect, pour, dunk, others), then the
     engine's order. Cut at `max_actions`.
`info["n_valid"]` gives the engine's full count (distinct actions) and
`info["admissible_truncated"]` whether the list was cut; `all_valid_actions()` returns the full
list. Actions outside the list are still sent to the engine as typed (ScienceWorld parses free
text), but a rollout that only accepts admissible actions will count them as invalid. The gold
path also uses spellings outside the engine's list (e.g. "connect battery anode to ...", or
opening an already-open door under "easy").

Speed: ~15 steps/s with admissible actions (listing them costs the engine ~50 ms a step),
~350 steps/s with `admissible=False` (no list); a reset costs ~0.3 s.

Snapshots: not supported (the engine exposes no state save/load); the rollout resets and
replays. Resetting the same task is an engine reset (no reload).
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

from spo3.actors.envs.base import EnvError, Observation, StepResult, close_engines

_AMBIGUOUS = re.compile(r"^\s*(\d+):", re.MULTILINE)
_ZERO_ARG = {"look around", "inventory", "task", "wait", "wait1"}
_CORE_PREFIXES = (
    "go to ",
    "teleport to ",
    "open ",
    "close ",
    "pick up ",
    "put down ",
    "focus on ",
    "activate ",
    "deactivate ",
    "read ",
)
_DROP = {"reset task"}
_INVENTORY_ITEM = re.compile(r"^\s+(?:an? |some |the )?(.+?)\s*$")


class ScienceWorldEnv:
    name = "scienceworld"

    def __init__(
        self,
        *,
        simplification: str = "",
        max_actions: int | None = 200,
        partial_credit: bool = False,
        admissible: bool = True,
        include_task_in_reset_text: bool = True,
    ) -> None:
        try:
            from scienceworld import ScienceWorldEnv as _SW
        except ImportError as e:  # pragma: no cover - depends on the install
            raise EnvError("scienceworld: the scienceworld package is not installed") from e
        self.simplification = simplification or ""
        self.max_actions = max_actions
        self.partial_credit = partial_credit
        self.admissible = admissible
        self.include_task_in_reset_text = include_task_in_reset_text
        try:
            self._env = _SW("", envStepLimit=10**9)  # the rollout enforces max steps
        except Exception as e:
            raise EnvError(f"scienceworld: cannot start the engine (Java 11+ needed): {e}") from e
        self._server = self._env.server
        self._task_names = list(self._env.get_task_names())
        self._loaded: tuple[str, int, bool] | None = None
        self._task_id: str | None = None
        self._done = False
        self._steps = 0
        self._task_description = ""

    # --- task ids ---------------------------------------------------------------------
    def parse_task_id(self, task_id: str) -> tuple[str, int]:
        from scienceworld.utils import infer_task

        if not isinstance(task_id, str) or task_id.count(":") != 1:
            raise EnvError(
                f"scienceworld: task id must be TASK:VARIATION (e.g. boil:0), got {task_id!r}"
            )
        name, var = (p.strip() for p in task_id.split(":"))
        with contextlib.suppress(Exception):
            name = infer_task(name)
        if name not in self._task_names:
            raise EnvError(
                f"scienceworld: unknown task {name!r} in {task_id!r}; one of {self._task_names}"
            )
        try:
            variation = int(var)
        except ValueError:
            raise EnvError(f"scienceworld: variation must be an integer in {task_id!r}") from None
        n = int(self._server.getTaskMaxVariations(name))
        if not 0 <= variation < n:
            raise EnvError(
                f"scienceworld: variation {variation} out of range [0, {n}) for {name!r}"
            )
        return name, variation

    # --- protocol ---------------------------------------------------------------------
    def reset(self, task_id: str, *, gold: bool = False) -> Observation:
        if self._server is None:
            raise EnvError("scienceworld: reset() after close()")
        name, variation = self.parse_task_id(task_id)
        key = (name, variation, bool(gold))
        try:
            if (
                self._loaded is not None
                and self._loaded[:2] == key[:2]
                and (self._loaded[2] or not gold)
            ):
                self._server.reset()
            else:
                self._env.load(name, variation, self.simplification, generateGoldPath=bool(gold))
                self._loaded = key
            observation = str(self._server.step("look around"))
        except ValueError as e:  # bad simplification string
            raise EnvError(f"scienceworld: {e}") from e
        except Exception as e:
            raise EnvError(f"scienceworld: cannot load {task_id!r}: {e}") from e
        self._task_id, self._done, self._steps = task_id, False, 0
        self._task_description = str(self._server.freeActionTaskDesc() or "").strip()
        obs = self._observation(observation, float(self._server.getScore()))
        if self.include_task_in_reset_text and self._task_description:
            obs = Observation(
                f"{self._task_description}\n\n{obs.text}", obs.state_text, obs.admissible_actions
            )
        return obs

    def step(self, action: str) -> StepResult:
        if self._task_id is None:
            raise EnvError("scienceworld: step() before reset()")
        if self._done:
            raise EnvError("scienceworld: step() after the episode ended; reset() first")
        try:
            observation = str(self._server.step(action))
            score = float(self._server.getScore())
            completed = bool(self._server.getCompleted())
        except Exception as e:
            raise EnvError(f"scienceworld: step({action!r}) failed: {e}") from e
        self._steps += 1
        score100 = round(100 * score)
        done = completed or score100 < 0
        self._done = done
        won = completed and score >= 1.0
        if self.partial_credit:
            success = max(score100, 0) / 100.0 if done else 0.0
        else:
            success = 1.0 if won else 0.0
        obs = self._observation(observation, score)
        return StepResult(
            observation=obs,
            done=done,
            success=success,
            raw_reward=float(score100),
            info={
                "score": score100,
                "completed": completed,
                "won": won,
                "n_valid": self._n_valid,
                "admissible_truncated": self._truncated,
            },
        )

    def snapshot(self) -> None:
        return None

    def restore(self, snapshot: Any) -> Observation:
        raise EnvError(
            "scienceworld: snapshots are not supported (snapshot() returns None); reset and replay"
        )

    def close(self) -> None:
        close_engines([self._env])
        self._env = self._server = None
        self._task_id = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # --- extras -----------------------------------------------------------------------
    def walkthrough(self) -> list[str]:
        """The engine's gold action sequence for the current task (resets it: call first)."""
        if self._task_id is None:
            raise EnvError("scienceworld: walkthrough() before reset()")
        if not (self._loaded and self._loaded[2]):
            self.reset(self._task_id, gold=True)
        return [str(a) for a in self._server.getGoldActionSequence()]

    @property
    def task_description(self) -> str:
        return self._task_description

    def all_valid_actions(self) -> list[str]:
        """The engine's full (unbounded) list of valid actions for the current state."""
        return _dedupe(a["action"] for a in self._valid_json())

    # --- internals --------------------------------------------------------------------
    _n_valid = 0
    _truncated = False

    def _valid_json(self) -> list[dict[str, Any]]:
        return json.loads(self._server.getValidActionObjectCombinationsJSON())["validActions"]

    def _observation(self, observation: str, score: float) -> Observation:
        look = str(self._server.freeActionLook() or "").strip()
        inventory = str(self._server.freeActionInventory() or "").strip()
        observation = observation.strip()
        ambiguous = observation.startswith("Ambiguous request")
        state_text = f"{look}\n{inventory}\nscore: {round(100 * score)}"
        if ambiguous:
            state_text += f"\n{observation}"
        actions: tuple[str, ...] = ()
        self._n_valid, self._truncated = 0, False
        if ambiguous:
            actions = tuple(_AMBIGUOUS.findall(observation))
            self._n_valid = len(actions)
        elif self.admissible:
            actions = self._bounded(self._valid_json(), inventory)
        return Observation(text=observation, state_text=state_text, admissible_actions=actions)

    def _bounded(self, valid: list[dict[str, Any]], inventory: str) -> tuple[str, ...]:
        items = [
            m.group(1) for line in inventory.split("\n")[1:] if (m := _INVENTORY_ITEM.match(line))
        ]
        task_words = _content_words(self._task_description)
        ranked: list[tuple[tuple[int, int, int, int, int], str]] = []
        seen: set[str] = set()
        for index, entry in enumerate(valid):
            action = str(entry.get("action", "")).strip()
            if not action or action in seen or action in _DROP:
                continue
            seen.add(action)
            n_obj = len(entry.get("obj_ids") or ())
            if action in _ZERO_ARG or n_obj == 0:
                ranked.append(((0, 0, 0, 0, index), action))
                continue
            if _mentions_self(action):
                continue
            if n_obj == 1:
                tier = 1
            elif "in inventory" in action or any(
                _first_object(action).startswith(it) for it in items
            ):
                tier = 2
            else:
                tier = 3
            relevance = len(_content_words(action) & task_words)
            group = 1 if n_obj == 1 and action.startswith(_CORE_PREFIXES) else 2
            ranked.append(((group, -relevance, tier, _verb_rank(action), index), action))
        self._n_valid = len(seen)
        ranked.sort(key=lambda kv: kv[0])
        out = [a for _, a in ranked]
        if self.max_actions is not None and len(out) > self.max_actions:
            out = out[: self.max_actions]
            self._truncated = True
        return tuple(out)


_VERBS = ("move", "use", "connect", "pour", "dunk")
_STOP = {
    "the",
    "and",
    "then",
    "your",
    "task",
    "first",
    "thing",
    "focus",
    "move",
    "find",
    "with",
    "that",
    "this",
    "into",
    "from",
    "for",
    "you",
    "are",
    "can",
    "its",
    "use",
    "pour",
    "dunk",
    "connect",
    "containing",
    "description",
    "inventory",
    "found",
    "room",
    "called",
}
_WORD = re.compile(r"[a-z]{3,}")


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def _verb_rank(action: str) -> int:
    verb = action.split(" ", 1)[0]
    return _VERBS.index(verb) if verb in _VERBS else len(_VERBS)


_VERB_PREFIX = re.compile(r"^(move|pour|dunk|use|connect|put|mix)\s+")
_SECOND = re.compile(r"\s+(to|in|into|on)\s+.*$")


def _first_object(action: str) -> str:
    return _SECOND.sub("", _VERB_PREFIX.sub("", action))


def _mentions_self(action: str) -> bool:
    """True when an object of the action is the agent ("focus on agent", "move agent to x"), or
    when a two-object action involves the air ("move air to x", "pour cup into air")."""
    words = action.split(" ", 1)
    rest = words[1] if len(words) > 1 else ""
    rest = re.sub(r"^(on|at|in|up|down|to)\s+", "", rest)
    parts = [p.strip() for p in re.split(r"\s+(?:to|in|into|on)\s+", rest)]
    return "agent" in parts or (len(parts) > 1 and "air" in parts)


def _dedupe(actions: Any) -> list[str]:
    seen: set[str] = set()
    out = []
    for a in actions:
        if a not in seen:
            seen.add(a)
            out.append(a)
    return out
