"""`spo3 bench`: 3SPO, GRPO and GiGPO side by side on the same env-step budget.

    for suite in suites:             (TextWorld coin/treasure/cooking, TextWorld-Express, ALFWorld...)
      for seed in seeds:             (one initial model and one task split per seed)
        for algo in algos:           (3spo, grpo, gigpo)
          spo3 train on that suite   (the same single-machine system as `make demo`)
    -> results.json (one record per run), summary.md (a table per suite: mean ± std over seeds,
       and the ratios behind the paper's claims), one plot per suite (curves averaged over seeds)

Every run gets the same budget of new environment steps (and the same time limit as a guard);
replayed steps that restore a node do not count, as in the paper's accounting.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from services.app.launcher import TrainConfig


class BenchConfig(BaseModel):
    """configs/bench.yaml: the run settings every suite starts from, then the suites."""

    model_config = ConfigDict(extra="forbid")
    base: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields shared by every run.")
    suites: dict[str, dict[str, Any]] = Field(default_factory=dict, description=(
        "name -> TrainConfig fields merged over `base` (at least `games`)."))
    algos: list[str] = Field(default_factory=lambda: ["3spo", "grpo", "gigpo"])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    success_threshold: float = Field(0.5, gt=0, le=1, description=(
        "Convergence: env steps until the training success rate over the last `window` leaves first "
        "reaches this."))
    window: int = Field(32, ge=1, description="Leaves in the rolling training success rate.")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "BenchConfig":
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})

    def run_config(self, suite: str, algo: str, seed: int, out: Path) -> TrainConfig:
        raw = _merge(copy.deepcopy(self.base), self.suites[suite])
        raw.setdefault("games", {})["seed"] = seed
        raw["games"].setdefault("cache_dir", str(out / "games" / suite))
        raw.update(algo=algo, name=f"{suite}-{algo}-s{seed}", runs_dir=str(out / "runs"))
        return TrainConfig.model_validate(raw)


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base.get(k) or {}, v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


# --- per-run figures (pure: from a run's metrics snapshots) ----------------------------------

def steps_to_threshold(snaps: list[dict], threshold: float, window: int) -> int | None:
    """Env steps at the first snapshot where the success rate of the last >= `window` leaves
    reached `threshold` (None: never within the budget)."""
    j = 0
    for s in snaps:
        while j + 1 < len(snaps) and s["leaves"] - snaps[j + 1]["leaves"] >= window:
            j += 1
        leaves = s["leaves"] - snaps[j]["leaves"]
        if leaves >= window and (s["successes"] - snaps[j]["successes"]) / leaves >= threshold:
            return s["env_steps"]
    return None


def run_figures(run_dir: Path, threshold: float, window: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    snaps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = max(summary["env_steps"], 1)
    last = snaps[-1] if snaps else {}
    # Small games run out of new states before the budget does: the first half shows the pace.
    half = next((x for x in snaps if x["env_steps"] >= steps / 2), last)
    return {
        "final_success": summary["held_out_success_after"],
        "initial_success": summary["held_out_success_before"],
        "train_success": last.get("successes", 0) / max(last.get("leaves", 0), 1),
        "unique_states_per_1k": 1000 * summary["unique_states"] / steps,
        "unique_states_per_1k_half": 1000 * half.get("unique_states", 0) / max(half.get("env_steps", 0), 1),
        "steps_to_threshold": steps_to_threshold(snaps, threshold, window),
        "generated_tokens": summary["generated_tokens"],
        "wall_time_s": summary["wall_time_s"],
        "env_steps": summary["env_steps"],
        "updates": summary["policy_version"],
        "curve": [(s["env_steps"], s["leaves"], s["successes"], s["unique_states"]) for s in snaps],
        "diagnostics": summary.get("diagnostics"),  # the DFS diagnostics (services.app.report.diagnostics)
    }


# --- aggregation ---------------------------------------------------------------------------

FIGURES = [  # (key, column title, format)
    ("final_success", "held-out success", "{:.1%}"),
    ("unique_states_per_1k", "unique states / 1k steps", "{:.1f}"),
    ("unique_states_per_1k_half", "... in the first half", "{:.1f}"),
    ("steps_to_threshold", "steps to threshold", "{:,.0f}"),
    ("generated_tokens", "generated tokens", "{:,.0f}"),
    ("wall_time_s", "wall time s", "{:.0f}"),
]


def mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and standard deviation of the values that exist, and how many exist."""
    vs = [v for v in values if v is not None]
    if not vs:
        return None, None, 0
    return statistics.fmean(vs), (statistics.stdev(vs) if len(vs) > 1 else 0.0), len(vs)


