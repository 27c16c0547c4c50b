"""`spo3-bench`: 3SPO, GRPO and GiGPO side by side, counted the same way (docs/algorithm.md "Metrics").

    for suite in suites:             (configs/bench-v2.yaml: suites with room to explore)
      for seed in seeds:             (one initial model and one task split per seed, for every algo)
        for algo in algos:           (3spo, grpo, gigpo; each with its settings from `algo_settings`)
          spo3 train on that suite   (the same single-machine system as `make demo`), keeping the
                                     published weights at `heldout_checkpoints` fixed env-step
                                     checkpoints and evaluating them on the held-out tasks afterwards
          -> results/<suite>/<algo>-<variant>-s<seed>.json (a bench_stats.RunResult; resume skips it)
    -> results.json (every run, and per suite the table and the paired bootstrap intervals),
       summary.md (tables; where an interval includes "no difference"), plots with interval bands

`spo3-bench --sweep configs/bench-sweep.yaml` runs settings variants per algorithm on the tuning
suites instead, picks each algorithm's best variant by a training-time figure and writes sweep.md
and the `algo_settings` to put into the bench config.

The figures are computed by services/bench_stats.py (pure functions); this module does the I/O.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bench.compare.stats import (
    RunResult,
    arm,
    best_variant,
    curve_band,
    held_out_curve,
    late_success,
    mean_std,
    run_figures,
    suite_comparisons,
    suite_table,
    visited_state_curve,
    visits_from_rollouts,
)
from spo3.app.evaluation import MIN_CHECKPOINTS, checkpoint_steps
from spo3.app.train_config import TrainConfig

if TYPE_CHECKING:
    from spo3.app.sft import SftRunConfig

ALGOS = ("3spo", "grpo", "gigpo")
FORMAT = "spo3 bench/2"


class BenchConfig(BaseModel):
    """configs/bench-v2.yaml: the run settings every suite starts from, then the suites."""

    model_config = ConfigDict(extra="forbid")
    base: dict[str, Any] = Field(
        default_factory=dict, description="TrainConfig fields shared by every run."
    )
    suites: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description=("name -> TrainConfig fields merged over `base` (at least `games`)."),
    )
    algos: list[str] = Field(
        default_factory=lambda: list(ALGOS), description="Algorithms compared (3spo, grpo, gigpo)."
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2, 3, 4],
        description=(
            "Paired seeds: every algorithm of a seed starts from the same model and trains and is evaluated on "
            "the same tasks."
        ),
    )
    success_threshold: float = Field(
        0.5,
        gt=0,
        le=1,
        description=("Convergence: env steps until the held-out success curve first reaches this."),
    )
    heldout_checkpoints: int = Field(
        MIN_CHECKPOINTS,
        ge=1,
        description=(
            "Held-out evaluations at this many evenly spaced env-step checkpoints after step 0 (8 or more "
            "for the paper's figures)."
        ),
    )
    min_heldout_episodes: int = Field(
        64,
        ge=1,
        description=(
            "Each suite's held-out tasks x eval.episodes must reach this (64: a 10-point difference is "
            "distinguishable); a suite below it stops the bench naming it."
        ),
    )
    init_model: str | None = Field(
        None,
        description=(
            "A model directory every run starts from (e.g. from `spo3 sft`); `{suite}` and `{seed}` in it are "
            "replaced. Empty: a fresh `model_preset` model per seed, shared by the algorithms of that seed."
        ),
    )
    warm_start: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "suite -> its entry in `sft_config`: every run of the suite starts from `spo3 sft`'s model for its "
            "seed (the SFT -> RL pipeline), made on first need into OUT/sft/<suite>-s<seed> and shared by the "
            "algorithms of that seed. The entry's games must be the suite's."
        ),
    )
    sft_config: str = Field(
        "configs/sft.yaml", description="The warm starts' settings (`spo3 sft --config`)."
    )
    algo_settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description=(
            "algo -> {dotted.key: value} overrides for that algorithm's runs (the best settings of a sweep), "
            "e.g. {grpo: {learner.groups_per_update: 2}}."
        ),
    )
    variants: dict[str, list[dict[str, Any]]] = Field(
        default_factory=dict,
        description=(
            "algo -> [{dotted.key: value}, ...]: more settings of an algorithm, each run beside its default on every "
            'suite and seed and reported as its own row ("3spo novelty_use=order"), paired with the same seeds. '
            "A variant with the key `suites: [name, ...]` runs on those suites only (a diagnostic arm)."
        ),
    )
    curve_points: int = Field(
        32, ge=1, description="Points of the visited-state curve over the budget."
    )
    resamples: int = Field(
        10_000, ge=100, description="Bootstrap resamples of the paired intervals."
    )

    @model_validator(mode="after")
    def _known_algos(self) -> BenchConfig:
        for a in [*self.algos, *self.algo_settings, *self.variants]:
            if a not in ALGOS:
                raise ValueError(f"unknown algorithm {a!r}; known: {list(ALGOS)}")
        unknown = sorted(set(self.warm_start) - set(self.suites))
        if unknown:
            raise ValueError(
                f"warm_start names suite(s) {unknown} that are not in suites ({list(self.suites)})"
            )
        if self.warm_start and self.init_model:
            raise ValueError("give init_model or warm_start, not both")
        for algo, sets_list in self.variants.items():
            for sets in sets_list:
                only = sets.get("suites", [])
                if not isinstance(only, list) or not set(only) <= set(self.suites):
                    raise ValueError(
                        f"variant {variant_name(_settings_of(sets))} of {algo}: suites must be a "
                        f"list of this bench's suites ({list(self.suites)}), not {only!r}"
                    )
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> BenchConfig:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})

    def run_config(
        self,
        suite: str,
        algo: str,
        seed: int,
        out: Path,
        overrides: dict[str, Any] | None = None,
        variant: str = "default",
    ) -> TrainConfig:
        """The TrainConfig of one run: base, then the suite, then `algo_settings[algo]`, then `overrides`."""
        raw = _merge(copy.deepcopy(self.base), copy.deepcopy(self.suites[suite]))
        apply_sets(raw, self.algo_settings.get(algo, {}))
        apply_sets(raw, overrides or {})
        raw.setdefault("games", {})["seed"] = seed
        raw["games"].setdefault("cache_dir", str(out / "games" / suite))
        raw.update(
            algo=algo,
            name=f"{suite}-{algo}-{variant}-s{seed}",
            runs_dir=str(out / "runs"),
            heldout_checkpoints=self.heldout_checkpoints,
        )
        cfg = TrainConfig.model_validate(raw)
        episodes = cfg.eval.episodes * cfg.games.eval
        if episodes < self.min_heldout_episodes:
            raise ValueError(
                f"suite {suite}: {cfg.games.eval} held-out tasks x eval.episodes "
                f"{cfg.eval.episodes} = {episodes} episodes per checkpoint, fewer than "
                f"min_heldout_episodes {self.min_heldout_episodes}"
            )
        return cfg


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = (
            _merge(base.get(k) or {}, v)
            if isinstance(v, dict) and isinstance(base.get(k), dict)
            else v
        )
    return base


def apply_sets(raw: dict, sets: dict[str, Any]) -> dict:
    """Set dotted keys (`score.alpha`) in the nested settings dict `raw` (in place, and returned)."""
    for key, value in sets.items():
        *path, leaf = key.split(".")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{key}: {part!r} is not a section")
        node[leaf] = value
    return raw


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """["score.alpha=50", ...] (command line) -> {"score.alpha": 50}."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set wants KEY=VALUE (e.g. score.alpha=50), got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def select(
    bench: BenchConfig,
    suites: list[str] | None,
    algos: list[str] | None,
    seeds: list[int] | None,
    env_steps: int | None,
    time_limit_s: float | None,
    sets: list[str] | None = None,
) -> BenchConfig:
    """`bench` narrowed and overridden by command-line choices (unknown suite names are an error).
    `sets`: "dotted.key=value" overrides of every run's settings, e.g. "score.alpha=50"."""
    b = bench.model_copy(deep=True)
    for key, value in parse_sets(sets).items():
        for target in [b.base, *b.suites.values()]:  # suites that set the key would win over base
            node = target
            *path, leaf = key.split(".")
            for part in path:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ValueError(f"--set {key}: {part!r} is not a section")
            if target is b.base or leaf in node:
                node[leaf] = value
    if suites:
        unknown = [s for s in suites if s not in b.suites]
        if unknown:
            raise ValueError(f"unknown suite(s) {unknown}; the config has {list(b.suites)}")
        b.suites = {s: b.suites[s] for s in suites}
        b.warm_start = {s: e for s, e in b.warm_start.items() if s in b.suites}
    if algos:
        unknown = [a for a in algos if a not in b.algos]
        if unknown:
            raise ValueError(f"unknown algorithm(s) {unknown}; the config has {b.algos}")
        b.algos = algos
    if seeds:
        b.seeds = seeds
    for field, value in (("env_steps", env_steps), ("time_limit_s", time_limit_s)):
        if value:
            b.base[field] = value
            for s in b.suites.values():
                s.pop(field, None)
    return b


