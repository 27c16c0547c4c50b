"""The score store against a real Redis: counting, idempotency, truncation, backends, failures."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from spo3.score_store.score_math import Counts, ScoreParams, n_rollouts, state_score
from spo3.score_store.store import LeafOutcome, RedisScoreStore
from spo3.transport.connection import (
    EmbeddedRedis,
    LocalRedisServer,
    StoreUnavailable,
    connect,
    redact,
)

pytestmark = pytest.mark.redis


def test_unseen_states_score_one(store):
    batch = store.scores(["a", "b"])
    assert batch.t == 1
    assert [(s.key, s.score, s.n_rollouts, s.n_total) for s in batch.scores] == [
        ("a", 1.0, 8, 0),
        ("b", 1.0, 8, 0),
    ]


def test_commit_counts_each_unique_state_once_and_bumps_t(store):
    r = store.commit_leaf("leaf-1", ["root", "x", "y", "x", "y"], success=0.0)
    assert r.counted and r.t == 2
    r = store.commit_leaf("leaf-2", ["root", "x", "z"], success=1.0)
    assert r.counted and r.t == 3
    got = {
        s.key: (s.n_total, s.n_success) for s in store.scores(["root", "x", "y", "z", "w"]).scores
    }
    assert got == {"root": (2, 1), "x": (2, 1), "y": (1, 0), "z": (1, 1), "w": (0, 0)}
    st = store.stats()
    assert (st.t, st.n_states, st.leaves_counted) == (3, 4, 2)


def test_same_leaf_id_counts_once_and_says_so(store):
    assert store.commit_leaf("dup", ["r", "a"], 1.0).counted is True
    again = store.commit_leaf("dup", ["r", "a"], 1.0)
    assert again.counted is False and again.t == 2
    assert store.scores(["a"]).scores[0].n_total == 1
    assert store.stats().duplicate_commits == 1


def test_same_leaf_id_concurrently_counts_once(redis_url):
    stores = [RedisScoreStore(connect(redis_url)) for _ in range(8)]
    results = []
    barrier = threading.Barrier(8)

    def commit(s):
        barrier.wait()
        results.append(s.commit_leaf("race", ["r", "a", "b"], 1.0).counted)

    threads = [threading.Thread(target=commit, args=(s,)) for s in stores]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(results) == [False] * 7 + [True]
    assert stores[0].scores(["b"]).scores[0].n_total == 1
    assert stores[0].stats().t == 2


def test_scores_match_pure_functions(store):
    # Build counts: state "a" 3 paths / 1 success, "b" 12 failures (truncated), root "r".
    for i in range(12):
        store.commit_leaf(f"f{i}", ["r", "b"] + (["a"] if i < 2 else []), 0.0)
    store.commit_leaf("s0", ["r", "a"], 1.0)
    batch = store.scores(["r", "a", "b"])
    t = batch.t
    assert t == 14
    p = store.params
    expect = {
        "r": state_score(Counts(13, 1), t, p, is_root=True),
        "a": state_score(Counts(3, 1), t, p),
        "b": state_score(Counts(12, 0), t, p),
    }
    for s in batch.scores:
        assert s.score == pytest.approx(expect[s.key], rel=1e-12)
        assert s.n_rollouts == n_rollouts(expect[s.key], p.g_max)
    assert expect["b"] == 0.0
    # The root also failed 12 of 13 times, yet is never truncated.
    assert batch.scores[0].score > 0 and batch.scores[0].n_rollouts > 0
    assert store.stats().truncated_states == 1


def test_truncated_set_follows_the_pure_rule_both_ways(store):
    p = ScoreParams(xi=2, zeta=0.5)
    s = RedisScoreStore(store.client, p, run="recover")
    n_total = n_success = 0
    for i, won in enumerate([0, 0, 1, 1, 1, 0, 0, 0]):
        s.commit_leaf(str(i), ["r", "x"], float(won))
        n_total, n_success = n_total + 1, n_success + won
        expected = state_score(Counts(n_total, n_success), i + 2, p) == 0.0
        assert s.stats().truncated_states == int(expected), (n_total, n_success)
        assert (s.scores(["x"]).scores[0].score == 0.0) is expected
    # In: (2, 0); still in at (4, 2) since 2/(4+eps) <= 0.5; out at (5, 3); back in at (8, 3).


def test_runs_are_isolated(store):
    other = RedisScoreStore(store.client, run="other-run")
    store.commit_leaf("l", ["r", "a"], 1.0)
    assert other.scores(["a"]).scores[0].n_total == 0
    assert other.stats().t == 1
    assert store.clear() > 0
    assert store.stats().t == 1


def test_batched_commits_in_one_round_trip(store):
    leaves = [
        LeafOutcome(leaf_id=f"b{i}", path=["r", f"s{i % 3}"], success=float(i % 2))
        for i in range(30)
    ]
    leaves.append(leaves[0])  # a duplicate inside the batch
    results = store.commit_leaves(leaves)
    assert sum(r.counted for r in results) == 30
    assert results[-1].counted is False
    assert store.stats().t == 31


def test_commit_rejects_bad_input(store):
    with pytest.raises(ValueError):
        store.commit_leaf("x", [], 1.0)
    with pytest.raises(ValueError):
        store.commit_leaf("x", ["r"], 1.5)
    assert store.stats().t == 1


def test_unix_socket_and_password_urls():
    with LocalRedisServer(extra_args=("--requirepass", "s3cret")) as srv:
        url = f"redis://:s3cret@127.0.0.1:{srv.port}/2"
        s = RedisScoreStore(connect(url))
        assert s.commit_leaf("l", ["r"], 1.0).counted
        with pytest.raises(redis.AuthenticationError):
            connect(f"redis://:wrong@127.0.0.1:{srv.port}/0").ping()
    assert redact(url) == f"redis://:***@127.0.0.1:{srv.port}/2"
    with EmbeddedRedis() as emb:
        assert emb.url.startswith("unix://")
        s = RedisScoreStore(connect(emb.url))
        s.commit_leaf("l", ["r", "a"], 0.0)
        assert RedisScoreStore(connect(emb.url)).scores(["a"]).scores[0].n_total == 1


def test_lost_connection_is_a_clear_error_after_bounded_retries():
    srv = LocalRedisServer().start()
    s = RedisScoreStore(connect(srv.url, retries=2, timeout_s=0.5))
    s.commit_leaf("before", ["r"], 1.0)
    srv.stop()
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unreachable"):
        s.commit_leaf("after", ["r"], 1.0)
    assert time.monotonic() - start < 15  # bounded, not a hang


def test_retry_after_restart_does_not_double_count():
    """A commit retried after the server came back (same leaf id) counts once."""
    srv = LocalRedisServer().start()
    try:
        s = RedisScoreStore(connect(srv.url))
        assert s.commit_leaf("L", ["r", "a"], 1.0).counted
        s.client.connection_pool.disconnect()  # as if the connection dropped after the reply was lost
        assert s.commit_leaf("L", ["r", "a"], 1.0).counted is False
        assert s.scores(["a"]).scores[0].n_total == 1
    finally:
        srv.stop()


def _counts(s: RedisScoreStore, keys) -> dict[str, tuple[int, int]]:
    return {x.key: (x.n_total, x.n_success) for x in s.scores(keys).scores}


def test_count_per_rollout_against_the_pure_rule(store):
    from spo3.score_store.score_math import count_leaf
    from spo3.score_store.store import rollout_of

    assert rollout_of("task-1:a0:12") == "task-1:a0" and rollout_of("x") == "x"
    per_leaf = RedisScoreStore(store.client, ScoreParams(), run="leaf")
    per_rollout = RedisScoreStore(store.client, ScoreParams(count="rollout"), run="rollout")
    # One DFS rollout: 16 failed leaves below x, then one winning leaf; then a second rollout's leaf.
    leaves = [(f"item:a0:{i}", ["r", "x", f"d{i}"], 0.0) for i in range(16)]
    leaves += [("item:a0:16", ["r", "x", "goal"], 1.0), ("item:a1:0", ["r", "x", "d0"], 0.0)]
    pure: dict[str, Counts] = {}
    seen: dict[str, dict[str, bool]] = {}
    for leaf_id, path, success in leaves:
        per_leaf.commit_leaf(leaf_id, path, success)
        assert per_rollout.commit_leaf(leaf_id, path, success).counted
        pure.update(
            count_leaf(pure, path, success >= 1.0, seen=seen.setdefault(rollout_of(leaf_id), {}))
        )
    keys = ["r", "x", "d0", "d1", "goal"]
    got = _counts(per_rollout, keys)
    assert got == {k: (pure[k].n_total, pure[k].n_success) for k in keys}
    assert got["x"] == (2, 1) and got["d0"] == (2, 0) and got["goal"] == (1, 1)
    # t still counts leaves.
    assert per_rollout.stats().t == per_leaf.stats().t == 19
    # Per leaf (today) x is at N = 18, N_s = 1 and truncated; per rollout it is not.
    assert _counts(per_leaf, ["x"])["x"] == (18, 1)
    assert per_leaf.scores(["x"]).scores[0].score == 0.0
    assert per_rollout.scores(["x"]).scores[0].score > 0.0
    assert per_leaf.stats().truncated_states == 1 and per_rollout.stats().truncated_states == 0
    # Idempotent: a repeated commit of a leaf id changes nothing, under either counting.
    assert per_rollout.commit_leaf("item:a0:3", ["r", "x", "d3"], 1.0).counted is False
    assert _counts(per_rollout, keys) == got


def test_count_per_rollout_counts_the_first_win_below_a_state_once(store):
    s = RedisScoreStore(store.client, ScoreParams(count="rollout"), run="wins")
    s.commit_leaf("w:a0:0", ["r", "x", "a"], 0.0)
    s.commit_leaf("w:a0:1", ["r", "x", "b"], 1.0)
    s.commit_leaf("w:a0:2", ["r", "x", "c"], 1.0)
    assert _counts(s, ["r", "x", "a", "b", "c"]) == {
        "r": (1, 1), "x": (1, 1), "a": (1, 0), "b": (1, 1), "c": (1, 1),
    }  # fmt: skip
    # The seen set expires with the leaf markers.
    assert 0 < s.client.ttl(s.names.rollout_seen("w:a0")) <= s.leaf_ttl_s


def test_truncated_set_with_truncate_won_false(store):
    p = ScoreParams(xi=2, zeta=0.5, truncate_won=False)
    s = RedisScoreStore(store.client, p, run="keepwon")
    n_total = n_success = 0
    for i, won in enumerate([0, 0, 1, 0, 0, 0]):
        s.commit_leaf(str(i), ["r", "x"], float(won))
        n_total, n_success = n_total + 1, n_success + won
        expected = state_score(Counts(n_total, n_success), i + 2, p) == 0.0
        assert s.stats().truncated_states == int(expected), (n_total, n_success)
        assert (s.scores(["x"]).scores[0].score == 0.0) is expected
    # In at (2, 0); out at (3, 1) and never back: under truncate_won true (6, 1) would be truncated.
    assert s.stats().truncated_states == 0
    assert state_score(Counts(6, 1), 8, ScoreParams(xi=2, zeta=0.5)) == 0.0
