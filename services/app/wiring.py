"""The one place that chooses a policy engine for actors and a publisher for the learner.

Actors sample from a vLLM server (`policy_url`), or run the model in-process (`model`), following
the weights the learner publishes to a shared directory (`weights_dir`). The learner publishes to
the same kind of target: vLLM servers (disk reload through their weight-update routes) or the
directory. `spo3 actor`, `spo3 learner` and `spo3 train` all wire through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from services.policy.interface import Policy, WeightSink


def actor_policy(*, redis_url: str, run: str, policy_url: str | None = None, model: str | Path | None = None,
                 weights_dir: str | Path | None = None, threads: int = 1) -> Policy:
    """The policy an actor samples from: exactly one of `policy_url` (vLLM) or `model` (in-process,
    following `weights_dir` when given)."""
    if bool(policy_url) == bool(model):
        raise ValueError("give exactly one of a policy url (vLLM) or a model directory (in-process)")
    if weights_dir and not model:
        raise ValueError("a weights directory goes with an in-process model (a vLLM server gets its weights "
                         "from the learner)")
    if policy_url:
        from services.policy.vllm_client import VLLMPolicy

        return VLLMPolicy(policy_url)
    from services.policy.inprocess import InProcessPolicy

    policy = InProcessPolicy(model, threads=threads)
    if weights_dir:
        from services.policy.follow import FollowingPolicy
        from services.transport.connection import connect

        return FollowingPolicy(policy, weights_dir, connect(redis_url), run)
    return policy


def learner_publisher(*, redis_url: str, run: str, policy_urls: Sequence[str] | None = None,
                      model: str | Path | None = None, staging_dir: str | Path = "published-weights",
                      dtype: str | None = None, weights_dir: str | Path | None = None) -> WeightSink | None:
    """Where the learner republishes weights: vLLM servers (`policy_urls`, checked against `model`'s
    tensors, written through `staging_dir`), a directory in-process actors follow (`weights_dir`),
    or nowhere (None)."""
    if policy_urls and weights_dir:
        raise ValueError("publish to vLLM servers or to a weights directory, not both")
    if policy_urls:
        from services.policy.publish import VLLMDiskPublisher

        return VLLMDiskPublisher(list(policy_urls), model, staging_dir, dtype=dtype)
    if weights_dir:
        from services.policy.publish import DirectoryPublisher
        from services.transport.connection import connect

        return DirectoryPublisher(weights_dir, connect(redis_url), run)
    return None
