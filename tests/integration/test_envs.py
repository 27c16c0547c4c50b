"""The environment adapters on their real engines: each plays a real game to a win with the game's
own solution (TextWorld walkthrough, TWX/ScienceWorld gold path, ALFWorld expert and planner), and
checks admissible actions, state keys, success/done, bad task ids, snapshots and replay.

One engine (one JVM) per module; the ALFWorld games are the small hand-written ones under
tests/data/alfworld (game.tw-pddl made from them by ALFWorld's own alfworld-generate).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spo3.actors.envs.base import EnvError, Observation, StepResult
from spo3.actors.envs.registry import ENV_NAMES, env_class, make_env
from spo3.score_store.state_key import state_key

ALF_DATA = Path(__file__).resolve().parents[1] / "data" / "alfworld"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime (11+)")

# Actions that only read the state: the state key must not change.
READ_ONLY = ("look", "inventory", "examine", "read", "task", "help")


def _key(env, task: str, obs: Observation) -> str:
    return state_key(env.name, task, obs.state_text)


def _read_only(action: str) -> bool:
    return action.split(" ", 1)[0] in READ_ONLY


def play(
    env, task: str, actions: list[str], *, check_keys: bool = True, check_admissible: bool = True
) -> tuple[StepResult, list[str]]:
    """Play `actions` from a fresh reset; check admissible lists and state keys on the way.
    Returns the last step and the state keys (root first)."""
    obs = env.reset(task)
    keys = [_key(env, task, obs)]
    result = None
    for i, action in enumerate(actions):
        assert obs.admissible_actions, f"no admissible action before step {i}"
        if check_admissible:
            assert action in obs.admissible_actions, (i, action, obs.admissible_actions[:20])
        result = env.step(action)
        obs = result.observation
        keys.append(_key(env, task, obs))
        assert isinstance(result.success, float) and 0.0 <= result.success <= 1.0
        if check_keys:
            if _read_only(action):
                assert keys[-1] == keys[-2], f"read-only action {action!r} changed the state key"
            else:
                assert keys[-1] != keys[-2], f"action {action!r} did not change the state key"
        if result.done:
            assert i == len(actions) - 1 or all(
                _read_only(a) or a.startswith("wait") for a in actions[i + 1 :]
            ), f"episode ended early at step {i} ({action!r})"
            break
        assert result.success == 0.0, "success before the end"
    assert result is not None
    return result, keys


def assert_won(result: StepResult) -> None:
    assert result.done is True
    assert result.success == 1.0


def assert_noops_keep_key(env, task: str, noops: list[str]) -> None:
    obs = env.reset(task)
    k0 = _key(env, task, obs)
    for a in noops:
        r = env.step(a)
        assert _key(env, task, r.observation) == k0, f"{a!r} changed the state key"
        assert r.done is False and r.success == 0.0


def assert_replay_deterministic(env, task: str, prefix: list[str], keys: list[str]) -> None:
    """What the rollout does without snapshots: reset + replay gives the recorded keys."""
    obs = env.reset(task)
    assert _key(env, task, obs) == keys[0]
    for i, a in enumerate(prefix, start=1):
        obs = env.step(a).observation
        assert _key(env, task, obs) == keys[i]


# --- registry ---------------------------------------------------------------------------------
def test_registry_names_and_errors():
    assert set(ENV_NAMES) == {"textworld", "twx", "scienceworld", "alfworld"}
    for name in ENV_NAMES:
        assert env_class(name).name == name
    assert env_class("TextWorld-Express").name == "twx"
    with pytest.raises(EnvError):
        make_env("webshop")
    with pytest.raises(EnvError):
        make_env("textworld", no_such_option=1)


# --- TextWorld ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tw_game(tmp_path_factory):
    """tw_game(kind) -> path of a small game of that kind (seed 11), generated once per module."""
    pytest.importorskip("textworld")
    from spo3.actors.envs.textworld_env import generate_games

    out = tmp_path_factory.mktemp("twgames")
    return lambda kind: generate_games(out, kind, 1, seed=11)[0]


@pytest.fixture(scope="module")
def tw_env():
    pytest.importorskip("textworld")
    env = make_env("textworld")
    yield env
    env.close()


@pytest.fixture(scope="module")
def tw_env_facts():
    pytest.importorskip("textworld")
    env = make_env("textworld", state="facts")
    yield env
    env.close()


@pytest.mark.parametrize(
    "kind", ["tw-coin_collector", "tw-treasure_hunter", "tw-simple", "tw-cooking"]
)
def test_textworld_walkthrough_wins(tw_env, tw_env_facts, tw_game, kind):
    task = tw_game(kind)
    obs = tw_env.reset(task)
    assert obs.text and obs.state_text and obs.admissible_actions
    assert "$$$$" not in obs.text and "\n>" not in obs.text, (
        "banner or prompt left in the observation"
    )
    walkthrough = tw_env.walkthrough()
    # Default state text (room description + inventory): reads keep the key, the game's end differs.
    result, keys = play(tw_env, task, walkthrough, check_keys=False)
    assert_won(result)
    assert result.info["won"] is True and keys[-1] != keys[0]
    assert_noops_keep_key(tw_env, task, ["look", "inventory", "look"])
    # state="facts": every action of the walkthrough that is not a read changes the key.
    result, _ = play(tw_env_facts, task, walkthrough)
    assert_won(result)
    assert_noops_keep_key(tw_env_facts, task, ["look", "inventory"])


def test_textworld_generation_is_deterministic(tmp_path, tw_game):
    from spo3.actors.envs.textworld_env import generate_games

    first = tw_game("tw-treasure_hunter")
    again = generate_games(tmp_path, "tw-treasure_hunter", 1, seed=11)[0]
    assert Path(again).name == Path(first).name
    meta = [
        json.loads(Path(p).with_suffix(".json").read_text())["metadata"] for p in (first, again)
    ]
    assert meta[0]["walkthrough"] == meta[1]["walkthrough"]
    # An existing game is reused, not regenerated.
    assert generate_games(tmp_path, "tw-treasure_hunter", 1, seed=11) == [again]
    with pytest.raises(EnvError):
        generate_games(tmp_path, "tw-nope", 1)
    with pytest.raises(EnvError):
        generate_games(tmp_path, "tw-cooking", 1, bogus_setting=3)


def test_textworld_snapshot_restore(tw_env, tw_game):
    task = tw_game("tw-cooking")
    obs = tw_env.reset(task)
    walkthrough = tw_env.walkthrough()
    root = tw_env.snapshot()
    root_key = _key(tw_env, task, obs)
    r = tw_env.step(walkthrough[0])
    r = tw_env.step(walkthrough[1])
    mid = tw_env.snapshot()
    assert mid is not None
    mid_obs = r.observation
    for a in walkthrough[2:]:
        r = tw_env.step(a)
    assert_won(r)
    for _ in range(2):  # a snapshot can be restored more than once
        back = tw_env.restore(mid)
        assert _key(tw_env, task, back) == _key(tw_env, task, mid_obs)
        assert back.admissible_actions == mid_obs.admissible_actions
        for a in walkthrough[2:]:
            r = tw_env.step(a)
        assert_won(r)
    back = tw_env.restore(root)
    assert _key(tw_env, task, back) == root_key


def test_textworld_snapshot_survives_game_switch(tw_game):
    env = make_env("textworld", max_loaded_games=1)
    try:
        task, other = tw_game("tw-cooking"), tw_game("tw-treasure_hunter")
        env.reset(task)
        walkthrough = env.walkthrough()
        snap = env.snapshot()
        key = _key(env, task, env.step(walkthrough[0]).observation)
        snap = env.snapshot()
        env.reset(other)  # evicts the first game's process
        env.step(env.walkthrough()[0])
        assert _key(env, task, env.restore(snap)) == key
        for a in walkthrough[1:]:
            r = env.step(a)
        assert_won(r)
    finally:
        env.close()


def test_textworld_bad_task_ids(tw_env, tmp_path):
    (tmp_path / "lonely.z8").write_bytes(b"\0" * 64)  # no .json sidecar
    for bad in [
        "",
        str(tmp_path / "missing.z8"),
        str(tmp_path / "game.ulx"),
        str(tmp_path / "lonely.z8"),
        str(tmp_path),
    ]:
        with pytest.raises(EnvError):
            tw_env.reset(bad)


# --- TextWorld-Express ----------------------------------------------------------------------------
TWX_TASKS = {
    "cookingworld": "cookingworld:seed=3:numLocations=2,numIngredients=2,numDistractorItems=1,"
    "includeDoors=0,limitInventorySize=0",
    "coin": "coin:seed=1:numLocations=3,numDistractorItems=0,includeDoors=1",
    "twc": "twc:seed=2:numLocations=1,numItemsToPutAway=2,includeDoors=0",
    "mapreader": "mapreader:seed=4:numLocations=4,maxDistanceApart=3,maxDistractorItemsPerLocation=0,includeDoors=0",
}


@pytest.fixture(scope="module")
def twx_env():
    pytest.importorskip("textworld_express")
    if shutil.which("java") is None:
        pytest.skip("needs a Java runtime (11+)")
    env = make_env("twx")
    yield env
    env.close()


@needs_java
@pytest.mark.parametrize("game", sorted(TWX_TASKS))
def test_twx_gold_path_wins(twx_env, game):
    task = TWX_TASKS[game]
    obs = twx_env.reset(task)
    assert twx_env.task_description and obs.text.startswith(twx_env.task_description)
    gold = twx_env.walkthrough()
    result, keys = play(twx_env, task, gold)
    assert_won(result)
    assert_noops_keep_key(twx_env, task, ["look around", "inventory"])
    # Snapshots are copies of the game inside the JVM when the helper could be compiled (a JDK).
    assert (
        (twx_env.snapshot() is not None) == twx_env.snapshots == (shutil.which("javac") is not None)
    )
    assert_replay_deterministic(twx_env, task, gold[:-1], keys)


@needs_java
def test_twx_replay_in_the_jvm_equals_stepping(twx_env, tmp_path, monkeypatch):
    """replay(task, prefix) gives the observation of stepping the prefix, for every game and random
    prefixes, inside the JVM (javac here) and from Python (no javac); stepping on afterwards
    continues the same game."""
    import random

    if shutil.which("javac") is None:
        pytest.skip("needs a JDK's javac for the in-JVM replay")
    monkeypatch.setenv("SPO3_CACHE_DIR", str(tmp_path))  # compiled here, from the source
    fast = make_env("twx")
    slow = make_env("twx", fast_replay=False)
    rng = random.Random(1)
    try:
        assert fast.fast_replay and not slow.fast_replay
        assert list(tmp_path.glob("twx-replay-*/spo3/TwxReplay.class"))
        for task in TWX_TASKS.values():
            for _ in range(10):
                obs, prefix = twx_env.reset(task), []
                for _ in range(rng.randrange(6)):
                    action = rng.choice(obs.admissible_actions)
                    result = twx_env.step(action)
                    if result.done:
                        break
                    prefix.append(action)
                    obs = result.observation
                for env in (fast, slow):
                    assert env.replay(task, prefix) == obs, (task, prefix)
                nxt = rng.choice(obs.admissible_actions)
                assert fast.step(nxt).observation == slow.step(nxt).observation
    finally:
        fast.close()
        slow.close()


@needs_java
def test_twx_other_games_win(twx_env):
    for task in (
        "arithmetic:seed=1",
        "sorting:seed=2",
        "simonsays:seed=3",
        "peckingorder:seed=4",
        "coin:seed=10001:fold=dev:numLocations=2",
    ):
        twx_env.reset(task)
        result, _ = play(twx_env, task, twx_env.walkthrough(), check_keys=False)
        assert_won(result)


@needs_java
def test_twx_bad_task_ids(twx_env):
    from spo3.actors.envs.twx_env import parse_task_id

    assert (
        parse_task_id("coin:numLocations=2:seed=5:fold=dev").task_id
        == "coin:seed=5:fold=dev:numLocations=2"
    )
    for bad in [
        "",
        "coin",
        "chess:seed=1",
        "coin:seed=x",
        "coin:seed=-1",
        "coin:seed=1:seed=2",
        "coin:seed=1:fold=valid",
        "coin:seed=1:numLocations=abc",
        "coin:seed=1:numLocations=2,numLocations=3",
        "coin:seed=1::numLocations=2",
        "coin:seed=1:noSuchProperty=1",
        "coin:seed=1:numLocations=99",
    ]:
        with pytest.raises(EnvError):
            twx_env.reset(bad)
    # The engine is still usable after refusing a task.
    assert twx_env.reset(TWX_TASKS["coin"]).admissible_actions


# --- ScienceWorld ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sw_env():
    pytest.importorskip("scienceworld")
    if shutil.which("java") is None:
        pytest.skip("needs a Java runtime (11+)")
    env = make_env("scienceworld")
    yield env
    env.close()


@needs_java
def test_scienceworld_gold_path_wins(sw_env):
    task = "find-non-living-thing:0"
    sw_env.reset(task)
    gold = sw_env.walkthrough()
    result, keys = play(sw_env, task, gold)
    assert_won(result)
    assert result.info["completed"] and result.info["score"] == 100
    assert_noops_keep_key(sw_env, task, ["look around", "inventory"])
    assert sw_env.snapshot() is None
    assert_replay_deterministic(sw_env, task, gold[:-1], keys)


@needs_java
def test_scienceworld_admissible_is_bounded(sw_env):
    obs = sw_env.reset("find-non-living-thing:0")
    r = sw_env.step("open door to kitchen")
    r = sw_env.step("go to kitchen")
    acts = r.observation.admissible_actions
    assert r.info["n_valid"] > 200 and r.info["admissible_truncated"] is True
    assert len(acts) == 200 and len(set(acts)) == 200
    assert (
        acts.index("look around") < 10 and acts.index("inventory") < 10
    )  # object-free actions first
    assert "reset task" not in acts and "focus on agent" not in acts
    assert not any(a.startswith(("move air ", "pour air ")) for a in acts)
    assert len(sw_env.all_valid_actions()) > len(acts)
    assert "task" in obs.admissible_actions


@needs_java
def test_scienceworld_failure_is_not_success(sw_env):
    sw_env.reset("boil:0")
    # Focusing on something that is not the task's substance ends the task with score -100.
    r = sw_env.step("focus on picture")
    assert r.done is True and r.success == 0.0 and r.raw_reward == -100.0
    assert r.info["completed"] is False and r.info["won"] is False
    with pytest.raises(EnvError):
        sw_env.step("look around")


@needs_java
def test_scienceworld_bad_task_ids(sw_env):
    for bad in ["", "boil", "boil:x", "boil:0:1", "no-such-task:0", "boil:100000", "boil:-1"]:
        with pytest.raises(EnvError):
            sw_env.reset(bad)
    with pytest.raises(EnvError):
        make_env("scienceworld", simplification="bogus").reset("boil:0")


# --- ALFWorld ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def alf_games():
    pytest.importorskip("alfworld")
    from spo3.actors.envs.alfworld_env import list_games

    games = list_games(ALF_DATA)
    assert len(games) == 3
    return games


@pytest.fixture(scope="module")
def alf_env():
    pytest.importorskip("alfworld")
    env = make_env("alfworld", data_dir=str(ALF_DATA))  # state="facts", the default
    assert env.state_mode == "facts"
    yield env
    env.close()


@pytest.fixture(scope="module")
def alf_env_obs():
    pytest.importorskip("alfworld")
    env = make_env("alfworld", data_dir=str(ALF_DATA), state="observation")
    yield env
    env.close()


def _walk(env, task, actions):
    obs = env.reset(task)
    for a in actions:
        result = env.step(a)
        assert result.info["valid"], a
        obs = result.observation
    return obs


def test_alfworld_world_states_with_the_same_feedback_get_different_keys(
    alf_env, alf_env_obs, alf_games
):
    """At the fridge with empty hands and at the fridge holding the apple: the same feedback text,
    two world states. The default (facts) keys tell them apart; the feedback-text keys merge them."""
    task = next(g for g in alf_games if "Apple" in g)
    empty = ["go to fridge 1"]
    holding = ["go to countertop 1", "take apple 1 from countertop 1", "go to fridge 1"]
    a, b = _walk(alf_env, task, empty), _walk(alf_env, task, holding)
    assert a.text == b.text and a.text.startswith("You arrive at fridge 1")
    assert _key(alf_env, task, a) != _key(alf_env, task, b)
    assert "holds(agent1: agent, apple" in b.state_text and "holds(" not in a.state_text
    merged = [_key(alf_env_obs, task, _walk(alf_env_obs, task, p)) for p in (empty, holding)]
    assert merged[0] == merged[1]  # why the feedback text is no state key


def test_alfworld_two_objects_of_one_kind_are_two_world_states(alf_env, alf_env_obs):
    """Two apples on the countertop (tests/data/alfworld-multi): at the fridge holding apple 1 or
    apple 2 gives the same feedback text and two different world-state keys."""
    task = str(next((ALF_DATA.parent / "alfworld-multi").glob("*/*/game.tw-pddl")).parent)
    first = ["go to countertop 1", "take apple 1 from countertop 1", "go to fridge 1"]
    second = ["go to countertop 1", "take apple 2 from countertop 1", "go to fridge 1"]
    a, b = _walk(alf_env, task, first), _walk(alf_env, task, second)
    assert a.text == b.text
    assert _key(alf_env, task, a) != _key(alf_env, task, b)
    merged = [_key(alf_env_obs, task, _walk(alf_env_obs, task, p)) for p in (first, second)]
    assert merged[0] == merged[1]


def test_alfworld_look_and_inventory_create_no_new_keys(alf_env, alf_games):
    """look / inventory / help replies differ from each other and from the arrival text, in every
    state of the expert's path, but the key stays the world state's."""
    task = next(g for g in alf_games if "Apple" in g)
    expert = (alf_env.reset(task), alf_env.walkthrough())[1]
    for i in range(len(expert)):
        obs = _walk(alf_env, task, expert[:i])
        key = _key(alf_env, task, obs)
        texts = {obs.text}
        for read in ("look", "inventory", "help", "look"):
            r = alf_env.step(read)
            texts.add(r.observation.text)
            assert _key(alf_env, task, r.observation) == key, (expert[:i], read)
        assert len(texts) >= 3  # the replies themselves differ


def test_alfworld_expert_wins_every_game(alf_env, alf_games):
    for task in alf_games:
        obs = alf_env.reset(task)
        assert "Welcome to TextWorld" not in obs.text and "Your task is to:" in obs.text
        expert = (
            alf_env.walkthrough()
        )  # ALFWorld's hand-coded expert, recorded by alfworld-generate
        result, keys = play(alf_env, task, expert)
        assert_won(result)
        assert result.raw_reward == 10.0 and result.success == 1.0
        alf_env.reset(task)
        planner = alf_env.plan()  # ALFWorld's planner expert (Fast Downward)
        assert 0 < len(planner) <= len(expert)
        result, _ = play(alf_env, task, planner)
        assert_won(result)
        assert_replay_deterministic(alf_env, task, expert[:-1], keys)


def test_alfworld_facts_state_ignores_reads_and_invalid_actions(alf_env, alf_games):
    task = alf_games[0]
    assert_noops_keep_key(
        alf_env, task, ["look", "inventory", "help", "examine bed 1", "fly away", "look"]
    )
    r = alf_env.step("fly away")
    assert r.observation.text == "Nothing happens." and r.info["valid"] is False


def test_alfworld_snapshots_reproduce_replay(alf_env, alf_games):
    """Restore any state of the expert's path, take a random admissible action, then another: the
    same observations (texts, world-state keys, admissible actions) as resetting and replaying
    on a second engine. A snapshot taken before a reset of its game cannot be restored."""
    import random

    replayer = make_env("alfworld", data_dir=str(ALF_DATA), snapshots=False)
    rng = random.Random(0)
    try:
        for task in alf_games:
            obs = [alf_env.reset(task)]
            expert = alf_env.walkthrough()
            snaps = [alf_env.snapshot()]
            for a in expert[:-1]:
                obs.append(alf_env.step(a).observation)
                snaps.append(alf_env.snapshot())
            for _ in range(25):
                i = rng.randrange(len(snaps))
                assert alf_env.restore(snaps[i]) == obs[i]
                replayed = replayer.reset(task)
                for a in expert[:i]:
                    replayed = replayer.step(a).observation
                assert replayed == obs[i] and replayer.snapshot() is None
                for _ in range(2):
                    a = rng.choice(
                        obs[i].admissible_actions if _ == 0 else mine.observation.admissible_actions  # noqa: F821
                    )
                    mine, theirs = alf_env.step(a), replayer.step(a)
                    assert mine.observation == theirs.observation and mine.done == theirs.done, (
                        task,
                        i,
                        a,
                    )
                    if mine.done:
                        break
            alf_env.reset(task)
            with pytest.raises(EnvError, match="reset"):
                alf_env.restore(snaps[1])
    finally:
        replayer.close()


def test_alfworld_observation_state_has_no_banner_or_task(alf_env_obs, alf_games):
    task = alf_games[1]
    obs = alf_env_obs.reset(task)
    assert "Welcome" not in obs.state_text and "Your task" not in obs.state_text
    assert obs.state_text.startswith("You are in the middle of a room.")
    assert alf_env_obs.task_description == "put a apple in fridge."
    # The key is the observation: the same observation gives the same key across resets.
    k0 = _key(alf_env_obs, task, obs)
    assert _key(alf_env_obs, task, alf_env_obs.reset(task)) == k0
    result, _ = play(alf_env_obs, task, alf_env_obs.walkthrough(), check_keys=False)
    assert_won(result)


def test_alfworld_bad_task_ids_and_empty_data(alf_env, tmp_path):
    from spo3.actors.envs.alfworld_env import list_games

    for bad in ["", str(tmp_path / "nope"), str(tmp_path), str(ALF_DATA)]:
        with pytest.raises(EnvError):
            alf_env.reset(bad)
    # A folder with only traj_data.json + initial_state.pddl needs alfworld-generate first.
    src = next(ALF_DATA.glob("*/*/initial_state.pddl")).parent
    half = tmp_path / "half" / src.name
    half.mkdir(parents=True)
    for f in ("traj_data.json", "initial_state.pddl"):
        shutil.copy(src / f, half / f)
    with pytest.raises(EnvError, match="alfworld-generate"):
        alf_env.reset(str(half))
    # Zero games: refuse instead of spinning like AlfredTWEnv.
    with pytest.raises(EnvError, match="zero games"):
        make_env("alfworld", data_dir=str(tmp_path / "half"))
    with pytest.raises(EnvError, match="no playable games"):
        list_games(tmp_path / "half")
    with pytest.raises(EnvError):
        make_env("alfworld", state="pixels")


# --- the rollout restores nodes without replay where the engine allows it --------------------------
@pytest.mark.redis
@pytest.mark.parametrize("name", ["twx", "alfworld"])
def test_rollout_with_snapshots_equals_rollout_with_replay(name, redis_url):
    """The same 3SPO rollout (same policy draws, fresh stores) with snapshots (TWX: copies of the
    game inside the JVM; ALFWorld: Fast Downward's state id) and with reset + replay: the same
    groups, the same new steps, and no replay step with snapshots."""
    from spo3.actors.rollout import Rollout, RolloutConfig
    from spo3.score_store.score_math import ScoreParams
    from spo3.score_store.store import RedisScoreStore
    from spo3.transport.connection import connect
    from spo3.transport.contracts import WorkItem
    from spo3.transport.stream import GroupStream
    from tests.fakes import ScriptedPolicy, random_actions

    if name == "twx":
        pytest.importorskip("textworld_express")
        if shutil.which("javac") is None:
            pytest.skip("TWX snapshots need the helper compiled by a JDK's javac")
        task, envs = (
            TWX_TASKS["coin"],
            (make_env("twx"), make_env("twx", snapshots=False, fast_replay=False)),
        )
    else:
        pytest.importorskip("alfworld")
        from spo3.actors.envs.alfworld_env import list_games

        task = next(g for g in list_games(ALF_DATA) if "Apple" in g)
        envs = (
            make_env("alfworld", data_dir=str(ALF_DATA)),
            make_env("alfworld", data_dir=str(ALF_DATA), snapshots=False),
        )
    params, client = ScoreParams(), connect(redis_url)
    cfg = RolloutConfig(
        max_steps=6, max_leaves=64, choice_mode=True, env_step_budget=60 if name == "twx" else 30
    )
    out = []
    try:
        for i, env in enumerate(envs):
            run = f"snap-{name}-{i}"
            stream = GroupStream(client, run)
            stats = Rollout(
                env,
                ScriptedPolicy(random_actions(4)),
                RedisScoreStore(client, params, run=run),
                stream,
                params,
                cfg,
                run=run,
            ).run(WorkItem(item_id="s", env=name, task_id=task))
            out.append(
                (stats, [g.model_dump(exclude={"created_at", "run"}) for g in stream.read_all()])
            )
    finally:
        for env in envs:
            env.close()
    (snap, groups_snap), (replay, groups_replay) = out
    assert envs[0].snapshot is not None and snap.env_steps == replay.env_steps > 10
    assert groups_snap == groups_replay and len(groups_snap) > 2
    assert snap.replay_steps == 0 and snap.restores == 0
    assert replay.replay_steps > 0 and replay.restores > 0