# --- sweeps ------------------------------------------------------------------------------------


class SweepConfig(BaseModel):
    """configs/bench-sweep.yaml: settings variants per algorithm, tuned on training suites."""

    model_config = ConfigDict(extra="forbid")
    config: str = Field(
        description="The bench config whose base and suites the sweep runs (e.g. configs/bench-v2.yaml)."
    )
    suites: list[str] = Field(
        description="Tuning suites (names in `config`); the bench reports held-out results "
        "on every suite, the choice is made on these and on training-time figures only."
    )
    seeds: list[int] = Field(
        default_factory=lambda: [100, 101],
        description=(
            "Seeds of the sweep (other than the bench's, so the bench's tasks are not tuned on)."
        ),
    )
    env_steps: int | None = Field(
        None, ge=1, description="Budget per sweep run (default: the suite's)."
    )
    heldout_checkpoints: int | None = Field(
        None,
        ge=1,
        description="Held-out checkpoints per sweep run "
        "(reported, not used to choose; default: the bench config's).",
    )
    mode: Literal["one-at-a-time", "grid"] = Field(
        "one-at-a-time",
        description=(
            "one-at-a-time: the default settings and each listed value of one key at a time; grid: every combination."
        ),
    )
    select_by: Literal["train_eval_success", "train_success", "visited_states"] = Field(
        "train_eval_success",
        description=(
            "Figure that picks an algorithm's best variant, from training tasks only: the last checkpoint's success on "
            "`train_eval_tasks` training tasks at evaluation temperature; training leaf success over the last quarter "
            "of the budget (comparable between variants of one algorithm only; 3SPO's search can win every task "
            "whatever the policy learnt); or visited (task, key) pairs."
        ),
    )
    train_eval_tasks: int = Field(
        16,
        ge=1,
        description=(
            "Training tasks each sweep run's last checkpoint is evaluated on (eval temperature, eval.episodes each) "
            "for select_by: train_eval_success."
        ),
    )
    grid: dict[str, dict[str, list[Any]]] = Field(description="algo -> {dotted.key: [values]}.")

    @model_validator(mode="after")
    def _known_algos(self) -> SweepConfig:
        unknown = [a for a in self.grid if a not in ALGOS]
        if unknown:
            raise ValueError(f"unknown algorithm(s) {unknown} in grid; known: {list(ALGOS)}")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepConfig:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})


def _numbers_alike(x: Any) -> Any:
    """Settings with ints as floats, so that `alpha: 1` and `alpha: 1.0` compare equal."""
    if isinstance(x, dict):
        return {k: _numbers_alike(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_numbers_alike(v) for v in x]
    return float(x) if isinstance(x, int) and not isinstance(x, bool) else x


def _settings_key(cfg: TrainConfig) -> str:
    """What a run's settings amount to: every default filled in (typed settings), numbers alike."""
    return json.dumps(_numbers_alike(cfg.model_dump(mode="json")), sort_keys=True)


def _settings_of(variant: dict[str, Any]) -> dict[str, Any]:
    """A bench variant's settings overrides: all of its keys but `suites` (where it runs)."""
    return {k: v for k, v in variant.items() if k != "suites"}


def variant_name(sets: dict[str, Any]) -> str:
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in sets.items()) or "default"


