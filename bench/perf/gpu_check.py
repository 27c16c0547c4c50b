"""`make check-gpu`: the GPU path end to end, on one CUDA machine that has torch and
transformers and nothing else (no network, no vLLM, no Redis server: the packages it lacks
travel as wheels, see `make gpu-wheels`). Prints a table and writes JSON; safe to re-run.

    python -m bench.perf.gpu_check [--device cuda|cpu] [--shapes qwen2.5-0.5b,qwen2.5-1.5b] [--out F]

Stages (each one's failure is recorded and the others still run; the exit code is 1 if any failed):
1. updates   Trainer.update (DeepSpeed ZeRO-2, bf16) against a plain torch loop doing the same
             computation, per model shape (random weights), interleaved timed updates; real vs
             padded tokens of the length-bucketed micro-batches; model FLOP utilization (MFU);
             the share of an update spent in the optimizer step.
   Stages 2-4 run on the qwen2.5-1.5b preset (spo3.app.model_init; `--policy-preset`): Qwen2.5-1.5B's
   shape with tied embeddings and the real 151,936-token vocabulary, built on the GPU in bf16.
2. checkpoint a Trainer checkpoints, takes one more update; a fresh Trainer loads the checkpoint
             and takes the same update: the weights must be equal (optimizer state restored),
             and the Hugging Face folder must load in transformers.
3. publish   the trainer's weights published to a weights directory (version in an embedded
             Redis); an in-process policy on the device follows it, reports the new version and
             the checksum the learner wrote, and samples free-form and in choice mode.
4. engine    the in-process engine: 16 prompts x 8 samples, one request at a time, the same
             requests from 16 threads (batched into one generate; timed on the second round, the
             first warms the allocator at that batch size), and the engine's generate over all of
             them as one batch, against one raw generate; and one n-sample request's peak CUDA
             memory above what the engine held before it (max_memory_allocated).
5. learner   `spo3 learner` (python -m spo3.app.cli learner; qwen0.5b-body, `--learner-preset`:
             its two checkpoints must fit the disk) on a synthetic groups stream in an
             embedded Redis: two updates and a checkpoint, then `--resume` to version 4; every
             entry acknowledged, the last version published with its checksum.

`--device cpu` runs the same stages with tiny models (the CI test of this script's logic).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer

from bench.perf.harness import Row, print_table
from bench.perf.learner import PlainTorch, make_rows, sync, token_counts, versions
from spo3.app.model_init import PRESETS


def preset_shape(name: str) -> dict:
    """A spo3.app.model_init preset as a shape here: the model's vocabulary (padded beyond the
    tokenizer trained there) and its tie."""
    spec = PRESETS[name]
    body = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    return {
        **{k: spec[k] for k in body},
        "intermediate_size": spec["intermediate_size"],
        "vocab_size": spec.get("model_vocab_size", spec["vocab_size"]),
        "tie_word_embeddings": spec.get("tied", False),
    }


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

# Shapes of the Qwen2.5 family (random weights: nothing is downloaded).
SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    # Qwen2.5-1.5B(-Instruct): hidden 1536, 28 layers, 12 heads, 2 kv heads, intermediate 8960,
    # tied, vocabulary 151,936; the same preset makes the policy model of stages 2-4.
    "qwen2.5-1.5b": preset_shape("qwen2.5-1.5b"),
    # --device cpu: the same code on models that train in seconds.
    "tiny-a": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
        vocab_size=1024,
        tie_word_embeddings=True,
    ),
    "tiny-b": dict(
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        intermediate_size=192,
        vocab_size=2048,
        tie_word_embeddings=True,
    ),
}


@dataclass(frozen=True)
class Batch:
    rows: int
    prompt_len: int
    response_len: int
    micro_rows: int


# The batches the first GPU measurement used, so that figures compare.
BATCHES = {
    "qwen2.5-0.5b": Batch(32, 200, 35, 8),
    "qwen2.5-1.5b": Batch(64, 600, 43, 16),
    "tiny-a": Batch(12, 40, 8, 4),
    "tiny-b": Batch(12, 60, 8, 4),
}
# Dense bf16 peak (no sparsity) of the accelerators the figure names, in TFLOP/s.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def matmul_params(config: dict, n_params: int) -> int:
    """Parameters that take part in a matrix product per token: all of them but the input
    embedding (a lookup), plus the output projection (which a tied embedding also is)."""
    embed = config["vocab_size"] * config["hidden_size"]
    return n_params if config.get("tie_word_embeddings") else n_params - embed


def update_flops(config: dict, n_params: int, tokens: int) -> float:
    """Forward 2P + backward 4P of the policy and forward 2P of the reference, per real token
    (attention scores are left out: at these lengths they are a few percent)."""
    return 8.0 * matmul_params(config, n_params) * tokens


def make_model(out: Path, shape: dict, device: torch.device, seed: int = 0) -> tuple[Path, int]:
    """A randomly initialized Qwen2 of this shape, written as bf16 safetensors (built on the device:
    a 1.5B model initializes in seconds there, in minutes on the host)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(
        **shape,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=shape["vocab_size"] - 1,
        pad_token_id=0,
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    del model
    return out, n_params


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# --- stage 1: update throughput -------------------------------------------------------------

# Other DeepSpeed settings timed beside the default (`--zero-variants`, first shape only).
# (One rank runs ZeRO-2 as ZeRO-1, see spo3.learner.trainer.effective_zero_stage: the raw DeepSpeed
# setting forces stage 2 there.)
ZERO_VARIANTS: dict[str, dict] = {
    "zero2 (one rank, forced)": {"deepspeed": {"zero_optimization": {"stage": 2}}},
    "zero2+overlap_comm (forced)": {
        "deepspeed": {"zero_optimization": {"stage": 2, "overlap_comm": True}}
    },
    "zero0": {"zero_stage": 0},
}


def profile_update(fn: Callable[[], object], device: torch.device, path: Path) -> dict:
    """One update under torch.profiler: how much of the wall time the GPU is busy, and how many
    kernels it took (a launch-bound update keeps the GPU idle between small kernels)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - t0  # includes the profiler's own overhead
    events = prof.key_averages()
    attr = (
        "self_device_time_total"
        if hasattr(events[0], "self_device_time_total")
        else "self_cuda_time_total"
    )
    busy_us = sum(getattr(e, attr) for e in events)
    kernels = sum(e.count for e in events if str(getattr(e, "device_type", "")).endswith("CUDA"))
    sort = attr if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(events.table(sort_by=sort, row_limit=30))
    return {"wall_s": wall, "device_busy_s": busy_us / 1e6, "kernels": kernels, "table": path.name}


def stage_updates(
    name: str,
    work: Path,
    device: torch.device,
    reps: int,
    log: Callable[[str], None],
    variants: dict[str, dict] | None = None,
    profile_dir: Path | None = None,
) -> dict:
    from spo3.learner.trainer import Trainer, TrainerConfig

    shape, b = SHAPES[name], BATCHES[name]
    model_dir, n_params = make_model(work / name, shape, device)
    rows = make_rows(b.rows, b.prompt_len, b.response_len, shape["vocab_size"], seed=0)
    counts = token_counts(rows, b.micro_rows)
    log(
        f"  {name}: {n_params / 1e6:.0f}M parameters, {b.rows} rows, {counts['total_tokens']} tokens"
    )
    plain = PlainTorch(str(model_dir), device=device, bf16=True, lr=1e-5, micro_rows=b.micro_rows)
    # One pass per batch, as the plain loop does (the learner's default takes two: ppo_epochs).
    trainers = {
        k: Trainer(
            TrainerConfig(
                **{
                    "model": str(model_dir),
                    "lr": 1e-5,
                    "zero_stage": 2,
                    "bf16": True,
                    "ppo_epochs": 1,
                    "micro_batch_rows": b.micro_rows,
                    **kw,
                }
            )
        )
        for k, kw in {"trainer": {}, **(variants or {})}.items()
    }
    trainer = trainers["trainer"]
    fns: dict[str, Callable[[], object]] = {"plain": lambda: plain.update(rows)}  # noqa: F821
    fns.update({k: (lambda t: lambda: t.update(rows))(t) for k, t in trainers.items()})
    first = {k: timed(device, fn) for k, fn in fns.items()}  # warm-up: allocator, kernels
    # The two took the same step from the same weights: they should agree (bf16 noise aside).
    moved = diff = 0.0
    initial = dict(plain.reference.state_dict())
    got = dict(trainer.engine.module.named_parameters())
    for k, p in plain.model.named_parameters():
        moved = max(moved, (p.detach().float() - initial[k].float()).abs().max().item())
        diff = max(diff, (p.detach().float() - got[k].detach().float()).abs().max().item())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):  # interleaved, so that anything else on the machine hits all alike
        for k, fn in fns.items():
            times[k].append(timed(device, fn))
    # Where the trainer's time goes: one more update with the optimizer step timed apart.
    step_s: list[float] = []
    engine_step = trainer.engine.step

    def timed_step(*a, **kw):
        sync(device)
        t0 = time.perf_counter()
        out = engine_step(*a, **kw)
        sync(device)
        step_s.append(time.perf_counter() - t0)
        return out

    trainer.engine.step = timed_step
    total_s = timed(device, fns["trainer"])
    trainer.engine.step = engine_step
    out_metrics = trainer.update(rows)
    profiles = (
        {
            k: profile_update(fns[k], device, profile_dir / f"profile-{name}-{k}.txt")
            for k in ("plain", "trainer")
        }
        if profile_dir is not None
        else None
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = update_flops(shape, n_params, counts["total_tokens"])
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    result = {
        "shape": shape,
        "parameters": n_params,
        "batch": counts,
        "micro_batch_rows": b.micro_rows,
        "reps": reps,
        "trainer_reports": {
            "seq_tokens": out_metrics.seq_tokens,
            "padded_tokens": out_metrics.padded_tokens,
            "tokens": out_metrics.tokens,
        },
        "update_s": {k: {"median": med[k], "all": v, "first": first[k]} for k, v in times.items()},
        "response_tokens_per_s": {k: counts["response_tokens"] / med[k] for k in med},
        "total_tokens_per_s": {k: counts["total_tokens"] / med[k] for k in med},
        "ratio_trainer_to_plain": med["plain"] / med["trainer"],
        "trainer_zero_stage": trainer.zero_stage,
        "variants": {
            k: {"settings": kw, "ratio_to_plain": med["plain"] / med[k]}
            for k, kw in (variants or {}).items()
        },
        "tflops": {k: flops / med[k] / 1e12 for k in med},
        "peak_tflops": peak,
        "mfu": {k: flops / med[k] / 1e12 / peak for k in med} if peak else None,
        "trainer_step_share": sum(step_s) / total_s if total_s else None,
        "profile": profiles,
        "weights_after_one_update": {"max_abs_diff_trainer_vs_plain": diff, "max_abs_move": moved},
    }
    del plain, trainer, trainers, fns, initial, got
    free_device_memory()
    return result


def rows_updates(name: str, r: dict) -> list[Row]:
    c = r["batch"]
    tok = r["response_tokens_per_s"]
    mfu = r["mfu"]
    return [
        Row(
            f"1 {name}: plain torch bf16, {c['rows']} rows x {c['total_tokens'] / c['rows']:.0f} tok",
            f"{tok['plain']:,.0f} resp tok/s ({r['total_tokens_per_s']['plain']:,.0f} total)",
            "-",
            "baseline",
        ),
        Row(
            f"1 {name}: Trainer ZeRO-{r['trainer_zero_stage']} bf16",
            f"{tok['trainer']:,.0f} resp tok/s ({r['total_tokens_per_s']['trainer']:,.0f} total)",
            ">= 0.9 x plain",
            f"{r['ratio_trainer_to_plain']:.2f} {'PASS' if r['ratio_trainer_to_plain'] >= 0.9 else 'FAIL'}",
        ),
        Row(
            "1   TFLOP/s (MFU): trainer / plain",
            f"{r['tflops']['trainer']:.3g} / {r['tflops']['plain']:.3g}"
            + (
                f" ({100 * mfu['trainer']:.1f}% / {100 * mfu['plain']:.1f}% of {r['peak_tflops']:.0f})"
                if mfu
                else ""
            ),
        ),
        Row(
            "1   tokens: real / padded (length-bucketed) / padded (arrival order)",
            f"{c['total_tokens']:,} / {c['padded_tokens']:,} / {c['padded_tokens_arrival_order']:,}",
        ),
        Row(
            "1   trainer: optimizer step share of an update",
            f"{100 * r['trainer_step_share']:.0f}%" if r["trainer_step_share"] is not None else "-",
        ),
        *[
            Row(
                f"1   DeepSpeed variant {k}",
                f"{tok[k]:,.0f} resp tok/s",
                "-",
                f"{v['ratio_to_plain']:.2f} x plain",
            )
            for k, v in r["variants"].items()
        ],
        *[
            Row(
                f"1   profile {k}: device busy / wall, kernels",
                f"{p['device_busy_s']:.3f} / {p['wall_s']:.3f} s, {p['kernels']:,}",
            )
            for k, p in (r["profile"] or {}).items()
        ],
        Row(
            "1   weights after one update: |trainer - plain| (moved)",
            f"{r['weights_after_one_update']['max_abs_diff_trainer_vs_plain']:.1e} "
            f"({r['weights_after_one_update']['max_abs_move']:.1e})",
        ),
    ]


# --- stages 2-3: checkpoint and publish -----------------------------------------------------


def policy_model(work: Path, device: torch.device, preset: str, name: str = "policy") -> Path:
    """A model with a tokenizer (the in-process engine needs one), from a spo3.app.model_init
    preset: on a GPU built there in bf16 (qwen2.5-1.5b: Qwen2.5-1.5B's shape, tied, the real
    151,936-token vocabulary over a small trained tokenizer); on the CPU in float32."""
    from spo3.app.model_init import init_model

    if device.type == "cuda":
        return init_model(work / name, preset, seed=0, dtype="bfloat16", device=str(device))
    return init_model(work / name, preset, seed=0)


def stage_checkpoint(
    model_dir: Path, work: Path, device: torch.device, log: Callable[[str], None]
) -> dict:
    from transformers import AutoModelForCausalLM

    from spo3.learner import checkpoint
    from spo3.learner.trainer import Trainer, TrainerConfig

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    batches = [make_rows(8, 60, 12, vocab, seed=s) for s in range(3)]
    # lr 1e-3: a step must move bf16 weights by more than their rounding step to be seen.
    cfg = TrainerConfig(model=str(model_dir), lr=1e-3, zero_stage=2, bf16=True, micro_batch_rows=4)
    a = Trainer(cfg)
    a.update(batches[0])
    a.update(batches[1])
    t0 = time.perf_counter()
    path = checkpoint.save(a, work / "ckpt", checkpoint.CheckpointMeta(version=2, unacked=[]))
    save_s = time.perf_counter() - t0
    at_save = {k: v.detach().to("cpu", copy=True) for k, v in a.state_dict().items()}
    a.update(batches[2])
    after_a = {k: v.detach().float().cpu() for k, v in a.state_dict().items()}
    del a
    free_device_memory()
    b = Trainer(cfg)
    t0 = time.perf_counter()
    meta = checkpoint.load(b, checkpoint.latest(work / "ckpt"))
    load_s = time.perf_counter() - t0
    b.update(batches[2])
    after_b = {k: v.detach().float().cpu() for k, v in b.state_dict().items()}
    del b
    free_device_memory()
    # The same from the checkpoint's weights but a fresh optimizer: how far off a resume that
    # lost the optimizer state would be (GPU kernels are not bitwise deterministic, so the
    # resumed run is judged against this, not against zero).
    c = Trainer(cfg)
    c.engine.load_checkpoint(
        str(checkpoint.latest(work / "ckpt") / "ds"), tag="state", load_optimizer_states=False
    )
    c.update(batches[2])
    after_c = {k: v.detach().float().cpu() for k, v in c.state_dict().items()}
    del c
    free_device_memory()
    hf = AutoModelForCausalLM.from_pretrained(path / "hf", dtype=torch.bfloat16).state_dict()
    hf_diff = max(
        (hf[k].float() - at_save[k].float()).abs().max().item() for k in at_save if k in hf
    )
    resumed_diff = max((after_a[k] - after_b[k]).abs().max().item() for k in after_a)
    no_optimizer_diff = max((after_a[k] - after_c[k]).abs().max().item() for k in after_a)
    moved = max((after_a[k] - at_save[k].float()).abs().max().item() for k in after_a)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    # A 1.5B checkpoint is ~24 GB (bf16 weights, float32 master weights and Adam moments): gone
    # before the learner stage writes its own two.
    shutil.rmtree(work / "ckpt", ignore_errors=True)
    log(f"  checkpoint {size / 2**20:.0f} MiB: save {save_s:.1f} s, load {load_s:.1f} s")
    ok = (
        meta.version == 2
        and hf_diff == 0.0
        and moved > 0
        and no_optimizer_diff > 0
        and resumed_diff <= 0.1 * no_optimizer_diff
    )
    return {
        "version": meta.version,
        "bytes": size,
        "save_s": save_s,
        "load_s": load_s,
        "resumed_vs_uninterrupted_max_abs_diff": resumed_diff,
        "fresh_optimizer_vs_uninterrupted_max_abs_diff": no_optimizer_diff,
        "hf_folder_vs_trainer_max_abs_diff": hf_diff,
        "last_update_moved": moved,
        "pass": ok,
    }


def stage_publish(
    model_dir: Path, work: Path, device: torch.device, log: Callable[[str], None]
) -> dict:
    from spo3.learner.trainer import Trainer, TrainerConfig
    from spo3.policy.follow import FollowingPolicy
    from spo3.policy.inprocess import InProcessPolicy
    from spo3.policy.publish import CHECKSUM_FILE, DirectoryPublisher, version_dir
    from spo3.policy.weights import drop_tied, tied_map, weights_checksum
    from spo3.transport.connection import EmbeddedRedis, connect
    from spo3.transport.contracts import ChatMessage, SamplingParams

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    trainer = Trainer(
        TrainerConfig(model=str(model_dir), lr=1e-3, zero_stage=2, bf16=True, micro_batch_rows=4)
    )
    trainer.update(make_rows(8, 60, 12, vocab, seed=7))
    redis_server = EmbeddedRedis(work / "redis-publish")
    try:
        client = connect(redis_server.url)
        engine = InProcessPolicy(model_dir, dtype="bfloat16", device=str(device))
        policy = FollowingPolicy(engine, work / "weights", client, run="gpu-check")
        # As `spo3 learner --weights-dir` publishes: a tied model's alias is not written.
        tied = tied_map(model_dir)
        publisher = DirectoryPublisher(work / "weights", client, run="gpu-check", tied=tied)
        messages = [
            ChatMessage(
                role="user", content="You are in the kitchen. You see a knife. Exits: north."
            )
        ]
        before = policy.sample(messages, SamplingParams(n=1, max_tokens=8, temperature=0.0))[0]
        t0 = time.perf_counter()
        publisher.publish(1, trainer.state_dict())
        publish_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        free = policy.sample(messages, SamplingParams(n=4, max_tokens=16, temperature=1.0))
        follow_s = time.perf_counter() - t0
        choices = ["go north", "take knife", "look", "inventory"]
        chosen = policy.sample(messages, SamplingParams(n=4, choices=choices, temperature=1.0))
        written = (version_dir(work / "weights", 1) / CHECKSUM_FILE).read_text().strip()
        # What the engine serves, as published (the tie's alias dropped).
        served = weights_checksum(drop_tied(engine.model.state_dict(), tied))
        versions_seen = sorted({c.policy_version for c in free + chosen})
        ok = (
            before.policy_version == 0
            and versions_seen == [1]
            and served == written
            and all(c.text in choices for c in chosen)
            and all(c.token_ids for c in free)
        )
        log(f"  published v1 in {publish_s:.2f} s; followed and sampled in {follow_s:.2f} s")
        return {
            "publish_s": publish_s,
            "follow_and_sample_s": follow_s,
            "versions_seen": versions_seen,
            "checksum_written": written,
            "checksum_served": served,
            "engine_device": str(next(engine.model.parameters()).device),
            "tied": sorted(tied),
            "free_form": [c.text for c in free],
            "choice": [c.text for c in chosen],
            "pass": ok,
        }
    finally:
        redis_server.close()
        del trainer
        free_device_memory()


# --- stage 4: the in-process engine's batching ----------------------------------------------


def stage_engine(
    model_dir: Path,
    device: torch.device,
    prompts: int,
    n: int,
    tokens: int,
    log: Callable[[str], None],
    reps: int = 3,
) -> dict:
    from spo3.policy.inprocess import InProcessPolicy
    from spo3.transport.contracts import ChatMessage, SamplingParams

    engine = InProcessPolicy(
        model_dir, dtype="bfloat16" if device.type == "cuda" else "float32", device=str(device)
    )
    chats = [
        [
            ChatMessage(
                role="user", content=f"Task {i}: you are in room {i}." + " You see a box." * (i % 5)
            )
        ]
        for i in range(prompts)
    ]
    params = SamplingParams(n=n, max_tokens=tokens, temperature=1.0)
    engine.sample(chats[0], params)  # warm-up
    peak_memory = None
    if device.type == "cuda":  # one n-sample request's peak above the memory held before it
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
        engine.sample(chats[0], params)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        peak_memory = {"held_bytes": held, "peak_bytes": peak, "request_bytes": peak - held}
        log(f"  one n={n} request: +{(peak - held) / 2**20:,.0f} MiB over {held / 2**30:.1f} GiB")

    def generated(outs) -> int:
        return sum(len(c.token_ids) for cs in outs for c in cs)

    t0 = time.perf_counter()
    one_by_one = [engine.sample(c, params) for c in chats]
    seq_s = time.perf_counter() - t0

    run_batch = engine._run_batch
    batches: list[int] = []

    def counted(batch):  # how many requests each batched generate took
        batches.append(len(batch))
        return run_batch(batch)

    engine._run_batch = counted

    def threaded() -> tuple[int, list[int]]:
        """The requests from `prompts` threads released together: (tokens, requests per generate)."""
        batches.clear()
        results: list = [None] * prompts
        start = threading.Barrier(
            prompts
        )  # requests made at the same moment, as concurrent callers make them

        def ask(i: int) -> None:
            start.wait()
            results[i] = engine.sample(chats[i], params)  # noqa: F821

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(prompts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return generated(results), list(batches)

    # The engine's own generate over all requests as one batch, no threads: what the sampler around
    # `model.generate` (log-probs, decoding, stop strings) costs, apart from how requests coalesce.
    prompt_ids = [engine.prompt_ids(c) for c in chats]

    def direct() -> tuple[int, None]:
        with torch.no_grad():
            return generated(engine._generate([(x, params) for x in prompt_ids])), None  # noqa: F821

    # The hardware's figure: one generate over the same rows, left-padded, nothing else around it.
    ids = [x for x in prompt_ids for _ in range(n)]
    width = max(map(len, ids))
    pad = engine.tokenizer.pad_token_id
    x = torch.tensor([[pad] * (width - len(r)) + r for r in ids], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids], device=device)

    def raw() -> tuple[int, None]:
        with torch.no_grad():
            out = engine.model.generate(  # noqa: F821
                x,
                attention_mask=mask,
                max_new_tokens=tokens,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                eos_token_id=engine.eos_id,  # noqa: F821
                pad_token_id=pad,
            )
        gen = out[:, width:].tolist()
        return sum(
            (r.index(engine.eos_id) + 1) if engine.eos_id in r else len(r)  # noqa: F821
            for r in gen
        ), None

    # Each variant runs once untimed (the first call at a batch size warms the allocator and the
    # clocks), then the three take turns `reps` times: no variant gains from running later.
    variants = {
        "threads_batched": threaded,
        "engine_generate_one_batch": direct,
        "raw_generate": raw,
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    first_batches = threaded()[1]
    direct()
    raw()
    threaded_batches: list[list[int]] = []
    for _ in range(reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            got, sizes = fn()
            sync(device)
            rates[name].append(got / (time.perf_counter() - t0))
            if sizes is not None:
                threaded_batches.append(sizes)
    engine._run_batch = run_batch
    per_s = {
        "one_request_at_a_time": generated(one_by_one) / seq_s,
        **{k: statistics.median(v) for k, v in rates.items()},
    }
    log("  engine tok/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in per_s.items()))
    del engine
    free_device_memory()
    return {
        "prompts": prompts,
        "n": n,
        "max_tokens": tokens,
        "reps": reps,
        "tokens_per_s": per_s,
        "tokens_per_s_each_rep": rates,
        "threaded_batches": threaded_batches,
        "threaded_batches_first_round": first_batches,
        "ratio_batched_to_raw": per_s["threads_batched"] / per_s["raw_generate"],
        "ratio_engine_generate_to_raw": per_s["engine_generate_one_batch"] / per_s["raw_generate"],
        "ratio_sequential_to_raw": per_s["one_request_at_a_time"] / per_s["raw_generate"],
        "one_request_peak_memory": peak_memory,
    }


# --- stage 5: spo3 learner on a synthetic stream --------------------------------------------


def synthetic_groups(n: int, vocab: int) -> list:
    from spo3.transport.contracts import Group, GroupMember, Transition

    groups = []
    for i in range(n):
        members = []
        for j in range(3):
            t = Transition(
                state_key=f"s{i}",
                next_state_key=f"s{i}.{j}",
                prompt_token_ids=[5 + (i * 7 + k) % (vocab - 10) for k in range(40)],
                token_ids=[10 + (j * 13 + i + k) % (vocab - 20) for k in range(6)],
                logprobs=[-1.0] * 6,
                action="a",
                reward=float(j),
                policy_version=0,
            )
            members.append(GroupMember(transitions=[t], score=float((i + j) % 3)))
        groups.append(
            Group(
                group_id=f"g{i}",
                run="gpu-check",
                algo="3spo",
                task_id="t",
                node_id="r",
                depth=0,
                members=members,
                created_at=time.time(),
            )
        )
    return groups


def stage_learner(
    model_dir: Path, work: Path, device: torch.device, log: Callable[[str], None]
) -> dict:
    from spo3.policy.publish import CHECKSUM_FILE, version_dir
    from spo3.transport.connection import EmbeddedRedis, connect
    from spo3.transport.redis_names import RedisNames
    from spo3.transport.stream import GroupStream

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    redis_server = EmbeddedRedis(work / "redis-learner")
    names = RedisNames("gpu-check")
    try:
        client = connect(redis_server.url)
        stream = GroupStream(client, "gpu-check")
        for g in synthetic_groups(8, vocab):
            stream.append(g)
        base = [
            sys.executable,
            "-m",
            "spo3.app.cli",
            "learner",
            "--model",
            str(model_dir),
            "--redis-url",
            redis_server.url,
            "--run",
            "gpu-check",
            "--checkpoint-dir",
            str(work / "learner-ckpt"),
            "--weights-dir",
            str(work / "learner-weights"),
            "--groups-per-update",
            "2",
            "--checkpoint-every",
            "2",
            "--max-staleness",
            "100",
            "--lr",
            "1e-4",
            "--exit-when-idle",
            "5",
            "--micro-batch-rows",
            "4",
        ]
        if device.type == "cuda":
            base.append("--bf16")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        runs = []
        for extra in (["--max-updates", "2"], ["--max-updates", "4", "--resume"]):
            t0 = time.perf_counter()
            proc = subprocess.run(
                base + extra, env=env, capture_output=True, text=True, timeout=400
            )
            runs.append(
                {
                    "args": extra,
                    "rc": proc.returncode,
                    "seconds": time.perf_counter() - t0,
                    "stdout": proc.stdout.strip()[-500:],
                    "resumed": "resumed at version 2" in proc.stdout + proc.stderr,
                }
            )
            log(
                f"  spo3 learner {' '.join(extra)}: rc {proc.returncode} in {runs[-1]['seconds']:.0f} s"
            )
            if proc.returncode != 0:
                return {
                    "runs": runs,
                    "output_tail": (proc.stdout + proc.stderr)[-3000:],
                    "pass": False,
                }
        published = int(client.get(names.policy_version) or 0)
        pending = client.xpending(names.groups_stream, names.learner_group)["pending"]
        left = client.xlen(names.groups_stream)
        checksum_file = version_dir(work / "learner-weights", 4) / CHECKSUM_FILE
        ok = (
            published == 4
            and pending == 0
            and left == 0
            and checksum_file.exists()
            and runs[1]["resumed"]
            and "stopped at version 2" in runs[0]["stdout"]
            and "stopped at version 4" in runs[1]["stdout"]
        )
        return {
            "runs": runs,
            "published_version": published,
            "pending_entries": pending,
            "stream_length": left,
            "checksum": checksum_file.read_text().strip() if checksum_file.exists() else None,
            "pass": ok,
        }
    finally:
        redis_server.close()


# --- driver -----------------------------------------------------------------------------------


@app.command()
def main(
    device: Annotated[
        str, typer.Option(help="cuda (the check) or cpu (tiny models: this script's own test).")
    ] = "cuda",
    shapes: Annotated[
        str,
        typer.Option(
            help="Comma-separated model shapes for the update figures "
            f"({', '.join(SHAPES)}); default: both Qwen2.5 shapes on cuda, "
            "both tiny ones on cpu."
        ),
    ] = "",
    reps: Annotated[
        int,
        typer.Option(
            help="Timed repetitions per variant (after one warm-up): updates per shape, "
            "engine rounds (median reported).",
            min=1,
        ),
    ] = 3,
    stages: Annotated[
        str, typer.Option(help="Comma-separated stages to run.")
    ] = "updates,checkpoint,publish,engine,learner",
    policy_preset: Annotated[
        str,
        typer.Option(
            help="spo3.app.model_init preset of the model of stages 2-4 (checkpoint, publish, "
            "engine); default: qwen2.5-1.5b on cuda (tied, 151,936-token vocabulary), tiny on cpu."
        ),
    ] = "",
    learner_preset: Annotated[
        str,
        typer.Option(
            help="Preset of stage 5's model (spo3 learner writes two checkpoints, ~24 GB each "
            "at 1.5B); default: qwen0.5b-body on cuda, the stages 2-4 model on cpu."
        ),
    ] = "",
    engine_prompts: Annotated[
        int, typer.Option(help="Stage 4: prompts (each its own request).", min=1)
    ] = 16,
    engine_n: Annotated[int, typer.Option(help="Stage 4: samples per prompt.", min=1)] = 8,
    engine_tokens: Annotated[int, typer.Option(help="Stage 4: new tokens per sample.", min=1)] = 64,
    zero_variants: Annotated[
        bool,
        typer.Option(
            help="Stage 1, first shape: also time ZeRO-2 with overlap_comm, ZeRO-1 and ZeRO-0."
        ),
    ] = False,
    profile: Annotated[
        bool,
        typer.Option(
            help="Stage 1, first shape: profile one update of each (tables beside --out)."
        ),
    ] = False,
    out: Annotated[Path, typer.Option(help="Where to write the figures as JSON.")] = Path(
        "bench-results/gpu-check.json"
    ),
) -> None:
    """Run the GPU path end to end and print what it measured (see the module docstring)."""
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", flush=True)

    if device == "cuda" and not torch.cuda.is_available():
        print(
            "--device cuda: torch.cuda.is_available() is False here (a CPU build of torch, or no GPU). "
            "Use --device cpu to check this script's logic.",
            file=sys.stderr,
        )
        raise typer.Exit(2)
    dev = (
        torch.device("cuda", torch.cuda.current_device())
        if device == "cuda"
        else torch.device("cpu")
    )
    wanted = [s for s in stages.split(",") if s]
    unknown = set(wanted) - {"updates", "checkpoint", "publish", "engine", "learner"}
    if unknown:
        raise typer.BadParameter(f"unknown stage(s) {sorted(unknown)}", param_hint="--stages")
    shape_names = [s for s in shapes.split(",") if s] or (
        ["qwen2.5-0.5b", "qwen2.5-1.5b"] if dev.type == "cuda" else ["tiny-a", "tiny-b"]
    )
    for s in shape_names:
        if s not in SHAPES:
            raise typer.BadParameter(
                f"unknown shape {s!r}; choose from {', '.join(SHAPES)}", param_hint="--shapes"
            )
    if dev.type == "cpu":
        engine_prompts, engine_n, engine_tokens = (
            min(engine_prompts, 4),
            min(engine_n, 2),
            min(engine_tokens, 8),
        )
    results: dict = {
        "device": {
            "kind": dev.type,
            "name": torch.cuda.get_device_name(dev)
            if dev.type == "cuda"
            else platform.processor() or "cpu",
            "cpus": os.cpu_count(),
            "cuda": torch.version.cuda,
            **versions(),
        },
        "stages": {},
        "seconds": {},
    }
    table: list[Row] = []
    failed: list[str] = []

    def run(stage: str, fn: Callable[[], dict]) -> dict | None:
        log(f"{stage} ...")
        t0 = time.perf_counter()
        try:
            r = fn()
        except Exception as e:  # recorded and shown; the other stages still run
            traceback.print_exc()
            r = {"pass": False, "error": f"{type(e).__name__}: {e}"}
        results["seconds"][stage] = time.perf_counter() - t0
        results["stages"][stage] = r
        if r.get("pass") is False:
            failed.append(stage)
        return r

    with tempfile.TemporaryDirectory(prefix="spo3-gpu-check-") as tmp:
        work = Path(tmp)
        if "updates" in wanted:
            for i, name in enumerate(shape_names):
                extra = ZERO_VARIANTS if zero_variants and i == 0 else None
                prof = out.parent if profile and i == 0 else None
                if prof is not None:
                    prof.mkdir(parents=True, exist_ok=True)
                r = run(
                    f"updates/{name}",
                    lambda: stage_updates(name, work, dev, reps, log, extra, prof),
                )
                table += (
                    rows_updates(name, r)
                    if "error" not in r
                    else [Row(f"1 {name}", r["error"][:80], "-", "FAIL")]
                )
        model_dir = learner_dir = None
        preset = policy_preset or ("qwen2.5-1.5b" if dev.type == "cuda" else "tiny")
        if set(wanted) & {"checkpoint", "publish", "engine"} or (
            "learner" in wanted and dev.type == "cpu" and not learner_preset
        ):
            log(f"policy model ({preset}) ...")
            model_dir = policy_model(work, dev, preset)
            results["policy_model"] = json.loads((model_dir / "spo3_model.json").read_text())
        if "learner" in wanted:
            lpreset = learner_preset or ("qwen0.5b-body" if dev.type == "cuda" else "")
            if lpreset:
                log(f"learner model ({lpreset}) ...")
                learner_dir = policy_model(work, dev, lpreset, name="learner-model")
                results["learner_model"] = json.loads((learner_dir / "spo3_model.json").read_text())
            else:
                learner_dir = model_dir
        if "checkpoint" in wanted:
            r = run("checkpoint", lambda: stage_checkpoint(model_dir, work, dev, log))
            table.append(
                Row(
                    "2 checkpoint -> load in a fresh trainer -> same update",
                    f"|diff| {r.get('resumed_vs_uninterrupted_max_abs_diff', float('nan')):.1e} "
                    f"(fresh optimizer: {r.get('fresh_optimizer_vs_uninterrupted_max_abs_diff', float('nan')):.1e}), "
                    f"{r.get('bytes', 0) / 2**20:,.0f} MiB, save {r.get('save_s', 0):.1f} s, "
                    f"load {r.get('load_s', 0):.1f} s"
                    if "error" not in r
                    else r["error"][:80],
                    "<= 0.1 x fresh",
                    "PASS" if r["pass"] else "FAIL",
                )
            )
        if "publish" in wanted:
            r = run("publish", lambda: stage_publish(model_dir, work, dev, log))
            table.append(
                Row(
                    f"3 publish -> in-process policy on {dev.type} (free-form + choice)",
                    f"versions {r.get('versions_seen')}, checksum "
                    f"{'equal' if r.get('checksum_served') == r.get('checksum_written') else 'DIFFERS'}, "
                    f"publish {r.get('publish_s', 0):.2f} s"
                    if "error" not in r
                    else r["error"][:80],
                    "v1, equal",
                    "PASS" if r["pass"] else "FAIL",
                )
            )
        if "engine" in wanted:
            r = run(
                "engine",
                lambda: stage_engine(
                    model_dir, dev, engine_prompts, engine_n, engine_tokens, log, reps
                ),
            )
            if "error" in r:
                table.append(Row("4 in-process engine", r["error"][:80], "-", "FAIL"))
            else:
                t = r["tokens_per_s"]
                table += [
                    Row(
                        f"4 in-process engine: {r['prompts']} prompts x n={r['n']} x {r['max_tokens']} tok, "
                        "raw generate",
                        f"{t['raw_generate']:,.0f} tok/s",
                        "-",
                        "baseline",
                    ),
                    Row(
                        f"4   sample() from threads (requests per generate: {r['threaded_batches']})",
                        f"{t['threads_batched']:,.0f} tok/s",
                        "-",
                        f"{r['ratio_batched_to_raw']:.2f} x raw",
                    ),
                    Row(
                        "4   the engine's generate, all requests as one batch (no threads)",
                        f"{t['engine_generate_one_batch']:,.0f} tok/s",
                        "-",
                        f"{r['ratio_engine_generate_to_raw']:.2f} x raw",
                    ),
                    *(
                        [
                            Row(
                                f"4   one n={r['n']} request: peak CUDA memory above the held",
                                f"+{m['request_bytes'] / 2**20:,.0f} MiB "
                                f"(held {m['held_bytes'] / 2**30:.1f} GiB)",
                                "-",
                                "max_memory_allocated",
                            )
                        ]
                        if (m := r.get("one_request_peak_memory"))
                        else []
                    ),
                    Row(
                        "4   sample() one request at a time",
                        f"{t['one_request_at_a_time']:,.0f} tok/s",
                        "-",
                        f"{r['ratio_sequential_to_raw']:.2f} x raw",
                    ),
                ]
        if "learner" in wanted:
            r = run("learner", lambda: stage_learner(learner_dir, work, dev, log))
            table.append(
                Row(
                    "5 spo3 learner on an embedded Redis: 2 updates, then --resume to 4",
                    f"published v{r.get('published_version')}, pending {r.get('pending_entries')}, "
                    + ", ".join(f"{x['seconds']:.0f} s" for x in r.get("runs", []))
                    if "error" not in r
                    else r["error"][:80],
                    "v4, 0 pending",
                    "PASS" if r["pass"] else "FAIL",
                )
            )
    results["total_seconds"] = time.perf_counter() - t_start
    results["failed"] = failed
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    d = results["device"]
    print()
    print_table(
        table,
        f"GPU check: {d['kind']} ({d['name']}), torch {d['torch']}, CUDA {d['cuda']}, "
        f"deepspeed {d['deepspeed']}, transformers {d['transformers']}, "
        f"total {results['total_seconds']:.0f} s",
    )
    print("\nstage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in results["seconds"].items()))
    print(f"JSON: {out}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
