"""Kill the learner (SIGKILL) mid-run and resume it: the final weights equal those of a run
that never crashed, so every group was used exactly once and the optimizer state continued."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from spo3.app.model_init import init_model
from spo3.learner import checkpoint
from spo3.transport.connection import connect
from spo3.transport.contracts import Group, GroupMember, Transition
from spo3.transport.redis_names import RedisNames
from spo3.transport.stream import GroupStream

pytestmark = [pytest.mark.slow, pytest.mark.redis]
SPO3 = str(Path(sys.executable).with_name("spo3"))
N_GROUPS = 24


def groups(stale_every: int = 0) -> list[Group]:
    out = []
    for i in range(N_GROUPS):
        members = []
        for j in range(3):
            t = Transition(
                state_key=f"s{i}",
                next_state_key=f"s{i}.{j}",
                prompt_token_ids=[5, 6, 7 + i % 50],
                token_ids=[10 + j, 20 + i % 30, 30 + j],
                logprobs=[-1.0] * 3,
                action="a",
                reward=float(j),
                policy_version=0,
            )
            members.append(GroupMember(transitions=[t], score=float((i + j) % 3)))
        out.append(
            Group(
                group_id=f"g{i}",
                run="x",
                algo="3spo",
                task_id="t",
                node_id="r",
                depth=0,
                members=members,
                created_at=0.0,
            )
        )
    return out


def learner(model_dir, redis_url, run, ckpt, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [
            SPO3,
            "learner",
            "--model",
            str(model_dir),
            "--redis-url",
            redis_url,
            "--run",
            run,
            "--checkpoint-dir",
            str(ckpt),
            "--groups-per-update",
            "2",
            "--checkpoint-every",
            "3",
            "--max-staleness",
            "1000",
            "--lr",
            "0.01",
            "--exit-when-idle",
            "3",
            *extra,
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigkill_and_resume_equals_an_uninterrupted_run(redis_url, tmp_path):
    model_dir = init_model(tmp_path / "model", "tiny", seed=0)
    client = connect(redis_url)
    for run in ("clean", "crash"):
        stream = GroupStream(client, run)
        for g in groups():
            stream.append(g)

    clean = learner(model_dir, redis_url, "clean", tmp_path / "ck-clean")
    out, _ = clean.communicate(timeout=300)
    assert clean.returncode == 0, out[-3000:]
    assert f"version {N_GROUPS // 2}" in out

    first = learner(model_dir, redis_url, "crash", tmp_path / "ck-crash")
    key = RedisNames("crash").policy_version
    deadline = time.monotonic() + 240
    while int(client.get(key) or 0) < 5:  # past the checkpoint at 3, before the one at 6
        assert first.poll() is None and time.monotonic() < deadline, (
            first.stdout.read()[-3000:] if first.stdout else ""
        )
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert checkpoint.latest(tmp_path / "ck-crash").name in ("v00000003", "v00000006")
    second = learner(model_dir, redis_url, "crash", tmp_path / "ck-crash", "--resume")
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out[-3000:]
    assert f"version {N_GROUPS // 2}" in out and "resumed at version" in out

    a = load_file(str(checkpoint.latest(tmp_path / "ck-clean") / "hf" / "model.safetensors"))
    b = load_file(str(checkpoint.latest(tmp_path / "ck-crash") / "hf" / "model.safetensors"))
    assert set(a) == set(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    initial = load_file(str(model_dir / "model.safetensors"))
    assert max((a[k] - initial[k]).abs().max().item() for k in a) > 1e-3
    # Nothing left behind: every entry acknowledged and deleted.
    assert client.xlen(RedisNames("crash").groups_stream) == 0
    assert client.xpending(RedisNames("crash").groups_stream, "learner")["pending"] == 0


def test_stale_and_malformed_groups_are_dropped_and_counted(redis_url, tmp_path):
    from spo3.learner.loop import LearnerConfig, run_learner
    from spo3.learner.trainer import TrainerConfig

    model_dir = init_model(tmp_path / "model", "tiny", seed=0)
    client = connect(redis_url)
    stream = GroupStream(client, "stale")
    batch = groups()  # all produced by policy version 0
    for g in batch[:2]:
        stream.append(g)
    client.xadd(stream.names.groups_stream, {"group": b'{"schema_version": 1, "group_id": 5}'})
    cfg = LearnerConfig(
        redis_url=redis_url,
        run="stale",
        checkpoint_dir=str(tmp_path / "ck"),
        groups_per_update=2,
        max_staleness=0,
        exit_when_idle_s=1.5,
        trainer=TrainerConfig(model=str(model_dir), lr=0.01),
    )
    from spo3.transport.metrics import learner_metrics

    unknown = learner_metrics().groups.labels("unknown_schema")
    before = unknown._value.get()
    first = run_learner(cfg)
    assert first.version == 1 and first.malformed == 1
    assert (
        unknown._value.get() == before + 1
    )  # counted as an unknown schema version, not as malformed
    for g in batch[
        2:7
    ]:  # version 0, while the learner is now at version 1: 1 - 0 > max_staleness 0
        stream.append(g)
    second = run_learner(LearnerConfig(**{**cfg.__dict__, "resume": True}))
    assert second.groups_dropped_stale == 5 and second.version == 1
    assert (
        client.xlen(stream.names.groups_stream) == 0
    )  # dropped groups are acknowledged, not left behind
    assert len(client.xrange(stream.names.dead_letters)) == 1
