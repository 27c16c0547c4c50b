"""`spo3`: the command line of the 3SPO actor-learner system.

Heavy modules (torch, ray, fastapi) are imported inside each command so that `spo3 --help`
answers at once.
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import BaseModel

from spo3.actors.config import ActorConfig, RolloutConfig
from spo3.app.score_service import ScoreServiceProcess
from spo3.app.wiring import PolicySource, PublishTarget
from spo3.learner.config import (
    AdvantageConfig,
    LearnerConfig,
    LearnerSettings,
    LossConfig,
    TrainerConfig,
    TrainerSettings,
)
from spo3.score_store.score_math import ScoreParams
from spo3.score_store.settings import ServiceSettings

if TYPE_CHECKING:
    from spo3.app.sft import SftRunConfig

_M = TypeVar("_M", bound=BaseModel)

_SERVICE_PARAM = "With --score-url the service's value is used; one given here must equal it or the actor does not start."


def _doc(model: type[BaseModel], field: str, note: str = "") -> str:
    """An option's help: the description of the settings field it sets (one text for --help, the YAML
    files and the README), and a note about the command line where it needs one."""
    return f"{model.model_fields[field].description} {note}".strip()


OptionFields = dict[str, tuple[type[BaseModel], str]]  # option -> (settings model, its field)

ACTOR_OPTIONS: OptionFields = {  # `spo3 actor` option -> the settings field it sets
    "redis_url": (ActorConfig, "redis_url"),
    "score_url": (ActorConfig, "score_url"),
    "score_token": (ActorConfig, "score_token"),
    "run": (ActorConfig, "run"),
    "policy_url": (PolicySource, "policy_url"),
    "model": (PolicySource, "model"),
    "weights_dir": (PolicySource, "weights_dir"),
    "threads": (PolicySource, "threads"),
    "dtype": (PolicySource, "dtype"),
    "device": (PolicySource, "device"),
    "max_steps": (RolloutConfig, "max_steps"),
    "max_leaves": (RolloutConfig, "max_leaves"),
    "group_size": (RolloutConfig, "group_size"),
    "choice_mode": (RolloutConfig, "choice_mode"),
    "temperature": (RolloutConfig, "temperature"),
    "max_tokens": (RolloutConfig, "max_tokens"),
    "alpha": (ScoreParams, "alpha"),
    "g_max": (ScoreParams, "g_max"),
    "reward_score": (ScoreParams, "reward_score"),
    "novelty": (ScoreParams, "novelty"),
    "novelty_use": (ScoreParams, "novelty_use"),
    **{
        f: (ScoreParams, f)
        for f in ("count", "truncate_won", "sr_prior_a", "sr_prior_b", "dead_end_novelty")
    },
    "lease_s": (ActorConfig, "lease_s"),
    "exit_when_idle": (ActorConfig, "exit_when_idle_s"),
    "metrics_port": (ActorConfig, "metrics_port"),
    "metrics_host": (ActorConfig, "metrics_host"),
    "eval_task": (ActorConfig, "eval_tasks"),
    "eval_every": (ActorConfig, "eval_every"),
    "max_unread": (ActorConfig, "stream_max_unread"),
    "concurrency": (ActorConfig, "concurrency"),
}
LEARNER_OPTIONS: OptionFields = {  # `spo3 learner` option -> the settings field it sets
    "model": (TrainerConfig, "model"),
    "redis_url": (LearnerConfig, "redis_url"),
    "run": (LearnerConfig, "run"),
    "checkpoint_dir": (LearnerConfig, "checkpoint_dir"),
    "resume": (LearnerConfig, "resume"),
    "policy_url": (PublishTarget, "policy_url"),
    "staging_dir": (PublishTarget, "staging_dir"),
    "publish_dtype": (PublishTarget, "publish_dtype"),
    "weights_dir": (PublishTarget, "weights_dir"),
    "weight_transfer": (PublishTarget, "weight_transfer"),
    **{
        f: (LearnerSettings, f)
        for f in (
            "groups_per_update",
            "max_staleness",
            "publish_every",
            "checkpoint_every",
            "max_updates",
        )
    },
    "exit_when_idle": (LearnerSettings, "exit_when_idle_s"),
    **{
        f: (TrainerSettings, f)
        for f in (
            "lr",
            "zero_stage",
            "bf16",
            "offload_optimizer",
            "micro_batch_rows",
            "gradient_checkpointing",
            "share_prompts",
            "max_len",
            "ppo_epochs",
        )
    },
    **{
        f: (AdvantageConfig, f)
        for f in (
            "mean_only",
            "norm_3spo",
            "norm_grpo",
            "norm_gigpo",
            "norm_floor",
            "baseline_std",
            "baseline_stats",
            "baseline_invalid",
            "gamma",
            "omega",
        )
    },
    **{f: (LossConfig, f) for f in ("kl_coef", "entropy_coef", "clip", "behav_imp_weight_cap")},
    "metrics_port": (LearnerConfig, "metrics_port"),
    "metrics_host": (LearnerConfig, "metrics_host"),
}

SCORE_SERVICE_OPTIONS: OptionFields = {  # `spo3 score-service` option -> the settings field it sets
    "host": (ScoreServiceProcess, "host"),
    "port": (ScoreServiceProcess, "port"),
    "redis_url": (ServiceSettings, "redis_url"),
    "run": (ServiceSettings, "run"),
    "token": (ServiceSettings, "api_token"),
    **{
        f: (ServiceSettings, f)
        for f in (
            "alpha",
            "xi",
            "zeta",
            "g_max",
            "omega_k",
            "count",
            "truncate_won",
            "sr_prior_a",
            "sr_prior_b",
            "dead_end_novelty",
        )
    },
    "ray_serve": (ScoreServiceProcess, "ray_serve"),
    "replicas": (ScoreServiceProcess, "replicas"),
}


def _opt(mapping: OptionFields, name: str, note: str = "", *decls: str, **kw: Any) -> Any:
    """The typer option `name` of a command whose options `mapping` maps to settings fields: its
    help is the field's description (and `note`)."""
    model, field = mapping[name]
    return typer.Option(*decls, help=_doc(model, field, note), **kw)