def sweep_variants(grid: dict[str, list[Any]], mode: str) -> list[dict[str, Any]]:
    """The override sets of one algorithm's sweep: {} (the defaults) first, then one key at a time
    (one-at-a-time) or every combination (grid)."""
    if mode == "grid":
        keys = list(grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    return [{}] + [{k: v} for k, values in grid.items() for v in values]


# --- one run: its files -> a RunResult ----------------------------------------------------------


def _jsonl(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if path.is_file()
        else []
    )


def read_run(
    run_dir: Path,
    *,
    suite: str,
    algo: str,
    seed: int,
    variant: str,
    budget: int,
    checkpoints: int,
    curve_points: int,
    settings: dict[str, Any],
) -> RunResult:
    """A finished `spo3 train` run directory (with held-out checkpoints) as a RunResult."""
    summary = json.loads((run_dir / "summary.json").read_text())
    held = json.loads((run_dir / "heldout.json").read_text())
    totals = json.loads((run_dir / "actor_totals.json").read_text())
    evals = held["evaluations"]
    stopped = bool(held.get("stopped_by_time_limit"))
    curve = held_out_curve(
        [(k["env_steps"], evals[str(k["version"])]["successes"]) for k in held["checkpoints"]],
        min_checkpoints=len(held["checkpoints"]) - 1 if stopped else checkpoints,
    )
    visits = visits_from_rollouts(_jsonl(run_dir / "visits.jsonl"))
    visited = visited_state_curve(visits, checkpoint_steps(budget, min(curve_points, budget)))
    learner_tokens = sum(int(h.get("tokens", 0)) for h in _jsonl(run_dir / "learner.jsonl"))
    return RunResult(
        suite=suite,
        algo=algo,
        seed=seed,
        variant=variant,
        settings=settings,
        visited_states=visited,
        held_out=curve,
        new_env_steps=int(totals.get("env_steps", summary["env_steps"])),
        replay_env_steps=int(totals.get("replay_steps", 0)),
        generated_tokens=int(totals.get("generated_tokens", 0)),
        learner_tokens=learner_tokens,
        updates=int(summary.get("policy_version") or 0),
        wall_time_s=float(summary.get("wall_time_s", 0.0)),
        budget=budget,
        stopped_by_time_limit=stopped,
        train_success=late_success(_jsonl(run_dir / "metrics.jsonl")),
        updates_at=[[int(k["env_steps"]), int(k["version"])] for k in held["checkpoints"]],
        train_eval_success=(held.get("train_eval") or {}).get("success"),
        actions_at_budget=evals[str(held["checkpoints"][-1]["version"])].get("actions", {}),
        eval_wall_s=float(held.get("eval_wall_s", 0.0)),
        eval_env_steps=int(held.get("eval_env_steps", 0)),
        run_dir=str(run_dir),
    )


def result_path(out: Path, suite: str, algo: str, variant: str, seed: int) -> Path:
    safe = variant.replace("/", "_").replace(" ", "")
    return out / "results" / suite / f"{algo}-{safe}-s{seed}.json"


def _comparable(
    settings: dict[str, Any],
    model: type[BaseModel] | None = None,
    ignore: tuple[str, ...] = ("time_limit_s", "runs_dir", "model"),
) -> dict[str, Any]:
    """Settings that must match for a recorded run (a `model`, TrainConfig by default) to stand for a
    planned one, with every default filled in (a record written when fewer settings were spelt out
    compares by what they amount to): not the `ignore`d keys, by default the time limit (it may change)
    and where files go (results copied into another --out stay valid). A record from before
    `games.seed_stride` generated its tasks at stride 1; what it amounts to is the first game seed, so
    a seed-0 record stands for a seed-0 run at any stride."""
    if isinstance(settings.get("games"), dict):
        settings = {**settings, "games": {"seed_stride": 1, **settings["games"]}}
    try:
        settings = (model or TrainConfig).model_validate(settings).model_dump(mode="json")
    except ValueError:
        pass  # compared as recorded: it differs from any plan, and the error names the keys
    out = {k: v for k, v in _numbers_alike(settings).items() if k not in ignore}
    if isinstance(out.get("games"), dict):
        games = {k: v for k, v in out["games"].items() if k not in ("cache_dir", "seed_stride")}
        games["first_game_seed"] = out["games"].get("seed", 0) * out["games"].get("seed_stride", 1)
        out["games"] = games
    return out


# --- running a plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One run of a plan (hashable: `overrides` is a tuple of (dotted key, value))."""

    suite: str
    algo: str
    seed: int
    variant: str = "default"
    overrides: tuple = ()


@dataclass(frozen=True)
class Shard:
    """The runs one invocation may start (`--suite/--algo/--seed`; an empty field: every one). Its
    report still covers every run of the plan recorded in OUT, so shards run one after another build
    one report."""

    suites: tuple[str, ...] = ()
    algos: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()

    def __contains__(self, p: Planned) -> bool:
        return (
            (not self.suites or p.suite in self.suites)
            and (not self.algos or p.algo in self.algos)
            and (not self.seeds or p.seed in self.seeds)
        )


def _model_for(
    bench: BenchConfig,
    cfg: TrainConfig,
    suite: str,
    seed: int,
    out: Path,
    say: Callable[[str], None] = lambda _: None,
) -> str:
    from spo3.app.model_init import init_model

    if suite in bench.warm_start:
        return str(warm_start_model(bench, cfg, suite, seed, out, say).resolve())
    if bench.init_model:
        path = Path(bench.init_model.format(suite=suite, seed=seed))
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"init_model {path} is not a model directory (no config.json)")
        return str(path.resolve())
    if cfg.model:
        return cfg.model
    model_dir = (
        out / "models" / f"{cfg.model_preset}-s{seed}"
    )  # one initial model per seed, shared by the algos
    if not (model_dir / "spo3_model.json").is_file():
        init_model(model_dir, cfg.model_preset, seed=seed)
    return str(model_dir.resolve())


