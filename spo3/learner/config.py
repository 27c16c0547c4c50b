"""The learner's settings, one pydantic model per component, each field described once: the
descriptions are the `spo3 learner --help` texts, the README's and the YAML files' (no torch
here, so the command line can read them at once).

    LossConfig       coefficients of the policy loss (spo3/learner/loss.py)
    AdvantageConfig  how group members become advantages (spo3/learner/batch.py)
    TrainerSettings  the optimizer and DeepSpeed engine (spo3/learner/trainer.py); TrainerConfig adds
                     the model and the loss
    LearnerSettings  the loop: batch size, staleness, publishing, checkpoints (spo3/learner/loop.py);
                     LearnerConfig adds where it runs (Redis, run id, directories, metrics)
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Norm = Literal["std", "mean", "floor", "batch"]
"""How a group's centred values are scaled (spo3/learner/advantages.py)."""
StdKind = Literal["population", "sample"]

_FORBID = ConfigDict(extra="forbid")


class LossConfig(BaseModel):
    """Coefficients of the policy loss."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    clip: float = Field(
        0.2,
        ge=0,
        description="PPO ratio clip around the proximal policy: the ratio is kept "
        "within [1 - clip, 1 + clip].",
    )
    kl_coef: float = Field(
        0.01, ge=0, description="Weight of the k3 KL penalty to the frozen reference model."
    )
    entropy_coef: float = Field(
        0.0,
        ge=0,
        description="Weight of the entropy bonus (off by default; docs/algorithm.md "
        '"Policy loss" suggests 0.001 when enabled).',
    )
    behav_imp_weight_cap: float | None = Field(
        5.0,
        gt=0,
        description=(
            "Cap on the importance weight pi_prox / pi_behav that corrects stale groups (truncated importance "
            "sampling: one token the sampler found unlikely cannot dominate the batch); empty: no cap."
        ),
    )


class AdvantageConfig(BaseModel):
    """How the members of a group become advantages."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mean_only: bool = Field(
        False,
        description="Advantages without the std division: the normalisation of every algorithm "
        "whose norm_<algo> is empty (true: mean, false: std).",
    )
    norm_3spo: Norm | None = Field(
        None,
        description='3SPO step groups\' normalisation (docs/algorithm.md "Step groups"): std = '
        "(r - mean) / (std + 1e-6), which cancels the novelty weight w(N); mean = r - mean; floor = "
        "(r - mean) / max(std, norm_floor); batch = r - mean, divided by one scale of the update's "
        "3SPO rows (their root mean square). Empty: follows mean_only.",
    )
    norm_grpo: Norm | None = Field(
        None,
        description="GRPO's normalisation of episode scores (std, mean, floor, batch as for "
        "norm_3spo; verl's norm_adv_by_std_in_grpo true = std). Empty: follows mean_only.",
    )
    norm_gigpo: Norm | None = Field(
        None,
        description="GiGPO's normalisation of both its episode and its step term (GiGPO's "
        "mean_norm = mean, mean_std_norm = std, the reference's ALFWorld setting; floor, batch as "
        "for norm_3spo). Empty: follows mean_only.",
    )
    norm_floor: float = Field(
        0.1, gt=0, description="Smallest divisor of the floor normalisation: max(std, norm_floor)."
    )
    baseline_std: StdKind = Field(
        "sample",
        description="GRPO/GiGPO std: sample (n - 1, torch.std's default, as the reference code) "
        "or population (n, as 3SPO's step groups).",
    )
    baseline_stats: Literal["steps", "episodes"] = Field(
        "steps",
        description="GRPO/GiGPO episode-term mean and std over every step row of the group "
        "(steps: a long episode weighs once per step, as verl-agent's compute_mean_std_cross_steps) "
        "or over one return per episode (episodes).",
    )
    baseline_invalid: Literal["row", "return"] = Field(
        "row",
        description="GRPO/GiGPO invalid-reply penalty: subtracted from the invalid step's own row "
        "(its episode score and its GiGPO step return) after returns are computed (row, as the "
        "reference code), or a step reward summed into the episode return and discounted into "
        "earlier GiGPO step returns (return).",
    )
    gamma: float = Field(0.95, ge=0, le=1, description="GiGPO discount.")
    omega: float = Field(1.0, ge=0, description="GiGPO weight of the step advantage.")

    def norm(self, algo: str) -> Norm:
        """The normalisation of `algo`'s groups: its norm_<algo>, else mean_only's."""
        chosen = {"3spo": self.norm_3spo, "grpo": self.norm_grpo, "gigpo": self.norm_gigpo}[algo]
        if chosen is not None:
            return chosen
        return "mean" if self.mean_only else "std"


