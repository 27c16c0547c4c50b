"""The actors' settings, one pydantic model per component, each field described once: the
descriptions are the `spo3 actor --help` texts, the README's and the YAML files' (the `rollout:`
and `eval:` sections of a run).

    RolloutConfig  how one task is rolled out (spo3/actors/rollout.py)
    EvalConfig     held-out evaluation episodes (spo3/actors/evaluate.py)
    ActorConfig    an actor process: where it finds Redis and the score store, its rollout and
                   score settings, leases, back-pressure, metrics, evaluation (spo3/actors/worker.py)
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from spo3.score_store.score_math import ScoreParams
from spo3.score_store.state_key import KeyScope
from spo3.transport.contracts import Algo


class RolloutConfig(BaseModel):
    """How one task is rolled out: the 3SPO search's limits, or GRPO/GiGPO's episodes, and sampling."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    algo: Algo = Field(
        "3spo", description="3spo (branching by state score), grpo or gigpo (G full episodes)."
    )
    max_steps: int = Field(15, ge=1, description="Deepest path in actions (from the root).")
    env_step_budget: int | None = Field(
        None,
        ge=1,
        description=(
            "New environment steps per task; empty: g_max * max_steps, what G_max GRPO episodes may use."
        ),
    )
    max_leaves: int = Field(64, ge=1, description="Most leaves per task.")
    group_size: int = Field(8, ge=1, description="G, the episodes per task of GRPO/GiGPO.")
    history_len: int = Field(
        3, ge=0, description="Past (action, observation) pairs shown in the prompt."
    )
    temperature: float = Field(1.0, ge=0, description="Sampling temperature.")
    max_tokens: int = Field(64, ge=1, description="Most tokens per reply.")
    choice_mode: bool = Field(
        False,
        description="Constrain replies to the admissible actions (small models): "
        "the policy picks among them.",
    )
    key_scope: KeyScope = Field(
        "task",
        description="State keys per task (task) or shared across the tasks of a game (game).",
    )

    def budget(self, g_max: int) -> int:
        return self.env_step_budget if self.env_step_budget is not None else g_max * self.max_steps


class EvalConfig(BaseModel):
    """Held-out evaluation: one episode per task and repeat, no branching, no learning."""

    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(
        0.4, ge=0, description="Sampling temperature of evaluation episodes (the paper's 0.4)."
    )
    episodes: int = Field(1, ge=1, description="Episodes per held-out task.")


class ActorConfig(BaseModel):
    """An actor process."""

    model_config = ConfigDict(extra="forbid")
    redis_url: str = Field(
        description="Redis holding the work queue and groups stream (and the score store, "
        "used directly, unless score_url is given)."
    )
    run: str = Field("default", description="Run id; prefixes every Redis key of the run.")
    params: ScoreParams = Field(
        default_factory=ScoreParams,
        description=(
            "State-score parameters. With score_url the service's are used; fields set explicitly here "
            "(pydantic's model_fields_set) must equal them or the actor does not start (client.reconcile_params)."
        ),
    )
    score_url: str | None = Field(
        None,
        description=(
            "State-score service (`spo3 score-service`, http://HOST:8100): scores, leaf commits and the score "
            "parameters come from it. Empty: the score store on redis_url directly."
        ),
    )
    score_token: str | None = Field(
        None,
        description="Bearer token of the score service (its SPO3_API_TOKEN); "
        "needed with score_url.",
    )
    score_retry_s: float = Field(
        30.0,
        gt=0,
        description="How long the score client retries an unreachable "
        "service before the work item fails.",
    )
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig, description="How one task is rolled out."
    )
    env_options: dict[str, dict] = Field(
        default_factory=dict, description="Per environment name, keyword arguments for its adapter."
    )
    lease_s: float = Field(
        120.0,
        gt=0,
        description="Work-item lease, renewed every lease_s/3 while the actor lives; "
        "a dead actor's task returns after it.",
    )
    concurrency: int = Field(
        1,
        ge=1,
        description=(
            "Work items one actor process rolls out at once, each in a thread with its own environment "
            "instance, so policy requests overlap (the in-process engine batches them; a vLLM server "
            "wants many in flight)."
        ),
    )
    stream_max_len: int = Field(
        10_000, ge=1, description="Most entries in the groups stream; appends wait beyond."
    )
    stream_max_unread: int | None = Field(
        None,
        ge=0,
        description=(
            "Wait while the learner has this many groups not read yet, so actors do not outrun it (0: no bound). "
            "A group that finds U unread groups ahead of it is read U / groups_per_update updates later, and "
            "is dropped if more than max_staleness versions old by then: keep U <= groups_per_update x "
            "max_staleness / 2, which leaves half the staleness allowance for the rollout itself and the "
            "publish, so actors that outpace the learner wait instead of making groups to drop. Empty: 8 "
            "(= 8 x 2 / 2, the learner's defaults) once a learner reads the stream, no bound before (a run "
            "without a learner, a test, a benchmark); set it with the learner's settings (the deployments do)."
        ),
    )
    exit_when_idle_s: float | None = Field(
        None,
        ge=0,
        description="Exit after the queue was empty this many "
        "seconds (empty: wait for work forever).",
    )
    metrics_port: int | None = Field(
        None,
        description="Serve Prometheus metrics on metrics_host:metrics_port "
        "(empty: not served; deployments use 9100).",
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Interface for metrics_port (0.0.0.0 in containers)."
    )
    max_attempts: int = Field(
        3,
        ge=1,
        description="A work item that failed this many times is set aside "
        "(counted as gave_up), not retried forever.",
    )
    eval_tasks: list[tuple[str, str]] = Field(
        default_factory=list,
        description=(
            "Held-out (environment, task id) pairs played as evaluation episodes (temperature eval_temperature, "
            "never trained on, never committed to the score store), counted in spo3_actor_eval_*."
        ),
    )
    eval_every: int = Field(
        0,
        ge=0,
        description="One evaluation episode of the next held-out task after every "
        "N finished work items (0: none).",
    )
    eval_temperature: float = Field(
        0.4, ge=0, description="Sampling temperature of evaluation episodes."
    )
    record_visits: bool = Field(
        False,
        description=(
            "Append each rollout's visited states to the run's `actor_visits` list (one record per rollout, "
            "bounded by the run's env steps; `spo3 train` and `spo3-bench` read it)."
        ),
    )
