"""Messages that cross process boundaries. Pydantic only: this module must not import torch,
so actors, services and dashboards can use it without the ML stack."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class SamplingParams(BaseModel):
    """How to sample. `choices` switches to constrained mode: every completion is exactly one
    of these strings (the admissible actions), which small models need to act at all."""

    model_config = ConfigDict(frozen=True)

    n: int = Field(1, ge=1, le=64, description="Completions for the prompt; the prefix is computed once.")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(64, ge=1, le=8192)
    stop: list[str] = Field(default_factory=list, description="Stop strings (not included in the text).")
    choices: list[str] | None = Field(None, min_length=1, description="Constrained mode: pick one of these.")
    seed: int | None = None


class Completion(BaseModel):
    """One sampled completion, with the tokens exactly as the server produced them."""

    text: str
    token_ids: list[int]
    logprobs: list[float] = Field(description="Log-probability of each generated token under the sampling policy.")
    finish_reason: str | None = Field(description="'stop', 'length', or None when the server did not say.")
    policy_version: int = Field(ge=0, description="Version of the weights that produced every token here.")
    prompt_token_ids: list[int] | None = None
