"""Many processes committing overlapping paths at once: every count exactly right afterwards."""

from __future__ import annotations

import multiprocessing as mp
import random
from collections import Counter

import pytest

from spo3.score_store.store import RedisScoreStore
from spo3.transport.connection import connect

pytestmark = pytest.mark.redis

PROCESSES = 8
LEAVES_PER_PROCESS = 500
SHARED_LEAVES = 50  # committed by every process: each must count once


def _plan(proc: int) -> list[tuple[str, list[str], float]]:
    """Leaves of one process: paths over 3 roots and 40 inner states, so they overlap a lot,
    with repeated states inside a path; plus the same shared leaves in every process."""
    rng = random.Random(proc)
    leaves = []
    for i in range(LEAVES_PER_PROCESS):
        depth = rng.randint(1, 12)
        path = [f"root{i % 3}"] + [f"s{rng.randrange(40)}" for _ in range(depth)]
        leaves.append((f"p{proc}-{i}", path, float(rng.random() < 0.3)))
    shared = random.Random(1234)
    for i in range(SHARED_LEAVES):
        path = ["root0"] + [f"s{shared.randrange(40)}" for _ in range(5)]
        leaves.append((f"shared-{i}", path, float(i % 2)))
    rng.shuffle(leaves)
    return leaves


def _worker(url: str, proc: int, barrier) -> int:
    store = RedisScoreStore(connect(url))
    barrier.wait()
    return sum(
        store.commit_leaf(leaf_id, path, success).counted for leaf_id, path, success in _plan(proc)
    )


def test_eight_processes_count_exactly(redis_url):
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(PROCESSES)
    with ctx.Pool(PROCESSES) as pool:
        counted = pool.starmap(_worker, [(redis_url, p, barrier) for p in range(PROCESSES)])

    # Expected counts from the plan, each leaf id once.
    unique = {}
    for p in range(PROCESSES):
        for leaf_id, path, success in _plan(p):
            unique[leaf_id] = (path, success)
    n_total, n_success = Counter(), Counter()
    for path, success in unique.values():
        for key in set(path):
            n_total[key] += 1
            n_success[key] += int(success == 1.0)

    assert sum(counted) == len(unique) == PROCESSES * LEAVES_PER_PROCESS + SHARED_LEAVES
    store = RedisScoreStore(connect(redis_url))
    keys = sorted(n_total)
    got = {s.key: (s.n_total, s.n_success) for s in store.scores(keys).scores}
    assert got == {k: (n_total[k], n_success[k]) for k in keys}
    stats = store.stats()
    assert stats.t == len(unique) + 1
    assert stats.n_states == len(keys)
    assert stats.duplicate_commits == (PROCESSES - 1) * SHARED_LEAVES