def warm_start_config(
    bench: BenchConfig, cfg: TrainConfig, suite: str, seed: int, out: Path
) -> SftRunConfig:
    """The `spo3 sft` settings of (`suite`, `seed`): the suite's `sft_config` entry for that seed, writing
    to OUT/sft/<suite>-s<seed>, without evaluation (the bench measures step 0 itself). Stops when the
    entry's games or model preset are not the run's: its demos would come from other tasks."""
    from spo3.app.sft import suite_config, with_seed

    entry = bench.warm_start[suite]
    sft = with_seed(
        suite_config(
            bench.sft_config, entry, out=str(out / "sft" / f"{suite}-s{seed}"), eval_episodes=0
        ),
        seed,
    )
    fields = {
        "env",
        "kind",
        "train",
        "eval",
        "seed",
        "seed_stride",
        "settings",
        "tasks",
        "eval_tasks",
    }
    mine, theirs = cfg.games.model_dump(include=fields), sft.games.model_dump(include=fields)
    if mine != theirs:
        diff = sorted(k for k in fields if mine[k] != theirs[k])
        raise ValueError(
            f"warm_start: {bench.sft_config} entry {entry!r} has other games than suite {suite!r} ({diff})"
        )
    if sft.model_preset != cfg.model_preset:
        raise ValueError(
            f"warm_start: {bench.sft_config} entry {entry!r} starts from preset "
            f"{sft.model_preset!r}, suite {suite!r} from {cfg.model_preset!r}"
        )
    return sft.model_copy(
        update={"games": sft.games.model_copy(update={"cache_dir": cfg.games.cache_dir})}
    )


def warm_start_model(
    bench: BenchConfig,
    cfg: TrainConfig,
    suite: str,
    seed: int,
    out: Path,
    say: Callable[[str], None] = lambda _: None,
) -> Path:
    """The warm-started model of (`suite`, `seed`): OUT/sft/<suite>-s<seed>/model, made by `spo3 sft`
    (`warm_start_config`) unless a finished one is there (its sft.json is written last)."""
    import shutil

    from spo3.app.sft import SftRunConfig, run_sft

    sft = warm_start_config(bench, cfg, suite, seed, out)
    target = Path(sft.out)
    if (target / "sft.json").is_file():
        ignore = ("out", "note")  # where it was written, and free text
        made = _comparable(
            json.loads((target / "sft.json").read_text())["config"], SftRunConfig, ignore
        )
        wanted = _comparable(sft.model_dump(mode="json"), SftRunConfig, ignore)
        if made != wanted:
            diff = sorted(k for k in set(made) | set(wanted) if made.get(k) != wanted.get(k))
            raise ValueError(
                f"{target} was made with other settings ({diff}) than warm start {suite} seed {seed} "
                "wants; use another --out, or delete that folder to make it again"
            )
    else:
        shutil.rmtree(target, ignore_errors=True)  # a warm start cut short is made again whole
        say(
            f"warm start of {suite} seed {seed}: spo3 sft ({bench.sft_config} entry {bench.warm_start[suite]!r}) "
            f"-> {target}"
        )
        summary = run_sft(sft, progress=False, log=lambda _: None)
        say(
            f"warm start of {suite} seed {seed}: {summary['examples']} expert steps, loss {summary['loss_first']:.3f} "
            f"-> {summary['loss_last']:.3f}, {summary['seconds']:.0f} s"
        )
    return target / "model"