def suite_table(records: list[dict], algos: list[str]) -> dict[str, dict[str, tuple]]:
    """algo -> figure -> (mean, std, runs that have the figure, runs)."""
    out: dict[str, dict[str, tuple]] = {}
    for algo in algos:
        rs = [r for r in records if r["algo"] == algo]
        out[algo] = {k: (*mean_std([r[k] for r in rs]), len(rs)) for k, _, _ in FIGURES}
    return out


def claim_ratios(table: dict[str, dict[str, tuple]], ours: str = "3spo") -> dict[str, dict[str, float | None]]:
    """The paper's three claims against each baseline, from the per-suite means:
    exploration = unique states per 1k steps, ours / theirs (paper: 2.4x vs GRPO), over the whole
    budget and over its first half;
    convergence = steps to threshold, theirs / ours (paper: 1.8x vs GRPO; None when either
    side never reached the threshold); success = held-out success, ours - theirs (points)."""
    out = {}
    for base in table:
        if base == ours:
            continue
        a, b = table[ours], table[base]
        ua, ub = a["unique_states_per_1k"][0], b["unique_states_per_1k"][0]
        ha, hb = a["unique_states_per_1k_half"][0], b["unique_states_per_1k_half"][0]
        sa, sb = a["steps_to_threshold"][0], b["steps_to_threshold"][0]
        fa, fb = a["final_success"][0], b["final_success"][0]
        out[base] = {
            "reached": (a["steps_to_threshold"][2], b["steps_to_threshold"][2], a["steps_to_threshold"][3]),
            "exploration": ua / ub if ua is not None and ub else None,
            "exploration_half": ha / hb if ha is not None and hb else None,
            "convergence": sb / sa if sa and sb else None,
            "success_points": 100 * (fa - fb) if fa is not None and fb is not None else None,
        }
    return out


def _cell(stats: tuple, fmt: str) -> str:
    mean, std, have, runs = stats
    if mean is None:
        return f"not reached (0/{runs})"
    text = f"{fmt.format(mean)} ± {fmt.format(std).rstrip('%')}" if runs > 1 else fmt.format(mean)
    return text + (f" ({have}/{runs} reached)" if have < runs else "")


def markdown(results: dict) -> str:
    lines = [f"# spo3 bench: {', '.join(results['algos'])}, seeds {results['seeds']}", "",
             f"mean ± std over seeds. Steps to threshold: env steps until the training success rate over "
             f"the last {results['window']} leaves first reached {results['success_threshold']:.0%}.", ""]
    for suite, data in results["suites"].items():
        lines += [f"## {suite} ({data['budget']:,} env steps per run)", "", "| algo | " + " | ".join(t for _, t, _ in FIGURES) + " |",
                  "|---" * (len(FIGURES) + 1) + "|"]
        for algo, figs in data["table"].items():
            lines.append(f"| {algo} | " + " | ".join(_cell(figs[k], f) for k, _, f in FIGURES) + " |")
        lines.append("")
        for base, r in data["ratios"].items():
            parts = [(f"exploration {r['exploration']:.2f}x" if r["exploration"] is not None else "exploration n/a")
                     + (f" ({r['exploration_half']:.2f}x in the first half)" if r.get("exploration_half") else ""),
                     (f"convergence {r['convergence']:.2f}x" if r["convergence"] is not None else "convergence n/a")
                     + " (threshold reached in {}/{} vs {}/{} runs)".format(r["reached"][0], r["reached"][2],
                                                                         r["reached"][1], r["reached"][2]),
                     f"success {r['success_points']:+.1f} points" if r["success_points"] is not None else "success n/a"]
            lines.append(f"- 3SPO vs {base}: " + ", ".join(parts))
        lines += ["", f"![{suite}]({suite}.png)", ""]
    return "\n".join(lines)


