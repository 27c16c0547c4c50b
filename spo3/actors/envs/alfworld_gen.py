"""ALFWorld-format games made offline, each checked winnable by ALFWorld's own hand-coded expert.

ALFWorld ships no game data (`alfworld-download` needs the internet), but it does ship what its
games are made of: the PDDL domain (`alfworld/data/alfred.pddl`), the text grammar
(`alfred.twl2`), the goal library (`alfworld/gen/goal_library.py`), the receptacle/object
affordances (`alfworld/gen/constants.py`) and, per AI2-THOR floor plan, the scene's receptacles
with the pose the agent interacts from (`alfworld/gen/layouts/FloorPlan<N>-openable.json`) and the
scene's object types (`FloorPlan<N>-objects.json`). This module samples a game from those:

- a floor plan valid for the task type (ALFRED's `GOALS_VALID`: heat/cool only in kitchens, clean in
  kitchens and bathrooms, look-at-in-light in bedrooms and living rooms);
- a subset of its receptacles (the ones the task needs always kept), each at the location its pose
  gives (`loc|x|z|rotation|horizon` as ALFRED writes it; receptacles sharing a pose share a location);
- target and distractor objects from the scene's own object types, each put in a receptacle that
  may hold it (`VAL_RECEPTACLE_OBJECTS`, which is also where the expert searches), never one that
  already satisfies the goal; a desk/floor lamp for look-at-in-light;
- the agent at a location of its own; the goal from ALFWorld's goal library; the goal sentence from
  its templates.

It writes ALFWorld's folder format, `<split>/<task_type>-<Object>-None-<Parent>-<floorplan>/
trial_T<seed>_<index>/` with `initial_state.pddl`, `traj_data.json` and `game.tw-pddl`, and solves
each game exactly as `alfworld-generate` does: TextWorld's PDDL engine wrapped in ALFWorld's
AlfredDemangler, AlfredInfos and AlfredExpert (hand-coded expert), following the expert until the
game is won; the trajectory is stored as `walkthrough` with `solvable: true`. A game the expert does
not win is not kept (another is drawn in its place).

Splits: `train` and `heldout` draw from disjoint floor plans (every fourth floor plan of each room
type, ALFRED's "unseen" idea), so held-out games differ in room layout and receptacles, not only in
placements. Everything is drawn from `random.Random` seeded from (seed, split, task type, index), and
the global `random` state ALFWorld's expert uses is seeded the same way, so the same arguments
always give byte-identical files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spo3.actors.envs.alfworld_env import GAME_FILE, TASK_TYPES
from spo3.actors.envs.base import EnvError

SPLITS = ("train", "heldout")
# Short names for the CLI; values are ALFWorld's task types.
TASK_KINDS = {
    "pick": "pick_and_place_simple",
    "light": "look_at_obj_in_light",
    "clean": "pick_clean_then_place_in_recep",
    "heat": "pick_heat_then_place_in_recep",
    "cool": "pick_cool_then_place_in_recep",
    "two": "pick_two_obj_and_place",
}
# The appliance each state-changing task needs (the domain's CleanObject/HeatObject/CoolObject
# preconditions); it is never the place the object starts in or must end up in.
_APPLIANCE = {
    "pick_clean_then_place_in_recep": "SinkBasin",
    "pick_heat_then_place_in_recep": "Microwave",
    "pick_cool_then_place_in_recep": "Fridge",
}
_LAMP_HOLDERS = ("Desk", "SideTable", "Dresser", "Shelf", "CoffeeTable", "DiningTable", "TVStand")
_LAMPS = ("DeskLamp", "FloorLamp")
_MANGLE = {"-": "_minus_", "#": "-", "|": "_bar_", "+": "_plus_", ".": "_dot_", ",": "_comma_"}
_MANGLE_RE = re.compile("|".join(re.escape(k) for k in _MANGLE))


def mangle(name: str) -> str:
    """ALFRED's PDDL spelling of an id: 'Cabinet|+00.68|+00.50|-02.20' -> 'Cabinet_bar__plus_00_dot_68_...'
    (the same substitutions as alfworld.gen PlannedGameState.fix_pddl_str_chars, done at once)."""
    return _MANGLE_RE.sub(lambda m: _MANGLE[m.group(0)], name)


def resolve_task_types(names: list[str] | None) -> list[str]:
    """Task types from short names (pick, light, clean, heat, cool, two), ALFWorld's names or ids 1-6."""
    if not names:
        return [TASK_KINDS[k] for k in ("pick", "clean", "heat", "cool", "two", "light")]
    out = []
    for n in names:
        n = str(n).strip()
        if n in TASK_KINDS:
            out.append(TASK_KINDS[n])
        elif n in TASK_TYPES.values():
            out.append(n)
        elif n.isdigit() and int(n) in TASK_TYPES:
            out.append(TASK_TYPES[int(n)])
        else:
            raise EnvError(
                f"alfworld: unknown task type {n!r}; one of {sorted(TASK_KINDS)} "
                f"or {sorted(TASK_TYPES.values())}"
            )
    return list(dict.fromkeys(out))


