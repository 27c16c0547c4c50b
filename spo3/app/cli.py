"""`spo3`: the command line of the 3SPO actor-learner system.

Heavy modules (torch, ray, fastapi) are imported inside each command so that `spo3 --help`
answers at once.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated

import typer

from spo3.actors.config import ActorConfig, RolloutConfig
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

_SERVICE_PARAM = "With --score-url the service's value is used; one given here must equal it or the actor does not start."


def _doc(model, field: str, note: str = "") -> str:
    """An option's help: the description of the settings field it sets (one text for --help, the YAML
    files and the README), and a note about the command line where it needs one."""
    return f"{model.model_fields[field].description} {note}".strip()


ACTOR_OPTIONS = {  # `spo3 actor` option -> the settings field it sets
    "redis_url": (ActorConfig, "redis_url"),
    "score_url": (ActorConfig, "score_url"),
    "score_token": (ActorConfig, "score_token"),
    "run": (ActorConfig, "run"),
    "policy_url": (PolicySource, "policy_url"),
    "model": (PolicySource, "model"),
    "weights_dir": (PolicySource, "weights_dir"),
    "threads": (PolicySource, "threads"),
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
    "lease_s": (ActorConfig, "lease_s"),
    "exit_when_idle": (ActorConfig, "exit_when_idle_s"),
    "metrics_port": (ActorConfig, "metrics_port"),
    "metrics_host": (ActorConfig, "metrics_host"),
    "eval_task": (ActorConfig, "eval_tasks"),
    "eval_every": (ActorConfig, "eval_every"),
    "max_unread": (ActorConfig, "stream_max_unread"),
}
LEARNER_OPTIONS = {  # `spo3 learner` option -> the settings field it sets
    "model": (TrainerConfig, "model"),
    "redis_url": (LearnerConfig, "redis_url"),
    "run": (LearnerConfig, "run"),
    "checkpoint_dir": (LearnerConfig, "checkpoint_dir"),
    "resume": (LearnerConfig, "resume"),
    "policy_url": (PublishTarget, "policy_url"),
    "staging_dir": (PublishTarget, "staging_dir"),
    "publish_dtype": (PublishTarget, "publish_dtype"),
    "weights_dir": (PublishTarget, "weights_dir"),
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
        for f in ("lr", "zero_stage", "bf16", "offload_optimizer", "micro_batch_rows", "ppo_epochs")
    },
    "mean_only": (AdvantageConfig, "mean_only"),
    **{f: (LossConfig, f) for f in ("kl_coef", "entropy_coef", "clip", "behav_imp_weight_cap")},
    "metrics_port": (LearnerConfig, "metrics_port"),
    "metrics_host": (LearnerConfig, "metrics_host"),
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
    host: Annotated[
        str, typer.Option(help="Interface to bind. Keep 127.0.0.1 unless behind a network policy.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8100,
    redis_url: Annotated[
        str | None,
        typer.Option(
            envvar="SPO3_REDIS_URL",
            help="redis://[:password@]host:port/db, rediss://... or unix:///path. Empty: an embedded Redis (single machine).",
        ),
    ] = None,
    run: Annotated[
        str, typer.Option(envvar="SPO3_RUN", help="Run id; prefixes every Redis key of the run.")
    ] = "default",
    token: Annotated[
        str | None,
        typer.Option(
            envvar="SPO3_API_TOKEN",
            help="Bearer token for mutating routes. Unset: a random one is generated and printed.",
        ),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            help="lambda(t) = alpha ln t (default 1; the paper's scripts use 50). Env SPO3_ALPHA."
        ),
    ] = None,
    xi: Annotated[
        int | None,
        typer.Option(help="Truncate a state after xi failures ... (default 10). Env SPO3_XI."),
    ] = None,
    zeta: Annotated[
        float | None,
        typer.Option(help="... while its success rate is <= zeta (default 0.1). Env SPO3_ZETA."),
    ] = None,
    g_max: Annotated[
        int | None,
        typer.Option(
            help="Most branches at one state, n = ceil(g_max S) (default 8). Env SPO3_G_MAX."
        ),
    ] = None,
    omega_k: Annotated[
        float | None, typer.Option(help="Novelty weight decay (default 0.1). Env SPO3_OMEGA_K.")
    ] = None,
    ray_serve: Annotated[
        bool,
        typer.Option(
            "--ray-serve", help="Deploy as a Ray Serve application instead of plain uvicorn."
        ),
    ] = False,
    replicas: Annotated[int, typer.Option(help="Ray Serve replicas (with --ray-serve).")] = 1,
) -> None:
    """Serve state scores over HTTP: POST /v1/scores, POST /v1/leaves, GET /v1/stats, /metrics."""
    from spo3.score_store.service import ServiceSettings

    overrides = {
        k: v
        for k, v in dict(
            alpha=alpha,
            xi=xi,
            zeta=zeta,
            g_max=g_max,
            omega_k=omega_k,
            redis_url=redis_url,
            run=run,
        ).items()
        if v is not None
    }
    if not token:
        token = secrets.token_urlsafe(24)
        typer.echo(f"SPO3_API_TOKEN not set; generated token for this process: {token}", err=True)
    settings = ServiceSettings(**overrides, api_token=token)

    if ray_serve:
        import ray
        from ray import serve

        from spo3.score_store.serve import build_app

        ray.init(include_dashboard=False)
        serve.start(
            http_options={"host": host, "port": port}, logging_config={"enable_access_log": False}
        )
        serve.run(build_app(settings, num_replicas=replicas), blocking=True)
        return

    import uvicorn

    from spo3.score_store.service import create_app

    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False)


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
) -> None:
    """Create a small Qwen2-shaped model and a tokenizer trained locally (no downloads).

    Any local Hugging Face checkpoint (e.g. Qwen2.5-1.5B-Instruct) can be used instead wherever
    a model path is asked for.
    """
    from spo3.app.model_init import init_model

    path = init_model(out, preset, seed)
    typer.echo(f"wrote {preset} model to {path}")


@app.command("actor")
def actor_cmd(
    redis_url: Annotated[
        str, typer.Option(envvar="SPO3_REDIS_URL", help=_doc(ActorConfig, "redis_url"))
    ],
    score_url: Annotated[
        str | None, typer.Option(envvar="SPO3_SCORE_URL", help=_doc(ActorConfig, "score_url"))
    ] = None,
    score_token: Annotated[
        str | None, typer.Option(envvar="SPO3_SCORE_TOKEN", help=_doc(ActorConfig, "score_token"))
    ] = None,
    policy_url: Annotated[
        str | None, typer.Option(envvar="SPO3_POLICY_URL", help=_doc(PolicySource, "policy_url"))
    ] = None,
    model: Annotated[str | None, typer.Option(help=_doc(PolicySource, "model"))] = None,
    weights_dir: Annotated[
        str | None, typer.Option(envvar="SPO3_WEIGHTS_DIR", help=_doc(PolicySource, "weights_dir"))
    ] = None,
    run: Annotated[str, typer.Option(envvar="SPO3_RUN", help=_doc(ActorConfig, "run"))] = "default",
    max_steps: Annotated[int, typer.Option(help=_doc(RolloutConfig, "max_steps"))] = 15,
    max_leaves: Annotated[int, typer.Option(help=_doc(RolloutConfig, "max_leaves"))] = 64,
    group_size: Annotated[int, typer.Option(help=_doc(RolloutConfig, "group_size"))] = 8,
    choice_mode: Annotated[bool, typer.Option(help=_doc(RolloutConfig, "choice_mode"))] = False,
    temperature: Annotated[float, typer.Option(help=_doc(RolloutConfig, "temperature"))] = 1.0,
    max_tokens: Annotated[int, typer.Option(help=_doc(RolloutConfig, "max_tokens"))] = 64,
    alpha: Annotated[
        float | None, typer.Option(help=_doc(ScoreParams, "alpha", _SERVICE_PARAM))
    ] = None,
    g_max: Annotated[
        int | None, typer.Option(help=_doc(ScoreParams, "g_max", _SERVICE_PARAM))
    ] = None,
    reward_score: Annotated[
        str | None, typer.Option(help=_doc(ScoreParams, "reward_score", _SERVICE_PARAM))
    ] = None,
    novelty: Annotated[
        str | None, typer.Option(help=_doc(ScoreParams, "novelty", _SERVICE_PARAM))
    ] = None,
    novelty_use: Annotated[
        str | None, typer.Option(help=_doc(ScoreParams, "novelty_use", _SERVICE_PARAM))
    ] = None,
    lease_s: Annotated[float, typer.Option(help=_doc(ActorConfig, "lease_s"))] = 120.0,
    exit_when_idle: Annotated[
        float | None, typer.Option(help=_doc(ActorConfig, "exit_when_idle_s"))
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help=_doc(ActorConfig, "metrics_port"))
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help=_doc(ActorConfig, "metrics_host"))
    ] = "127.0.0.1",
    threads: Annotated[int, typer.Option(help=_doc(PolicySource, "threads"))] = 1,
    eval_task: Annotated[
        list[str] | None,
        typer.Option(help=_doc(ActorConfig, "eval_tasks", "Give each as ENV:TASK_ID; repeatable.")),
    ] = None,
    eval_every: Annotated[int, typer.Option(help=_doc(ActorConfig, "eval_every"))] = 0,
    max_unread: Annotated[
        int, typer.Option(envvar="SPO3_MAX_UNREAD", help=_doc(ActorConfig, "stream_max_unread"))
    ] = 0,
) -> None:
    """Run a stateless environment actor: take tasks, branch by state score, stream groups.

    SIGTERM finishes the current expansion, gives the task back and exits.
    """
    import logging

    from spo3.actors.worker import run_actor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if bool(policy_url) == bool(model):
        raise typer.BadParameter("give exactly one of --policy-url (vLLM) or --model (in-process)")
    if reward_score not in (None, "raw", "truncated"):
        raise typer.BadParameter(f"--reward-score must be raw or truncated, not {reward_score!r}")
    if novelty not in (None, "path", "parent", "none"):
        raise typer.BadParameter(f"--novelty must be path, parent or none, not {novelty!r}")
    if novelty_use not in (None, "reward", "order"):
        raise typer.BadParameter(f"--novelty-use must be reward or order, not {novelty_use!r}")
    if weights_dir and not model:
        raise typer.BadParameter(
            "--weights-dir goes with --model (a vLLM server gets its weights from the learner)"
        )
    if score_url and not score_token:
        raise typer.BadParameter(
            "--score-url needs --score-token (or SPO3_SCORE_TOKEN): the service's SPO3_API_TOKEN"
        )
    evals = []
    for item in eval_task or []:
        env_name, sep, task_id = item.partition(":")
        if not sep or not task_id:
            raise typer.BadParameter(
                f"--eval-task wants ENV:TASK_ID (e.g. textworld:/games/g.z8), got {item!r}"
            )
        evals.append((env_name, task_id))
    from spo3.app.wiring import actor_policy

    policy = actor_policy(
        PolicySource(policy_url=policy_url, model=model, weights_dir=weights_dir, threads=threads),
        redis_url=redis_url,
        run=run,
    )
    cfg = ActorConfig(
        redis_url=redis_url,
        run=run,
        score_url=score_url,
        score_token=score_token,
        # Only the fields given here are set: with --score-url they are checked against the service's.
        params=ScoreParams(
            **{
                k: v
                for k, v in dict(
                    alpha=alpha,
                    g_max=g_max,
                    reward_score=reward_score,
                    novelty=novelty,
                    novelty_use=novelty_use,
                ).items()
                if v is not None
            }
        ),
        rollout=RolloutConfig(
            max_steps=max_steps,
            max_leaves=max_leaves,
            group_size=group_size,
            choice_mode=choice_mode,
            temperature=temperature,
            max_tokens=max_tokens,
        ),
        lease_s=lease_s,
        exit_when_idle_s=exit_when_idle,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        eval_tasks=evals,
        eval_every=eval_every,
        stream_max_unread=max_unread,
    )
    from spo3.score_store.client import ParamsMismatch, ScoreServiceError
    from spo3.transport.connection import StoreUnavailable

    try:
        finished = run_actor(cfg, policy)
    except (
        ParamsMismatch,
        ScoreServiceError,
        StoreUnavailable,
    ) as e:  # at start: settings or reachability
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


@app.command("learner")
def learner_cmd(
    model: Annotated[str, typer.Option(help=_doc(TrainerConfig, "model"))],
    redis_url: Annotated[
        str, typer.Option(envvar="SPO3_REDIS_URL", help=_doc(LearnerConfig, "redis_url"))
    ],
    run: Annotated[
        str, typer.Option(envvar="SPO3_RUN", help=_doc(LearnerConfig, "run"))
    ] = "default",
    checkpoint_dir: Annotated[
        str, typer.Option(help=_doc(LearnerConfig, "checkpoint_dir"))
    ] = "checkpoints",
    resume: Annotated[bool, typer.Option(help=_doc(LearnerConfig, "resume"))] = False,
    policy_url: Annotated[
        list[str] | None, typer.Option(help=_doc(PublishTarget, "policy_url"))
    ] = None,
    staging_dir: Annotated[
        str, typer.Option(help=_doc(PublishTarget, "staging_dir"))
    ] = "published-weights",
    publish_dtype: Annotated[
        str | None, typer.Option(help=_doc(PublishTarget, "publish_dtype"))
    ] = None,
    weights_dir: Annotated[
        str | None, typer.Option(envvar="SPO3_WEIGHTS_DIR", help=_doc(PublishTarget, "weights_dir"))
    ] = None,
    groups_per_update: Annotated[
        int, typer.Option(help=_doc(LearnerSettings, "groups_per_update"))
    ] = 8,
    max_staleness: Annotated[int, typer.Option(help=_doc(LearnerSettings, "max_staleness"))] = 2,
    publish_every: Annotated[int, typer.Option(help=_doc(LearnerSettings, "publish_every"))] = 1,
    checkpoint_every: Annotated[
        int, typer.Option(help=_doc(LearnerSettings, "checkpoint_every"))
    ] = 10,
    max_updates: Annotated[
        int | None, typer.Option(help=_doc(LearnerSettings, "max_updates"))
    ] = None,
    exit_when_idle: Annotated[
        float | None, typer.Option(help=_doc(LearnerSettings, "exit_when_idle_s"))
    ] = None,
    lr: Annotated[float, typer.Option(help=_doc(TrainerSettings, "lr"))] = 1e-5,
    zero_stage: Annotated[int, typer.Option(help=_doc(TrainerSettings, "zero_stage"))] = 2,
    bf16: Annotated[bool, typer.Option(help=_doc(TrainerSettings, "bf16"))] = False,
    offload_optimizer: Annotated[
        bool, typer.Option(help=_doc(TrainerSettings, "offload_optimizer"))
    ] = False,
    micro_batch_rows: Annotated[
        int, typer.Option(help=_doc(TrainerSettings, "micro_batch_rows"))
    ] = 8,
    mean_only: Annotated[bool, typer.Option(help=_doc(AdvantageConfig, "mean_only"))] = False,
    kl_coef: Annotated[float, typer.Option(help=_doc(LossConfig, "kl_coef"))] = 0.01,
    entropy_coef: Annotated[float, typer.Option(help=_doc(LossConfig, "entropy_coef"))] = 0.0,
    clip: Annotated[float, typer.Option(help=_doc(LossConfig, "clip"))] = 0.2,
    behav_imp_weight_cap: Annotated[
        float | None, typer.Option(help=_doc(LossConfig, "behav_imp_weight_cap"))
    ] = 5.0,
    ppo_epochs: Annotated[int, typer.Option(min=1, help=_doc(TrainerSettings, "ppo_epochs"))] = 2,
    metrics_port: Annotated[
        int | None, typer.Option(help=_doc(LearnerConfig, "metrics_port"))
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help=_doc(LearnerConfig, "metrics_host"))
    ] = "127.0.0.1",
) -> None:
    """Run the DeepSpeed learner: post-step updates from the groups stream, weight republishing,
    checkpoints. Several processes: `torchrun --nproc_per_node N -m spo3.app.cli learner ...`."""
    import logging

    from spo3.learner.loop import run_learner

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from spo3.app.wiring import learner_publisher

    if policy_url and weights_dir:
        raise typer.BadParameter(
            "give --policy-url (vLLM servers) or --weights-dir (in-process actors), not both"
        )
    publisher = learner_publisher(
        PublishTarget(
            policy_url=policy_url,
            staging_dir=staging_dir,
            publish_dtype=publish_dtype,
            weights_dir=weights_dir,
        ),
        redis_url=redis_url,
        run=run,
        model=model,
    )
    cfg = LearnerConfig(
        redis_url=redis_url,
        run=run,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        groups_per_update=groups_per_update,
        max_staleness=max_staleness,
        publish_every=publish_every,
        checkpoint_every=checkpoint_every,
        max_updates=max_updates,
        exit_when_idle_s=exit_when_idle,
        advantages=AdvantageConfig(mean_only=mean_only),
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        trainer=TrainerConfig(
            model=model,
            lr=lr,
            zero_stage=zero_stage,
            bf16=bf16,
            offload_optimizer=offload_optimizer,
            micro_batch_rows=micro_batch_rows,
            ppo_epochs=ppo_epochs,
            loss=LossConfig(
                kl_coef=kl_coef,
                entropy_coef=entropy_coef,
                clip=clip,
                behav_imp_weight_cap=behav_imp_weight_cap,
            ),
        ),
    )
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
    from spo3.app.launcher import TrainConfig, train

    try:
        cfg = TrainConfig.from_yaml(config)
    except ValidationError as e:  # before anything starts: a misspelt or invalid setting
        typer.echo(f"error: {config}:\n{settings_error(e)}", err=True)
        raise typer.Exit(2) from None
    if engine:
        if engine not in ("inprocess", "vllm"):
            raise typer.BadParameter(f"--engine must be inprocess or vllm, not {engine!r}")
        cfg.engine = engine
    run_dir = train(cfg, progress=not no_progress)
    typer.echo(f"run directory: {run_dir}")


@app.command("sft")
def sft_cmd(
    config: Annotated[
        str | None,
        typer.Option(
            help="YAML: one warm start (SftRunConfig fields), or a suites "
            "file (configs/sft.yaml) with --suite."
        ),
    ] = None,
    suite: Annotated[
        str | None,
        typer.Option(
            help="The suite of a suites file (its games come from the bench file it names)."
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the task split, base model and example order (as `spo3 train`'s games.seed)."
        ),
    ] = None,
    out: Annotated[
        str | None, typer.Option(help="Output directory (model/ is the warm-started model).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Hugging Face model directory to fine-tune (default: made from --model-preset)."
        ),
    ] = None,
    model_preset: Annotated[
        str | None, typer.Option(help="Preset of `spo3 init-model` for the base model.")
    ] = None,
    env: Annotated[
        str | None,
        typer.Option(help="Games: textworld, twx or alfworld (as games.env of `spo3 train`)."),
    ] = None,
    kind: Annotated[
        str | None, typer.Option(help="Games: the generator / TWX game (games.kind).")
    ] = None,
    train: Annotated[int | None, typer.Option(help="Games: training tasks (games.train).")] = None,
    heldout: Annotated[int | None, typer.Option(help="Games: held-out tasks (games.eval).")] = None,
    setting: Annotated[
        list[str] | None,
        typer.Option(
            help="Games: a generator setting KEY=VALUE (repeatable), e.g. numLocations=9."
        ),
    ] = None,
    games_dir: Annotated[
        str | None,
        typer.Option(help="Games: where generated TextWorld games are kept (games.cache_dir)."),
    ] = None,
    demos: Annotated[
        str | None,
        typer.Option(help="Reuse the expert demos of an earlier run (its OUT/demos.json)."),
    ] = None,
    tasks: Annotated[
        int | None, typer.Option(help="Demos of the first N training tasks only.")
    ] = None,
    fraction: Annotated[
        float | None, typer.Option(help="Share of the expert steps trained on (seeded subset).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Optimizer steps in all (instead of --epochs).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the examples.")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate.")] = None,
    eval_episodes: Annotated[
        int | None,
        typer.Option(help="Held-out episodes per task for success before/after (0: none)."),
    ] = None,
    eval_base: Annotated[
        bool | None,
        typer.Option(
            "--eval-base/--no-eval-base", help="With --eval-episodes: also evaluate the base model."
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="torch CPU threads (1 on a shared machine).")
    ] = None,
    no_progress: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Warm start: fine-tune a model on expert trajectories (TextWorld walkthroughs, TextWorld-Express
    gold paths, ALFWorld's expert) formatted as the policy sees them; `spo3 train` starts from
    OUT/model (its `model:` setting)."""
    import yaml
    from pydantic import ValidationError

    from spo3.app.sft import SftRunConfig, run_sft, suite_config, with_seed

    overrides = {
        k: v
        for k, v in dict(
            out=out,
            model=model,
            model_preset=model_preset,
            demos=demos,
            tasks=tasks,
            fraction=fraction,
            steps=steps,
            epochs=epochs,
            lr=lr,
            eval_episodes=eval_episodes,
            eval_base=eval_base,
            threads=threads,
        ).items()
        if v is not None
    }
    games = {
        k: v
        for k, v in dict(env=env, kind=kind, train=train, eval=heldout, cache_dir=games_dir).items()
        if v is not None
    }
    if setting:
        games["settings"] = {}
        for item in setting:
            key, sep, value = item.partition("=")
            if not sep:
                raise typer.BadParameter(f"--setting wants KEY=VALUE, got {item!r}")
            games["settings"][key] = yaml.safe_load(value)
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
    policy = InProcessPolicy(checkpoint)
    if weights:
        from safetensors.torch import load_file

        policy.publish(1, load_file(weights))
    env = make_env(env)
    result = evaluate(
        env,
        policy,
        games,
        max_steps=max_steps,
        temperature=temperature,
        choice_mode=choice_mode,
        episodes=episodes,
    )
    env.close()
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
    import yaml

    if env == "alfworld":
        if setting:
            raise typer.BadParameter("--setting is for --env textworld")
        from spo3.actors.envs.alfworld_gen import make_games
        from spo3.actors.envs.base import EnvError

        def show(g) -> None:
            typer.echo(f"{g.split}\t{g.task_type}\texpert {g.expert_steps} steps\t{g.path}")

        try:
            make_games(
                out,
                n_train=n,
                n_heldout=n // 2 if heldout is None else heldout,
                seed=seed,
                task_types=task_type,
                progress=show,
            )
        except EnvError as e:
            raise typer.BadParameter(str(e)) from None
        return
    if env != "textworld":
        raise typer.BadParameter(f"--env must be textworld or alfworld, not {env!r}")
    if heldout is not None or task_type:
        raise typer.BadParameter("--heldout and --task-type are for --env alfworld")
    from spo3.actors.envs.textworld_env import generate_games

    settings = {}
    for item in setting or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--setting wants KEY=VALUE, got {item!r}")
        settings[key] = yaml.safe_load(value)
    for path in generate_games(out, kind, n, seed=seed, **settings):
        typer.echo(path)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