def run_plan(
    bench: BenchConfig,
    plan: list[Planned],
    out: Path,
    *,
    progress: bool = True,
    report_only: bool = False,
    shard: Shard = Shard(),
    console=None,
) -> tuple[dict[Planned, RunResult], list[dict]]:
    """Run every planned run of `shard` whose result file does not exist yet (none with `report_only`);
    returns the recorded results of the plan and the failures of this invocation. A failed run is
    logged to failures.jsonl and the next one starts; re-running retries it. A recorded run made with
    other settings stops the plan when it is in the shard (it would be resumed as this one) and is left
    out, named, when it is not."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from spo3.app.launcher import train

    out.mkdir(parents=True, exist_ok=True)
    cfgs = {
        p: bench.run_config(p.suite, p.algo, p.seed, out, dict(p.overrides), p.variant)
        for p in plan
    }
    done: dict[Planned, RunResult] = {}
    for p in plan:
        path = result_path(out, p.suite, p.algo, p.variant, p.seed)
        if path.is_file():
            r = RunResult.model_validate_json(path.read_text())
            planned = cfgs[p].model_dump(mode="json")
            if _comparable(r.settings) != _comparable(planned):
                diff = sorted(
                    k for k in set(planned) | set(r.settings) if planned.get(k) != r.settings.get(k)
                )
                if p in shard:
                    raise ValueError(
                        f"{path} was recorded with other settings ({diff}); use another --out, "
                        "or delete that file to run it again"
                    )
                if console is not None:
                    console.print(
                        f"left out of the report: {path} (recorded with other settings: {diff})"
                    )
                continue
            done[p] = r
    todo = [] if report_only else [p for p in plan if p not in done and p in shard]
    failures: list[dict] = []
    total_steps = sum(cfgs[p].env_steps for p in todo)
    eta = {"text": "ETA: after the first run"}
    columns = [
        TextColumn("[bold]bench"),
        BarColumn(),
        TextColumn("{task.fields[runs]}"),
        TextColumn("{task.completed:,}/{task.total:,} env steps"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[eta]}"),
    ]
    with Progress(
        *columns, console=console, disable=not progress or not todo, refresh_per_second=2
    ) as bar:
        task = bar.add_task("bench", total=max(total_steps, 1), runs="", info="", eta=eta["text"])
        finished_steps, spent_s = 0, 0.0
        for i, p in enumerate(todo):
            cfg = cfgs[p]
            label = f"{p.suite} {p.algo}{'' if p.variant == 'default' else ' ' + p.variant} seed {p.seed}"
            bar.update(task, runs=f"run {i + 1}/{len(todo)} ({len(done)} recorded)", info=label)
            t0 = time.monotonic()
            try:
                cfg.model = _model_for(bench, cfg, p.suite, p.seed, out, bar.console.print)
                run_dir = train(
                    cfg,
                    progress=False,
                    on_tick=lambda s, base=finished_steps, c=cfg: bar.update(
                        task, completed=base + min(s["env_steps"], c.env_steps)
                    ),
                )
                result = read_run(
                    run_dir,
                    suite=p.suite,
                    algo=p.algo,
                    seed=p.seed,
                    variant=p.variant,
                    budget=cfg.env_steps,
                    checkpoints=cfg.heldout_checkpoints,
                    curve_points=bench.curve_points,
                    settings=cfg.model_dump(mode="json"),
                )
            except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
                failure = {
                    "suite": p.suite,
                    "algo": p.algo,
                    "seed": p.seed,
                    "variant": p.variant,
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()[-4000:],
                    "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
                failures.append(failure)
                with (out / "failures.jsonl").open("a") as f:
                    f.write(json.dumps(failure) + "\n")
                bar.console.print(f"[red]FAILED[/] {label}: {failure['error']}")
            else:
                path = result_path(out, p.suite, p.algo, p.variant, p.seed)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(result.model_dump_json(indent=1))
                tmp.replace(path)  # a run is recorded whole or not at all
                done[p] = result
                f = run_figures(result, bench.success_threshold)
                bar.console.print(
                    f"{label}: held-out {result.held_out[0][1]:.0%} -> {f['final_success']:.0%} "
                    f"({int(result.held_out[-1][2])} episodes), {f['visited_states']:.0f} visited states, "
                    f"{result.updates} updates, train {result.wall_time_s:.0f} s + eval {result.eval_wall_s:.0f} s"
                    + (" [yellow](time limit)" if result.stopped_by_time_limit else "")
                )
            finished_steps += cfg.env_steps
            spent_s += time.monotonic() - t0
            left = total_steps - finished_steps
            eta["text"] = (
                f"ETA {time.strftime('%H:%M:%S', time.gmtime(spent_s / finished_steps * left))}"
            )
            bar.update(task, completed=finished_steps, eta=eta["text"])
    return done, failures


# --- reports -------------------------------------------------------------------------------------

TABLE = [  # (figure, column title, format, scale)
    ("initial_success", "held-out at step 0", "{:.1%}", 1),
    ("final_success", "held-out at budget", "{:.1%}", 1),
    ("success_auc", "held-out AUC", "{:.3f}", 1),
    ("steps_to_threshold", "steps to threshold", "{:,.0f}", 1),
    ("visited_states", "visited (task, key)", "{:,.0f}", 1),
    ("replay_per_new_step", "replay / new step", "{:.2f}", 1),
    ("generated_tokens", "generated tokens", "{:,.0f}", 1),
    ("learner_tokens", "learner tokens", "{:,.0f}", 1),
    ("updates", "updates", "{:.1f}", 1),
]

COMPARISON_TITLES = {
    ("final_success", "difference"): (
        "held-out success at budget, ours - theirs",
        "{:+.1f} points",
        100,
    ),
    ("success_auc", "difference"): ("held-out AUC, ours - theirs", "{:+.3f}", 1),
    ("visited_states", "ratio"): ("visited (task, key) pairs, ours / theirs", "{:.2f}x", 1),
    ("visited_states", "difference"): ("visited (task, key) pairs, ours - theirs", "{:+,.0f}", 1),
    ("steps_to_threshold", "ratio"): ("env steps to threshold, theirs / ours", "{:.2f}x", 1),
}


def _fmt(fmt: str, v: float | None, scale: float = 1) -> str:
    return "inf" if v is None else fmt.format(v * scale)


def _cell(stats: dict, fmt: str) -> str:
    if stats["mean"] is None:
        return "n/a"
    text = fmt.format(stats["mean"])
    if stats["n"] > 1:
        text += " ± " + fmt.format(stats["std"]).lstrip("+")
    return text


def build_results(bench: BenchConfig, runs: list[RunResult]) -> dict:
    """results.json: the bench's settings, every run, and per suite the table and the paired intervals."""

    def dumped(comps: dict) -> dict:
        return {
            base: {
                fig: {k: (iv.model_dump() if iv else None) for k, iv in kinds.items()}
                for fig, kinds in figs.items()
            }
            for base, figs in comps.items()
        }

    suites = {}
    for suite in dict.fromkeys(r.suite for r in runs):
        rs = [r for r in runs if r.suite == suite]
        ours = list(dict.fromkeys(arm(r.algo, r.variant) for r in rs if r.algo == "3spo"))
        comps = {
            o: dumped(
                suite_comparisons(rs, bench.success_threshold, ours=o, resamples=bench.resamples)
            )
            for o in ours
        }
        suites[suite] = {
            "budget": rs[0].budget,
            "checkpoints": [int(p[0]) for p in rs[0].held_out],
            "table": suite_table(rs, bench.success_threshold),
            "comparisons": comps.pop("3spo", {}),
            "variant_comparisons": comps,
        }
    return {
        "format": FORMAT,
        "algos": bench.algos,
        "seeds": bench.seeds,
        "arms": list(dict.fromkeys(arm(r.algo, r.variant) for r in runs)),
        "success_threshold": bench.success_threshold,
        "heldout_checkpoints": bench.heldout_checkpoints,
        "suites": suites,
        "runs": [r.model_dump() for r in runs],
    }