# --- scene data -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    floor_plan: int
    room: str
    receptacles: dict[str, tuple[int, int, int, int]]
    """receptacle id ('Cabinet|+00.68|+00.50|-02.20') -> ALFRED location (x/0.25, z/0.25, rotation/90, horizon)."""
    object_types: tuple[str, ...]


def _alfworld_gen_dir() -> Path:
    try:
        import alfworld.gen
    except ImportError as e:  # pragma: no cover - depends on the install
        raise EnvError(f"alfworld: not importable: {e}") from e
    return Path(os.path.dirname(alfworld.gen.__file__))


def recep_type(recep_id: str) -> str:
    """'Sink|...|SinkBasin' -> 'SinkBasin', 'Cabinet|...' -> 'Cabinet'."""
    parts = recep_id.split("|")
    return parts[4] if len(parts) > 4 else parts[0]


def load_scenes() -> dict[int, Scene]:
    """Every floor plan ALFWorld ships a layout for, keyed by number."""
    from alfworld.gen import constants as C

    layouts = _alfworld_gen_dir() / "layouts"
    rooms = {n: room for room, r in C.SCENE_TYPE.items() for n in r}
    scenes = {}
    for p in sorted(layouts.glob("FloorPlan*-openable.json")):
        n = int(p.name[len("FloorPlan") :].split("-")[0])
        if n not in rooms:
            continue
        poses = json.loads(p.read_text())
        receps = {}
        for rid, (x, z, rot, hor) in sorted(poses.items()):
            if (
                recep_type(rid) in C.RECEPTACLES
                and recep_type(rid) not in C.MOVABLE_RECEPTACLES_SET
            ):
                receps[rid] = (
                    int(round(x / 0.25)),
                    int(round(z / 0.25)),
                    int(round(rot / 90)) % 4,
                    int(hor),
                )
        objs_file = layouts / f"FloorPlan{n}-objects.json"
        objs = tuple(json.loads(objs_file.read_text())) if objs_file.is_file() else ()
        if receps:
            scenes[n] = Scene(n, rooms[n], receps, objs)
    return scenes


def split_of(floor_plan: int) -> str:
    """Every fourth floor plan of a room type is held out (FloorPlan1, 5, ..., 201, 205, ...)."""
    return "heldout" if (floor_plan % 100) % 4 == 1 else "train"


# --- sampling (pure: scene + rng -> files' contents) --------------------------------------------