def plot_suite(path: Path, suite: str, records: list[dict], algos: list[str], window: int) -> None:
    """Training success rate and unique states against env steps, averaged over seeds per algo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_s, ax_u) = plt.subplots(1, 2, figsize=(11, 4))
    for algo in algos:
        rs = [r for r in records if r["algo"] == algo and r["curve"]]
        if not rs:
            continue
        grid = np.linspace(0, max(r["curve"][-1][0] for r in rs), 30)
        succ, uniq = [], []
        for r in rs:
            steps, leaves, wins, states = (np.array(c, dtype=float) for c in zip(*r["curve"]))
            # success of the leaves finished in each stretch of the grid (rolling, as in training)
            lv, wn = np.interp(grid, steps, leaves), np.interp(grid, steps, wins)
            lo = np.interp(grid - grid[-1] / 10, steps, leaves, left=0), np.interp(grid - grid[-1] / 10, steps, wins, left=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                succ.append(np.where(lv - lo[0] > 0, (wn - lo[1]) / (lv - lo[0]), np.nan))
            uniq.append(np.interp(grid, steps, states))
        m = np.nanmean(np.array(succ), axis=0)
        ax_s.plot(grid, m, label=algo)
        u = np.array(uniq)
        ax_u.plot(grid, u.mean(axis=0), label=algo)
        ax_u.fill_between(grid, u.min(axis=0), u.max(axis=0), alpha=0.15)
    ax_s.set(title=f"{suite}: training success (last 10% of steps)", xlabel="env steps", ylabel="success rate",
             ylim=(-0.02, 1.02))
    ax_u.set(title=f"{suite}: unique states (band: min-max over seeds)", xlabel="env steps", ylabel="states")
    for ax in (ax_s, ax_u):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize(bench: BenchConfig, records: list[dict], budgets: dict[str, int]) -> dict:
    """Tables and ratios per suite; `budgets`: the env-step budget of each suite's runs."""
    suites = {}
    for suite in dict.fromkeys(r["suite"] for r in records):
        rs = [r for r in records if r["suite"] == suite]
        table = suite_table(rs, [a for a in bench.algos if any(r["algo"] == a for r in rs)])
        suites[suite] = {"table": table, "ratios": claim_ratios(table) if "3spo" in table else {},
                         "budget": budgets.get(suite, 0)}
    return {"algos": bench.algos, "seeds": bench.seeds,
            "success_threshold": bench.success_threshold, "window": bench.window, "suites": suites}