def per_seed_table(runs: list[dict]) -> list[str]:
    """One suite's runs as arm x seed: held-out success at step 0 -> at the budget, and the
    number of updates (single runs, for reading the spread the means hide)."""
    seeds = sorted({r["seed"] for r in runs})
    cells: dict[str, dict[int, str]] = {}
    for r in runs:
        held = r["held_out"]
        cells.setdefault(arm(r["algo"], r["variant"]), {})[r["seed"]] = (
            f"{held[0][1]:.1%} -> {held[-1][1]:.1%} ({r['updates']})"
        )
    lines = [
        "Per seed, held-out success at step 0 -> at the budget (updates):",
        "",
        "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---" * (len(seeds) + 1) + "|",
    ]
    for name, by_seed in cells.items():
        lines.append(f"| {name} | " + " | ".join(by_seed.get(s, "-") for s in seeds) + " |")
    return [*lines, ""]


def markdown(results: dict) -> str:
    thr = results["success_threshold"]
    lines = [
        f"# spo3-bench: {', '.join(results['algos'])}, paired seeds {results['seeds']}",
        "",
        f"mean ± std over seeds. Held-out success: the same held-out tasks for every algorithm of a seed, at "
        f"{results['heldout_checkpoints']} env-step checkpoints after step 0; steps to threshold: the first "
        f"checkpoint at >= {thr:.0%} (runs that never reach it are left out of its mean and counted). "
        "Visited (task, key): unique pairs stepped into at the budget, counted alike for every algorithm. "
        "Intervals: percentile bootstrap 95% over paired seeds.",
        "",
    ]
    lines += targets_table(results)
    for suite, data in results["suites"].items():
        table = data["table"]
        lines += [
            f"## {suite} ({data['budget']:,} env steps per run, held-out at {data['checkpoints']})",
            "",
            "| algo | runs | " + " | ".join(t for _, t, _, _ in TABLE) + " |",
            "|---" * (len(TABLE) + 2) + "|",
        ]
        for algo, row in table.items():
            cells = []
            for key, _, fmt, _ in TABLE:
                c = _cell(row[key], fmt)
                if key == "steps_to_threshold":
                    c += f" (reached {row[key]['n']}/{row['runs']}"
                    c += (
                        f", {row['threshold_met_at_start']} at start)"
                        if row["threshold_met_at_start"]
                        else ")"
                    )
                cells.append(c)
            runs = f"{row['runs']}" + (
                f" ({row['stopped_by_time_limit']} hit the time limit)"
                if row["stopped_by_time_limit"]
                else ""
            )
            lines.append(f"| {algo} | {runs} | " + " | ".join(cells) + " |")
        lines.append("")
        acted = {
            algo: row["actions_at_budget"]
            for algo, row in table.items()
            if row.get("actions_at_budget")
        }
        if acted:
            lines += ["Held-out actions at the budget, by verb (mean share over runs):", ""]
            lines += [
                f"- {algo}: " + ", ".join(f"{v} {p:.0%}" for v, p in list(shares.items())[:6])
                for algo, shares in acted.items()
            ]
            lines.append("")
        lines += per_seed_table([r for r in results["runs"] if r["suite"] == suite])
        for ours, comparisons in [
            ("3spo", data["comparisons"]),
            *data.get("variant_comparisons", {}).items(),
        ]:
            if not comparisons:
                continue
            lines += [
                f"| {ours} vs | figure | estimate | 95% interval | seed pairs | no difference? |",
                "|---|---|---|---|---|---|",
            ]
            for base, figs in comparisons.items():
                for fig, kinds in figs.items():
                    for kind, iv in kinds.items():
                        title, fmt, scale = COMPARISON_TITLES[(fig, kind)]
                        if iv is None:
                            lines.append(
                                f"| {base} | {title} | n/a | fewer than 2 seed pairs | | |"
                            )
                            continue
                        verdict = (
                            "**includes no difference**"
                            if iv["includes_no_difference"]
                            else "excludes it"
                        )
                        lines.append(
                            f"| {base} | {title} | {_fmt(fmt, iv['estimate'], scale)} | "
                            f"[{_fmt(fmt, iv['low'], scale)}, {_fmt(fmt, iv['high'], scale)}] | "
                            f"{iv['pairs']} | {verdict} |"
                        )
            lines.append("")
        lines += [
            cost_line([r for r in results["runs"] if r["suite"] == suite]),
            "",
            f"![{suite}]({suite}.png)",
            "",
        ]
    return "\n".join(lines)


TARGETS = (  # the paper's claims, as the project states them: (baseline, figure, kind, bound, what it says)
    ("grpo", "visited_states", "ratio", 2.4, "visited pairs >= 2.4x GRPO's"),
    (
        "grpo",
        "steps_to_threshold",
        "ratio",
        1.8,
        ">= 1.8x fewer env steps to the threshold than GRPO",
    ),
    ("grpo", "final_success", "difference", 0.0, "final held-out success above GRPO's"),
    ("gigpo", "final_success", "difference", 0.0, "final held-out success above GiGPO's"),
)


def target_verdict(iv: dict | None, bound: float) -> str:
    """met: the whole 95% interval is above `bound`; not met: it is below or at it; open: it straddles."""
    if iv is None:
        return "n/a (fewer than 2 seed pairs)"
    if iv["low"] is not None and iv["low"] > bound:
        return "**met**"
    if iv["high"] is not None and iv["high"] <= bound:
        return "not met"
    return "open (the interval includes it)"