@dataclass
class GameDraft:
    task_type: str
    floor_plan: int
    object_target: str
    parent_target: str
    toggle_target: str
    pddl: str
    goal_sentence: str

    def folder_name(self) -> str:
        second = (
            self.toggle_target if self.task_type == "look_at_obj_in_light" else self.parent_target
        )
        return f"{self.task_type}-{self.object_target}-None-{second}-{self.floor_plan}"

    def traj_data(self, trial: str) -> dict[str, Any]:
        return {
            "task_id": trial,
            "task_type": self.task_type,
            "scene": {"floor_plan": f"FloorPlan{self.floor_plan}", "scene_num": self.floor_plan},
            "pddl_params": {
                "object_target": self.object_target,
                "parent_target": self.parent_target,
                "toggle_target": self.toggle_target,
                "mrecep_target": "",
                "object_sliced": False,
            },
            "turk_annotations": {
                "anns": [{"task_desc": self.goal_sentence.capitalize() + ".", "high_descs": []}]
            },
            "plan": {"high_pddl": [], "low_actions": []},
            "generated_by": "spo3 make-games --env alfworld",
        }


def _pickupable_types() -> set[str]:
    from alfworld.gen import constants as C

    movable = set().union(*C.VAL_RECEPTACLE_OBJECTS.values())
    return {o for o in movable if "Sliced" not in o and o in C.OBJECTS}


def _coord(rng: random.Random, base: float) -> float:
    return round(base + rng.uniform(-0.4, 0.4), 2)


def _obj_id(rng: random.Random, otype: str, recep_id: str, used: set[str]) -> str:
    parts = recep_id.split("|")
    bx, by, bz = (
        (float(parts[1]), float(parts[2]), float(parts[3])) if len(parts) >= 4 else (0.0, 0.0, 0.0)
    )
    while True:
        oid = f"{otype}|{_coord(rng, bx):+06.2f}|{round(by + rng.uniform(0.0, 0.6), 2):+06.2f}|{_coord(rng, bz):+06.2f}"
        if oid not in used:
            used.add(oid)
            return oid


def draft_game(
    scene: Scene,
    task_type: str,
    rng: random.Random,
    *,
    min_receptacles: int = 6,
    max_receptacles: int = 16,
    distractors: tuple[int, int] = (4, 10),
) -> GameDraft | None:
    """One game of `task_type` in `scene`, or None when the scene cannot host it (no microwave for a
    heat task, no lamp for look-at-in-light, no receptacle that may hold any object...)."""
    from alfworld.gen import goal_library

    fit = _task_fit(scene, task_type)
    if fit is None:
        return None
    appliance, toggle, candidates = fit
    # target object and destination type
    obj_target, parent = rng.choice(sorted(candidates))
    keep, lamp_holder = _pick_receptacles(
        scene, rng, obj_target, parent, appliance, toggle, (min_receptacles, max_receptacles)
    )
    objects = _place_objects(
        scene,
        rng,
        keep,
        task_type,
        obj_target,
        (parent, appliance),
        toggle,
        lamp_holder,
        distractors,
    )
    if objects is None:
        return None
    placed, lamp = objects

    # locations: each receptacle's pose; the agent starts at a pose of its own
    loc_of = {r: "loc|" + "|".join(str(int(v)) for v in scene.receptacles[r]) for r in keep}
    agent_loc = _agent_loc(rng, set(loc_of.values()))

    goal = goal_library.gdict[task_type]["pddl"].format(
        obj=obj_target, recep=parent, toggle=toggle, mrecep=""
    )
    sentence = rng.choice(goal_library.gdict[task_type]["templates"]).format(
        obj=obj_target.lower(), recep=parent.lower(), toggle=toggle.lower(), mrecep=""
    )
    pddl = _problem_pddl(scene, keep, loc_of, agent_loc, placed, toggle, lamp, goal)
    return GameDraft(task_type, scene.floor_plan, obj_target, parent, toggle, pddl, sentence)


def _pickupable_here(scene: Scene) -> list[str]:
    return sorted(_pickupable_types() & set(scene.object_types))


