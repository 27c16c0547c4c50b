"""The policy update on a DeepSpeed engine: decoupled PPO-clip + k3 KL to a frozen reference,
token-mean over every response token of the batch, across micro-batches and data-parallel ranks.

`ppo_epochs` passes over the batch, each pass = every micro-batch, then one optimizer step. The
proximal log-probs (the clip's reference) are the first pass's own, taken before its step; the
behaviour log-probs are the sampler's (rows' `sampler_logprobs`). Choice-mode rows are scored
under the distribution the sampler drew from (spo3/learner/restricted.py).

Rows are split across ranks; each micro-batch's loss is scaled by (its tokens / all tokens of
the batch) x world size, so that after DeepSpeed averages gradients over ranks the gradient
is exactly that of the token-mean over the whole batch, whatever the split.

Log-probs are taken at the response positions only: the output embedding (lm_head) is handed the
hidden states of those positions (`_ResponseHead`), and the log-softmax runs a chunk of positions
at a time (spo3/learner/restricted.py `response_logprobs`). With Qwen's 151,936-token vocabulary
the logits of every prompt position were most of an update's memory and time.

ZeRO-3: both models are built partitioned (under `deepspeed.zero.Init`, then loaded a tensor at a
time, `_load_zero3`: transformers' own route, `HfDeepSpeedConfig`, needs `accelerate`, which
this project does not install), and the frozen reference runs in a second
DeepSpeed engine without an optimizer (ZeRO-3 inference): every rank holds 1/world of each model,
never a whole one. Gathering the weights (`state_dict`) is then a collective.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from spo3.learner.batch import Row
from spo3.learner.config import TrainerConfig
from spo3.learner.loss import policy_loss
from spo3.learner.restricted import (
    VocabText,
    allowed_index,
    allowed_tokens,
    guided_allowed_tokens,
    response_logprobs,
    restricted_entropy,
    restricted_logprobs,
)
from spo3.transport.procs import free_port

STALE_BUILD_LOCK_S = 600.0  # a build of DeepSpeed's comm op takes 30-120 s on 2 cores


@dataclass
class PreparedMicroBatch:
    """What every pass over one micro-batch shares (`Trainer._prepare`), on the engine's device.
    B rows, T padded positions; the log-prob tensors are [B, T-1], indexed like the logits."""

    ids: torch.Tensor
    """The forward's input ids: [B, T] long, each row's prompt + response, right-padded; with
    `share_prompts`, [U, P]: each distinct prompt once, right-padded (`shared` has the rest)."""
    attn: torch.Tensor
    """[B, T] (shared: [U, P]) long: 1 on real tokens."""
    targets: torch.Tensor
    """[B, T-1] long: the next token at each logits position."""
    mask: torch.Tensor
    """[B, T-1] float: 1.0 where the next token is a (kept) response token."""
    ref_logp: torch.Tensor
    """[B, T-1] float32: the frozen reference's log-probs of `targets`."""
    n_tokens: int
    """Response tokens of the micro-batch (after `max_len`), known on the host."""
    response_index: torch.Tensor
    """[N] long: flat indices into B x (T-1) of the response positions (the logits' layout)."""
    hidden_index: torch.Tensor
    """[N] long: flat indices into B x T of the hidden states that predict the response tokens
    (unused with `shared`)."""
    allowed_ids: torch.Tensor | None
    """[B, T-1, K] long: allowed tokens of choice-mode positions; None when every row is free-form."""
    allowed_valid: torch.Tensor | None
    """[B, T-1, K] bool: which of `allowed_ids` are real; None with `allowed_ids`."""
    behav: torch.Tensor
    """[B, T-1] float32: the sampler's log-probs (0 where `has_behav` is False)."""
    has_behav: torch.Tensor
    """[B, T-1] bool: where `behav` holds the sampler's log-prob."""
    adv: torch.Tensor
    """[B] float32: each row's advantage."""
    inv_temp: torch.Tensor | None
    """[B, 1, 1]: 1 / each row's sampling temperature, the logits' scale; None when every row was
    sampled at temperature 1 (docs/algorithm.md "Policy loss")."""
    shared: SharedPrompts | None = None
    """With `share_prompts`: the responses' forward after their prompts'; else None."""
    prox_logp: torch.Tensor | None = None
    """[B, T-1]: the proximal policy's log-probs, set by the first pass (no gradient)."""


