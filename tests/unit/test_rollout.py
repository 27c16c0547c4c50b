"""The branching rollout's logic on a tiny deterministic world (fakes); the same rollout runs
on real TextWorld games in tests/integration/test_rollout_textworld.py."""

from __future__ import annotations

import math

import pytest

from spo3.actors.rollout import ReplayMismatch, Rollout, RolloutConfig
from spo3.score_store.score_math import Counts, ScoreParams, n_rollouts, state_score
from spo3.score_store.state_key import state_key
from spo3.transport.contracts import WorkItem
from tests.fakes import LineWorld, ListSink, MemoryScoreStore, ScriptedPolicy, random_actions

P = ScoreParams()


def key(pos: int) -> str:
    return state_key("lineworld", "line-1", f"mile {pos}")


def make(script=None, *, cfg=None, env=None, store=None, params=P):
    env = env or LineWorld(length=3)
    store = store or MemoryScoreStore(params)
    sink = ListSink()
    policy = ScriptedPolicy(script or random_actions(0))
    ro = Rollout(
        env, policy, store, sink, params, cfg or RolloutConfig(max_steps=6, max_leaves=200)
    )
    return ro, env, store, sink, policy


def item(algo="3spo", attempt=0):
    return WorkItem(item_id="task-1", env="lineworld", task_id="line-1", algo=algo, attempt=attempt)


def test_first_visit_branches_g_max_and_emits_the_group():
    ro, env, store, sink, policy = make(
        cfg=RolloutConfig(max_steps=6, max_leaves=1000, env_step_budget=8)
    )
    stats = ro.run(item())
    assert policy.requests[0].n == 8  # unseen root: S = 1, n = ceil(8 * 1)
    root_group = sink.groups[0]
    assert root_group.node_id == "r" and len(root_group.members) == 8
    assert {m.transitions[0].state_key for m in root_group.members} == {key(0)}
    assert stats.env_steps <= 8


def test_branching_follows_n_of_the_stored_counts():
    store = MemoryScoreStore(P)
    # Root seen 4 times, 2 successes, t = 5 after these commits.
    for i, won in enumerate([1, 1, 0, 0]):
        store.commit_leaf(f"pre-{i}", [key(0), f"other-{i}"], float(won))
    expected = n_rollouts(state_score(Counts(4, 2), 5, P, is_root=True), P.g_max)
    assert expected == 4  # S = exp(-ln 5 * 0.5) = 0.447 -> ceil(8 * 0.447) = ceil(3.58) = 4
    ro, *_, policy = make(store=store)
    ro.run(item())
    assert policy.requests[0].n == expected


def test_truncated_state_stops_the_path():
    store = MemoryScoreStore(P)
    for i in range(10):  # mile 1 failed 10 times, never succeeded: N_fail >= xi, SR 0 <= zeta
        store.commit_leaf(f"pre-{i}", [key(0), key(1)], 0.0)
    forward_only = lambda m, p, i: "<action>forward</action>"
    ro, env, store, sink, policy = make(forward_only, store=store)
    stats = ro.run(item())
    assert stats.truncated >= 1
    # Nothing was ever sampled at mile 1: every request was made at the root.
    assert len(policy.requests) == 1
    assert all(path[-1] == key(1) for _, path, _ in store.commits[10:])


def test_leaves_are_committed_once_with_stable_ids_and_groups_match_expansions():
    ro, env, store, sink, policy = make(cfg=RolloutConfig(max_steps=5, max_leaves=40))
    stats = ro.run(item(attempt=2))
    ids = [c[0] for c in store.commits]
    assert len(ids) == len(set(ids)) == stats.leaves
    assert all(i.startswith("task-1:a2:") for i in ids)
    assert stats.leaves <= 40
    multi = sum(c for n, c in stats.branching.items() if n > 1)
    assert stats.groups == len(sink.groups)
    assert (
        multi - 1 <= stats.groups <= multi
    )  # the last expansion may be cut to one member by the budget
    for g in sink.groups:
        assert len(g.members) > 1
        assert g.group_id.startswith("task-1:a2:")
    assert len({g.group_id for g in sink.groups}) == len(sink.groups)
    # Every committed path starts at the task's root.
    assert all(path[0] == key(0) for _, path, _ in store.commits)