def _task_fit(scene: Scene, task_type: str) -> tuple[str | None, str, list[tuple[str, str]]] | None:
    """(appliance the task needs, lamp type for look-at-in-light, (object, destination type)
    candidates), or None when `scene` cannot host a game of `task_type`."""
    from alfworld.gen import constants as C

    if scene.room not in C.GOALS_VALID[task_type]:
        return None
    types_here = {recep_type(r) for r in scene.receptacles}
    appliance = _APPLIANCE.get(task_type)
    if appliance and appliance not in types_here:
        return None
    toggle = ""
    if task_type == "look_at_obj_in_light":
        lamps = [lamp for lamp in _LAMPS if lamp in scene.object_types]
        holders = [r for r in scene.receptacles if recep_type(r) in _LAMP_HOLDERS]
        if not lamps or not holders:
            return None
        toggle = lamps[0]
    candidates = _candidates(_pickupable_here(scene), task_type, types_here, appliance)
    if not candidates:
        return None
    return appliance, toggle, candidates


def _candidates(
    pickupable: list[str], task_type: str, types_here: set[str], appliance: str | None
) -> list[tuple[str, str]]:
    """(target object, destination type) pairs: the object may start somewhere other than its
    destination (and the appliance); look-at-in-light has no destination ("")."""
    from alfworld.gen import constants as C

    can_hold = C.VAL_RECEPTACLE_OBJECTS
    action_set = {
        "pick_clean_then_place_in_recep": "Cleanable",
        "pick_heat_then_place_in_recep": "Heatable",
        "pick_cool_then_place_in_recep": "Coolable",
    }.get(task_type)
    candidates = []
    for obj in pickupable:
        if action_set and obj not in C.VAL_ACTION_OBJECTS[action_set]:
            continue
        starts = [r for r in types_here if obj in can_hold.get(r, ()) and r != appliance]
        if task_type == "look_at_obj_in_light":
            if starts:
                candidates.append((obj, ""))
            continue
        for parent in sorted(types_here):
            if parent == appliance or obj not in can_hold.get(parent, ()):
                continue
            if any(s != parent for s in starts):
                candidates.append((obj, parent))
    return candidates


def _pick_receptacles(
    scene: Scene,
    rng: random.Random,
    obj_target: str,
    parent: str,
    appliance: str | None,
    toggle: str,
    bounds: tuple[int, int],
) -> tuple[list[str], str | None]:
    """The receptacles kept (the ones the task needs, then a random subset of the rest, between
    `bounds` in number; sorted) and the lamp's holder (look-at-in-light only)."""
    from alfworld.gen import constants as C

    can_hold = C.VAL_RECEPTACLE_OBJECTS
    all_receps = sorted(scene.receptacles)
    rng.shuffle(all_receps)
    keep: list[str] = []

    def need(pred: Callable[[str], bool]) -> None:
        for r in all_receps:
            if pred(r):
                if r not in keep:
                    keep.append(r)
                return

    if appliance:
        need(lambda r: recep_type(r) == appliance)
    if parent:
        need(lambda r: recep_type(r) == parent)
    if toggle:
        need(lambda r: recep_type(r) in _LAMP_HOLDERS)
    lamp_holder = keep[-1] if toggle else None
    need(
        lambda r: (
            recep_type(r) != parent
            and recep_type(r) != appliance
            and obj_target in can_hold.get(recep_type(r), ())
        )
    )
    min_receptacles, max_receptacles = bounds
    n_receps = rng.randint(
        min(min_receptacles, len(all_receps)), min(max_receptacles, len(all_receps))
    )
    for r in all_receps:
        if len(keep) >= n_receps:
            break
        if r not in keep:
            keep.append(r)
    keep.sort()
    return keep, lamp_holder