def run_bench(bench: BenchConfig, out: Path, *, progress: bool = True, report_only: bool = False) -> dict:
    """Run every (suite, seed, algo) not yet recorded in `out` (none with `report_only`), then write
    the tables and plots from all recorded runs of the plan."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from services.app.launcher import train
    from services.app.model_init import init_model

    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    plan = [(suite, seed, algo) for suite in bench.suites for seed in bench.seeds for algo in bench.algos]
    budget = sum(bench.run_config(s, a, seed, out).env_steps for s, seed, a in plan)
    records_path = out / "results.jsonl"
    done = {(r["suite"], r["seed"], r["algo"]): r for r in map(json.loads, records_path.read_text().splitlines())} \
        if records_path.exists() else {}  # a re-run of the same command resumes where it stopped
    columns = [TextColumn("[bold]bench"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} env steps"),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not progress, refresh_per_second=2) as bar:
        task = bar.add_task("bench", total=budget, info="")
        finished = 0
        for i, (suite, seed, algo) in enumerate(plan):
            cfg = bench.run_config(suite, algo, seed, out)
            if (suite, seed, algo) in done or report_only:
                finished += cfg.env_steps
                bar.update(task, completed=finished)
                continue
            if not cfg.model:  # one initial model per seed, shared by the algos
                model_dir = out / "models" / f"{cfg.model_preset}-s{seed}"
                if not (model_dir / "spo3_model.json").is_file():
                    init_model(model_dir, cfg.model_preset, seed=seed)
                cfg.model = str(model_dir)
            info = f"run {i + 1}/{len(plan)}: {suite} {algo} seed {seed}"
            bar.update(task, info=info)
            run_dir = train(cfg, progress=False, on_tick=lambda s, base=finished, c=cfg: bar.update(
                task, completed=base + min(s["env_steps"], c.env_steps)))
            record = {"suite": suite, "seed": seed, "algo": algo, "run_dir": str(run_dir),
                      **run_figures(run_dir, bench.success_threshold, bench.window)}
            with records_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            done[(suite, seed, algo)] = record
            finished += cfg.env_steps
            bar.update(task, completed=finished)
            console.print(f"{info}: held-out {record['final_success']:.0%}, "
                          f"{record['unique_states_per_1k']:.1f} states/1k steps, {record['wall_time_s']:.0f} s")
    # Figures are recomputed from each run's files, so a report uses the current definitions.
    records = [{**done[k], **run_figures(Path(done[k]["run_dir"]), bench.success_threshold, bench.window)}
               if (Path(done[k]["run_dir"]) / "summary.json").is_file() else done[k] for k in plan if k in done]
    results = summarize(bench, records, {s: bench.run_config(s, bench.algos[0], bench.seeds[0], out).env_steps
                                         for s in bench.suites})
    results["runs"] = [{k: v for k, v in r.items() if k != "curve"} for r in records]
    for suite in results["suites"]:
        plot_suite(out / f"{suite}.png", suite, [r for r in records if r["suite"] == suite], bench.algos, bench.window)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text(markdown(results))
    console.print(markdown(results), markup=False, highlight=False)
    return results


def select(bench: BenchConfig, suites: list[str] | None, algos: list[str] | None, seeds: list[int] | None,
           env_steps: int | None, time_limit_s: float | None, sets: list[str] | None = None) -> BenchConfig:
    """`bench` narrowed and overridden by command-line choices (unknown suite names are an error).
    `sets`: "dotted.key=value" overrides of every run's settings, e.g. "score.alpha=50" (a sweep)."""
    b = bench.model_copy(deep=True)
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set wants KEY=VALUE (e.g. score.alpha=50), got {item!r}")
        *path, leaf = key.split(".")
        parsed = yaml.safe_load(value)
        for target in [b.base, *b.suites.values()]:  # suites that set the key would win over base
            node = target
            for part in path:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ValueError(f"--set {key}: {part!r} is not a section")
            if target is b.base or leaf in node:
                node[leaf] = parsed
    if suites:
        unknown = [s for s in suites if s not in b.suites]
        if unknown:
            raise ValueError(f"unknown suite(s) {unknown}; the config has {list(b.suites)}")
        b.suites = {s: b.suites[s] for s in suites}
    if algos:
        b.algos = algos
    if seeds:
        b.seeds = seeds
    if env_steps:
        b.base["env_steps"] = env_steps
        for s in b.suites.values():
            s.pop("env_steps", None)
    if time_limit_s:
        b.base["time_limit_s"] = time_limit_s
        for s in b.suites.values():
            s.pop("time_limit_s", None)
    return b


def now_tag() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
