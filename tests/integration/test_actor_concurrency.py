"""Actors that run several work items at once, and leases that hold while an actor waits: real
Redis, real actor processes (tests/integration/scripts/scripted_actor.py) playing real TextWorld
games with a seeded policy.

The stall test runs the scenario twice: at full scale (8 actor processes, the learner reading
nothing for 3 minutes, 6 leases of 30 s) and scaled down in time with 2 lanes per process (4
processes x concurrency 2, a 12 s stall, 4 leases of 3 s). A small unread bound makes every append
wait; no work item may run twice (attempts stay 0, one rollout per item in the run's totals) and
nothing is lost once the learner reads again."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from spo3.actors.config import ActorConfig, RolloutConfig
from spo3.actors.envs.textworld_env import generate_games
from spo3.actors.worker import run_actor
from spo3.transport.connection import connect
from spo3.transport.redis_names import RedisNames
from spo3.transport.stream import GroupConsumer, GroupStream
from spo3.transport.work_queue import WorkQueue
from tests.fakes import ScriptedPolicy, random_actions
from tests.integration.test_actor_service import ROLLOUT, finish, start_actor
from tests.integration.test_stream_queue import group as group_of

pytestmark = [pytest.mark.redis, pytest.mark.slow]

MAX_UNREAD = 3


@pytest.fixture(scope="module")
def games(tmp_path_factory):
    return generate_games(tmp_path_factory.mktemp("games"), "tw-coin_collector", 4, seed=5)


def attempts(client, run: str) -> dict[str, int]:
    raw = client.hgetall(RedisNames(run).work_items)
    return {k.decode(): json.loads(v)["attempt"] for k, v in raw.items()}


@pytest.mark.parametrize(
    "processes, concurrency, lease_s, stall_s",
    [(8, 1, 30.0, 180.0), (4, 2, 3.0, 12.0)],
    ids=["8-actors-3-minutes", "4x2-lanes-12-seconds"],
)
def test_leases_hold_while_appends_wait_for_a_stalled_learner(
    redis_url, games, processes, concurrency, lease_s, stall_s
):
    run, client = f"stall-{processes}x{concurrency}", connect(redis_url)
    lanes = processes * concurrency
    queue = WorkQueue(client, run)
    items = [f"item-{i}" for i in range(3 * len(games))]
    for i, item_id in enumerate(items):
        queue.put("textworld", games[i % len(games)], item_id=item_id)
    consumer = GroupConsumer(client, run)  # the learner's group exists; it reads nothing yet
    actors = [
        start_actor(
            redis_url,
            run,
            seed,
            lease_s=lease_s,
            stream_max_unread=MAX_UNREAD,
            concurrency=concurrency,
            exit_when_idle_s=2.0,
        )
        for seed in range(processes)
    ]
    try:
        # The stream fills up to the bound and every lane holds an item: from then on every
        # append waits.
        deadline = time.monotonic() + 120
        while (
            client.xlen(consumer.names.groups_stream) < MAX_UNREAD
            or queue.counts()["leased"] < lanes
        ):
            assert time.monotonic() < deadline, (
                client.xlen(consumer.names.groups_stream),
                queue.counts(),
            )
            assert all(a.poll() is None for a in actors)
            time.sleep(0.2)
        stalled_at = time.monotonic()
        while time.monotonic() - stalled_at < stall_s:
            time.sleep(0.5)
            assert client.xlen(consumer.names.groups_stream) == MAX_UNREAD  # nobody got past
            assert set(attempts(client, run).values()) == {0}, attempts(client, run)
        # Every lane still holds an item (one that appended nothing may have finished meanwhile).
        assert queue.counts()["leased"] == lanes

        # The learner reads again: everything drains, each item exactly once.
        read: list[str] = []
        while any(a.poll() is None for a in actors):
            batch = consumer.read(16, block_ms=200)
            read += [g.group_id for _, g in batch]
            consumer.ack([entry for entry, _ in batch])
        read += [g.group_id for _, g in consumer.read(1000, block_ms=200)]
        results = [finish(a, timeout=60) for a in actors]
    finally:
        for a in actors:
            if a.poll() is None:
                a.kill()
    assert sum(r["finished"] for r in results) == len(items)
    assert set(attempts(client, run).values()) == {0}
    assert queue.counts() == {"ready": 0, "leased": 0, "done": len(items)}
    totals = {k.decode(): int(v) for k, v in client.hgetall(RedisNames(run).actor_totals).items()}
    assert totals["tasks"] == len(items)  # one rollout per item: none ran twice
    assert len(read) == len(set(read)) == totals["groups"] > 0  # every group appended was read
    assert client.hlen(f"{RedisNames(run).prefix}:work:owner") == 0


class GatheringPolicy:
    """The scripted policy with a fixed latency, counting the requests in flight at once. Its
    first requests wait (up to 30 s) until `lanes` of them are in flight together, so a test on a
    loaded machine still sees every lane's request out at once if the lanes run concurrently."""

    def __init__(self, latency_s: float, lanes: int) -> None:
        self.inner, self.latency_s, self.lanes = ScriptedPolicy(random_actions(1)), latency_s, lanes
        self.in_flight = self.most_in_flight = 0
        self.threads: set[str] = set()
        self._cond = threading.Condition()

    def sample(self, messages, params):
        with self._cond:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.threads.add(threading.current_thread().name)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self.most_in_flight >= self.lanes, timeout=30)
        try:
            time.sleep(self.latency_s)
            return self.inner.sample(messages, params)
        finally:
            with self._cond:
                self.in_flight -= 1


