"""The learner loop on two ranks (gloo on CPU, torchrun), publishing after every update and
checkpointing: ZeRO-2 with ranks of unequal micro-batch counts, and ZeRO-3, whose weight gather
for publishing and checkpoints is a collective of every rank. Both end at the weights of a
one-rank run; a ZeRO-3 resume from a checkpoint reproduces them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from spo3.app.model_init import init_model
from spo3.transport.connection import connect
from spo3.transport.contracts import Group, GroupMember, Transition
from spo3.transport.procs import free_port
from spo3.transport.stream import GroupStream

pytestmark = [pytest.mark.slow, pytest.mark.redis]
REPO = Path(__file__).resolve().parents[2]
UPDATES = 3
TOL = 1e-4


def group(u: int, shared: bool = False) -> Group:
    """Update u's group: 5 members of distinct scores -> 5 rows (prompts of unequal lengths), so
    two ranks with 2 rows per micro-batch run 2 and 1 real micro-batches. `shared`: every member
    has the same prompt, as the children of one 3SPO state have."""
    members = []
    for j in range(5):
        t = Transition(
            state_key=f"s{u}",
            next_state_key=f"s{u}.{j}",
            prompt_token_ids=(
                [5 + (u + k) % 40 for k in range(9)]
                if shared
                else [5 + (u + j) % 40 for _ in range(3 + 2 * j)]
            ),
            token_ids=[10 + j, 20 + u, 30 + j, 40 + (u * j) % 50][: 2 + j % 3],
            logprobs=[-1.0] * (2 + j % 3),
            action=f"a{j}",
            reward=0.0,
            policy_version=0,
        )
        members.append(GroupMember(transitions=[t], score=float(j * (u + 1) % 5)))
    return Group(
        group_id=f"g{u}",
        run="x",
        algo="3spo",
        task_id="t",
        node_id="r",
        depth=0,
        members=members,
        created_at=0.0,
    )


def launch(
    model_dir,
    redis_url,
    run,
    ckpt,
    out,
    *,
    nproc,
    stage,
    first=0,
    resume=False,
    shared=False,
    pack=False,
):
    """Push the groups of updates first..UPDATES-1 to a fresh stream `run` and run the loop to
    version UPDATES on `nproc` ranks; the files the script wrote, read back. `shared`: groups
    whose members share a prompt; `pack`: the trainer's share_prompts."""
    stream = GroupStream(connect(redis_url), run)
    for u in range(first, UPDATES):
        stream.append(group(u, shared))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(REPO / "tests/integration/scripts/learner_loop.py"),
        str(model_dir),
        redis_url,
        run,
        str(ckpt),
        str(out),
        str(stage),
        "2",  # micro_batch_rows
        str(UPDATES),
        "1",  # checkpoint_every
        str(int(resume)),
        str(int(pack)),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    result = json.loads((out / "result.json").read_text())
    assert result["version"] == UPDATES and result["world"] == nproc
    return result, load_file(str(out / "final.safetensors")), out


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("model"), "tiny", seed=0)


@pytest.fixture(scope="module")
def one_rank(model_dir, redis_server, tmp_path_factory):
    """The weights of the same loop on one rank (ZeRO-2, run as ZeRO-1), computed once."""
    tmp = tmp_path_factory.mktemp("one-rank")
    result, weights, _ = launch(
        model_dir, redis_server.url, "one", tmp / "ck", tmp / "out", nproc=1, stage=2
    )
    assert result["published"] == [1, 2, 3]
    initial = load_file(str(model_dir / "model.safetensors"))
    assert max_diff(weights, initial) > 1e-3  # the updates moved the weights
    return weights


def test_two_zero2_ranks_through_the_loop_match_one_rank(model_dir, redis_url, tmp_path, one_rank):
    result, weights, out = launch(
        model_dir, redis_url, "z2", tmp_path / "ck2", tmp_path / "o2", nproc=2, stage=2
    )
    assert result["published"] == [1, 2, 3]
    assert max_diff(weights, one_rank) < TOL
    assert max_diff(load_file(str(out / "published.safetensors")), weights) == 0.0


def test_two_zero3_ranks_publish_checkpoint_and_resume(model_dir, redis_url, tmp_path, one_rank):
    ckpt = tmp_path / "ck3"
    result, weights, out = launch(
        model_dir, redis_url, "z3", ckpt, tmp_path / "o3", nproc=2, stage=3
    )
    assert result["published"] == [1, 2, 3] and result["checkpoint"] == "v00000003"
    assert max_diff(weights, one_rank) < TOL
    assert max_diff(load_file(str(out / "published.safetensors")), weights) == 0.0
    # Each rank saved its own partitions of the weights and the optimizer state.
    ds = ckpt / "v00000003" / "ds" / "state"
    assert len(list(ds.glob("*optim_states.pt"))) == 2
    # Resume from the checkpoint at version 2 and redo the last update.
    (ckpt / "latest").write_text("v00000002")
    result, resumed, _ = launch(
        model_dir,
        redis_url,
        "z3-resume",
        ckpt,
        tmp_path / "o3r",
        nproc=2,
        stage=3,
        first=UPDATES - 1,
        resume=True,
    )
    assert result["published"] == [3]
    assert max_diff(resumed, weights) < 1e-6


def test_two_zero3_ranks_with_tied_embeddings_match_one_rank(redis_url, tmp_path_factory):
    """A tied model (as Qwen2.5-0.5B/1.5B/3B are), built under zero.Init on two ZeRO-3 ranks:
    the published weights keep lm_head equal to the embedding, and the final weights equal a
    one-rank run's within the same tolerance."""
    tmp = tmp_path_factory.mktemp("tied")
    tied_dir = init_model(tmp / "model", "tiny", seed=0, tied=True)
    _, one, _ = launch(tied_dir, redis_url, "tied-1", tmp / "ck1", tmp / "o1", nproc=1, stage=2)
    result, two, out = launch(
        tied_dir, redis_url, "tied-z3", tmp / "ck3", tmp / "o3", nproc=2, stage=3
    )
    assert result["published"] == [1, 2, 3]
    assert max_diff(two, one) < TOL
    assert max_diff(two, load_file(str(tied_dir / "model.safetensors"))) > 1e-3  # it trained
    published = load_file(str(out / "published.safetensors"))
    embed = published["model.embed_tokens.weight"]
    assert "lm_head.weight" not in published or (published["lm_head.weight"] == embed).all()
    assert (embed == two["model.embed_tokens.weight"]).all()


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_sharing_prompts_match_one_rank_without(model_dir, redis_url, tmp_path, stage):
    """Groups whose 5 members share one prompt: two ranks with share_prompts (each rank runs its
    rows' prompt once, then their responses after its cached keys and values: two forwards
    before one backward, under ZeRO-2 and ZeRO-3) end at the weights of one rank that runs a
    sequence per row."""
    _, one, _ = launch(
        model_dir,
        redis_url,
        "sh1",
        tmp_path / "ck1",
        tmp_path / "o1",
        nproc=1,
        stage=2,
        shared=True,
    )
    result, two, _ = launch(
        model_dir,
        redis_url,
        "sh2",
        tmp_path / "ck2",
        tmp_path / "o2",
        nproc=2,
        stage=stage,
        shared=True,
        pack=True,
    )
    assert result["published"] == [1, 2, 3]
    assert max_diff(one, load_file(str(model_dir / "model.safetensors"))) > 1e-3  # it trained
    assert max_diff(two, one) < TOL