@dataclass
class SharedPrompts:
    """A micro-batch as `share_prompts` runs it: a forward of each distinct prompt once
    (`PreparedMicroBatch.ids`, U x P), whose keys and values every row then reads (the cache,
    reordered to one entry per row) in a second forward of the responses alone. R rows, L the
    longest response; N the response tokens, in `_prepare`'s order (row by row)."""

    ids: torch.Tensor
    """[R, L] long: each row's response, right-padded."""
    attn: torch.Tensor
    """[R, P + L] long: its prompt's padding mask, then 1 on its response tokens."""
    positions: torch.Tensor
    """[R, L] long: the response's positions, continuing its own prompt's."""
    unit: torch.Tensor
    """[R] long: the prompt (row of `ids` of the prompt forward) of each row."""
    first_index: torch.Tensor
    """Flat indices into U x P: the last prompt position of each row with a response token
    (it predicts the row's first token)."""
    rest_index: torch.Tensor
    """Flat indices into R x L: response positions that predict the row's next token."""
    order: torch.Tensor
    """[N]: index into [first positions..., rest positions...] of each response token in order."""


@dataclass(frozen=True)
class UpdateMetrics:
    """What one `Trainer.update` reports, the same on every rank. The first nine are token-means
    over every response token of the batch and every pass (the first pass's clip fraction is 0 by
    construction); `as_dict` gives the names the metrics and history have always used."""

    pg_loss: float
    kl: float
    clip_frac: float
    ratio_mean: float
    approx_kl_old: float
    entropy: float
    imp_weight_mean: float
    imp_weight_clipped_frac: float
    behav_kl: float
    imp_weight_max: float
    """Largest importance weight of any token, any pass, any rank."""
    loss: float
    """pg_loss + kl_coef * kl - entropy_coef * entropy."""
    grad_norm: float | None
    """Of the last pass, before clipping; None when DeepSpeed reports none."""
    tokens: float
    """Response tokens of the batch (at least 1)."""
    rows: float
    seq_tokens: float
    """Tokens of the sequences (prompt + response, cut to max_len), all ranks."""
    padded_tokens: float
    """Tokens through the model per pass, all ranks: every micro-batch padded to its longest
    row; with share_prompts, each distinct prompt once and each response, padded apart."""
    truncated_rows: float
    """Rows longer than max_len: their log-probs are of a shorter context than the one sampled from."""
    ppo_epochs: float

    def as_dict(self) -> dict[str, float]:
        """Name -> value, in field order; `grad_norm` left out when there is none."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in values.items() if v is not None}


def extensions_dir() -> Path:
    """Where DeepSpeed compiles its ops: one cache per virtualenv, so two checkouts do not
    rebuild them for each other (~30 s each time)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def clear_stale_build_locks(root: Path, older_than_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove the lock files of op builds that died: torch holds a build's lock file while it
    compiles, and a build killed mid-way leaves it behind, after which every later start waits
    on it forever. A lock older than any build takes is taken for such a leftover."""
    now, removed = time.time(), []
    for lock in root.glob("*/lock"):
        try:
            if now - lock.stat().st_mtime > older_than_s:
                lock.unlink()
                removed.append(lock)
                print(f"removed a stale build lock (a build that died): {lock}", file=sys.stderr)
        except FileNotFoundError:
            continue
    return removed


def build_ops() -> bool:
    """Compile DeepSpeed's shared-memory comm op now (`make install` does), so that no learner
    start compiles it, or dies while compiling it. False: this accelerator has no such op."""
    clear_stale_build_locks(extensions_dir())
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return False
    builder.load()
    return True


def init_distributed() -> tuple[int, int]:
    """Join the process group the launcher (deepspeed / torchrun) set up, or a group of one."""
    clear_stale_build_locks(extensions_dir())
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        # A group of one that no launcher set up needs no agreed port; an inherited MASTER_PORT
        # may still be held by the process that set it (a parent that ran a learner itself).
        # (torchrun's agent hosts the store on its port: keep that one.)
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if torch.cuda.is_available():
        # One GPU per rank, chosen before NCCL starts: without it every rank of a node would put
        # its tensors (and the reference model) on GPU 0.
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


class Trainer:
    def __init__(self, cfg: TrainerConfig) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM

        if cfg.ppo_epochs < 1:
            raise ValueError(f"ppo_epochs must be >= 1, got {cfg.ppo_epochs}")
        self.cfg = cfg
        self.rank, self.world = init_distributed()
        torch.manual_seed(cfg.seed)
        self.device = (
            torch.device(f"cuda:{torch.cuda.current_device()}")
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        self.zero_stage = effective_zero_stage(cfg.zero_stage, self.world)
        zero: dict = {"stage": self.zero_stage}
        if cfg.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": cfg.bf16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        ds_config = _merged(ds_config, cfg.deepspeed)
        self.reference: torch.nn.Module
        if self.zero_stage == 3:
            model = _load_zero3(cfg.model, ds_config)
        else:
            model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self._head = _ResponseHead(model)
        # The reference is read from disk again rather than copied: no transient float32 copy.
        reference = (
            _load_zero3(cfg.model, ds_config)
            if self.zero_stage == 3
            else AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
        )
        reference.eval().requires_grad_(False)
        self._ref_head = _ResponseHead(reference)
        if self.zero_stage == 3:
            # Partitioned like the policy, by a second engine with no optimizer (ZeRO-3
            # inference): its forward gathers each layer's weights in turn. Simpler than an
            # offloaded copy, and each rank holds 1/world of it on the accelerator.
            ref_config = {
                "train_micro_batch_size_per_gpu": 1,
                "zero_optimization": {"stage": 3},
                "bf16": {"enabled": cfg.bf16},
                "steps_per_print": 1 << 30,
            }
            self.reference, *_ = deepspeed.initialize(model=reference, config=ref_config)
            self.reference.eval()
        else:
            # Typed as a plain Module: transformers declares PreTrainedModel.to through
            # functools.wraps of Module.to, which type checkers read as an unbound function.
            plain: torch.nn.Module = reference
            self.reference = plain.to(self.device)
        # torch's AdamW: DeepSpeed's fused/CPU Adam would compile an op first (~35 s on CPU).
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.pad_id = int(getattr(model.config, "pad_token_id", None) or 0)
        self._full_logits = False
        """The previous path (full logits at every position): kept for the benchmark's "before"."""

    # --- one update ------------------------------------------------------------------
    def update(self, rows: Sequence[Row]) -> UpdateMetrics:
        """`ppo_epochs` optimizer steps on all rows (the same list on every rank)."""
        share = self.cfg.share_prompts
        mine = _dealt(rows, self.rank, self.world, by_prompt=share)
        micro = micro_batches(mine, self.cfg.micro_batch_rows, self.cfg.max_len, by_prompt=share)
        my_real, my_padded = padding_counts(micro, self.cfg.max_len, packed=share)
        my_cut = sum(len(r.prompt_ids) + len(r.response_ids) > self.cfg.max_len for r in mine)
        my_tokens = sum(len(r.response_ids) for r in mine)
        response_tokens, real, padded, cut = self._sum_across_ranks(
            [my_tokens, my_real, my_padded, my_cut]
        )
        total_tokens = max(response_tokens, 1.0)
        # Every rank runs as many micro-batches as the rank with the most rows (at least one):
        # ZeRO-2/3 run collectives in every forward/backward, so a rank with fewer rows pads with
        # empty steps, and every rank reaches the accumulation boundary at the same step.
        micro += [[]] * (
            max_micro_batches(len(rows), self.world, self.cfg.micro_batch_rows) - len(micro)
        )
        epochs = self.cfg.ppo_epochs
        sums: dict[str, torch.Tensor] = {}
        imp_max = torch.zeros((), dtype=torch.float64, device=self.device)
        own_norm: float | None = None
        self.engine.train()
        # Padded inputs, reference and behaviour log-probs: computed once for every pass.
        prepared = [self._prepare(mb) for mb in micro]
        for _epoch in range(epochs):
            for i, prep in enumerate(prepared):
                self.engine.set_gradient_accumulation_boundary(i == len(prepared) - 1)
                loss, metrics, n_tok = self._micro_loss(prep)
                self.engine.backward(loss * (n_tok / total_tokens) * self.world)
                if "imp_weight_max" in metrics:
                    imp_max = torch.maximum(imp_max, metrics.pop("imp_weight_max").double())
                for k, v in metrics.items():  # on the device: read once, after the last pass
                    term = v.double() * (n_tok / epochs)
                    sums[k] = sums[k] + term if k in sums else term
            # ZeRO stages 1-3 report the gradient norm they clip with; without ZeRO it is computed here.
            own_norm = self._grad_norm() if self.zero_stage == 0 else None
            self.engine.step()
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        out = torch.stack([sums.get(k, zero) for k in _METRICS])
        dist.all_reduce(out)
        peak = imp_max.reshape(1)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        # Means over all passes; the first pass's clip fraction is 0 by construction.
        means = {k: v / total_tokens for k, v in zip(_METRICS, out.tolist())}
        loss_cfg = self.cfg.loss
        # Of the last pass, before clipping; the same on every rank.
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = own_norm
        return UpdateMetrics(
            **means,
            imp_weight_max=float(peak.item()),
            loss=means["pg_loss"]
            + loss_cfg.kl_coef * means["kl"]
            - loss_cfg.entropy_coef * means["entropy"],
            grad_norm=None if grad_norm is None else float(grad_norm),
            tokens=total_tokens,
            rows=float(len(rows)),
            seq_tokens=real,
            padded_tokens=padded,
            truncated_rows=cut,
            ppo_epochs=float(epochs),
        )

    def _sum_across_ranks(self, values: Sequence[float]) -> list[float]:
        """Sums over the data-parallel ranks. The tensor lives on the engine's device: NCCL has
        no CPU backend, so a CPU tensor here kills every GPU learner at its first update."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _grad_norm(self) -> float:
        """2-norm of the (already averaged across ranks) gradients, before clipping."""
        norms = [
            p.grad.detach().float().norm()
            for p in self.engine.module.parameters()
            if p.grad is not None
        ]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def _prepare(self, rows: Sequence[Row]) -> PreparedMicroBatch | None:
        """What every pass over a micro-batch shares, computed once: padded ids, the allowed-token
        index of choice-mode rows, behaviour log-probs, advantages, the reference's log-probs."""
        if not rows:
            if self.zero_stage == 3:  # the partitioned reference gathers in every forward
                with torch.no_grad():
                    self._padding_forward(self.reference, self._ref_head)
            return None
        ids, mask, attn, spans = self._pad(rows)
        targets, resp_mask = ids[:, 1:], mask[:, 1:]
        width = targets.shape[1]
        starts = [s - 1 for s, _ in spans]  # logits index of each row's first response token
        counts = [n for _, n in spans]
        behav = torch.zeros((len(rows), width), dtype=torch.float32, device="cpu")
        has_behav = torch.zeros((len(rows), width), dtype=torch.bool, device="cpu")
        restricted: list[list[tuple[int, list[int]]]] = []
        for b, r in enumerate(rows):
            start, n = starts[b], counts[b]  # n < len(response) when max_len cut the response
            if len(r.sampler_logprobs) == len(r.response_ids):
                behav[b, start : start + n] = torch.tensor(
                    r.sampler_logprobs[:n], dtype=torch.float32, device="cpu"
                )
                has_behav[b, start : start + n] = True
            if r.choice_token_ids is not None:  # the sampler walked the trie of these tokenizations
                steps = allowed_tokens(r.response_ids, r.choice_token_ids)[:n]
                restricted.append([(start + j, a) for j, a in enumerate(steps)])
            elif r.choices is not None:  # a guided decoder: any tokenization of a choice's text
                steps = guided_allowed_tokens(r.response_ids, r.choices, self._vocab_text())[:n]
                restricted.append([(start + j, a) for j, a in enumerate(steps)])
            else:
                restricted.append([])
        # Free-form rows only: no index at all (restricted_* then take the full vocabulary without
        # asking the device whether any position is restricted).
        allowed_ids, allowed_valid = (
            allowed_index(restricted, (len(rows), width), self.device)
            if any(restricted)
            else (None, None)
        )
        # The policy that sampled a row is the model at the row's temperature: the current,
        # proximal and reference log-probs are all taken from logits / temperature.
        inv_temp = (
            torch.tensor([1.0 / r.temperature for r in rows], device=self.device).view(-1, 1, 1)
            if any(r.temperature != 1.0 for r in rows)
            else None
        )
        # Flat indices of the response positions: in the logits' layout B x (T-1), and of the
        # hidden states that predict them in B x T (the same positions, rows T + 1 apart).
        flat = [
            b * width + start + j
            for b, (start, n) in enumerate(zip(starts, counts))
            for j in range(n)
        ]
        hidden = [
            b * (width + 1) + start + j
            for b, (start, n) in enumerate(zip(starts, counts))
            for j in range(n)
        ]
        shared = None
        if self.cfg.share_prompts:  # the forward takes each prompt once; targets stay per row
            ids, attn, shared = self._share(rows)
        prep = PreparedMicroBatch(
            ids=ids,
            attn=attn,
            targets=targets,
            mask=resp_mask,
            ref_logp=torch.empty(0),
            n_tokens=sum(counts),
            response_index=torch.tensor(flat, dtype=torch.long, device="cpu").to(
                self.device, non_blocking=True
            ),
            hidden_index=torch.tensor(hidden, dtype=torch.long, device="cpu").to(
                self.device, non_blocking=True
            ),
            allowed_ids=allowed_ids,
            allowed_valid=allowed_valid,
            behav=behav.to(self.device),
            has_behav=has_behav.to(self.device),
            adv=torch.tensor([r.advantage for r in rows], dtype=torch.float32, device=self.device),
            inv_temp=inv_temp,
            shared=shared,
        )
        with torch.no_grad():
            prep.ref_logp, _ = self._logprobs(self.reference, self._ref_head, prep, entropy=False)
        return prep

    def _padding_forward(self, model: Any, head: _ResponseHead) -> torch.Tensor:
        """The forward(s) of a rank's empty micro-batch, as many as a real one runs (ZeRO-3
        gathers each layer's weights in every forward, on every rank alike): one of one token,
        or with `share_prompts` the prompt's and the response's of a one-token row."""
        if self.cfg.share_prompts:
            ids, attn, shared = self._share([Row([self.pad_id], [self.pad_id], 0.0, [], 0, "")])
            return _shared_logits(model, head, ids, attn, shared)
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits

    def _logprobs(
        self, model: torch.nn.Module, head: _ResponseHead, prep: PreparedMicroBatch, entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs [B, T-1] of the targets under the sampled distribution, entropies [B, T-1]),
        float32, 0 outside the response positions. The entropy has a gradient when `entropy`."""
        shape = prep.targets.shape
        allowed = [
            None if a is None else a.reshape(-1, a.shape[-1]).index_select(0, prep.response_index)
            for a in (prep.allowed_ids, prep.allowed_valid)
        ]
        inv_temp = (
            None
            if prep.inv_temp is None
            else prep.inv_temp.view(-1, 1).expand(shape).reshape(-1)[prep.response_index]
        )
        if self._full_logits:
            if prep.shared is not None:
                raise ValueError("the full-logit path takes unshared rows (share_prompts: false)")
            logits = _scaled(
                model(input_ids=prep.ids, attention_mask=prep.attn).logits[:, :-1], prep.inv_temp
            )
            logp = restricted_logprobs(logits, prep.targets, prep.allowed_ids, prep.allowed_valid)
            flat = (logits if entropy else logits.detach()).reshape(-1, logits.shape[-1])
            with torch.set_grad_enabled(entropy and torch.is_grad_enabled()):
                picked = restricted_entropy(flat.index_select(0, prep.response_index), *allowed)
            return logp, _scatter(picked, prep.response_index, shape)
        if prep.shared is not None:
            logits = _shared_logits(model, head, prep.ids, prep.attn, prep.shared)
        else:
            with head.only(prep.hidden_index):
                logits = model(input_ids=prep.ids, attention_mask=prep.attn, use_cache=False).logits
        targets = prep.targets.reshape(-1).index_select(0, prep.response_index)
        logp, ent = response_logprobs(
            logits.reshape(-1, logits.shape[-1]),
            targets,
            allowed[0],
            allowed[1],
            inv_temp,
            entropy_grad=entropy,
        )
        return _scatter(logp, prep.response_index, shape), _scatter(ent, prep.response_index, shape)

    def _vocab_text(self) -> VocabText:
        if getattr(self, "_vocab", None) is None:
            from transformers import AutoTokenizer

            self._vocab = VocabText(AutoTokenizer.from_pretrained(self.cfg.model))
        return self._vocab

    def _micro_loss(
        self, prep: PreparedMicroBatch | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """(loss of the micro-batch as a token-mean over its own tokens, its metrics as 0-dim
        tensors on the device, its response tokens)."""
        if prep is None:
            # A padding step: zero loss through a real forward of one token, so that its backward
            # hands the gradients to ZeRO's hooks in the same order as the other ranks' real
            # steps (ZeRO-2 buckets gradients in arrival order: another order would sum one
            # parameter's gradient into another's).
            logits = self._padding_forward(self.engine, self._head)
            return logits.sum() * 0.0, {}, 0
        # Entropy on response positions only; a diagnostic unless entropy_coef > 0.
        bonus = self.cfg.loss.entropy_coef > 0
        logp, entropy = self._logprobs(self.engine, self._head, prep, entropy=bonus)
        if prep.prox_logp is None:  # the first pass: its weights are the proximal policy
            prep.prox_logp = logp.detach()
        prox = prep.prox_logp
        # Rows without the sampler's log-probs (length mismatch) count as sampled by the proximal policy.
        behav = torch.where(prep.has_behav, prep.behav, prox)
        loss, metrics = policy_loss(
            logp,
            prox,
            prep.ref_logp,
            prep.adv,
            prep.mask,
            self.cfg.loss,
            entropy=entropy,
            behav_logprobs=behav,
        )
        return loss, metrics, prep.n_tokens

    def _pad(
        self, rows: Sequence[Row]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Right-padded ids, response mask and attention mask, built on the host and moved to the
        engine's device in one copy each; and per row (first response position, response tokens
        kept), known on the host so that nothing has to be read back from the device."""
        seqs, starts = [], []
        for r in rows:
            prompt, response = _cut(r, self.cfg.max_len)
            seqs.append(prompt + response)
            starts.append(len(prompt))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long, device="cpu")
        mask = torch.zeros((len(seqs), width), dtype=torch.float32, device="cpu")
        attn = torch.zeros((len(seqs), width), dtype=torch.long, device="cpu")
        for i, (s, start) in enumerate(zip(seqs, starts)):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long, device="cpu")
            mask[i, start : len(s)] = 1.0
            attn[i, : len(s)] = 1
        spans = [(start, len(s) - start) for s, start in zip(seqs, starts)]
        return (
            ids.to(self.device, non_blocking=True),
            mask.to(self.device, non_blocking=True),
            attn.to(self.device, non_blocking=True),
            spans,
        )

    def _share(self, rows: Sequence[Row]) -> tuple[torch.Tensor, torch.Tensor, SharedPrompts]:
        """The prompt forward's ids and mask (each distinct prompt once, as `_pad` cuts it,
        right-padded) and the responses' forward (`SharedPrompts`)."""
        cut = [_cut(r, self.cfg.max_len) for r in rows]
        units: dict[tuple[int, ...], int] = {}
        unit = [units.setdefault(tuple(prompt), len(units)) for prompt, _ in cut]
        width = max(map(len, units))
        longest = max(1, max(len(response) for _, response in cut))
        ids = torch.full((len(units), width), self.pad_id, dtype=torch.long, device="cpu")
        attn = torch.zeros((len(units), width), dtype=torch.long, device="cpu")
        for prompt, u in units.items():
            ids[u, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device="cpu")
            attn[u, : len(prompt)] = 1
        r_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long, device="cpu")
        r_attn = torch.zeros((len(rows), width + longest), dtype=torch.long, device="cpu")
        positions = torch.zeros((len(rows), longest), dtype=torch.long, device="cpu")
        first: list[int] = []
        rest: list[int] = []
        order: list[tuple[int, int]] = []  # (0, i): first[i]; (1, i): rest[i]
        for b, (row_prompt, response) in enumerate(cut):
            n, u = len(response), unit[b]
            r_ids[b, :n] = torch.tensor(response, dtype=torch.long, device="cpu")
            r_attn[b, :width] = attn[u]
            r_attn[b, width : width + n] = 1
            positions[b] = torch.arange(len(row_prompt), len(row_prompt) + longest)
            for j in range(n):
                if j == 0:
                    order.append((0, len(first)))
                    first.append(u * width + len(row_prompt) - 1)
                else:
                    order.append((1, len(rest)))
                    rest.append(b * longest + j - 1)
        flat = [i if part == 0 else len(first) + i for part, i in order]

        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, non_blocking=True)

        def index(values: list[int]) -> torch.Tensor:
            return dev(torch.tensor(values, dtype=torch.long, device="cpu"))

        shared = SharedPrompts(
            ids=dev(r_ids),
            attn=dev(r_attn),
            positions=dev(positions),
            unit=index(unit),
            first_index=index(first),
            rest_index=index(rest),
            order=index(flat),
        )
        return dev(ids), dev(attn), shared

    # --- weights out -----------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights with Hugging Face names on rank 0, None on every other rank.

        A collective: EVERY rank must call it, at the same point (under ZeRO-3 each rank holds
        1/world of the weights and they are gathered; a call on rank 0 alone waits forever). The
        other stages need no communication but keep the same contract, so that callers are
        written once for all stages."""
        if self.zero_stage == 3:
            gathered = self.engine._zero3_consolidated_16bit_state_dict()
            return gathered if self.rank == 0 else None
        if self.rank != 0:
            return None
        return {k: v.detach() for k, v in self.engine.module.state_dict().items()}


def _load_zero3(model_dir: str, ds_config: dict) -> Any:
    """The model of `model_dir` built under `deepspeed.zero.Init` (each parameter partitioned
    across the ranks as it is created), its weights then loaded one tensor at a time: gathered,
    set by rank 0 from the safetensors file, partitioned again. No rank holds more than one whole
    tensor beyond its partitions."""
    import json

    import deepspeed
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    from transformers.initialization import no_init_weights

    # No random initialization: it cannot index partitioned (empty) tensors, and is overwritten.
    with deepspeed.zero.Init(config_dict_or_path=ds_config), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    files = (
        json.loads(index.read_text())["weight_map"]
        if index.exists()
        else dict.fromkeys(_safetensors_keys(root / "model.safetensors"), "model.safetensors")
    )
    # Tied parameters come once, under the name the checkpoint holds them by.
    rank = dist.get_rank()
    for name, param in model.named_parameters():
        if name not in files:
            raise ValueError(f"{model_dir} has no tensor {name}")
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                with safe_open(str(root / files[name]), framework="pt") as f:
                    param.data.copy_(f.get_tensor(name))
    return model


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


class _ResponseHead:
    """A forward pre-hook on a model's output embedding (lm_head): inside `only(index)`, it is
    handed the hidden states at `index` (flat indices into B x T) instead of all of them, so
    the model's forward returns logits [1, N, V] of those positions alone. The forward still runs
    through the model (and its DeepSpeed engine, whose ZeRO-3 hooks gather lm_head's weight);
    outside `only`, the model is untouched."""

    def __init__(self, model: Any) -> None:
        self.index: torch.Tensor | None = None
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Module):
            raise ValueError(f"{type(model).__name__} has no output embedding to restrict")
        head.register_forward_pre_hook(self._select)

    def _select(self, _module: torch.nn.Module, args: tuple) -> tuple | None:
        if self.index is None:
            return None
        hidden, *rest = args
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.index)
        return (flat.unsqueeze(0), *rest)

    @contextmanager
    def only(self, index: torch.Tensor) -> Iterator[None]:
        self.index = index
        try:
            yield
        finally:
            self.index = None


def _shared_logits(
    model: Any, head: _ResponseHead, ids: torch.Tensor, attn: torch.Tensor, shared: SharedPrompts
) -> torch.Tensor:
    """Logits [1, N, V] of a `share_prompts` micro-batch's response tokens: each prompt's forward
    once (keeping its keys and values), then every row's response after its prompt's cached keys
    and values (reordered to one entry per row: gradients reach the prompt's forward through
    them). The prompt's last position predicts a row's first token; its response positions the
    rest."""
    with head.only(shared.first_index):
        out = model(input_ids=ids, attention_mask=attn, use_cache=True)
    cache = out.past_key_values
    cache.reorder_cache(shared.unit)
    with head.only(shared.rest_index):
        rest = model(
            input_ids=shared.ids,
            attention_mask=shared.attn,
            position_ids=shared.positions,
            past_key_values=cache,
            use_cache=True,
        ).logits
    both = torch.cat([out.logits[0], rest[0]])
    return both.index_select(0, shared.order).unsqueeze(0)


def _scatter(values: torch.Tensor, index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """[N] values at flat `index` of a zero tensor of `shape`."""
    out = torch.zeros(shape.numel(), dtype=values.dtype, device=values.device)
    return out.index_put((index,), values).view(shape)


def _scaled(logits: torch.Tensor, inv_temp: torch.Tensor | None) -> torch.Tensor:
    """`logits` [B, T, V] of rows sampled at temperatures T_b, as the sampler saw them: / T_b."""
    return logits if inv_temp is None else logits * inv_temp.to(logits.dtype)


def effective_zero_stage(stage: int, world: int) -> int:
    """ZeRO-2 on a single rank runs as ZeRO-1. With one rank there is nothing to partition, so
    both hold the same memory, but ZeRO-2 moves every gradient through its reduction buckets on
    each micro-batch while ZeRO-1 reduces once per step (measured on an H200 with `make
    check-gpu --zero-variants`, Qwen2.5-0.5B shape: ZeRO-2 0.72x a plain torch loop, ZeRO-1 1.02x)."""
    return 1 if stage == 2 and world == 1 else stage


def _merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def micro_batches(
    rows: Sequence[Row], size: int, max_len: int | None = None, *, by_prompt: bool = False
) -> list[list[Row]]:
    """Rows sorted by length, longest first, then cut every `size` rows: rows of like length
    share a micro-batch, so padding to the longest row costs little. `by_prompt`: sorted by
    prompt length and then prompt, so that rows with the same prompt sit together (and are packed
    into one sequence). The loss weights each micro-batch by its share of the batch's response
    tokens, so the grouping does not change the gradient."""
    if by_prompt:
        order = sorted(rows, key=_prompt_order)
    else:
        order = sorted(rows, key=lambda r: _seq_len(r, max_len), reverse=True)
    return [order[i : i + size] for i in range(0, len(order), size)]


def _prompt_order(row: Row) -> tuple[int, tuple[int, ...]]:
    return (-len(row.prompt_ids), tuple(row.prompt_ids))


def _dealt(rows: Sequence[Row], rank: int, world: int, *, by_prompt: bool) -> list[Row]:
    """This rank's rows: every world-th (round-robin), or with `by_prompt` a contiguous share of
    the rows ordered by prompt, so that rows with one prompt stay on one rank where they can.
    Either way no rank has more than ceil(rows / world) (`max_micro_batches` counts on it)."""
    if not by_prompt:
        return list(rows[rank::world])
    share = -(-len(rows) // world)
    return sorted(rows, key=_prompt_order)[rank * share : (rank + 1) * share]


def _cut(row: Row, max_len: int) -> tuple[list[int], list[int]]:
    """(prompt, response) as the model sees them: at most `max_len` tokens, the prompt losing its
    oldest tokens first (at least one kept), then the response its last."""
    prompt = row.prompt_ids[-max(1, max_len - len(row.response_ids)) :]
    return prompt, row.response_ids[: max(0, max_len - len(prompt))]


def max_micro_batches(n_rows: int, world: int, size: int) -> int:
    """Micro-batches of the rank with the most rows when `n_rows` are dealt round-robin to
    `world` ranks and cut every `size` rows; at least 1 (a rank with no rows runs an empty one).
    Every rank knows all rows, so each computes this without asking the others."""
    most_rows = -(-n_rows // world)
    return max(1, -(-most_rows // size))


def padding_counts(
    micro: Sequence[Sequence[Row]], max_len: int | None = None, *, packed: bool = False
) -> tuple[int, int]:
    """(tokens of the sequences, tokens computed once every micro-batch is padded to its longest
    row; `packed` (share_prompts): each distinct prompt once, padded to the longest, and each
    response, padded to the longest)."""
    real = sum(_seq_len(r, max_len) for mb in micro for r in mb)
    if not packed:
        return real, sum(len(mb) * max(_seq_len(r, max_len) for r in mb) for mb in micro if mb)
    padded = 0
    for mb in micro:
        if not mb:
            continue
        cut = [_cut(r, max_len or len(r.prompt_ids) + len(r.response_ids)) for r in mb]
        prompts = {tuple(p) for p, _ in cut}
        padded += len(prompts) * max(map(len, prompts))
        padded += len(mb) * max(1, max(len(resp) for _, resp in cut))
    return real, padded


def _seq_len(row: Row, max_len: int | None) -> int:
    n = len(row.prompt_ids) + len(row.response_ids)
    return min(n, max_len) if max_len else n


# The token-mean fields of UpdateMetrics: summed on the device per micro-batch, read once.
_METRICS = (
    "pg_loss",
    "kl",
    "clip_frac",
    "ratio_mean",
    "approx_kl_old",
    "entropy",
    "imp_weight_mean",
    "imp_weight_clipped_frac",
    "behav_kl",
)