def test_budget_holds():
    for budget in (5, 13, 40):
        ro, env, *_ = make(cfg=RolloutConfig(max_steps=6, max_leaves=1000, env_step_budget=budget))
        stats = ro.run(item())
        assert stats.env_steps <= budget


def test_winning_child_gets_the_success_reward():
    forward_only = lambda m, p, i: "<action>forward</action>"
    ro, env, store, sink, _ = make(forward_only, cfg=RolloutConfig(max_steps=6))
    stats = ro.run(item())
    assert stats.successes == 1
    last = sink.groups[-1].members[0].transitions[0]
    assert last.done and last.next_state_key == key(3)
    assert last.reward >= 0.5  # 0.5 * R_success, never the raw reward 10


def test_replay_without_snapshots_gives_the_same_tree():
    a = make(random_actions(3), env=LineWorld(3, snapshots=True))
    b = make(random_actions(3), env=LineWorld(3, snapshots=False))
    sa, sb = a[0].run(item()), b[0].run(item())
    assert [g.model_dump(exclude={"created_at"}) for g in a[3].groups] == [
        g.model_dump(exclude={"created_at"}) for g in b[3].groups
    ]
    assert sa.replay_steps == 0 and sb.replay_steps > 0
    assert sa.env_steps == sb.env_steps


def test_replay_that_drifts_is_an_error():
    class Drifting(LineWorld):
        def reset(self, task_id):
            super().reset(task_id)
            self.pos = self.steps % 2  # a different start on some resets
            return self._obs()

    ro, *_ = make(random_actions(1), env=Drifting(3, snapshots=False))
    with pytest.raises(ReplayMismatch):
        ro.run(item())


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "\x00\x01\x02",
        "é" * 5000,
        "<action>",
        "<action>fly</action>",
        "no tags at all",
        "<think>" * 100,
    ],
)
def test_garbage_outputs_are_penalized_invalid_actions(garbage):
    ro, env, store, sink, _ = make(lambda m, p, i: garbage)
    stats = ro.run(item())
    assert stats.invalid_actions == stats.actions > 0
    assert stats.env_steps == 0
    g = sink.groups[0]
    assert all(m.transitions[0].invalid and m.transitions[0].action is None for m in g.members)
    assert all(m.score == pytest.approx(-P.invalid_penalty) for m in g.members)
    # Spec change (docs/algorithm.md "Leaf commit"): a node whose replies were all invalid is not a leaf
    # (nothing ended there), so nothing is committed.
    assert stats.leaves == 0 and stats.open_at_end == 0


def test_constrained_choice_mode():
    ro, env, store, sink, policy = make(cfg=RolloutConfig(max_steps=4, choice_mode=True))
    stats = ro.run(item())
    assert policy.requests[0].choices == ["forward", "look", "jump"]
    assert stats.invalid_actions == 0


@pytest.mark.parametrize("algo", ["grpo", "gigpo"])
def test_grpo_episodes_one_group_same_budget(algo):
    cfg = RolloutConfig(algo=algo, max_steps=5, group_size=8)
    ro, env, store, sink, policy = make(cfg=cfg)
    stats = ro.run(item(algo))
    assert len(sink.groups) == 1
    g = sink.groups[0]
    assert g.algo == algo and len(g.members) == 8
    assert all(1 <= len(m.transitions) <= 5 for m in g.members)
    assert stats.env_steps <= cfg.budget(P.g_max)
    assert stats.leaves == 8  # one leaf per episode
    assert all(p.n == 1 for p in policy.requests)
    for m in g.members:
        assert m.score == pytest.approx(sum(t.reward for t in m.transitions))


@pytest.mark.parametrize("algo", ["3spo", "grpo", "gigpo"])
def test_visits_record_every_state_entered_with_its_step(algo):
    """Every algorithm records the states it stepped into (committed or not) the same way: each key of
    `visited` once, in the order first entered, with the rollout's env-step count then (the root at 0)."""
    ro, *_ = make(cfg=RolloutConfig(max_steps=6, max_leaves=200, env_step_budget=30))
    stats = ro.run(item(algo))
    assert [k for _, k in stats.visits] == list(dict.fromkeys(k for _, k in stats.visits))
    assert {k for _, k in stats.visits} == stats.visited and stats.visits[0] == (0, key(0))
    steps = [s for s, _ in stats.visits]
    assert steps == sorted(steps) and 0 < steps[-1] <= stats.env_steps
    assert len(stats.visited) >= 2