class TrainerSettings(BaseModel):
    """The optimizer and the DeepSpeed engine."""

    model_config = _FORBID
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    zero_stage: int = Field(
        2,
        ge=0,
        le=3,
        description="DeepSpeed ZeRO stage (0-3) across data-parallel ranks; a "
        "single rank runs stage 2 as 1 (nothing to partition, fewer gradient copies).",
    )
    bf16: bool = Field(False, description="bf16 training.")
    offload_optimizer: bool = Field(
        False,
        description="ZeRO-Offload: optimizer state and step on the CPU (saves accelerator memory).",
    )
    micro_batch_rows: int = Field(
        8, ge=1, description="Rows per micro-batch (gradient accumulation inside a step)."
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in the backward pass instead of "
        "keeping them (less memory for long prompts, about a third more compute).",
    )
    share_prompts: bool = Field(
        False,
        description="Rows with the same prompt (the n(s) children of one 3SPO state; the first "
        "steps of a GRPO/GiGPO group) take the prompt through the model once: its keys and "
        "values are then read by each row's response. The same log-probs within rounding, for a "
        'fraction of the prompt tokens (docs/benchmarks.md "Rows that share a prompt"). Not with '
        "gradient_checkpointing, which drops the cached keys and values.",
    )
    max_len: int = Field(
        4096,
        ge=2,
        description="Longest prompt + response in tokens; longer prompts lose their "
        "oldest tokens, so their log-probs are not of the context the actor sampled from "
        "(counted per update as truncated_rows in learner.jsonl).",
    )
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    ppo_epochs: int = Field(
        2,
        ge=1,
        description="Passes over each batch, one optimizer step each; from the second "
        'on the PPO clip can act (2: docs/benchmarks.md "The measurement behind ppo_epochs: 2").',
    )
    seed: int = Field(0, description="Seed of the learner's random state.")

    @model_validator(mode="after")
    def _share_without_recompute(self) -> TrainerSettings:
        if self.share_prompts and self.gradient_checkpointing:
            raise ValueError(
                "share_prompts and gradient_checkpointing exclude each other: the recomputed "
                "layers keep no cached keys and values (turn one off)"
            )
        return self

    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Extra DeepSpeed config, merged key by key over the one built from the fields above "
            "(e.g. {zero_optimization: {overlap_comm: true}})."
        ),
    )


class TrainerConfig(TrainerSettings):
    model: str = Field(description="Hugging Face model directory (safetensors) to start from.")
    loss: LossConfig = Field(
        default_factory=LossConfig, description="Coefficients of the policy loss."
    )

    @field_validator("model", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        return os.fspath(v) if isinstance(v, os.PathLike) else v


class LearnerSettings(BaseModel):
    """The learner loop: how many groups make an update, which are too stale, how often to publish
    and to checkpoint, when to stop."""

    model_config = _FORBID
    groups_per_update: int = Field(
        8, ge=1, description="Step groups per optimizer step (post-step updates)."
    )
    max_staleness: int = Field(
        2, ge=0, description="Use a group only if current version - its version <= this."
    )
    publish_every: int = Field(1, ge=1, description="Republish weights every k updates.")
    checkpoint_every: int = Field(
        10, ge=1, description="Checkpoint (and acknowledge groups) every k updates."
    )
    max_updates: int | None = Field(
        None, ge=0, description="Stop at this policy version (empty: no limit)."
    )
    exit_when_idle_s: float | None = Field(
        None,
        ge=0,
        description="Stop after the stream was empty this many "
        "seconds (empty: wait for groups forever).",
    )


class LearnerConfig(LearnerSettings):
    """A learner process: its settings and where it runs."""

    redis_url: str = Field(description="Redis holding the groups stream.")
    trainer: TrainerConfig = Field(
        description="The optimizer, the DeepSpeed engine, the model and the loss."
    )
    run: str = Field("default", description="Run id; prefixes every Redis key of the run.")
    checkpoint_dir: str = Field(
        "checkpoints", description="Where checkpoints go (HF safetensors + optimizer state)."
    )
    advantages: AdvantageConfig = Field(
        default_factory=AdvantageConfig, description="How members become advantages."
    )
    resume: bool = Field(
        False, description="Continue from the latest checkpoint in checkpoint_dir."
    )
    metrics_port: int | None = Field(
        None,
        description="Serve Prometheus metrics on metrics_host:metrics_port from "
        "rank 0 (empty: not served; deployments use 9200).",
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Interface for metrics_port (0.0.0.0 in containers)."
    )

    @field_validator("checkpoint_dir", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        return os.fspath(v) if isinstance(v, os.PathLike) else v