def targets_table(results: dict) -> list[str]:
    """Markdown lines: per suite and target, 3SPO's paired estimate, its 95% interval and the verdict."""
    rows = []
    for suite, data in results["suites"].items():
        arms = [("3spo", data["comparisons"]), *data.get("variant_comparisons", {}).items()]
        for (ours, comparisons), (base, fig, kind, bound, what) in itertools.product(arms, TARGETS):
            if ours != "3spo" and not comparisons:
                continue
            iv = ((comparisons or {}).get(base) or {}).get(fig, {}).get(kind)
            _, fmt, scale = COMPARISON_TITLES[(fig, kind)]
            value = (
                "n/a"
                if iv is None
                else (
                    f"{_fmt(fmt, iv['estimate'], scale)} [{_fmt(fmt, iv['low'], scale)}, "
                    f"{_fmt(fmt, iv['high'], scale)}], {iv['pairs']} pairs"
                )
            )
            verdict = target_verdict(iv, bound)
            if iv is None and fig == "steps_to_threshold":
                verdict = "n/a (fewer than 2 seed pairs in which both reached the threshold)"
            rows.append(f"| {suite} | {ours} | {what} | {value} | {verdict} |")
    if not rows:
        return []
    return [
        "## The paper's targets, per suite",
        "",
        "3SPO against the baseline over paired seeds; a target is met when the whole 95% interval is beyond it.",
        "",
        "| suite | 3SPO | target | estimate [95% interval] | verdict |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def cost_line(runs: list[dict]) -> str:
    """What a suite's recorded runs cost in wall time: training + held-out evaluation, in all and per
    arm (algorithm, and variant unless the default; mean per run). The runs' own records; not the
    set-up between runs."""
    train = sum(r["wall_time_s"] for r in runs)
    evaluation = sum(r.get("eval_wall_s") or 0.0 for r in runs)
    per = []
    by_arm: dict[str, list[dict]] = {}
    for r in runs:
        by_arm.setdefault(arm(r["algo"], r.get("variant", "default")), []).append(r)
    for name, rs in by_arm.items():
        t = sum(r["wall_time_s"] for r in rs) / len(rs)
        e = sum(r.get("eval_wall_s") or 0.0 for r in rs) / len(rs)
        per.append(f"{name} {t:.0f} s + {e:.0f} s")
    return (
        f"Cost: {len(runs)} runs, training {train / 60:.1f} min + held-out evaluation {evaluation / 60:.1f} min "
        f"= {(train + evaluation) / 60:.1f} min (per run, training + evaluation: {'; '.join(per)})."
    )


def plot_suite(path: Path, suite: str, runs: list[RunResult]) -> None:
    """Held-out success and visited (task, key) pairs against env steps: per arm (algorithm, and variant
    unless the default) the mean over seeds and its bootstrap 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_h, ax_v, ax_u) = plt.subplots(1, 3, figsize=(16, 4))
    for algo in dict.fromkeys(arm(r.algo, r.variant) for r in runs):
        rs = [r for r in runs if arm(r.algo, r.variant) == algo]
        for ax, curves in (
            (ax_h, [r.held_out for r in rs]),
            (ax_v, [r.visited_states for r in rs]),
        ):
            grid = sorted({int(p[0]) for c in curves for p in c})
            band = curve_band(curves, grid)
            (line,) = ax.plot(
                band["steps"],
                band["mean"],
                marker="o" if ax is ax_h else None,
                ms=3,
                label=f"{algo} ({len(rs)})",
            )
            ax.fill_between(band["steps"], band["low"], band["high"], alpha=0.2)
        # against updates every run is its own line: runs of one arm differ in how many updates they made
        for i, r in enumerate(r for r in rs if len(r.updates_at) == len(r.held_out)):
            ax_u.plot(
                [u for _, u in r.updates_at],
                [p[1] for p in r.held_out],
                color=line.get_color(),
                marker="o",
                ms=2,
                lw=0.8,
                alpha=0.7,
                label=algo if i == 0 else None,
            )
    ax_h.set(
        title=f"{suite}: held-out success", xlabel="env steps", ylabel="success", ylim=(-0.02, 1.02)
    )
    ax_v.set(title=f"{suite}: visited (task, key) pairs", xlabel="env steps", ylabel="pairs")
    ax_u.set(
        title=f"{suite}: held-out success against updates",
        xlabel="learner updates (policy version)",
        ylabel="success",
        ylim=(-0.02, 1.02),
    )
    for ax in (ax_h, ax_v):
        ax.legend(title="mean, 95% band")
    if ax_u.lines:
        ax_u.legend(title="one line per run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(bench: BenchConfig, runs: list[RunResult], out: Path) -> dict:
    results = build_results(bench, runs)
    for suite in results["suites"]:
        plot_suite(out / f"{suite}.png", suite, [r for r in runs if r.suite == suite])
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text(markdown(results))
    return results


def bench_plan(bench: BenchConfig) -> list[Planned]:
    """Every run of a bench: per suite and seed, each algorithm with its default settings and then with
    each of its `variants` (those restricted to some `suites` on those only)."""
    return [
        Planned(
            suite=s,
            algo=a,
            seed=seed,
            variant=variant_name(_settings_of(sets)),
            overrides=tuple(_settings_of(sets).items()),
        )
        for s in bench.suites
        for seed in bench.seeds
        for a in bench.algos
        for sets in [{}, *bench.variants.get(a, [])]
        if s in sets.get("suites", [s])
    ]


def run_bench(
    bench: BenchConfig,
    out: Path,
    *,
    shard: Shard = Shard(),
    progress: bool = True,
    report_only: bool = False,
) -> dict:
    """Run every (suite, seed, algo) of `shard` not yet recorded in `out` (none with `report_only`),
    then write results.json, summary.md and the plots from every recorded run of the plan. The result
    has "failed": the runs that failed in this invocation."""
    from rich.console import Console

    console = Console()
    plan = bench_plan(bench)
    done, failures = run_plan(
        bench, plan, out, progress=progress, report_only=report_only, shard=shard, console=console
    )
    runs = [done[p] for p in plan if p in done]
    results = write_report(bench, runs, out) if runs else {"suites": {}, "runs": []}
    if runs:
        console.print(markdown(results), markup=False, highlight=False)
    unrun = sum(p in shard and p not in done for p in plan)
    if unrun and not report_only:
        console.print(
            f"{unrun} of this invocation's runs are not recorded in {out} (re-run the same command "
            "to resume)"
        )
    if len(runs) < len(plan):
        console.print(
            f"the report covers the {len(runs)} of {len(plan)} planned runs recorded in {out}"
        )
    results["failed"] = failures
    return results


def run_sweep(
    sweep: SweepConfig,
    out: Path,
    *,
    algos: list[str] | None = None,
    seeds: list[int] | None = None,
    suites: list[str] | None = None,
    progress: bool = True,
    report_only: bool = False,
) -> dict:
    """Every variant of every algorithm on the tuning suites; the best variant per algorithm by
    `select_by` (training-time figures only); sweep.json and sweep.md with the held-out figures reported."""
    from rich.console import Console

    console = Console()
    bench = BenchConfig.from_yaml(sweep.config)
    unknown_algos = [a for a in algos or [] if a not in sweep.grid]
    if unknown_algos:
        raise ValueError(
            f"--algo {unknown_algos}: the sweep has no grid for it ({list(sweep.grid)})"
        )
    if report_only:  # a report of what the filters name
        tuning, seeds, algos, shard = (
            suites or sweep.suites,
            seeds or sweep.seeds,
            algos or list(sweep.grid),
            Shard(),
        )
    else:  # run what the filters name; report every recorded run of the sweep
        shard = Shard(tuple(suites or ()), tuple(algos or ()), tuple(seeds or ()))
        tuning = list(dict.fromkeys([*sweep.suites, *(suites or [])]))
        seeds, algos = sorted({*sweep.seeds, *(seeds or [])}), list(sweep.grid)
    unknown = [s for s in tuning if s not in bench.suites]
    if unknown:
        raise ValueError(
            f"sweep suite(s) {unknown} are not in {sweep.config} ({list(bench.suites)})"
        )
    bench = select(bench, tuning, None, seeds, sweep.env_steps, None)
    if sweep.heldout_checkpoints:
        bench.heldout_checkpoints = sweep.heldout_checkpoints
    # Each variant changes one setting of the bench's own (its algo_settings included), so that "default"
    # is what the bench runs now and the block the sweep prints replaces it whole.
    bench.variants = {}
    if (
        sweep.select_by == "train_eval_success"
    ):  # an evaluation on training tasks only when it chooses
        bench.base["train_eval_tasks"] = sweep.train_eval_tasks
    plan: list[Planned] = []
    variants: dict[str, dict[str, dict[str, Any]]] = {}
    for algo in algos:
        seen: dict[str, str] = {}
        for sets in sweep_variants(sweep.grid[algo], sweep.mode):
            name = variant_name(sets)
            # a variant equal to the defaults (a listed value that is the default) is run once
            key = _settings_key(bench.run_config(tuning[0], algo, 0, out, sets))
            if key in seen:
                continue
            seen[key] = name
            variants.setdefault(algo, {})[name] = sets
            plan += [
                Planned(suite=s, algo=algo, seed=seed, variant=name, overrides=tuple(sets.items()))
                for s in tuning
                for seed in bench.seeds
            ]
    done, failures = run_plan(
        bench, plan, out, progress=progress, report_only=report_only, shard=shard, console=console
    )
    report: dict[str, Any] = {
        "format": FORMAT + "-sweep",
        "config": sweep.config,
        "suites": tuning,
        "seeds": bench.seeds,
        "select_by": sweep.select_by,
        "algos": {},
    }
    for algo, vs in variants.items():
        rows, table = {}, {}
        for name, sets in vs.items():
            rs = [done[p] for p in plan if p.algo == algo and p.variant == name and p in done]
            figs = [run_figures(r, bench.success_threshold) for r in rs]
            rows[name] = [f[sweep.select_by] for f in figs]
            table[name] = {
                "settings": sets,
                "runs": len(rs),
                "select_by": mean_std(rows[name]),
                **{
                    k: mean_std(f[k] for f in figs)
                    for k in ("final_success", "success_auc", "visited_states", "updates")
                },
            }
        best = best_variant(rows)
        report["algos"][algo] = {
            "variants": table,
            "best": best,
            "best_settings": vs.get(best, {}) if best else None,
        }
    settings = {a: dict(sets) for a, sets in bench.algo_settings.items()}  # what the bench runs now
    for algo, d in report["algos"].items():
        settings[algo] = {**settings.get(algo, {}), **(d["best_settings"] or {})}
    report["algo_settings"] = {a: sets for a, sets in settings.items() if sets}
    report["failed"] = failures
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(report, indent=1))
    (out / "sweep.md").write_text(sweep_markdown(report))
    console.print(sweep_markdown(report), markup=False, highlight=False)
    return report


def sweep_markdown(report: dict) -> str:
    lines = [
        f"# spo3-bench sweep on {', '.join(report['suites'])} (seeds {report['seeds']})",
        "",
        f"Chosen by `{report['select_by']}` (training-time, mean over suites and seeds); held-out figures "
        "are reported, not used to choose.",
        "",
    ]
    for algo, d in report["algos"].items():
        lines += [
            f"## {algo}: " + (f"best `{d['best']}`" if d["best"] else "no runs recorded yet"),
            "",
            f"| variant | runs | {report['select_by']} | held-out at budget | held-out AUC | visited | updates |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, row in d["variants"].items():
            mark = " **(best)**" if name == d["best"] else ""
            lines.append(
                f"| {name}{mark} | {row['runs']} | {_cell(row['select_by'], '{:.3f}')} | "
                f"{_cell(row['final_success'], '{:.1%}')} | {_cell(row['success_auc'], '{:.3f}')} | "
                f"{_cell(row['visited_states'], '{:,.0f}')} | {_cell(row['updates'], '{:.1f}')} |"
            )
        lines.append("")
    lines += [
        "Put into the bench config:",
        "",
        "```yaml",
        yaml.safe_dump({"algo_settings": report["algo_settings"]}, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def now_tag() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def bench_settings_check(bench: BenchConfig) -> None:
    """Every run a `spo3-bench` would make validates (a `--set` or YAML typo names its key) before
    the first run starts."""
    for suite in bench.suites:
        for algo in bench.algos:
            for seed in bench.seeds:
                bench.run_config(suite, algo, seed, Path("bench-results"))
