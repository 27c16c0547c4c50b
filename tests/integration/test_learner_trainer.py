"""The DeepSpeed update against a plain torch computation of the same loss, in one process and
with two ZeRO-2 ranks (gloo on CPU)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from spo3.app.model_init import init_model
from spo3.learner.batch import Row
from spo3.learner.loss import LossConfig, policy_loss, token_logprobs
from spo3.learner.trainer import TrainerConfig, max_micro_batches

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def fixed_rows(update: int) -> list[Row]:
    rng = random.Random(update)
    rows = []
    for i in range(7):  # odd count: ranks get different numbers of rows and tokens
        prompt = [rng.randrange(3, 200) for _ in range(rng.randint(3, 9))]
        response = [rng.randrange(3, 200) for _ in range(rng.randint(1, 6))]
        rows.append(
            Row(
                prompt,
                response,
                rng.choice([-1.5, -0.5, 0.7, 1.2]),
                [-1.0] * len(response),
                0,
                f"g{i}",
            )
        )
    return rows


def plain_torch_updates(
    model_dir,
    updates: int,
    lr: float = 1e-2,
    epochs: int = TrainerConfig.model_fields["ppo_epochs"].default,
) -> dict[str, torch.Tensor]:
    """The reference: the whole batch at once, token-mean loss, AdamW, clip 1.0; `epochs` steps per
    batch, the proximal log-probs being the first pass's."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = (
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        .eval()
        .requires_grad_(False)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for u in range(updates):
        rows = fixed_rows(u)
        width = max(len(r.prompt_ids) + len(r.response_ids) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width))
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            seq = r.prompt_ids + r.response_ids
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, len(r.prompt_ids) : len(seq)] = 1
            attn[i, : len(seq)] = 1
        with torch.no_grad():
            ref_logp = token_logprobs(
                ref(input_ids=ids, attention_mask=attn).logits[:, :-1], ids[:, 1:]
            )
        adv = torch.tensor([r.advantage for r in rows])
        prox = None
        for _ in range(epochs):
            logp = token_logprobs(
                model(input_ids=ids, attention_mask=attn).logits[:, :-1], ids[:, 1:]
            )
            prox = logp.detach() if prox is None else prox
            # The rows' sampler log-probs (-1.0) are the behaviour policy: weight exp(prox + 1), capped.
            loss, _ = policy_loss(
                logp,
                prox,
                ref_logp,
                adv,
                mask[:, 1:],
                LossConfig(),
                behav_logprobs=torch.full_like(logp, -1.0),
            )
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("ds-model"), "tiny", seed=0)


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def run_ranks(model_dir, out: Path, nproc: int, updates: int, micro: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={_port()}",
        str(REPO / "tests/integration/scripts/ds_updates.py"),
        str(model_dir),
        str(out),
        str(updates),
        str(micro),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _port() -> int:
    from spo3.transport.procs import free_port

    return free_port()


def test_two_zero2_ranks_match_each_other_and_plain_torch(model_dir, tmp_path):
    updates = 3
    reference = plain_torch_updates(model_dir, updates)
    run_ranks(model_dir, tmp_path, nproc=2, updates=updates, micro=2)
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert max_diff(r0, r1) == 0.0  # identical on both ranks
    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    moved = max_diff(r0, {k: v for k, v in initial.items()})
    assert moved > 1e-3  # the updates really changed the weights
    assert max_diff(r0, reference) < 1e-4 * max(1.0, moved)


def test_one_rank_with_micro_batches_matches_plain_torch(model_dir, tmp_path):
    run_ranks(model_dir, tmp_path, nproc=1, updates=2, micro=3)
    got = load_file(str(tmp_path / "rank0.safetensors"))
    # Micro-batches group rows by length, so float sums run in another order than the plain
    # whole-batch pass: equal up to rounding, as the two-rank test allows.
    assert max_diff(got, plain_torch_updates(model_dir, 2)) < 1e-4


def test_two_zero2_ranks_with_unequal_micro_batch_counts_match_plain_torch(model_dir, tmp_path):
    """7 rows, one per micro-batch: rank 0 has 4, rank 1 has 3 and runs one empty step. ZeRO-2
    reduces gradients in every backward, so without that step the ranks' collectives mismatch;
    with an empty step whose gradients arrive in another order, parameters' gradients mix."""
    assert max_micro_batches(7, 2, 1) == 4
    assert max_micro_batches(9, 2, 4) == 2 and max_micro_batches(0, 2, 4) == 1
    run_ranks(model_dir, tmp_path, nproc=2, updates=1, micro=1)
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert max_diff(r0, r1) == 0.0
    assert max_diff(r0, plain_torch_updates(model_dir, 1)) < 1e-4


def test_response_only_chunked_logprobs_equal_the_full_logit_path(model_dir):
    """One Trainer, one micro-batch of free-form and choice-mode rows at temperatures 1, 0.7 and
    1.3, entropy bonus on: the loss, every metric and the gradients of the response-only chunked
    path equal the previous full-logit one (`_full_logits`) within 1e-5."""
    rng = random.Random(3)
    rows = []
    for i in range(6):
        prompt = [rng.randrange(3, 200) for _ in range(rng.randint(3, 9))]
        choices = [[rng.randrange(3, 200) for _ in range(3)] for _ in range(3)]
        choice = i % 2 == 1
        response = choices[i % 3] if choice else [rng.randrange(3, 200) for _ in range(4)]
        rows.append(
            Row(
                prompt,
                response,
                rng.choice([-1.5, 0.7]),
                [-1.0] * len(response),
                0,
                f"g{i}",
                temperature=(1.0, 0.7, 1.3)[i % 3],
                choice_token_ids=choices if choice else None,
            )
        )
    from spo3.learner.trainer import Trainer

    trainer = Trainer(
        TrainerConfig(
            model=str(model_dir),
            zero_stage=0,
            micro_batch_rows=8,
            loss=LossConfig(entropy_coef=0.01),
        )
    )
    got = {}
    for full in (True, False):
        trainer._full_logits = full
        prep = trainer._prepare(rows)
        assert prep is not None and prep.allowed_ids is not None and prep.inv_temp is not None
        loss, metrics, _ = trainer._micro_loss(prep)
        trainer.engine.backward(loss)
        grads = [p.grad.clone() for p in trainer.engine.module.parameters()]
        trainer.engine.module.zero_grad()
        got[full] = (loss.detach(), metrics, prep.ref_logp * prep.mask, grads)
    (l0, m0, r0, g0), (l1, m1, r1, g1) = got[True], got[False]
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-5)
    assert set(m0) == set(m1)
    for k in m0:
        torch.testing.assert_close(m1[k], m0[k], rtol=0, atol=1e-5, msg=k)
    torch.testing.assert_close(r1, r0, rtol=0, atol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_gradient_checkpointing_recomputes_layers_and_changes_no_weight(model_dir):
    """`gradient_checkpointing: true` runs each decoder layer's forward again in the backward pass
    (counted with a hook on the first layer's attention; the layer's own hooks run outside the
    checkpoint) and ends two updates at the same weights as without
    it, within 1e-5."""
    from spo3.learner.trainer import Trainer

    weights, calls = {}, {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        trainer = Trainer(
            TrainerConfig(
                model=str(model_dir),
                zero_stage=0,
                micro_batch_rows=4,
                lr=1e-2,
                gradient_checkpointing=checkpointing,
            )
        )
        module = trainer.engine.module
        attention = module.model.layers[0].self_attn
        count = [0]
        attention.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        for u in range(2):
            trainer.update(fixed_rows(u))
        calls[checkpointing] = count[0]
        weights[checkpointing] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    # 2 updates x 2 micro-batches x 2 epochs with gradients: each recomputes the layer once more
    assert calls[True] >= calls[False] + 8, calls
    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert max_diff(weights[False], dict(initial)) > 1e-3  # the updates moved the weights
    assert max_diff(weights[True], weights[False]) < 1e-5


def shared_prompt_rows(seed: int = 5) -> list[Row]:
    """3 prompts with 3 rows each (the children of one state: one prompt, several replies), free
    and choice-mode rows at temperatures 1, 0.7 and 1.3, and 2 rows with prompts of their own."""
    rng = random.Random(seed)
    rows = []
    for p in range(5):
        prompt = [rng.randrange(3, 200) for _ in range(rng.randint(6, 12))]
        choices = [[rng.randrange(3, 200) for _ in range(rng.randint(1, 3))] for _ in range(3)]
        for i in range(3 if p < 3 else 1):
            choice = (p + i) % 2 == 1
            response = choices[i] if choice else [rng.randrange(3, 200) for _ in range(2 + i)]
            rows.append(
                Row(
                    prompt,
                    response,
                    rng.choice([-1.5, 0.7, 1.2]),
                    [-1.0] * len(response),
                    0,
                    f"g{p}",
                    temperature=(1.0, 0.7, 1.3)[(p + i) % 3],
                    choice_token_ids=choices if choice else None,
                )
            )
    return rows


def test_rows_sharing_a_prompt_packed_give_the_same_loss_and_gradients(model_dir):
    """share_prompts: one packed sequence per distinct prompt. The loss, every metric, the
    reference log-probs and the gradients equal the row-per-sequence path within 1e-5, while the
    forward sees 5 sequences instead of 11."""
    from spo3.learner.trainer import Trainer

    rows = shared_prompt_rows()
    got = {}
    for share in (False, True):
        trainer = Trainer(
            TrainerConfig(
                model=str(model_dir),
                zero_stage=0,
                micro_batch_rows=16,
                share_prompts=share,
                loss=LossConfig(entropy_coef=0.01),
            )
        )
        prep = trainer._prepare(rows)
        assert prep is not None
        loss, metrics, _ = trainer._micro_loss(prep)
        trainer.engine.backward(loss)
        grads = [p.grad.clone() for p in trainer.engine.module.parameters()]
        got[share] = (loss.detach(), metrics, prep.ref_logp * prep.mask, grads, prep.ids.shape)
    (l0, m0, r0, g0, s0), (l1, m1, r1, g1, s1) = got[False], got[True]
    assert s0[0] == 11 and s1[0] == 5  # rows vs distinct prompts
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-5)
    for k in m0:  # behav_kl is ~145 here: float32 rounding of the sum passes 1e-5
        torch.testing.assert_close(m1[k], m0[k], rtol=1e-6, atol=1e-5, msg=k)
    torch.testing.assert_close(r1, r0, rtol=0, atol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_share_prompts_updates_end_at_the_same_weights_with_fewer_tokens(model_dir):
    """Two updates through `Trainer.update` (micro-batches of 4 rows, 2 epochs) with and without
    share_prompts: the same weights up to rounding (micro-batches group rows by prompt instead of
    length, so sums run in another order; 1e-4 as the other micro-batch tests); fewer tokens
    computed (padded_tokens)."""
    from spo3.learner.trainer import Trainer

    weights, computed = {}, {}
    for share in (False, True):
        torch.manual_seed(0)
        trainer = Trainer(
            TrainerConfig(
                model=str(model_dir), zero_stage=0, micro_batch_rows=4, lr=1e-2, share_prompts=share
            )
        )
        computed[share] = [trainer.update(shared_prompt_rows(u)).padded_tokens for u in range(2)]
        weights[share] = {
            k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()
        }
    assert max_diff(weights[True], weights[False]) < 1e-4
    assert all(a < b for a, b in zip(computed[True], computed[False])), computed