def _settings(
    options: dict[str, Any], mapping: OptionFields
) -> dict[type[BaseModel], dict[str, Any]]:
    """The options given (not None), grouped by the settings model whose field each one sets."""
    groups: dict[type[BaseModel], dict[str, Any]] = defaultdict(dict)
    for name, value in options.items():
        if value is not None and name in mapping:
            model, field = mapping[name]
            groups[model][field] = value
    return groups


def _checked(model: type[_M], values: dict[str, Any]) -> _M:
    """`model` from options' values; an invalid one stops the command with the option named and
    what it accepts (e.g. `--norm-3spo: Input should be 'std', 'mean', 'floor' or 'batch'`)."""
    from pydantic import ValidationError

    try:
        return model(**values)
    except ValidationError as e:
        lines = [
            f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}" if err["loc"] else err["msg"]
            for err in e.errors()
        ]
        raise typer.BadParameter("; ".join(lines)) from None


def _key_values(items: list[str] | None) -> dict[str, Any]:
    """`--setting KEY=VALUE` options as a dict (values read as YAML: numbers, booleans, lists)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--setting wants KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


# `spo3 score-service` options
def _svc(name: str, note: str = "", *decls: str, **kw: Any) -> Any:
    return _opt(SCORE_SERVICE_OPTIONS, name, note, *decls, **kw)


_SvcHost = Annotated[str, _svc("host")]
_SvcPort = Annotated[int, _svc("port")]
_SvcRedisUrl = Annotated[str | None, _svc("redis_url", envvar="SPO3_REDIS_URL")]
_SvcRun = Annotated[str, _svc("run", envvar="SPO3_RUN")]
_SvcToken = Annotated[
    str | None,
    _svc("token", "Unset: a random one is generated and printed.", envvar="SPO3_API_TOKEN"),
]
_SvcAlpha = Annotated[float | None, _svc("alpha", "Env SPO3_ALPHA.")]
_SvcXi = Annotated[int | None, _svc("xi", "Env SPO3_XI.")]
_SvcZeta = Annotated[float | None, _svc("zeta", "Env SPO3_ZETA.")]
_SvcGMax = Annotated[int | None, _svc("g_max", "Env SPO3_G_MAX.")]
_SvcOmegaK = Annotated[float | None, _svc("omega_k", "Env SPO3_OMEGA_K.")]
_SvcCount = Annotated[str | None, _svc("count", "Env SPO3_COUNT.")]
_SvcTruncateWon = Annotated[bool | None, _svc("truncate_won", "Env SPO3_TRUNCATE_WON.")]
_SvcSrPriorA = Annotated[float | None, _svc("sr_prior_a", "Env SPO3_SR_PRIOR_A.")]
_SvcSrPriorB = Annotated[float | None, _svc("sr_prior_b", "Env SPO3_SR_PRIOR_B.")]
_SvcDeadEndNovelty = Annotated[bool | None, _svc("dead_end_novelty", "Env SPO3_DEAD_END_NOVELTY.")]
_SvcRayServe = Annotated[bool, _svc("ray_serve", "", "--ray-serve")]
_SvcReplicas = Annotated[int, _svc("replicas")]


# `spo3 actor` options
def _act(name: str, note: str = "", **kw: Any) -> Any:
    return _opt(ACTOR_OPTIONS, name, note, **kw)


_ActRedisUrl = Annotated[str, _act("redis_url", envvar="SPO3_REDIS_URL")]
_ActScoreUrl = Annotated[str | None, _act("score_url", envvar="SPO3_SCORE_URL")]
_ActScoreToken = Annotated[str | None, _act("score_token", envvar="SPO3_SCORE_TOKEN")]
_ActPolicyUrl = Annotated[str | None, _act("policy_url", envvar="SPO3_POLICY_URL")]
_ActModel = Annotated[str | None, _act("model")]
_ActWeightsDir = Annotated[str | None, _act("weights_dir", envvar="SPO3_WEIGHTS_DIR")]
_ActRun = Annotated[str, _act("run", envvar="SPO3_RUN")]
_ActMaxSteps = Annotated[int, _act("max_steps")]
_ActMaxLeaves = Annotated[int, _act("max_leaves")]
_ActGroupSize = Annotated[int, _act("group_size")]
_ActChoiceMode = Annotated[bool, _act("choice_mode")]
_ActTemperature = Annotated[float, _act("temperature")]
_ActMaxTokens = Annotated[int, _act("max_tokens")]
_ActAlpha = Annotated[float | None, _act("alpha", _SERVICE_PARAM)]
_ActGMax = Annotated[int | None, _act("g_max", _SERVICE_PARAM)]
_ActRewardScore = Annotated[str | None, _act("reward_score", _SERVICE_PARAM)]
_ActNovelty = Annotated[str | None, _act("novelty", _SERVICE_PARAM)]
_ActNoveltyUse = Annotated[str | None, _act("novelty_use", _SERVICE_PARAM)]
_ActCount = Annotated[str | None, _act("count", _SERVICE_PARAM)]
_ActTruncateWon = Annotated[bool | None, _act("truncate_won", _SERVICE_PARAM)]
_ActSrPriorA = Annotated[float | None, _act("sr_prior_a", _SERVICE_PARAM)]
_ActSrPriorB = Annotated[float | None, _act("sr_prior_b", _SERVICE_PARAM)]
_ActDeadEndNovelty = Annotated[bool | None, _act("dead_end_novelty", _SERVICE_PARAM)]
_ActLeaseS = Annotated[float, _act("lease_s")]
_ActExitWhenIdle = Annotated[float | None, _act("exit_when_idle")]
_ActMetricsPort = Annotated[int | None, _act("metrics_port")]
_ActMetricsHost = Annotated[str, _act("metrics_host")]
_ActThreads = Annotated[int, _act("threads")]
_ActDtype = Annotated[str, _act("dtype", envvar="SPO3_POLICY_DTYPE")]
_ActDevice = Annotated[str, _act("device", envvar="SPO3_POLICY_DEVICE")]
_ActEvalTask = Annotated[
    list[str] | None, _act("eval_task", "Give each as ENV:TASK_ID; repeatable.")
]
_ActEvalEvery = Annotated[int, _act("eval_every")]
_ActMaxUnread = Annotated[int | None, _act("max_unread", envvar="SPO3_MAX_UNREAD")]
_ActConcurrency = Annotated[int, _act("concurrency", envvar="SPO3_ACTOR_CONCURRENCY")]


# `spo3 learner` options
def _lrn(name: str, **kw: Any) -> Any:
    return _opt(LEARNER_OPTIONS, name, **kw)


_LrnModel = Annotated[str, _lrn("model")]
_LrnRedisUrl = Annotated[str, _lrn("redis_url", envvar="SPO3_REDIS_URL")]
_LrnRun = Annotated[str, _lrn("run", envvar="SPO3_RUN")]
_LrnCheckpointDir = Annotated[str, _lrn("checkpoint_dir")]
_LrnResume = Annotated[bool, _lrn("resume")]
_LrnPolicyUrl = Annotated[list[str] | None, _lrn("policy_url")]
_LrnStagingDir = Annotated[str, _lrn("staging_dir")]
_LrnPublishDtype = Annotated[str | None, _lrn("publish_dtype")]
_LrnWeightsDir = Annotated[str | None, _lrn("weights_dir", envvar="SPO3_WEIGHTS_DIR")]
_LrnWeightTransfer = Annotated[str, _lrn("weight_transfer")]
_LrnGroupsPerUpdate = Annotated[int, _lrn("groups_per_update")]
_LrnMaxStaleness = Annotated[int, _lrn("max_staleness")]
_LrnPublishEvery = Annotated[int, _lrn("publish_every")]
_LrnCheckpointEvery = Annotated[int, _lrn("checkpoint_every")]
_LrnMaxUpdates = Annotated[int | None, _lrn("max_updates")]
_LrnExitWhenIdle = Annotated[float | None, _lrn("exit_when_idle")]
_LrnLr = Annotated[float, _lrn("lr")]
_LrnZeroStage = Annotated[int, _lrn("zero_stage")]
_LrnBf16 = Annotated[bool, _lrn("bf16")]
_LrnOffloadOptimizer = Annotated[bool, _lrn("offload_optimizer")]
_LrnMicroBatchRows = Annotated[int, _lrn("micro_batch_rows")]
_LrnGradientCheckpointing = Annotated[bool, _lrn("gradient_checkpointing")]
_LrnSharePrompts = Annotated[bool, _lrn("share_prompts")]
_LrnMaxLen = Annotated[int, _lrn("max_len")]
_LrnMeanOnly = Annotated[bool, _lrn("mean_only")]
_LrnNorm3spo = Annotated[str | None, _lrn("norm_3spo")]
_LrnNormGrpo = Annotated[str | None, _lrn("norm_grpo")]
_LrnNormGigpo = Annotated[str | None, _lrn("norm_gigpo")]
_LrnNormFloor = Annotated[float, _lrn("norm_floor")]
_LrnBaselineStd = Annotated[str, _lrn("baseline_std")]
_LrnBaselineStats = Annotated[str, _lrn("baseline_stats")]
_LrnBaselineInvalid = Annotated[str, _lrn("baseline_invalid")]
_LrnGamma = Annotated[float, _lrn("gamma")]
_LrnOmega = Annotated[float, _lrn("omega")]
_LrnKlCoef = Annotated[float, _lrn("kl_coef")]
_LrnEntropyCoef = Annotated[float, _lrn("entropy_coef")]
_LrnClip = Annotated[float, _lrn("clip")]
_LrnBehavImpWeightCap = Annotated[float | None, _lrn("behav_imp_weight_cap")]
_LrnPpoEpochs = Annotated[int, _lrn("ppo_epochs", min=1)]
_LrnMetricsPort = Annotated[int | None, _lrn("metrics_port")]
_LrnMetricsHost = Annotated[str, _lrn("metrics_host")]

# `spo3 sft` options (the games ones set `games:` fields, as in `spo3 train`'s file)
_SftConfigFile = Annotated[
    str | None,
    typer.Option(
        help="YAML: one warm start (SftRunConfig fields), or a suites "
        "file (configs/sft.yaml) with --suite.",
    ),
]
_SftSuite = Annotated[
    str | None,
    typer.Option(help="The suite of a suites file (its games come from the bench file it names)."),
]
_SftSeed = Annotated[
    int | None,
    typer.Option(
        help="Seed of the task split, base model and example order (as `spo3 train`'s games.seed)."
    ),
]
_SftOut = Annotated[
    str | None, typer.Option(help="Output directory (model/ is the warm-started model).")
]
_SftModel = Annotated[
    str | None,
    typer.Option(
        help="Hugging Face model directory to fine-tune (default: made from --model-preset)."
    ),
]
_SftModelPreset = Annotated[
    str | None, typer.Option(help="Preset of `spo3 init-model` for the base model.")
]
_SftEnv = Annotated[
    str | None,
    typer.Option(help="Games: textworld, twx or alfworld (as games.env of `spo3 train`)."),
]
_SftKind = Annotated[str | None, typer.Option(help="Games: the generator / TWX game (games.kind).")]
_SftTrain = Annotated[int | None, typer.Option(help="Games: training tasks (games.train).")]
_SftHeldout = Annotated[int | None, typer.Option(help="Games: held-out tasks (games.eval).")]
_SftSetting = Annotated[
    list[str] | None,
    typer.Option(help="Games: a generator setting KEY=VALUE (repeatable), e.g. numLocations=9."),
]
_SftGamesDir = Annotated[
    str | None,
    typer.Option(help="Games: where generated TextWorld games are kept (games.cache_dir)."),
]
_SftDemos = Annotated[
    str | None,
    typer.Option(help="Reuse the expert demos of an earlier run (its OUT/demos.json)."),
]
_SftTasks = Annotated[int | None, typer.Option(help="Demos of the first N training tasks only.")]
_SftFraction = Annotated[
    float | None, typer.Option(help="Share of the expert steps trained on (seeded subset).")
]
_SftSteps = Annotated[
    int | None, typer.Option(help="Optimizer steps in all (instead of --epochs).")
]
_SftEpochs = Annotated[int | None, typer.Option(help="Passes over the examples.")]
_SftLr = Annotated[float | None, typer.Option(help="AdamW learning rate.")]
_SftEvalEpisodes = Annotated[
    int | None,
    typer.Option(help="Held-out episodes per task for success before/after (0: none)."),
]
_SftEvalBase = Annotated[
    bool | None,
    typer.Option(
        "--eval-base/--no-eval-base", help="With --eval-episodes: also evaluate the base model."
    ),
]
_SftThreads = Annotated[int | None, typer.Option(help="torch CPU threads (1 on a shared machine).")]
_SFT_FIELDS = (  # `spo3 sft` options that set the SftRunConfig field of their name
    "out",
    "model",
    "model_preset",
    "demos",
    "tasks",
    "fraction",
    "steps",
    "epochs",
    "lr",
    "eval_episodes",
    "eval_base",
    "threads",
)
_SFT_GAMES = {  # `spo3 sft` option -> the `games:` field it sets
    "env": "env",
    "kind": "kind",
    "train": "train",
    "heldout": "eval",
    "games_dir": "cache_dir",
}


app = typer.Typer(
    help="3SPO: state-score-supervised policy optimization for LLM agents, as an actor-learner system.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """3SPO: state-score-supervised policy optimization for LLM agents.

    Run `spo3 COMMAND --help` for the options of a command.
    """


@app.command("score-service")
def score_service(
    host: _SvcHost = "127.0.0.1",
    port: _SvcPort = 8100,
    redis_url: _SvcRedisUrl = None,
    run: _SvcRun = "default",
    token: _SvcToken = None,
    alpha: _SvcAlpha = None,
    xi: _SvcXi = None,
    zeta: _SvcZeta = None,
    g_max: _SvcGMax = None,
    omega_k: _SvcOmegaK = None,
    count: _SvcCount = None,
    truncate_won: _SvcTruncateWon = None,
    sr_prior_a: _SvcSrPriorA = None,
    sr_prior_b: _SvcSrPriorB = None,
    dead_end_novelty: _SvcDeadEndNovelty = None,
    ray_serve: _SvcRayServe = False,
    replicas: _SvcReplicas = 1,
) -> None:
    """Serve state scores over HTTP: POST /v1/scores, POST /v1/leaves, GET /v1/stats, /metrics."""
    from spo3.app.score_service import serve_scores

    groups = _settings(dict(locals()), SCORE_SERVICE_OPTIONS)
    if not token:
        token = secrets.token_urlsafe(24)
        typer.echo(f"SPO3_API_TOKEN not set; generated token for this process: {token}", err=True)
    settings = _checked(ServiceSettings, {**groups[ServiceSettings], "api_token": token})
    serve_scores(ScoreServiceProcess(**groups[ScoreServiceProcess]), settings)


@app.command("init-model")
def init_model_cmd(
    out: Annotated[
        str,
        typer.Argument(help="Directory to write the model to (Hugging Face format, safetensors)."),
    ],
    preset: Annotated[
        str,
        typer.Option(
            help="Size: tiny (~0.15M parameters, tests), small (~3.5M, demo) or qwen0.5b-body (~360M, Qwen2.5-0.5B's body with the small vocabulary; GPU checks)."
        ),
    ] = "tiny",
    seed: Annotated[
        int, typer.Option(help="Seed for the tokenizer corpus and the initial weights.")
    ] = 0,
    tied: Annotated[
        bool | None,
        typer.Option(
            "--tied/--untied",
            help="Tie lm_head to the input embeddings, as Qwen2.5-0.5B/1.5B/3B-Instruct do "
            "(default: the preset's own: tied for qwen2.5-1.5b, untied for the others).",
        ),
    ] = None,
) -> None:
    """Create a small Qwen2-shaped model and a tokenizer trained locally (no downloads).

    Any local Hugging Face checkpoint (e.g. Qwen2.5-1.5B-Instruct) can be used instead wherever
    a model path is asked for.
    """
    from spo3.app.model_init import init_model

    path = init_model(out, preset, seed, tied=tied)
    typer.echo(f"wrote {preset} model to {path}")


def _eval_tasks(items: list[str] | None) -> list[tuple[str, str]]:
    """`--eval-task ENV:TASK_ID` options as (environment, task id) pairs."""
    evals = []
    for item in items or []:
        env_name, sep, task_id = item.partition(":")
        if not sep or not task_id:
            raise typer.BadParameter(
                f"--eval-task wants ENV:TASK_ID (e.g. textworld:/games/g.z8), got {item!r}"
            )
        evals.append((env_name, task_id))
    return evals


def _actor_settings(options: dict[str, Any]) -> tuple[PolicySource, ActorConfig]:
    """The policy source and the actor config that `spo3 actor`'s options give, checked."""
    o = options
    if bool(o["policy_url"]) == bool(o["model"]):
        raise typer.BadParameter("give exactly one of --policy-url (vLLM) or --model (in-process)")
    if o["weights_dir"] and not o["model"]:
        raise typer.BadParameter(
            "--weights-dir goes with --model (a vLLM server gets its weights from the learner)"
        )
    if o["score_url"] and not o["score_token"]:
        raise typer.BadParameter(
            "--score-url needs --score-token (or SPO3_SCORE_TOKEN): the service's SPO3_API_TOKEN"
        )
    groups = _settings({**o, "eval_task": _eval_tasks(o["eval_task"])}, ACTOR_OPTIONS)
    cfg = ActorConfig(
        **groups[ActorConfig],
        # Only the score fields given are set: with --score-url they are checked against the service's.
        params=_checked(ScoreParams, groups[ScoreParams]),
        rollout=RolloutConfig(**groups[RolloutConfig]),
    )
    return PolicySource(**groups[PolicySource]), cfg