def _place_objects(
    scene: Scene,
    rng: random.Random,
    keep: list[str],
    task_type: str,
    obj_target: str,
    not_start: tuple[str, str | None],
    toggle: str,
    lamp_holder: str | None,
    distractors: tuple[int, int],
) -> tuple[list[tuple[str, str, str]], tuple[str, str] | None] | None:
    """The objects placed, (object id, type, receptacle id): target instance(s), then distractors of
    the scene's other types; and the lamp, (object id, holder), for look-at-in-light. None when no
    kept receptacle may hold the target other than the receptacle types in `not_start`
    (destination, appliance)."""
    from alfworld.gen import constants as C

    can_hold = C.VAL_RECEPTACLE_OBJECTS
    parent, appliance = not_start
    used: set[str] = set()
    placed: list[tuple[str, str, str]] = []
    start_ok = [
        r
        for r in keep
        if obj_target in can_hold.get(recep_type(r), ())
        and recep_type(r) != parent
        and recep_type(r) != appliance
    ]
    if not start_ok:
        return None
    n_target = 2 if task_type == "pick_two_obj_and_place" else rng.randint(1, 2)
    for _ in range(n_target):
        r = rng.choice(start_ok)
        placed.append((_obj_id(rng, obj_target, r, used), obj_target, r))
    others = [o for o in _pickupable_here(scene) if o != obj_target]
    rng.shuffle(others)
    for otype in others[: rng.randint(*distractors)]:
        homes = [r for r in keep if otype in can_hold.get(recep_type(r), ())]
        if not homes:
            continue
        for _ in range(rng.randint(1, 2)):
            r = rng.choice(homes)
            placed.append((_obj_id(rng, otype, r, used), otype, r))
    # the holder is kept exactly when there is a lamp (toggle)
    lamp = (_obj_id(rng, toggle, lamp_holder, used), lamp_holder) if lamp_holder else None
    return placed, lamp


def _agent_loc(rng: random.Random, taken: set[str]) -> str:
    """A random agent pose at no receptacle's location, as an ALFRED location."""
    while True:
        pose = (rng.randint(-12, 12), rng.randint(-12, 12), rng.randint(0, 3), rng.choice((0, 30)))
        agent_loc = "loc|" + "|".join(str(v) for v in pose)
        if agent_loc not in taken:
            return agent_loc


def _problem_pddl(
    scene: Scene,
    keep: list[str],
    loc_of: dict[str, str],
    agent_loc: str,
    placed: list[tuple[str, str, str]],
    toggle: str,
    lamp: tuple[str, str] | None,
    goal: str,
) -> str:
    """The problem's PDDL; `lamp` is (lamp object id, its holder) for look-at-in-light."""
    from alfworld.gen import constants as C

    m = mangle
    lamp_id, lamp_holder = lamp if lamp else ("", "")
    rtypes = sorted({recep_type(r) for r in keep})
    otypes = sorted({t for _, t, _ in placed} | ({toggle} if toggle else set()))
    objects = sorted(placed)
    lines = [
        f";; Generated by `spo3 make-games --env alfworld` from ALFWorld's FloorPlan{scene.floor_plan} layout "
        f"({scene.room}).",
        f"(define (problem plan_generated_{scene.floor_plan})",
        "(:domain alfred)",
        "(:objects",
        "        agent1 - agent",
    ]
    lines += [f"        {t}Type - otype" for t in otypes]
    lines += [f"        {t}Type - rtype" for t in rtypes]
    lines += [f"        {m(o)} - object" for o, _, _ in objects]
    if lamp_id:
        lines.append(f"        {m(lamp_id)} - object")
    lines += [f"        {m(r)} - receptacle" for r in keep]
    lines += [f"        {m(loc)} - location" for loc in sorted(set(loc_of.values()) | {agent_loc})]
    lines += ["        )", "", "(:init", f"        (atLocation agent1 {m(agent_loc)})", ""]
    lines += [f"        (receptacleType {m(r)} {recep_type(r)}Type)" for r in keep]
    lines += [f"        (objectType {m(o)} {t}Type)" for o, t, _ in objects]
    if lamp_id:
        lines.append(f"        (objectType {m(lamp_id)} {toggle}Type)")
    lines.append("")
    lines += [
        f"        (canContain {rt}Type {ot}Type)"
        for rt in rtypes
        for ot in otypes
        if ot in C.VAL_RECEPTACLE_OBJECTS.get(rt, ())
    ]
    lines.append("")
    for o, t, _ in objects:
        lines.append(f"        (pickupable {m(o)})")
        for action, pred in (
            ("Cleanable", "cleanable"),
            ("Heatable", "heatable"),
            ("Coolable", "coolable"),
            ("Sliceable", "sliceable"),
        ):
            if t in C.VAL_ACTION_OBJECTS[action]:
                lines.append(f"        ({pred} {m(o)})")
    if lamp_id:
        lines.append(f"        (toggleable {m(lamp_id)})")
    lines.append("")
    lines += [f"        (openable {m(r)})" for r in keep if recep_type(r) in C.OPENABLE_CLASS_SET]
    lines.append("")
    lines += [f"        (inReceptacle {m(o)} {m(r)})" for o, _, r in objects]
    if lamp_id:
        lines.append(f"        (inReceptacle {m(lamp_id)} {m(lamp_holder)})")
    lines.append("")
    lines += [f"        (receptacleAtLocation {m(r)} {m(loc_of[r])})" for r in keep]
    lines += [f"        (objectAtLocation {m(o)} {m(loc_of[r])})" for o, _, r in objects]
    if lamp_id:
        lines.append(f"        (objectAtLocation {m(lamp_id)} {m(loc_of[lamp_holder])})")
    lines += ["        )", "", goal.replace("#", "-").strip("\n"), ""]
    return "\n".join(lines)


