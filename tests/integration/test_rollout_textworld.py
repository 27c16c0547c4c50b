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

from actors.envs.registry import make_env
from actors.envs.textworld_env import generate_games
from actors.rollout import Rollout, RolloutConfig
from score_store.connection import connect
from score_store.score_math import ScoreParams
from score_store.state_key import state_key
from score_store.store import RedisScoreStore
from services.contracts import WorkItem
from services.model_init import init_model
from services.stream import GroupStream
from services.work_queue import WorkQueue
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
    assert stats.truncated == 1 and stats.branching[0] == 1
    assert len(policy.requests) == 1  # sampled at the root only; the child was cut
    assert store.scores([child_key]).scores[0].n_total == P.xi + 1


def test_actor_killed_mid_task_another_finishes_it(game, redis_url, tmp_path):
    """SIGKILL an actor process mid-task: after its lease runs out a second actor runs the task
    again; every leaf counts once and no group id repeats in the stream."""
    client = connect(redis_url)
    model = init_model(tmp_path / "model", "tiny", seed=0)
    queue = WorkQueue(client, "kill")
    queue.put("textworld", game, item_id="task-1")
    args = [SPO3, "actor", "--redis-url", redis_url, "--model", str(model), "--run", "kill", "--choice-mode",
            "--max-steps", "8", "--max-leaves", "400", "--lease-s", "4", "--exit-when-idle", "6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    store = RedisScoreStore(client, run="kill")
    deadline = time.monotonic() + 120
    while store.stats().leaves_counted < 3:
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    leaves_before = store.stats().leaves_counted
    assert queue.counts()["done"] == 0  # the task died with the actor

    second = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out[-3000:]
    assert "actor finished 1 work items" in out
    assert queue.counts() == {"ready": 0, "leased": 0, "done": 1}
    stats = store.stats()
    assert stats.leaves_counted > leaves_before and stats.duplicate_commits == 0
    groups = GroupStream(client, "kill").read_all()
    ids = [g.group_id for g in groups]
    assert len(ids) == len(set(ids))
    assert any(i.startswith("task-1:a0:") for i in ids) and any(i.startswith("task-1:a1:") for i in ids)