def test_one_actor_process_runs_concurrency_items_at_once(redis_url, games):
    run, client = "lanes", connect(redis_url)
    queue = WorkQueue(client, run)
    for i in range(2 * len(games)):
        queue.put("textworld", games[i % len(games)], item_id=f"lane-{i}")
    policy = GatheringPolicy(0.05, lanes=4)
    cfg = ActorConfig(
        redis_url=redis_url,
        run=run,
        rollout=RolloutConfig(**ROLLOUT),
        exit_when_idle_s=0.5,
        concurrency=4,
    )
    assert run_actor(cfg, policy) == 2 * len(games)
    assert policy.most_in_flight == 4  # every lane had a request out at once
    assert policy.threads == {f"rollout-{i}" for i in range(4)}
    assert queue.counts() == {"ready": 0, "leased": 0, "done": 2 * len(games)}
    totals = {k.decode(): int(v) for k, v in client.hgetall(RedisNames(run).actor_totals).items()}
    assert totals["tasks"] == 2 * len(games)


def test_sigterm_ends_an_actor_waiting_on_a_full_stream(redis_url, games):
    """A learner that finished reads no more: an actor waiting for room in the stream stops at
    SIGTERM (well before the append's 600 s limit), exits cleanly, and gives its unfinished item
    back to the queue, its attempt counted once."""
    run, client = "sigterm", connect(redis_url)
    queue = WorkQueue(client, run)
    queue.put("textworld", games[0], item_id="held")
    GroupConsumer(client, run)  # the learner's group exists and reads nothing
    GroupStream(client, run).append(group_of("earlier"))  # one unread group: the stream is full
    actor = start_actor(redis_url, run, 0, stream_max_unread=1, exit_when_idle_s=60.0)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(actor.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("waits: the groups stream is full" in line for line in lines):
            assert actor.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.1)
        actor.send_signal(signal.SIGTERM)
        actor.wait(timeout=30)
        reader.join(10)
    finally:
        if actor.poll() is None:
            actor.kill()
    out = "".join(lines)
    assert actor.returncode == 0, out[-3000:]
    assert "was not appended" in out  # the wait itself was cut short
    result = json.loads(out.strip().splitlines()[-1])
    assert result["finished"] == 0
    assert queue.counts() == {"ready": 1, "leased": 0, "done": 0}
    assert attempts(client, run) == {"held": 1}
    assert [g.group_id for g in GroupStream(client, run).read_all()] == ["earlier"]
    # the env steps it spent count in the run's totals, as for any rollout stopped mid-task
    assert int(client.hget(RedisNames(run).actor_totals, "env_steps") or 0) > 0