@app.command("actor")
def actor_cmd(
    redis_url: _ActRedisUrl,
    score_url: _ActScoreUrl = None,
    score_token: _ActScoreToken = None,
    policy_url: _ActPolicyUrl = None,
    model: _ActModel = None,
    weights_dir: _ActWeightsDir = None,
    run: _ActRun = "default",
    max_steps: _ActMaxSteps = 15,
    max_leaves: _ActMaxLeaves = 64,
    group_size: _ActGroupSize = 8,
    choice_mode: _ActChoiceMode = False,
    temperature: _ActTemperature = 1.0,
    max_tokens: _ActMaxTokens = 64,
    alpha: _ActAlpha = None,
    g_max: _ActGMax = None,
    reward_score: _ActRewardScore = None,
    novelty: _ActNovelty = None,
    novelty_use: _ActNoveltyUse = None,
    count: _ActCount = None,
    truncate_won: _ActTruncateWon = None,
    sr_prior_a: _ActSrPriorA = None,
    sr_prior_b: _ActSrPriorB = None,
    dead_end_novelty: _ActDeadEndNovelty = None,
    lease_s: _ActLeaseS = 120.0,
    exit_when_idle: _ActExitWhenIdle = None,
    metrics_port: _ActMetricsPort = None,
    metrics_host: _ActMetricsHost = "127.0.0.1",
    threads: _ActThreads = 1,
    dtype: _ActDtype = "float32",
    device: _ActDevice = "cpu",
    eval_task: _ActEvalTask = None,
    eval_every: _ActEvalEvery = 0,
    max_unread: _ActMaxUnread = None,
    concurrency: _ActConcurrency = 1,
) -> None:
    """Run a stateless environment actor: take tasks, branch by state score, stream groups.

    SIGTERM finishes the current expansion, gives the task back and exits.
    """
    import logging

    from spo3.actors.worker import run_actor
    from spo3.app.wiring import actor_policy
    from spo3.score_store.client import ParamsMismatch, ScoreServiceError
    from spo3.transport.connection import StoreUnavailable

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    source, cfg = _actor_settings(dict(locals()))
    policy = actor_policy(source, redis_url=redis_url, run=run)
    try:
        finished = run_actor(cfg, policy)
    except (ParamsMismatch, ScoreServiceError, StoreUnavailable) as e:  # settings or reachability
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"actor finished {finished} work items")


