"""Schema 3 of the groups stream: a group's prompts travel once, through a real Redis stream, and
the learner's rows are those of the old format (schema 2, prompts inline), which it still reads."""

from __future__ import annotations

import json

import pytest

from spo3.learner.batch import batch_rows
from spo3.transport.connection import connect
from spo3.transport.contracts import SCHEMA_VERSION, Group, GroupMember, Transition
from spo3.transport.stream import GroupConsumer, GroupStream

pytestmark = pytest.mark.redis


def transition(prompt: list[int], k: int, version: int = 0) -> Transition:
    return Transition(
        state_key=f"s{k}",
        next_state_key=f"s{k}'",
        prompt_token_ids=prompt,
        token_ids=[7 + k, 8],
        logprobs=[-0.5 - k / 10, -0.25],
        action=f"go {k}",
        reward=float(k % 3),
        policy_version=version,
        choices=["go 0", "go 1", "go 2"],
        temperature=0.7,
    )


def step_group(gid: str, members: int = 6, prompt_len: int = 1200) -> Group:
    """3SPO: every member's transition has the same prompt."""
    prompt = [1000 + (i * 37) % 5000 for i in range(prompt_len)]
    return Group(
        group_id=gid,
        run="p",
        algo="3spo",
        task_id="t",
        node_id="n",
        depth=1,
        members=[
            GroupMember(transitions=[transition(list(prompt), k)], score=float(k % 3))
            for k in range(members)
        ],
        created_at=1.0,
    )


def episode_group(gid: str) -> Group:
    """GRPO: prompts differ per step; two episodes repeat the first steps' prompts."""
    p = [[5, 6, 7, i] for i in range(4)]
    episodes = [[p[0], p[1], p[2]], [p[0], p[1], p[3]], [p[0], p[3]]]
    return Group(
        group_id=gid,
        run="p",
        algo="grpo",
        task_id="t",
        node_id="root",
        depth=0,
        members=[
            GroupMember(
                transitions=[transition(q, k) for k, q in enumerate(ep)], score=float(j % 2)
            )
            for j, ep in enumerate(episodes)
        ],
        created_at=1.0,
    )


def schema_2_json(group: Group) -> bytes:
    """The entry an actor of the previous release wrote: schema 2, prompts inline."""
    data = json.loads(group.model_dump_json(exclude={"prompts"}))
    data["schema_version"] = 2
    for m in data["members"]:
        for t in m["transitions"]:
            t.pop("prompt_index")
    return json.dumps(data).encode()


def test_prompts_travel_once_and_rows_equal_the_old_format(redis_url):
    client = connect(redis_url)
    stream, consumer = GroupStream(client, "prompts"), GroupConsumer(client, "prompts")
    groups = [step_group("step"), episode_group("episodes")]
    for g in groups:
        stream.append(g)
        client.xadd(stream.names.groups_stream, {"group": schema_2_json(g)})
    raw = [fields[b"group"] for _, fields in client.xrange(stream.names.groups_stream)]
    new = json.loads(raw[0])
    assert new["schema_version"] == SCHEMA_VERSION == 3
    assert len(new["prompts"]) == 1 and len(new["prompts"][0]) == 1200
    assert all("prompt_token_ids" not in t for m in new["members"] for t in m["transitions"])
    assert [t["prompt_index"] for m in new["members"] for t in m["transitions"]] == [0] * 6
    assert len(json.loads(raw[2])["prompts"]) == 4  # 8 transitions, 4 distinct prompts
    assert len(raw[0]) * 4 <= len(raw[1]), (len(raw[0]), len(raw[1]))

    got = consumer.read(10, block_ms=100)
    assert consumer.malformed == 0 and len(got) == 4
    read = [g for _, g in got]
    assert [g.schema_version for g in read] == [3, 2, 3, 2]
    for g in read:  # every transition has its prompt back
        assert all(t.prompt_token_ids for m in g.members for t in m.transitions)
    # the learner's rows from schema 3 equal those from schema 2 and from the groups as made
    for i, made in enumerate(groups):
        v3, v2 = read[2 * i], read[2 * i + 1]
        assert batch_rows([v3]) == batch_rows([v2]) == batch_rows([made])
        assert len(batch_rows([v3])) > 0


def test_a_prompt_index_outside_the_table_is_dead_lettered(redis_url):
    client = connect(redis_url)
    stream, consumer = GroupStream(client, "badidx"), GroupConsumer(client, "badidx")
    data = json.loads(step_group("bad", members=2, prompt_len=3).to_stream_json())
    data["members"][1]["transitions"][0]["prompt_index"] = 5
    client.xadd(stream.names.groups_stream, {"group": json.dumps(data).encode()})
    stream.append(step_group("good", members=2, prompt_len=3))
    got = consumer.read(10, block_ms=100)
    assert [g.group_id for _, g in got] == ["good"] and consumer.malformed == 1
    (dead,) = client.xrange(stream.names.dead_letters)
    assert b"prompt_index 5 outside" in dead[1][b"error"]