def test_novelty_use_order_explores_the_same_tree_and_rewards_without_novelty():
    order = P.model_copy(update={"novelty_use": "order"})
    a, b = make(random_actions(3)), make(random_actions(3), params=order)
    sa, sb = a[0].run(item()), b[0].run(item())
    actions = lambda sink: [[m.transitions[0].action for m in g.members] for g in sink.groups]
    assert (
        actions(a[3]) == actions(b[3]) and sa.env_steps == sb.env_steps
    )  # the DFS order is the same
    root_a, root_b = a[3].groups[0].members, b[3].groups[0].members
    forward_a = [m.transitions[0].reward for m in root_a if m.transitions[0].action == "forward"]
    forward_b = [m.transitions[0].reward for m in root_b if m.transitions[0].action == "forward"]
    # At the unseen root (w = 0.5) the step reward is all novelty: 0.5 for reaching mile 1, and
    # without the novelty term nothing, like standing still.
    assert forward_a and all(r == pytest.approx(0.5) for r in forward_a)
    assert forward_b and all(r == 0.0 for r in forward_b)
    assert all(m.transitions[0].reward == 0.0 for m in root_b)


def _cycle(*actions):
    return lambda m, p, i: f"<action>{actions[i % len(actions)]}</action>"


def _rewards(group) -> dict[str, float]:
    return {m.transitions[0].action: m.score for m in group.members}


@pytest.mark.parametrize("dead_end_novelty", [True, False])
def test_dead_end_novelty_at_the_depth_limit(dead_end_novelty):
    # max_steps 1: every child of the root is depth-cut. forward reaches a new state (mile 1),
    # look stays at mile 0, jump ends the episode lost at mile 0.
    params = ScoreParams(dead_end_novelty=dead_end_novelty)
    ro, *_, sink, _ = make(
        _cycle("forward", "look", "jump"), cfg=RolloutConfig(max_steps=1), params=params
    )
    ro.run(item())
    r = _rewards(sink.groups[0])
    # Today: the depth-cut forward earns the novelty w(0) = 0.5; with the setting off, nothing.
    assert r["forward"] == (0.5 if dead_end_novelty else 0.0)
    assert r["look"] == r["jump"] == 0.0


@pytest.mark.parametrize("dead_end_novelty", [True, False])
def test_dead_end_novelty_into_a_truncated_state(dead_end_novelty):
    params = ScoreParams(dead_end_novelty=dead_end_novelty)
    store = MemoryScoreStore(params)
    for i in range(10):  # mile 1 failed 10 times: truncated; the root has N = 10
        store.commit_leaf(f"pre-{i}", [key(0), key(1)], 0.0)
    ro, *_, sink, _ = make(_cycle("forward", "look"), store=store, params=params)
    ro.run(item())
    r = _rewards(sink.groups[0])
    # forward lands on the truncated mile 1: novelty w(10) = 0.5 e^-1 today (score term 0: both SR 0).
    assert r["forward"] == pytest.approx(0.5 * math.exp(-1.0) if dead_end_novelty else 0.0)
    assert r["look"] == 0.0


def test_a_losing_terminal_is_a_dead_end_step():
    ro, *_ = make(cfg=RolloutConfig(max_steps=6))
    from spo3.actors.envs.base import Observation, StepResult
    from spo3.actors.rollout import _Node
    from spo3.score_store.store import StateScore

    obs = Observation(text="x", state_text="x", admissible_actions=())
    node = _Node("r", (), ("k",), obs, ())
    alive = StateScore(key="c", score=1.0, n_rollouts=8, n_total=0, n_success=0)
    assert ro._dead_end_step(node, StepResult(obs, done=True, success=0.0), alive)
    assert not ro._dead_end_step(node, StepResult(obs, done=True, success=1.0), alive)
    assert not ro._dead_end_step(node, StepResult(obs, done=False, success=0.0), alive)
    dead = alive.model_copy(update={"score": 0.0, "n_rollouts": 0})
    assert ro._dead_end_step(node, StepResult(obs, done=False, success=0.0), dead)