@app.command("enqueue")
def enqueue_cmd(
    env: Annotated[
        str, typer.Argument(help="Environment: textworld, twx, scienceworld or alfworld.")
    ],
    tasks: Annotated[
        list[str],
        typer.Argument(
            help="Task ids (game files, twx/scienceworld task specs, ALFWorld game dirs)."
        ),
    ],
    redis_url: Annotated[
        str, typer.Option(envvar="SPO3_REDIS_URL", help="Redis of the run.")
    ] = "redis://127.0.0.1:6379/0",
    run: Annotated[str, typer.Option(envvar="SPO3_RUN", help="Run id.")] = "default",
    algo: Annotated[str, typer.Option(help="3spo, grpo or gigpo.")] = "3spo",
    repeat: Annotated[int, typer.Option(help="Enqueue every task this many times.")] = 1,
) -> None:
    """Put tasks on the run's work queue for actors to take."""
    from spo3.transport.connection import check_reachable, connect
    from spo3.transport.work_queue import WorkQueue

    if algo not in ("3spo", "grpo", "gigpo"):
        raise typer.BadParameter(f"algo must be 3spo, grpo or gigpo, not {algo!r}")
    client = connect(redis_url)
    check_reachable(client, redis_url)
    queue = WorkQueue(client, run)
    for _ in range(repeat):
        for task in tasks:
            queue.put(env, task, algo)
    typer.echo(f"queued {repeat * len(tasks)} items; queue now {queue.counts()}")


