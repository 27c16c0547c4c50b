"""The groups stream and the work queue on a real Redis."""

from __future__ import annotations

import threading
import time

import pytest

from spo3.transport.connection import connect
from spo3.transport.contracts import Group, GroupMember, Transition
from spo3.transport.stream import AppendStopped, GroupStream, StreamFull
from spo3.transport.work_queue import WorkQueue

pytestmark = pytest.mark.redis


def group(gid: str, version: int = 0) -> Group:
    t = Transition(
        state_key="s",
        next_state_key="s2",
        prompt_token_ids=[1],
        token_ids=[2, 3],
        logprobs=[-1.0, -2.0],
        action="go",
        reward=0.5,
        policy_version=version,
    )
    return Group(
        group_id=gid,
        run="r",
        algo="3spo",
        task_id="t",
        node_id="r",
        depth=0,
        members=[GroupMember(transitions=[t], score=0.5)] * 2,
        created_at=time.time(),
    )


def test_append_is_idempotent_per_group_id(redis_url):
    s = GroupStream(connect(redis_url), "r")
    assert s.append(group("g1")) is not None
    assert s.append(group("g1")) is None  # a retried append adds nothing
    s.append(group("g2", version=3))
    got = s.read_all()
    assert [g.group_id for g in got] == ["g1", "g2"]
    assert got[1].policy_version == 3 and got[1].members[0].transitions[0].token_ids == [2, 3]


def test_full_stream_makes_actors_wait_never_drop(redis_url):
    client = connect(redis_url)
    s = GroupStream(client, "r", max_len=3)
    for i in range(3):
        s.append(group(f"g{i}"))
    with pytest.raises(StreamFull, match="learner"):
        s.append(group("late"), wait_limit_s=0.3)
    assert s.length() == 3

    def drain():  # a learner consuming and deleting one entry after a while
        time.sleep(0.5)
        first = client.xrange(s.names.groups_stream, count=1)[0][0]
        client.xdel(s.names.groups_stream, first)

    threading.Thread(target=drain).start()
    start = time.monotonic()
    assert s.append(group("late"), wait_limit_s=10) is not None
    assert time.monotonic() - start >= 0.4
    assert [g.group_id for g in s.read_all()] == ["g1", "g2", "late"]


def test_unread_bound_waits_for_the_learner_to_read_not_to_checkpoint(redis_url):
    """max_unread counts only what the learner has not read: entries it read but has not
    acknowledged yet (they stay until a checkpoint) do not hold actors back."""
    from spo3.transport.stream import GroupConsumer

    client = connect(redis_url)
    s = GroupStream(client, "u", max_len=100, max_unread=2)
    s.append(group("a")), s.append(group("b"))
    with pytest.raises(StreamFull):  # no learner yet: both are unread
        s.append(group("c"), wait_limit_s=0.3)
    consumer = GroupConsumer(client, "u")
    with pytest.raises(StreamFull):  # a consumer group alone reads nothing
        s.append(group("c"), wait_limit_s=0.3)
    assert [g.group_id for _, g in consumer.read(1, 100)] == ["a"]
    assert (
        s.append(group("c"), wait_limit_s=1) is not None
    )  # "a" read, not acknowledged: room for one
    with pytest.raises(StreamFull):
        s.append(group("d"), wait_limit_s=0.3)
    assert s.length() == 3 and consumer.pending() == 1
    read = consumer.read(10, 100)
    assert [g.group_id for _, g in read] == ["b", "c"]
    s.append(group("d")), s.append(group("e"))
    assert [g.group_id for g in s.read_all()] == ["a", "b", "c", "d", "e"]


def test_a_stop_ends_the_wait_on_a_full_stream_and_adds_nothing(redis_url):
    """A stopping actor whose append waits on a full stream (a learner that finished reads no
    more) gives up at once instead of waiting out the limit, and adds nothing; a later append of
    the same group id, once there is room, still goes in."""
    client = connect(redis_url)
    stop = threading.Event()
    s = GroupStream(client, "stop", max_len=100, max_unread=1, stop=stop)
    s.append(group("a"))
    threading.Timer(0.3, stop.set).start()
    start = time.monotonic()
    with pytest.raises(AppendStopped, match="b was not appended"):
        s.append(group("b"), wait_limit_s=60)
    assert time.monotonic() - start < 10
    assert [g.group_id for g in s.read_all()] == ["a"]
    stop.clear()
    s.max_unread = 2
    assert s.append(group("b"), wait_limit_s=1) is not None