# --- the real engine: write, solve with ALFWorld's expert -----------------------------------------


def _grammar(sentence: str) -> tuple[str, str]:
    data = Path(_alfworld_gen_dir()).parent / "data"
    domain = (data / "alfred.pddl").read_text()
    grammar = (data / "alfred.twl2").read_text()
    # alfworld.agents.utils.misc.add_task_to_grammar with the sentence drawn from our seeded rng
    return domain, grammar.replace("UNKNOWN GOAL", sentence)


def solve(game_file: str | os.PathLike, *, seed: int = 0, max_steps: int = 200) -> list[str] | None:
    """Play `game_file` with ALFWorld's hand-coded expert the way `alfworld-generate` checks a game
    (its is_solvable): the engine wrapped in AlfredDemangler, AlfredInfos and AlfredExpert, taking the
    expert's action until the game is won. Returns the winning trajectory, or None when the expert
    fails, times out or the game cannot be played. The expert draws from the global `random`
    (a fallback on repeated actions); it is seeded with `seed` and restored afterwards."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import (
        AlfredDemangler,
        AlfredExpert,
        AlfredExpertType,
        AlfredInfos,
    )
    from textworld.envs import PddlEnv

    state_before = random.getstate()
    random.seed(seed)
    env = AlfredExpert(
        AlfredInfos(
            AlfredDemangler(
                PddlEnv(textworld.EnvInfos(admissible_commands=True, extras=["gamefile"])),
                shuffle=False,
            )
        ),
        expert_type=AlfredExpertType.HANDCODED,
    )
    trajectory: list[str] = []
    try:
        env.load(str(game_file))
        game_state = env.reset()
        done = False
        while not done:
            if len(trajectory) >= max_steps:
                return None
            command = game_state["extra.expert_plan"][0]
            game_state, _, done = env.step(command)
            trajectory.append(command)
        return trajectory if game_state.get("won") else None
    except (
        Exception,
        SystemExit,
    ):  # the expert signals failure by raising (HandCodedAgentFailed, "Timeout")
        return None
    finally:
        random.setstate(state_before)
        with contextlib.suppress(Exception):
            env.close()


def write_game(folder: Path, draft: GameDraft, trial: str) -> Path:
    """Write the three files of one game (game.tw-pddl not yet solved); returns the game.tw-pddl path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "initial_state.pddl").write_text(draft.pddl)
    (folder / "traj_data.json").write_text(json.dumps(draft.traj_data(trial), indent=2) + "\n")
    domain, grammar = _grammar(draft.goal_sentence)
    game = {
        "pddl_domain": domain,
        "grammar": grammar,
        "pddl_problem": draft.pddl,
        "solvable": None,
        "walkthrough": None,
    }
    path = folder / GAME_FILE
    path.write_text(json.dumps(game))
    return path


def _seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


@dataclass
class MadeGame:
    split: str
    task_type: str
    path: str
    expert_steps: int
    draws: int
    """How many games were drawn for this one (the expert lost, or the scene could not host, the others)."""