def _learner_settings(options: dict[str, Any]) -> tuple[PublishTarget, LearnerConfig]:
    """Where the learner publishes and its config, from `spo3 learner`'s options."""
    if options["policy_url"] and options["weights_dir"]:
        raise typer.BadParameter(
            "give --policy-url (vLLM servers) or --weights-dir (in-process actors), not both"
        )
    groups = _settings(options, LEARNER_OPTIONS)
    trainer = _checked(
        TrainerConfig,
        {
            **groups[TrainerConfig],
            **groups[TrainerSettings],
            "loss": LossConfig(**groups[LossConfig]),
        },
    )
    cfg = LearnerConfig(
        **groups[LearnerConfig],
        **groups[LearnerSettings],
        advantages=_checked(AdvantageConfig, groups[AdvantageConfig]),
        trainer=trainer,
    )
    return PublishTarget(**groups[PublishTarget]), cfg


@app.command("learner")
def learner_cmd(
    model: _LrnModel,
    redis_url: _LrnRedisUrl,
    run: _LrnRun = "default",
    checkpoint_dir: _LrnCheckpointDir = "checkpoints",
    resume: _LrnResume = False,
    policy_url: _LrnPolicyUrl = None,
    staging_dir: _LrnStagingDir = "published-weights",
    publish_dtype: _LrnPublishDtype = None,
    weights_dir: _LrnWeightsDir = None,
    weight_transfer: _LrnWeightTransfer = "disk",
    groups_per_update: _LrnGroupsPerUpdate = 8,
    max_staleness: _LrnMaxStaleness = 2,
    publish_every: _LrnPublishEvery = 1,
    checkpoint_every: _LrnCheckpointEvery = 10,
    max_updates: _LrnMaxUpdates = None,
    exit_when_idle: _LrnExitWhenIdle = None,
    lr: _LrnLr = 1e-5,
    zero_stage: _LrnZeroStage = 2,
    bf16: _LrnBf16 = False,
    offload_optimizer: _LrnOffloadOptimizer = False,
    micro_batch_rows: _LrnMicroBatchRows = 8,
    gradient_checkpointing: _LrnGradientCheckpointing = False,
    share_prompts: _LrnSharePrompts = False,
    max_len: _LrnMaxLen = 4096,
    mean_only: _LrnMeanOnly = False,
    norm_3spo: _LrnNorm3spo = None,
    norm_grpo: _LrnNormGrpo = None,
    norm_gigpo: _LrnNormGigpo = None,
    norm_floor: _LrnNormFloor = 0.1,
    baseline_std: _LrnBaselineStd = "sample",
    baseline_stats: _LrnBaselineStats = "steps",
    baseline_invalid: _LrnBaselineInvalid = "row",
    gamma: _LrnGamma = 0.95,
    omega: _LrnOmega = 1.0,
    kl_coef: _LrnKlCoef = 0.01,
    entropy_coef: _LrnEntropyCoef = 0.0,
    clip: _LrnClip = 0.2,
    behav_imp_weight_cap: _LrnBehavImpWeightCap = 5.0,
    ppo_epochs: _LrnPpoEpochs = 2,
    metrics_port: _LrnMetricsPort = None,
    metrics_host: _LrnMetricsHost = "127.0.0.1",
) -> None:
    """Run the DeepSpeed learner: post-step updates from the groups stream, weight republishing,
    checkpoints. Several processes: `torchrun --nproc_per_node N -m spo3.app.cli learner ...`."""
    import logging

    from spo3.app.wiring import learner_publisher
    from spo3.learner.loop import run_learner

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    target, cfg = _learner_settings(dict(locals()))
    publisher = learner_publisher(target, redis_url=redis_url, run=run, model=model)
    result = run_learner(cfg, publisher)
    typer.echo(
        f"learner stopped at version {result.version}: {result.groups_used} groups used, "
        f"{result.groups_dropped_stale} dropped as stale, {result.malformed} malformed"
    )


