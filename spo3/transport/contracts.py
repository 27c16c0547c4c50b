"""Messages that cross process boundaries. Pydantic only: this module must not import torch,
so actors, services and dashboards can use it without the ML stack."""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class SamplingParams(BaseModel):
    """How to sample. `choices` switches to constrained mode: every completion is exactly one
    of these strings (the admissible actions), which small models need to act at all."""

    model_config = ConfigDict(frozen=True)

    n: int = Field(
        1, ge=1, le=64, description="Completions for the prompt; the prefix is computed once."
    )
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(64, ge=1, le=8192)
    stop: list[str] = Field(
        default_factory=list, description="Stop strings (not included in the text)."
    )
    choices: list[str] | None = Field(
        None, min_length=1, description="Constrained mode: pick one of these."
    )
    seed: int | None = None


class Completion(BaseModel):
    """One sampled completion, with the tokens exactly as the server produced them."""

    text: str
    token_ids: list[int]
    logprobs: list[float] = Field(
        description="Log-probability of each generated token under the sampling policy."
    )
    finish_reason: str | None = Field(
        description="'stop', 'length', or None when the server did not say."
    )
    policy_version: int = Field(
        ge=0, description="Version of the weights that produced every token here."
    )
    prompt_token_ids: list[int] | None = None
    choice_token_ids: list[list[int]] | None = Field(
        None,
        description="Constrained mode: every choice as the sampler tokenized it, ending with its EOS "
        "(the trie its tokens were drawn over); None when the sampler does not say (vLLM).",
    )


# --- actor -> learner ------------------------------------------------------------------

Algo = Literal["3spo", "grpo", "gigpo"]


class Transition(BaseModel):
    """One step an agent took: the tokens the policy produced at a state and what followed."""

    state_key: str
    next_state_key: str
    prompt_token_ids: list[int] = Field(
        default_factory=list,
        description="The prompt's token ids. On the stream (schema 3) they travel once per group, "
        "in `Group.prompts`, and this field is filled from `prompt_index` when read.",
    )
    prompt_index: int | None = Field(
        None,
        ge=0,
        description="Schema 3 on the stream: the index of this transition's prompt in "
        "`Group.prompts` (None: the prompt is inline, schema 2 or in memory).",
    )
    token_ids: list[int] = Field(
        description="Generated tokens, exactly as the policy server returned them."
    )
    logprobs: list[float] = Field(
        description="Behaviour log-probs: the sampler's, of exactly the distribution it drew "
        "each token from (choice mode: renormalized over the choices' trie; at "
        "`temperature`). The learner's importance weight divides by them."
    )
    action: str | None = Field(
        description="The admissible action parsed from the output; None if invalid."
    )
    invalid: bool = False
    reward: float = Field(
        description="3SPO step reward, or the environment's task reward for GRPO/GiGPO."
    )
    done: bool = False
    policy_version: int = Field(ge=0)
    choices: list[str] | None = Field(
        None,
        description="Constrained choice mode: the admissible choices the "
        "action was drawn from (None: free-form generation).",
    )
    choice_token_ids: list[list[int]] | None = Field(
        None,
        description="The choices as the sampler tokenized them (each ending with EOS): it drew over the "
        "trie of these token sequences (in-process engine). None with `choices`: a guided "
        "decoder (vLLM) admitted any token whose text keeps the output a prefix of a choice.",
    )
    temperature: float = Field(
        1.0,
        gt=0,
        description="The temperature of the distribution the tokens were drawn from (and "
        "`logprobs` describe): the learner scores the policy at the same temperature.",
    )


class GroupMember(BaseModel):
    """3SPO: one child of an expansion (one transition, score = its step reward).
    GRPO/GiGPO: one episode of the task (its transitions, score = episode return)."""

    transitions: list[Transition] = Field(min_length=1)
    score: float


SCHEMA_VERSION: Final = 3
"""Stream schema of `Group`. 2: transitions say how they were sampled (choices, behaviour log-probs).
3: a group's distinct prompts travel once, in `Group.prompts`; each transition names its prompt by
`prompt_index` (a 3SPO step group's members all share one prompt: n(s) copies became one)."""
READABLE_SCHEMAS: Final = (2, 3)
"""Schema versions the learner reads: version 2 entries (actors of the previous release, still in
the stream across an upgrade) carry their prompts inline and train exactly as before."""


class Group(BaseModel):
    """The unit the learner trains on: members whose scores are compared with each other."""

    schema_version: Literal[2, 3] = Field(
        SCHEMA_VERSION,
        description="Stream schema; the learner reads 2 and 3 and dead-letters any other version.",
    )
    group_id: str = Field(min_length=1, max_length=512)
    run: str
    algo: Algo
    task_id: str
    node_id: str = Field(description="3SPO: the parent node expanded; GRPO/GiGPO: the task's root.")
    depth: int = Field(ge=0)
    members: list[GroupMember] = Field(min_length=1)
    created_at: float
    prompts: list[list[int]] = Field(
        default_factory=list,
        description="Schema 3 on the stream: the group's distinct prompts (token ids), each once; "
        "transitions point into it with `prompt_index`.",
    )

    @model_validator(mode="after")
    def _expand_prompts(self) -> Group:
        """Fill each transition's `prompt_token_ids` from the prompts table (shared lists, so a
        prompt is held once in memory too); an index outside the table is a validation error."""
        for m in self.members:
            for t in m.transitions:
                if t.prompt_index is None:
                    continue
                if t.prompt_index >= len(self.prompts):
                    raise ValueError(
                        f"prompt_index {t.prompt_index} outside the group's {len(self.prompts)} prompts"
                    )
                t.prompt_token_ids = self.prompts[t.prompt_index]
        return self

    def to_stream_json(self) -> str:
        """The stream entry (schema 3): every distinct prompt once in `prompts`, each transition
        with its `prompt_index` and without inline token ids. Reading it back
        (`Group.model_validate_json`) gives transitions with the same `prompt_token_ids`."""
        table: dict[tuple[int, ...], int] = {}
        members = []
        for m in self.members:
            transitions = []
            for t in m.transitions:
                index = table.setdefault(tuple(t.prompt_token_ids), len(table))
                transitions.append(t.model_copy(update={"prompt_index": index}))
            members.append(m.model_copy(update={"transitions": transitions}))
        compact = self.model_copy(
            update={
                "schema_version": SCHEMA_VERSION,
                "members": members,
                "prompts": [list(p) for p in table],
            }
        )
        return compact.model_dump_json(
            exclude={"members": {"__all__": {"transitions": {"__all__": {"prompt_token_ids"}}}}}
        )

    @property
    def policy_version(self) -> int:
        """The oldest policy that contributed: staleness is judged by it."""
        return min(t.policy_version for m in self.members for t in m.transitions)


class WorkItem(BaseModel):
    """A task for an actor to roll out, handed out by the work queue."""

    item_id: str = Field(min_length=1, max_length=256)
    env: str
    task_id: str
    algo: Algo = "3spo"
    attempt: int = 0