def make_games(
    out_dir: str | os.PathLike,
    *,
    n_train: int,
    n_heldout: int,
    seed: int = 0,
    task_types: list[str] | None = None,
    max_tries: int = 40,
    min_receptacles: int = 6,
    max_receptacles: int = 16,
    max_expert_steps: int = 120,
    force: bool = False,
    progress: Any = None,
) -> list[MadeGame]:
    """`n_train` training and `n_heldout` held-out games per task type under `out_dir/<split>/`,
    each won by ALFWorld's hand-coded expert. Game i of (split, type) is drawn from its own seed, so
    the same arguments give the same games, and a game already written (solvable) is reused unless
    `force`. Raises EnvError when no winnable game can be drawn for a (split, type) in `max_tries`
    draws per game; a game the expert has not won within `max_expert_steps` steps counts as lost.
    `progress(made_game)` is called after each game."""
    types = resolve_task_types(task_types)
    if n_train < 0 or n_heldout < 0:
        raise EnvError("alfworld: game counts must be >= 0")
    scenes = load_scenes()
    out = Path(out_dir).expanduser().resolve()
    made: list[MadeGame] = []
    seen: set[str] = set()
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        plans = sorted(p for p in scenes if split_of(p) == split)
        for task_type in types:
            hosts = [p for p in plans if scenes[p].room in _valid_rooms(task_type)]
            for i in range(n):
                game = _make_one(
                    out,
                    split,
                    task_type,
                    i,
                    seed,
                    hosts,
                    scenes,
                    seen,
                    max_tries,
                    min_receptacles,
                    max_receptacles,
                    force,
                    max_expert_steps,
                )
                made.append(game)
                if progress:
                    progress(game)
    return made


def _valid_rooms(task_type: str) -> set[str]:
    from alfworld.gen import constants as C

    return set(C.GOALS_VALID[task_type])


def _make_one(
    out: Path,
    split: str,
    task_type: str,
    i: int,
    seed: int,
    hosts: list[int],
    scenes: dict[int, Scene],
    seen: set[str],
    max_tries: int,
    min_r: int,
    max_r: int,
    force: bool,
    max_expert_steps: int,
) -> MadeGame:
    import shutil

    if not hosts:
        raise EnvError(f"alfworld: no floor plan in split {split!r} can host {task_type}")
    for attempt in range(max_tries):
        s = _seed_of(seed, split, task_type, i, attempt)
        rng = random.Random(s)
        draft = draft_game(
            scenes[rng.choice(hosts)], task_type, rng, min_receptacles=min_r, max_receptacles=max_r
        )
        if draft is None:
            continue
        digest = hashlib.blake2b(draft.pddl.encode(), digest_size=8).hexdigest()
        if digest in seen:
            continue
        trial = f"trial_T{seed:08d}_{i:04d}"
        folder = out / split / draft.folder_name() / trial
        game_file = folder / GAME_FILE
        if (
            not force
            and game_file.is_file()
            and (folder / "initial_state.pddl").is_file()
            and (folder / "initial_state.pddl").read_text() == draft.pddl
        ):
            data = json.loads(game_file.read_text())
            if data.get("solvable"):
                seen.add(digest)
                return MadeGame(
                    split, task_type, str(folder), len(data["walkthrough"]), attempt + 1
                )
        write_game(folder, draft, trial)
        walkthrough = solve(game_file, seed=s, max_steps=max_expert_steps)
        if walkthrough is None:
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):
                folder.parent.rmdir()
            continue
        data = json.loads(game_file.read_text())
        data["solvable"], data["walkthrough"] = True, walkthrough
        game_file.write_text(json.dumps(data))
        seen.add(digest)
        return MadeGame(split, task_type, str(folder), len(walkthrough), attempt + 1)
    raise EnvError(
        f"alfworld: no game of {task_type} in split {split!r} (index {i}) that ALFWorld's expert "
        f"wins in {max_tries} draws"
    )