@app.command("train")
def train_cmd(
    config: Annotated[
        str, typer.Option(help="YAML run configuration (see configs/demo.yaml).")
    ] = "configs/demo.yaml",
    engine: Annotated[
        str | None,
        typer.Option(
            help="Policy engine: inprocess, or vllm (a vLLM server from "
            ".venv-vllm; `make vllm-venv`). Default: the config's."
        ),
    ] = None,
    no_progress: Annotated[bool, typer.Option(help="No live progress bar (logs only).")] = False,
) -> None:
    """Train on one machine: embedded Redis, actor processes (Ray), the DeepSpeed learner, held-out
    evaluation before and after; writes metrics.jsonl, plots, a summary and the final checkpoint."""
    from pydantic import ValidationError

    from spo3.app.config import settings_error
    from spo3.app.launcher import train
    from spo3.app.train_config import TrainConfig

    try:
        cfg = TrainConfig.from_yaml(config)
    except ValidationError as e:  # before anything starts: a misspelt or invalid setting
        typer.echo(f"error: {config}:\n{settings_error(e)}", err=True)
        raise typer.Exit(2) from None
    if engine:
        if engine not in ("inprocess", "vllm"):
            raise typer.BadParameter(f"--engine must be inprocess or vllm, not {engine!r}")
        cfg = cfg.model_copy(update={"engine": engine})
    run_dir = train(cfg, progress=not no_progress)
    typer.echo(f"run directory: {run_dir}")


