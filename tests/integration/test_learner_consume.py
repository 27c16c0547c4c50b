"""The learner's side of the stream on a real Redis: consumer group, dead letters, re-claiming."""

from __future__ import annotations

import pytest

from spo3.learner.batch import batch_rows
from spo3.learner.staleness import StalenessFilter
from spo3.transport.connection import connect
from spo3.transport.stream import GroupConsumer, GroupStream
from tests.integration.test_stream_queue import group

pytestmark = pytest.mark.redis


def test_read_ack_and_malformed_entries_go_aside(redis_url):
    client = connect(redis_url)
    stream = GroupStream(client, "r")
    consumer = GroupConsumer(client, "r")
    stream.append(group("g1"))
    client.xadd(stream.names.groups_stream, {"group": b"{not json"})
    client.xadd(stream.names.groups_stream, {"other": b"1"})
    stream.append(group("g2"))
    got = consumer.read(10, block_ms=100)
    assert [g.group_id for _, g in got] == ["g1", "g2"]
    assert consumer.malformed == 2
    dead = client.xrange(stream.names.dead_letters)
    assert len(dead) == 2 and b"error" in dead[0][1]
    assert consumer.pending() == 2
    assert consumer.ack([e for e, _ in got]) == 2
    assert consumer.pending() == 0 and stream.length() == 0  # acknowledged entries free the stream


def test_a_new_learner_reclaims_what_a_dead_one_held(redis_url):
    client = connect(redis_url)
    stream = GroupStream(client, "r")
    for i in range(5):
        stream.append(group(f"g{i}"))
    dead = GroupConsumer(client, "r", consumer="learner-0")
    held = dead.read(3, block_ms=100)
    assert len(held) == 3
    # learner-0 dies without acknowledging; its successor takes the pending entries first.
    successor = GroupConsumer(client, "r", consumer="learner-1")
    reclaimed = successor.reclaim()
    assert [g.group_id for _, g in reclaimed] == ["g0", "g1", "g2"]
    fresh = successor.read(10, block_ms=100)
    assert [g.group_id for _, g in fresh] == ["g3", "g4"]
    successor.ack([e for e, _ in reclaimed + fresh])
    assert successor.pending() == 0 and successor.reclaim() == []


def test_staleness_filter_and_rows():
    f = StalenessFilter(max_staleness=1)
    assert f.accept(group_version=4, current_version=5)
    assert not f.accept(group_version=3, current_version=5)
    assert (f.accepted, f.dropped) == (1, 1)
    g = group("g")
    g.members[1] = g.members[1].model_copy(update={"score": 0.0})
    rows = batch_rows([g])
    assert [r.advantage for r in rows] == pytest.approx([1.0, -1.0], abs=1e-5)
    assert rows[0].response_ids == [2, 3] and rows[0].prompt_ids == [1]
    assert batch_rows([group("flat")]) == []  # zero spread: nothing to learn


def test_unknown_schema_versions_are_dead_lettered_with_a_clear_error(redis_url):
    import json

    client = connect(redis_url)
    stream = GroupStream(client, "schema")
    consumer = GroupConsumer(client, "schema")
    old = json.loads(group("old").model_dump_json())
    for t in (t for m in old["members"] for t in m["transitions"]):  # what a version-1 actor sent
        t.pop("choices"), t.pop("choice_token_ids")
    for version in (1, 4, None):
        body = (
            {**old, "schema_version": version}
            if version is not None
            else {k: v for k, v in old.items() if k != "schema_version"}
        )
        client.xadd(stream.names.groups_stream, {"group": json.dumps(body).encode()})
    stream.append(group("new"))
    got = consumer.read(10, block_ms=100)
    assert [g.group_id for _, g in got] == ["new"]  # the reader goes on past them
    assert consumer.malformed == 3 and consumer.unknown_schema == 3
    errors = [fields[b"error"].decode() for _, fields in client.xrange(stream.names.dead_letters)]
    assert "unknown stream schema_version 1: this learner reads version 2" in errors[0]
    assert "schema_version 4" in errors[1] and "schema_version None" in errors[2]
    assert consumer.pending() == 1  # dead letters are acknowledged and removed from the stream
