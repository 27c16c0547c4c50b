"""The 3SPO rollout on a real TextWorld game, with the real score store and groups stream, and
real actor processes that get killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spo3.actors.envs.registry import make_env
from spo3.actors.envs.textworld_env import generate_games
from spo3.actors.rollout import Rollout, RolloutConfig
from spo3.app.model_init import init_model
from spo3.score_store.score_math import ScoreParams
from spo3.score_store.state_key import state_key
from spo3.score_store.store import RedisScoreStore
from spo3.transport.connection import connect
from spo3.transport.contracts import WorkItem
from spo3.transport.stream import GroupStream
from spo3.transport.work_queue import WorkQueue
from tests.fakes import ScriptedPolicy, random_actions

pytestmark = [pytest.mark.redis, pytest.mark.slow]
SPO3 = str(Path(sys.executable).with_name("spo3"))
P = ScoreParams()


@pytest.fixture(scope="module")
def game(tmp_path_factory):
    return generate_games(tmp_path_factory.mktemp("games"), "tw-coin_collector", 1, seed=3)[0]


@pytest.fixture(scope="module")
def env():
    e = make_env("textworld")
    yield e
    e.close()


def rollout(env, store, stream, script, cfg):
    policy = ScriptedPolicy(script)
    return Rollout(env, policy, store, stream, P, cfg, run="tw"), policy


def test_dfs_on_a_real_game(env, game, redis_url):
    client = connect(redis_url)
    store, stream = RedisScoreStore(client, P, run="tw"), GroupStream(client, "tw")
    root_key = state_key("textworld", game, env.reset(game).state_text)
    # Give the root history: 4 paths, 2 successes, t = 5 -> n = ceil(8 exp(-ln 5 * 0.5)) = 4.
    for i, won in enumerate([1, 1, 0, 0]):
        store.commit_leaf(f"pre-{i}", [root_key, f"elsewhere-{i}"], float(won))
    cfg = RolloutConfig(max_steps=6, max_leaves=30, choice_mode=True, env_step_budget=40)
    ro, policy = rollout(env, store, stream, random_actions(0), cfg)
    stats = ro.run(WorkItem(item_id="w1", env="textworld", task_id=game))

    assert policy.requests[0].n == 4
    assert stats.env_steps <= 40
    assert stats.leaves <= 30
    # Each leaf committed once: t counts the 4 earlier leaves plus ours, no duplicates.
    s = store.stats()
    assert s.leaves_counted == 4 + stats.leaves and s.duplicate_commits == 0
    root = store.scores([root_key]).scores[0]
    assert root.n_total == 4 + stats.leaves  # every leaf path starts at the root
    # The stream holds exactly the groups of the expansions that had more than one member.
    groups = stream.read_all()
    assert len(groups) == stats.groups > 0
    assert len({g.group_id for g in groups}) == len(groups)
    assert groups[0].node_id == "r" and len(groups[0].members) == 4
    for g in groups:
        assert all(len(m.transitions) == 1 for m in g.members)
        assert len({m.transitions[0].state_key for m in g.members}) == 1
    assert stats.visited and root_key in stats.visited


def test_truncated_state_is_never_expanded(env, game, redis_url):
    client = connect(redis_url)
    store, stream = RedisScoreStore(client, P, run="tw2"), GroupStream(client, "tw2")
    root = env.reset(game)
    walk = env.walkthrough()
    child = env.step(walk[0]).observation
    root_key, child_key = (state_key("textworld", game, o.state_text) for o in (root, child))
    for i in range(P.xi):  # N_fail = xi, SR = 0 -> S = 0 -> n = 0
        store.commit_leaf(f"pre-{i}", [root_key, child_key], 0.0)
    first_only = lambda m, p, i: walk[0]
    cfg = RolloutConfig(max_steps=5, choice_mode=True)
    ro, policy = rollout(env, store, stream, first_only, cfg)
    stats = ro.run(WorkItem(item_id="w2", env="textworld", task_id=game))
    # Spec change (docs/algorithm.md "Rollout"): the truncated child is one failed leaf when reached and is
    # never pushed, so it is never popped and scored for branching (branching[0] was 1).
    assert stats.truncated == 1 and stats.branching[0] == 0
    assert stats.leaf_kinds == {"truncated": 1} and stats.leaves == 1
    assert len(policy.requests) == 1  # sampled at the root only; the child was cut
    assert store.scores([child_key]).scores[0].n_total == P.xi + 1


class RecordingStore:
    """The real store, recording the paths committed through it."""

    def __init__(self, store):
        self.store, self.paths = store, []

    def scores(self, keys):
        return self.store.scores(keys)

    def commit_leaf(self, leaf_id, path, success):
        self.paths.append(list(path))
        return self.store.commit_leaf(leaf_id, path, success)

    def commit_leaves(self, leaves):
        return self.store.commit_leaves(leaves)

    def stats(self):
        return self.store.stats()


@pytest.fixture(scope="module")
def two_exits(tmp_path_factory):
    """tw-treasure_hunter level 15 seed 3: the first room has two exits, east (away from the
    goal) and south (the walkthrough's first step)."""
    return generate_games(
        tmp_path_factory.mktemp("games"), "tw-treasure_hunter", 1, seed=3, level=15
    )[0]


def keys_after(env, game, *actions):
    obs = env.reset(game)
    out = [state_key("textworld", game, obs.state_text)]
    for a in actions:
        out.append(state_key("textworld", game, env.step(a).observation.state_text))
    return out


@pytest.mark.parametrize("reward_score", ["raw", "truncated"])
def test_dead_end_child_is_never_the_top_reward_under_raw(env, two_exits, redis_url, reward_score):
    """A real room with a dead end (east: 10 failures, truncated) and a promising exit (south: one
    success). Under `raw` the dead end earns less than the promising child; under the literal
    `truncated` score it earns the most, which is what the setting is for."""
    game, params = two_exits, P.model_copy(update={"reward_score": reward_score})
    run = f"dead-{reward_score}"
    store = RedisScoreStore(connect(redis_url), params, run=run)
    root_key, east_key = keys_after(env, game, "go east")
    _, south_key = keys_after(env, game, "go south")
    for i in range(P.xi):
        store.commit_leaf(f"pre-dead-{i}", [root_key, east_key], 0.0)
    store.commit_leaf("pre-good", [root_key, south_key], 1.0)
    assert store.scores([east_key]).scores[0].score == 0.0  # truncated
    replies = lambda m, p, i: ["go east", "go south"][i] if i < 2 else p.choices[i % len(p.choices)]
    cfg = RolloutConfig(max_steps=5, max_leaves=30, choice_mode=True, env_step_budget=5)
    policy = ScriptedPolicy(replies)
    stream = GroupStream(connect(redis_url), run)
    stats = Rollout(env, policy, store, stream, params, cfg, run=run).run(
        WorkItem(item_id="dead", env="textworld", task_id=game)
    )
    (group,) = stream.read_all()  # the budget covers the root's expansion only
    reward = {m.transitions[0].next_state_key: m.score for m in group.members}
    assert (
        east_key in reward and south_key in reward and root_key in reward
    )  # look / inventory: no move
    assert stats.informative_groups == 1
    if reward_score == "raw":
        assert reward[east_key] < reward[south_key] == max(reward.values())
        assert stats.truncated_top_groups == 0
    else:
        assert reward[east_key] == max(reward.values()) > reward[south_key]
        assert stats.truncated_top_groups == 1
    # The dead end is one failed leaf, committed once, never expanded.
    assert stats.leaf_kinds["truncated"] == 1
    assert store.scores([east_key]).scores[0].n_total == P.xi + 1
    assert stats.expansions == 1 and len(policy.requests) == 1


def test_each_state_key_is_expanded_once_per_rollout(env, two_exits, redis_url):
    store = RedisScoreStore(connect(redis_url), P, run="once")
    stream = GroupStream(connect(redis_url), "once")
    cfg = RolloutConfig(max_steps=8, max_leaves=64, choice_mode=True, env_step_budget=80)
    ro, policy = rollout(env, store, stream, random_actions(5), cfg)
    stats = ro.run(WorkItem(item_id="once", env="textworld", task_id=two_exits))
    assert stats.env_steps > 30 and stats.expansions > 5
    assert stats.reexpansions == 0
    assert len(policy.requests) == stats.expansions == sum(stats.expansions_by_depth.values())
    expanded = [g.members[0].transitions[0].state_key for g in stream.read_all()]
    assert len(expanded) == len(set(expanded))  # one group per expanded key
    # look / inventory come back to the parent's state: members of the group, never pushed.
    assert stats.not_pushed["on_path"] > 0


def test_no_statistics_from_unexpanded_stack_nodes(env, two_exits, redis_url):
    """A budget far too small to reach the treasure or the depth limit: paths are left open on the
    stack; none of them is a leaf, so the store holds no statistics at all."""
    store = RecordingStore(RedisScoreStore(connect(redis_url), P, run="open"))
    cfg = RolloutConfig(max_steps=20, max_leaves=64, choice_mode=True, env_step_budget=12)

    def never_take(messages, params, i):
        moves = [c for c in params.choices if not c.startswith("take")]
        return moves[i % len(moves)]

    ro, _ = rollout(env, store, GroupStream(connect(redis_url), "open"), never_take, cfg)
    stats = ro.run(WorkItem(item_id="open", env="textworld", task_id=two_exits))
    assert stats.env_steps == 12 and stats.open_at_end > 0
    assert stats.leaves == 0 and store.paths == [] and store.stats().leaves_counted == 0


def test_depth_leaves_are_real_path_ends(env, game, redis_url):
    store = RecordingStore(RedisScoreStore(connect(redis_url), P, run="depth"))
    cfg = RolloutConfig(max_steps=2, max_leaves=64, choice_mode=True, env_step_budget=40)
    ro, _ = rollout(env, store, GroupStream(connect(redis_url), "depth"), random_actions(2), cfg)
    stats = ro.run(WorkItem(item_id="depth", env="textworld", task_id=game))
    assert stats.leaves == len(store.paths) == sum(stats.leaf_kinds.values()) > 0
    assert stats.leaf_kinds["depth"] == stats.leaves  # the coin is 5 moves away: no terminal state
    assert all(len(path) == 3 for path in store.paths)  # root + 2 actions
    assert len({path[-1] for path in store.paths}) == len(store.paths)  # one leaf per state reached


@pytest.mark.parametrize("novelty", ["path", "parent"])
def test_novelty_path_vs_parent(env, game, redis_url, novelty):
    """Shower -go north-> basement; from the basement, `go south` walks back to the shower (on the
    path), `go east` reaches the bedroom (new), `look` stays. Fresh store: every S~ is 1, so the
    reward is w(0) R_novel = 0.5 R_novel."""
    params = P.model_copy(update={"novelty": novelty})
    run = f"novel-{novelty}"
    store, stream = (
        RedisScoreStore(connect(redis_url), params, run=run),
        GroupStream(connect(redis_url), run),
    )
    shower, basement, bedroom = keys_after(env, game, "go north", "go east")
    replies = lambda m, p, i: (
        "go north" if "go north" in p.choices else ["go south", "go east", "look"][i % 3]
    )
    cfg = RolloutConfig(max_steps=5, choice_mode=True, env_step_budget=4)
    stats = Rollout(env, ScriptedPolicy(replies), store, stream, params, cfg, run=run).run(
        WorkItem(item_id="novel", env="textworld", task_id=game)
    )
    groups = stream.read_all()
    at_basement = next(g for g in groups if g.members[0].transitions[0].state_key == basement)
    reward = {m.transitions[0].action: m.score for m in at_basement.members}
    assert reward["go east"] == pytest.approx(0.5) and reward["look"] == pytest.approx(0.0)
    assert reward["go south"] == pytest.approx(0.0 if novelty == "path" else 0.5)
    assert stats.not_pushed["on_path"] == 2  # back to the shower, and look: neither is pushed


def _kill_mid_task(run: str, args: list[str], proc_env: dict, client) -> bool:
    """Start an actor on `run`'s one item and SIGKILL it once its first group is streamed and its
    second waits (--max-unread 1, no learner reading). False if the rollout ended after one group
    (every sampled action a dead end or going nowhere new), so nothing was held to kill."""
    first = subprocess.Popen(
        args + ["--run", run, "--max-unread", "1"],
        env=proc_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stream, queue = GroupStream(client, run), WorkQueue(client, run)
    try:
        deadline = time.monotonic() + 120
        while stream.length() < 1:
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
            time.sleep(0.05)
        time.sleep(1.0)
        if queue.counts()["done"]:
            return False
        assert first.poll() is None, first.stdout.read()[-3000:]  # waiting to stream its 2nd group
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    return queue.counts()["done"] == 0  # the task died with the actor


def test_actor_killed_mid_task_another_finishes_it(env, two_exits, redis_url, tmp_path):
    """SIGKILL an actor process mid-task: after its lease runs out a second actor runs the task
    again; every leaf counts once and no group id repeats in the stream.

    (Since leaves are only real path ends, a rollout commits few of them: the first actor is held
    mid-task by the groups stream's back-pressure, --max-unread 1 with no learner reading, and
    killed there. The east exit of the first room is made a dead end beforehand, and 32 actions
    are sampled per state, so that every attempt reaches it and commits that failed leaf. A
    rollout that ends after its first group cannot be held; the setup then starts over on a fresh
    run, at most twice.)"""
    game = two_exits
    client = connect(redis_url)
    root_key, east_key = keys_after(env, game, "go east")
    model = init_model(tmp_path / "model", "tiny", seed=0)
    args = [
        SPO3,
        "actor",
        "--redis-url",
        redis_url,
        "--model",
        str(model),
        "--choice-mode",
        "--max-steps",
        "4",
        "--g-max",
        "32",
        "--max-leaves",
        "400",
        "--lease-s",
        "4",
        "--exit-when-idle",
        "6",
    ]
    proc_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for run in ("kill", "kill-b", "kill-c"):
        store = RedisScoreStore(client, run=run)
        for i in range(P.xi):
            store.commit_leaf(f"pre-{i}", [root_key, east_key], 0.0)
        queue = WorkQueue(client, run)
        queue.put("textworld", game, item_id="task-1")
        if _kill_mid_task(run, args, proc_env, client):
            break
    else:
        pytest.fail("three rollouts in a row ended after one group: nothing held mid-task")
    leaves_before = store.stats().leaves_counted

    second = subprocess.Popen(
        args + ["--run", run],
        env=proc_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out[-3000:]
    assert "actor finished 1 work items" in out
    assert queue.counts() == {"ready": 0, "leased": 0, "done": 1}
    stats = store.stats()
    assert stats.leaves_counted > leaves_before and stats.duplicate_commits == 0, out[-2000:]
    groups = GroupStream(client, run).read_all()
    ids = [g.group_id for g in groups]
    assert len(ids) == len(set(ids))
    assert any(i.startswith("task-1:a0:") for i in ids) and any(
        i.startswith("task-1:a1:") for i in ids
    )