def test_queue_hands_each_item_once_and_requeues_expired_leases(redis_url):
    q = WorkQueue(connect(redis_url), "r", lease_s=0.5)
    a, b = q.put("twx", "task-a"), q.put("twx", "task-b")
    first, second = q.take(), q.take()
    assert {first.item_id, second.item_id} == {a.item_id, b.item_id}
    assert q.take() is None
    assert q.finish(first) is True
    time.sleep(0.6)  # the holder of `second` died: its lease runs out
    again = q.take()
    assert again.item_id == second.item_id and again.attempt == 1
    assert q.extend(again) is True
    assert q.finish(again) is True
    assert q.counts() == {"ready": 0, "leased": 0, "done": 2}


def test_release_gives_the_item_back_at_once(redis_url):
    q = WorkQueue(connect(redis_url), "r", lease_s=60)
    q.put("twx", "task-a")
    item = q.take()
    q.release(item)
    back = q.take()
    assert back.item_id == item.item_id and back.attempt == 1


def test_a_lapsed_lease_cannot_finish_release_or_renew_the_next_holders(redis_url):
    """The first holder's lease lapsed and a second actor took the item: the first one's finish,
    release and renewal change nothing, and the second one's lease stays whole."""
    q = WorkQueue(connect(redis_url), "r", lease_s=0.3)
    q.put("twx", "task-a")
    first = q.take()
    time.sleep(0.4)
    second = q.take()
    assert second.item_id == first.item_id and second.attempt == 1
    assert second.lease != first.lease
    assert "lease" not in second.model_dump()  # the token is not part of the item's JSON
    assert q.extend(first) is False
    assert q.finish(first) is False
    assert q.release(first) is False
    assert q.counts() == {"ready": 0, "leased": 1, "done": 0}
    assert q.extend(second) is True
    assert q.finish(second) is True
    assert q.counts() == {"ready": 0, "leased": 0, "done": 1}


def test_lease_keeper_holds_a_lease_past_its_length_and_reports_a_lost_one(redis_url):
    from spo3.transport.work_queue import LeaseKeeper

    q = WorkQueue(connect(redis_url), "r", lease_s=0.6)
    q.put("twx", "task-a"), q.put("twx", "task-b")
    a, b = q.take(), q.take()
    keeper = LeaseKeeper(q).start()
    try:
        keeper.hold(a)
        time.sleep(1.5)  # 2.5 leases: only `a` is renewed
        again = q.take()  # takes the lapsed `b` again
        assert again is not None and again.item_id == b.item_id and again.attempt == 1
        assert q.take() is None  # `a` is still held
        keeper.hold(b)  # a holder that does not know it lost its lease
        deadline = time.monotonic() + 3
        while not keeper.lost(b) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert keeper.lost(b) and not keeper.lost(a)
        keeper.drop(a), keeper.drop(b)
        assert q.finish(a) is True and q.finish(again) is True and q.finish(b) is False
    finally:
        keeper.stop()
    assert q.counts() == {"ready": 0, "leased": 0, "done": 2}


def test_default_unread_bound_applies_once_a_learner_reads(redis_url):
    """max_unread None (ActorConfig's default): no bound while no learner has a consumer group
    (runs without a learner never wait), DEFAULT_MAX_UNREAD once it has."""
    from spo3.transport.stream import DEFAULT_MAX_UNREAD, GroupConsumer

    client = connect(redis_url)
    s = GroupStream(client, "auto", max_len=100, max_unread=None)
    for i in range(DEFAULT_MAX_UNREAD + 2):  # no learner yet: no bound
        assert s.append(group(f"pre{i}"), wait_limit_s=0.3)
    consumer = GroupConsumer(client, "auto")
    with pytest.raises(StreamFull):  # the learner's group exists: 10 unread >= 8
        s.append(group("x"), wait_limit_s=0.3)
    consumer.read(DEFAULT_MAX_UNREAD, 100)  # 2 left unread
    for i in range(DEFAULT_MAX_UNREAD - 2):
        assert s.append(group(f"post{i}"), wait_limit_s=0.5)
    with pytest.raises(StreamFull):
        s.append(group("y"), wait_limit_s=0.3)