def _sft_config(options: dict[str, Any]) -> SftRunConfig:
    """The warm start that `spo3 sft`'s options give: a config file's (or the defaults), with
    the options given set over it."""
    from pydantic import ValidationError

    from spo3.app.sft import SftRunConfig, suite_config, with_seed

    overrides: dict[str, Any] = {k: options[k] for k in _SFT_FIELDS if options[k] is not None}
    games = {f: options[o] for o, f in _SFT_GAMES.items() if options[o] is not None}
    if options["setting"]:
        games["settings"] = _key_values(options["setting"])
    config, suite, seed = options["config"], options["suite"], options["seed"]
    try:
        cfg = suite_config(config, suite or "") if config else SftRunConfig()
        if suite and not config:
            raise ValueError("--suite needs --config (a suites file such as configs/sft.yaml)")
        if games:
            overrides["games"] = {**cfg.games.model_dump(), **games}
        cfg = SftRunConfig.model_validate({**cfg.model_dump(), **overrides})
        if seed is not None:
            cfg = with_seed(cfg, seed)
    except (ValueError, ValidationError, OSError) as e:
        raise typer.BadParameter(str(e)) from None
    return cfg


@app.command("sft")
def sft_cmd(
    config: _SftConfigFile = None,
    suite: _SftSuite = None,
    seed: _SftSeed = None,
    out: _SftOut = None,
    model: _SftModel = None,
    model_preset: _SftModelPreset = None,
    env: _SftEnv = None,
    kind: _SftKind = None,
    train: _SftTrain = None,
    heldout: _SftHeldout = None,
    setting: _SftSetting = None,
    games_dir: _SftGamesDir = None,
    demos: _SftDemos = None,
    tasks: _SftTasks = None,
    fraction: _SftFraction = None,
    steps: _SftSteps = None,
    epochs: _SftEpochs = None,
    lr: _SftLr = None,
    eval_episodes: _SftEvalEpisodes = None,
    eval_base: _SftEvalBase = None,
    threads: _SftThreads = None,
    no_progress: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Warm start: fine-tune a model on expert trajectories (TextWorld walkthroughs, TextWorld-Express
    gold paths, ALFWorld's expert) formatted as the policy sees them; `spo3 train` starts from
    OUT/model (its `model:` setting)."""
    from spo3.app.sft import run_sft

    cfg = _sft_config(dict(locals()))
    summary = run_sft(cfg, progress=not no_progress)
    typer.echo(f"warm-started model: {summary['model']}")


@app.command("eval")
def eval_cmd(
    checkpoint: Annotated[
        str, typer.Option(help="Hugging Face model directory (a run's checkpoints/v*/hf).")
    ],
    games: Annotated[
        list[str],
        typer.Argument(help="Held-out task ids (TextWorld .z8 files by default; see --env)."),
    ],
    env: Annotated[
        str,
        typer.Option(help="Environment of the tasks: textworld, twx, scienceworld or alfworld."),
    ] = "textworld",
    max_steps: Annotated[int, typer.Option(help="Most actions per episode.")] = 15,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature (the paper evaluates at 0.4).")
    ] = 0.4,
    episodes: Annotated[int, typer.Option(help="Episodes per game.")] = 1,
    choice_mode: Annotated[
        bool, typer.Option(help="Constrain replies to the admissible actions.")
    ] = True,
    weights: Annotated[
        str | None,
        typer.Option(
            help=(
                "A published weights file loaded over --checkpoint, e.g. a bench run's held-out version "
                "RUN/heldout-weights/v00000048.safetensors (with --checkpoint the run's initial model)."
            )
        ),
    ] = None,
    show_actions: Annotated[bool, typer.Option(help="Print every episode's actions.")] = False,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    dtype: Annotated[str, _act("dtype")] = "float32",
    device: Annotated[str, _act("device")] = "cpu",
) -> None:
    """Evaluate a checkpoint on held-out games: success rate, steps, invalid-action rate, and the share
    of each action verb (what the policy does)."""
    import torch

    from spo3.actors.envs.registry import make_env
    from spo3.actors.evaluate import action_shares, evaluate
    from spo3.policy.inprocess import InProcessPolicy

    if weights and not Path(weights).is_file():
        raise typer.BadParameter(
            f"--weights {weights}: no such file (a run keeps its held-out versions in "
            "RUN/heldout-weights/)"
        )
    torch.manual_seed(seed)
    source = _checked(PolicySource, {"model": checkpoint, "dtype": dtype, "device": device})
    policy = InProcessPolicy(checkpoint, dtype=source.dtype, device=source.device)
    if weights:
        from safetensors.torch import load_file

        policy.publish(1, load_file(weights))
    environment = make_env(env)
    result = evaluate(
        environment,
        policy,
        games,
        max_steps=max_steps,
        temperature=temperature,
        choice_mode=choice_mode,
        episodes=episodes,
    )
    environment.close()
    if show_actions:
        for t in result.per_task:
            typer.echo(
                f"{'WIN ' if t['success'] else 'fail'} {t['task']}: "
                + " | ".join(a if a is not None else "<invalid>" for a in t["actions"])
            )
    typer.echo(
        f"success {result.success_rate:.1%} over {len(result.per_task)} episodes, "
        f"mean steps {result.mean_steps:.1f}, invalid actions {result.invalid_rate:.1%}"
    )
    typer.echo(
        "actions: "
        + ", ".join(f"{v} {share:.0%}" for v, share in action_shares(result.per_task).items())
    )


def _make_alfworld_games(
    out: str, n: int, heldout: int | None, seed: int, task_types: list[str] | None
) -> None:
    from spo3.actors.envs.alfworld_gen import MadeGame, make_games
    from spo3.actors.envs.base import EnvError

    def show(g: MadeGame) -> None:
        typer.echo(f"{g.split}\t{g.task_type}\texpert {g.expert_steps} steps\t{g.path}")

    try:
        make_games(
            out,
            n_train=n,
            n_heldout=n // 2 if heldout is None else heldout,
            seed=seed,
            task_types=task_types,
            progress=show,
        )
    except EnvError as e:
        raise typer.BadParameter(str(e)) from None


@app.command("make-games")
def make_games_cmd(
    out: Annotated[
        str,
        typer.Argument(
            help="Directory for the games (TextWorld: .z8 + .json sidecars; "
            "ALFWorld: train/ and heldout/ game folders)."
        ),
    ],
    env: Annotated[str, typer.Option(help="textworld or alfworld.")] = "textworld",
    kind: Annotated[
        str,
        typer.Option(
            help="TextWorld: tw-coin_collector, tw-treasure_hunter, tw-simple or tw-cooking."
        ),
    ] = "tw-coin_collector",
    n: Annotated[
        int,
        typer.Option(
            help="TextWorld: how many games (seeds seed, seed+1, ...). "
            "ALFWorld: training games per task type."
        ),
    ] = 8,
    heldout: Annotated[
        int | None,
        typer.Option(
            help="ALFWorld: held-out games per task type (other floor plans; default n/2)."
        ),
    ] = None,
    task_type: Annotated[
        list[str] | None,
        typer.Option(
            help="ALFWorld: pick, clean, heat, cool, two, light (repeatable; default all six)."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="First seed; the same seed always gives the same game.")
    ] = 0,
    setting: Annotated[
        list[str] | None,
        typer.Option(help="TextWorld generator setting KEY=VALUE, e.g. level=3 (repeatable)."),
    ] = None,
) -> None:
    """Generate games offline and print their paths: TextWorld games with tw-make's generators, or
    ALFWorld-format games (from ALFWorld's floor-plan layouts), each won by ALFWorld's hand-coded expert."""
    if env == "alfworld":
        if setting:
            raise typer.BadParameter("--setting is for --env textworld")
        _make_alfworld_games(out, n, heldout, seed, task_type)
        return
    if env != "textworld":
        raise typer.BadParameter(f"--env must be textworld or alfworld, not {env!r}")
    if heldout is not None or task_type:
        raise typer.BadParameter("--heldout and --task-type are for --env alfworld")
    from spo3.actors.envs.textworld_env import generate_games

    settings = _key_values(setting)
    for path in generate_games(out, kind, n, seed=seed, **settings):
        typer.echo(path)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
