"""The two verbs of the policy boundary: actors `sample`, the learner `publish`es weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from spo3.transport.contracts import ChatMessage, Completion, SamplingParams


class PolicyError(RuntimeError):
    """The policy server failed, was unreachable after retries, or answered something malformed."""


class Policy(Protocol):
    def sample(self, messages: Sequence[ChatMessage], params: SamplingParams) -> list[Completion]:
        """`params.n` completions of the chat prompt, each stamped with its policy version."""
        ...


class WeightSink(Protocol):
    def publish(self, version: int, weights: Mapping[str, object]) -> None:
        """Make `weights` (name -> tensor, HF parameter names) the served policy, as `version`.
        Completions started after this returns report `version`; none mixes old and new weights."""
        ...
