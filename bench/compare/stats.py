"""Benchmark statistics, counted the same way for every algorithm (docs/algorithm.md "Metrics").

Pure functions (no torch, no I/O): a run's record in, curves and figures out; per suite, paired
bootstrap intervals across seeds. `spo3-bench` feeds them (docs/benchmarks.md describes results.json).

- **Exploration**: unique `(task, state key)` pairs *visited* (stepped into, whether or not a leaf was
  committed through them) as a curve over env steps: `visited_state_curve`.
- **Convergence**: held-out success at fixed env-step checkpoints (`checkpoint_steps`, 8 or more per
  run, the first at step 0 = before training), each with its episode count (`held_out_curve`); the env
  steps until that curve first reaches a threshold (`steps_to_threshold`), whether it already did at
  step 0 (`threshold_met_at_start`), and the area under it (`area_under_curve`).
- **Statistics**: seeds are paired (one initial model and task split per seed for all algorithms);
  `paired_bootstrap` gives the mean paired difference (or the ratio of means) with a percentile
  bootstrap 95% interval over seeds, and says whether the interval includes "no difference".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from spo3.app.evaluation import MIN_CHECKPOINTS

"""Held-out checkpoints after step 0 that a run's curve needs (docs/algorithm.md "Metrics": 8 or more per run)."""

Curve = list[list[float]]
"""[[env_steps, value], ...] with env_steps strictly increasing."""


# --- exploration --------------------------------------------------------------------------------


def _visit(v: Any) -> tuple[int, str, str]:
    if isinstance(v, Mapping):
        return int(v["env_steps"]), str(v["task"]), str(v["key"])
    steps, task, key = v
    return int(steps), str(task), str(key)


def visited_state_curve(visits: Iterable[Any], checkpoints: Sequence[int]) -> Curve:
    """Unique (task, key) pairs visited by each checkpoint: [[env_steps, pairs], ...].

    `visits`: the run's record of every state stepped into, in order, each as
    `{"env_steps": n, "task": id, "key": state key}` (or a tuple in that order), where `env_steps` is the
    run's count of new env steps when the state was entered (a reset's initial state: the count at the
    reset). States re-entered by replay count once like any other; replay steps are not new env steps.
    A visit at step n counts at every checkpoint >= n. Raises ValueError when the steps go backwards
    or the checkpoints are not increasing.
    """
    cps = _checked_checkpoints(checkpoints)
    seen: set[tuple[str, str]] = set()
    out: Curve = []
    i, last = 0, -1
    events = [_visit(v) for v in visits]
    for steps, _, _ in events:
        if steps < last:
            raise ValueError(
                f"visits go back in env steps ({last} then {steps}); record them in order"
            )
        if steps < 0:
            raise ValueError(f"negative env_steps {steps}")
        last = steps
    for cp in cps:
        while i < len(events) and events[i][0] <= cp:
            seen.add((events[i][1], events[i][2]))
            i += 1
        out.append([cp, len(seen)])
    return out


def _checked_checkpoints(checkpoints: Sequence[int]) -> list[int]:
    cps = [int(c) for c in checkpoints]
    if not cps or any(b <= a for a, b in zip(cps, cps[1:])) or cps[0] < 0:
        raise ValueError(
            f"checkpoints must be non-negative and strictly increasing, got {list(checkpoints)}"
        )
    return cps


# --- convergence --------------------------------------------------------------------------------


def held_out_curve(
    evaluations: Iterable[tuple[int, Sequence[float]]], *, min_checkpoints: int = MIN_CHECKPOINTS
) -> list[list[float]]:
    """[[env_steps, success rate, episodes], ...] from held-out evaluations, each
    `(env_steps, per-episode successes in [0, 1])`. The first must be at step 0 (the initial policy),
    steps strictly increasing, every evaluation non-empty, and at least `min_checkpoints` after step 0."""
    out = []
    for steps, successes in evaluations:
        s = [float(x) for x in successes]
        if not s:
            raise ValueError(f"held-out evaluation at env step {steps} has no episodes")
        if any(not 0.0 <= x <= 1.0 for x in s):
            raise ValueError(f"held-out successes at env step {steps} must lie in [0, 1]")
        out.append([int(steps), sum(s) / len(s), len(s)])
    _check_curve(out, min_checkpoints)
    return out


def _check_curve(curve: Sequence[Sequence[float]], min_checkpoints: int = 0) -> None:
    if not curve:
        raise ValueError("empty curve")
    if curve[0][0] != 0:
        raise ValueError(
            f"a held-out curve starts at env step 0 (the initial policy), not {curve[0][0]}"
        )
    _checked_checkpoints([p[0] for p in curve])
    if len(curve) - 1 < min_checkpoints:
        raise ValueError(
            f"{len(curve) - 1} held-out checkpoints after step 0; need >= {min_checkpoints}"
        )


def steps_to_threshold(curve: Sequence[Sequence[float]], threshold: float) -> int | None:
    """Env steps of the first checkpoint whose held-out success is >= `threshold` (0 when the initial
    policy already meets it; None when the curve never does). No interpolation between checkpoints."""
    _check_curve(curve)
    return next((int(p[0]) for p in curve if p[1] >= threshold), None)


def threshold_met_at_start(curve: Sequence[Sequence[float]], threshold: float) -> bool:
    """True when the initial policy (the step-0 point) already meets the threshold: its steps-to-threshold
    of 0 says nothing about learning and is flagged in the tables."""
    _check_curve(curve)
    return curve[0][1] >= threshold


def area_under_curve(curve: Sequence[Sequence[float]]) -> float:
    """Trapezoidal area under [[env_steps, value, ...], ...] divided by its env-step span: the mean
    value over the budget (for a success curve, in [0, 1]; faster learning gives more area)."""
    _check_curve(curve)
    if len(curve) == 1:
        return float(curve[0][1])
    area = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(curve, curve[1:]))
    return area / (curve[-1][0] - curve[0][0])


def value_at(curve: Sequence[Sequence[float]], env_steps: int) -> float:
    """The curve's value at `env_steps` (the last checkpoint at or before it), for comparing runs at equal
    env steps. Raises ValueError before the first point."""
    best = None
    for p in curve:
        if p[0] <= env_steps:
            best = p[1]
    if best is None:
        raise ValueError(f"no point at or before env step {env_steps}")
    return float(best)


# --- paired statistics --------------------------------------------------------------------------


class Interval(BaseModel):
    """A paired comparison across seeds: ours vs a baseline on one figure."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["difference", "ratio"] = Field(
        description="difference: mean of (ours - baseline) over "
        "seeds; ratio: mean(ours) / mean(baseline)."
    )
    estimate: float | None = Field(
        description="The statistic on the observed pairs (None: ratio over a zero mean)."
    )
    low: float | None = Field(
        description="2.5th percentile of the bootstrap distribution (None: infinite)."
    )
    high: float | None = Field(
        description="97.5th percentile of the bootstrap distribution (None: infinite, a ratio over resamples whose baseline mean is 0)."
    )
    level: float = Field(description="Coverage of the interval (0.95).")
    pairs: int = Field(description="Seeds with a value for both algorithms.")
    resamples: int = Field(description="Bootstrap resamples of the seed pairs.")
    includes_no_difference: bool = Field(
        description="The interval contains 0 (difference) or 1 (ratio): "
        "the seeds do not tell the two apart."
    )


def paired_bootstrap(
    ours: Sequence[float],
    theirs: Sequence[float],
    *,
    kind: Literal["difference", "ratio"] = "difference",
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap over seed pairs: resample the pairs with replacement `resamples` times,
    compute the statistic each time, and take the central `level` of those values.

    `ours[i]` and `theirs[i]` come from the same seed (same initial model and task split). The
    difference is mean(ours - theirs); the ratio is mean(ours) / mean(theirs) (a resample with a zero
    denominator is infinite, written None). Identical pairs give exactly [0, 0] (ratio [1, 1]); a
    constant shift c gives [c, c]. Needs 2 or more pairs.
    """
    a, b = np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"paired values must be two lists of the same length, got {a.shape} and {b.shape}"
        )
    if len(a) < 2:
        raise ValueError(f"a paired bootstrap needs >= 2 seed pairs, got {len(a)}")
    if not np.all(np.isfinite(a)) or not np.all(np.isfinite(b)):
        raise ValueError("paired values must be finite")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError("need 0 < level < 1 and resamples >= 1")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    if kind == "difference":
        d = a - b
        stats = d[idx].mean(axis=1)
        estimate: float | None = float(d.mean())
        null = 0.0
    elif kind == "ratio":
        num, den = a[idx].sum(axis=1), b[idx].sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            stats = np.where(den != 0, num / np.where(den != 0, den, 1.0), np.inf)
        estimate = float(a.sum() / b.sum()) if b.sum() != 0 else None
        null = 1.0
    else:
        raise ValueError(f"kind must be 'difference' or 'ratio', not {kind!r}")
    tail = (1 - level) / 2
    lo, hi = np.quantile(stats, [tail, 1 - tail], method="inverted_cdf")

    def finite(x: float) -> float | None:
        return float(x) if math.isfinite(x) else None

    return Interval(
        kind=kind,
        estimate=estimate,
        low=finite(lo),
        high=finite(hi),
        level=level,
        pairs=len(a),
        resamples=resamples,
        includes_no_difference=bool(lo <= null <= hi),
    )


def pair_by_seed(
    ours: Mapping[int, float | None], theirs: Mapping[int, float | None]
) -> tuple[list[float], list[float], list[int]]:
    """The values of the seeds both algorithms have (not None), in seed order, and those seeds."""
    seeds = sorted(s for s in ours if s in theirs and ours[s] is not None and theirs[s] is not None)
    return [float(ours[s]) for s in seeds], [float(theirs[s]) for s in seeds], seeds


# --- results.json (new format) -------------------------------------------------------------------


class RunResult(BaseModel):
    """One run (suite x algorithm x seed) in results.json."""

    model_config = ConfigDict(extra="forbid")
    suite: str = Field(description="Suite name from the bench config.")
    algo: str = Field(description="3spo, grpo or gigpo.")
    seed: int = Field(
        description="Seed; runs with the same suite and seed share the initial model and task split."
    )
    settings: dict[str, Any] = Field(
        default_factory=dict, description="The run's full settings (TrainConfig as a dict)."
    )
    visited_states: list[list[float]] = Field(
        description="[[env_steps, unique (task, key) pairs visited], ...]."
    )
    held_out: list[list[float]] = Field(
        description="[[env_steps, held-out success, episodes], ...], "
        "the first at step 0 (before training)."
    )
    new_env_steps: int = Field(
        description="Env steps that entered a state from its parent (the budget counts these)."
    )
    replay_env_steps: int = Field(
        0, description="Env steps spent replaying a prefix to restore a node."
    )
    generated_tokens: int = Field(0, description="Tokens sampled by the actors.")
    learner_tokens: int = Field(0, description="Tokens the learner trained on (real, not padding).")
    updates: int = Field(0, description="Learner updates (policy versions published).")
    wall_time_s: float = Field(0.0, description="Wall time of the run.")
    variant: str = Field(
        "default",
        description="Settings variant (a sweep's name for its overrides; 'default' in a bench).",
    )
    budget: int | None = Field(
        None,
        description="The planned budget of new env steps (the same for every run of a "
        "suite); figures 'at the budget' are read there. None: new_env_steps.",
    )
    stopped_by_time_limit: bool = Field(
        False,
        description="The run's time limit ended training before the budget: "
        "its held-out curve stops at the last checkpoint reached.",
    )
    train_success: float | None = Field(
        None,
        description="Training leaf success over the last quarter of the env "
        "steps: a diagnostic, comparable between settings of one algorithm only.",
    )
    train_eval_success: float | None = Field(
        None,
        description=(
            "The last checkpoint's success on training tasks at evaluation temperature (train_eval_tasks; None: not "
            "measured): for choosing settings without held-out tasks."
        ),
    )
    actions_at_budget: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "Share of each action verb in the held-out episodes of the last checkpoint (what the policy does; "
            "empty in records made before it was kept)."
        ),
    )
    updates_at: list[list[int]] = Field(
        default_factory=list,
        description=(
            "[[env_steps, updates], ...]: the policy version evaluated at each held-out checkpoint (the points of "
            "`held_out`), so that held-out success can be read against updates as well as env steps."
        ),
    )
    eval_wall_s: float = Field(
        0.0, description="Wall time of the held-out evaluations after training."
    )
    eval_env_steps: int = Field(
        0, description="Env steps of the held-out episodes (not training env steps)."
    )
    run_dir: str | None = Field(
        None, description="The run's directory (config, metrics, visits, heldout.json)."
    )


def visits_from_rollouts(records: Iterable[Mapping[str, Any]]) -> list[tuple[int, str, str]]:
    """The run's visit record from the actors' per-rollout records, in the order their env steps were
    added to the run's total: each `{"task", "steps": new env steps of the rollout, "visits":
    [[env step within the rollout, key], ...]}`. A rollout's steps occupy the run's env steps after those
    of the rollouts before it, so a visit at local step k of a rollout that starts at run step n is at
    n + k. Raises ValueError on a visit outside its rollout's steps."""
    out: list[tuple[int, str, str]] = []
    offset = 0
    for rec in records:
        steps = int(rec["steps"])
        if steps < 0:
            raise ValueError(f"negative steps in a rollout record of {rec.get('task')!r}")
        for local, key in rec["visits"]:
            if not 0 <= int(local) <= steps:
                raise ValueError(
                    f"visit at step {local} of a rollout of {steps} steps ({rec.get('task')!r})"
                )
            out.append((offset + int(local), str(rec["task"]), str(key)))
        offset += steps
    out.sort(key=lambda v: v[0])  # stable: within a step, the recorded order
    return out


def late_success(snapshots: Sequence[Mapping[str, Any]], fraction: float = 0.25) -> float | None:
    """Training leaf success over the last `fraction` of the env steps, from cumulative snapshots
    ({"env_steps", "leaves", "successes"}); None without leaves there."""
    if not snapshots:
        return None
    end = snapshots[-1]
    cut = end["env_steps"] * (1 - fraction)
    start = next(
        (s for s in reversed(snapshots) if s["env_steps"] <= cut), {"leaves": 0, "successes": 0}
    )
    leaves = end["leaves"] - start["leaves"]
    return (end["successes"] - start["successes"]) / leaves if leaves > 0 else None


def run_figures(run: RunResult, threshold: float) -> dict[str, Any]:
    """The per-run figures the tables and the paired comparisons use, at the planned budget."""
    budget = run.budget or run.new_env_steps
    visited = value_at(run.visited_states, budget)
    return {
        "final_success": run.held_out[-1][1],
        "initial_success": run.held_out[0][1],
        "visited_states": visited,
        "visited_per_1k_steps": 1000 * visited / max(budget, 1),
        "steps_to_threshold": steps_to_threshold(run.held_out, threshold),
        "threshold_met_at_start": threshold_met_at_start(run.held_out, threshold),
        "success_auc": area_under_curve(run.held_out),
        "replay_per_new_step": run.replay_env_steps / max(run.new_env_steps, 1),
        "generated_tokens": run.generated_tokens,
        "learner_tokens": run.learner_tokens,
        "updates": run.updates,
        "train_success": run.train_success,
        "train_eval_success": run.train_eval_success,
    }


def mean_std(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """{"mean", "std" (sample; 0 for one value), "n"} of the values that are not None."""
    vs = [float(v) for v in values if v is not None]
    if not vs:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": float(np.mean(vs)),
        "std": float(np.std(vs, ddof=1)) if len(vs) > 1 else 0.0,
        "n": len(vs),
    }


def arm(algo: str, variant: str = "default") -> str:
    """The row of the tables a run belongs to: its algorithm, followed by its variant unless that is the
    default (a bench's `variants`: "3spo novelty_use=order")."""
    return algo if variant == "default" else f"{algo} {variant}"


def mean_shares(shares: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The mean over runs of per-run shares (a verb a run never used counts 0 there), largest first;
    runs without shares are left out."""
    kept = [s for s in shares if s]
    if not kept:
        return {}
    verbs = {v for s in kept for v in s}
    mean = {v: sum(s.get(v, 0.0) for s in kept) / len(kept) for v in verbs}
    return dict(sorted(mean.items(), key=lambda kv: (-kv[1], kv[0])))


def suite_table(runs: Sequence[RunResult], threshold: float) -> dict[str, dict[str, Any]]:
    """arm (algo, or algo and variant) -> figure -> mean_std over its seeds, plus "runs",
    "threshold_met_at_start" (runs whose initial policy already met the threshold) and
    "stopped_by_time_limit" (counts)."""
    out: dict[str, dict[str, Any]] = {}
    by_arm: dict[str, list[RunResult]] = {}
    for r in runs:
        by_arm.setdefault(arm(r.algo, r.variant), []).append(r)
    for name, rs in by_arm.items():
        figs = [run_figures(r, threshold) for r in rs]
        row: dict[str, Any] = {
            k: mean_std(f[k] for f in figs) for k in figs[0] if k != "threshold_met_at_start"
        }
        row["runs"] = len(rs)
        row["actions_at_budget"] = mean_shares([r.actions_at_budget for r in rs])
        row["threshold_met_at_start"] = sum(f["threshold_met_at_start"] for f in figs)
        row["stopped_by_time_limit"] = sum(r.stopped_by_time_limit for r in rs)
        out[name] = row
    return out


def curve_band(
    curves: Sequence[Sequence[Sequence[float]]],
    grid: Sequence[int],
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Mean over runs of curves read at `grid` (value_at), with a percentile bootstrap `level` interval
    of that mean over runs at each grid point: {"steps", "mean", "low", "high"} (one run: low = high = mean).
    Grid points before a curve's first point are an error."""
    if not curves:
        raise ValueError("no curves")
    values = np.array([[value_at(c, g) for g in grid] for c in curves], dtype=float)
    mean = values.mean(axis=0)
    if len(curves) == 1:
        lo = hi = mean
    else:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(curves), size=(resamples, len(curves)))
        boots = values[idx].mean(axis=1)
        tail = (1 - level) / 2
        lo, hi = np.quantile(boots, [tail, 1 - tail], axis=0, method="inverted_cdf")
    return {
        "steps": [int(g) for g in grid],
        "mean": mean.tolist(),
        "low": np.asarray(lo).tolist(),
        "high": np.asarray(hi).tolist(),
    }


def best_variant(
    rows: Mapping[str, Sequence[float | None]], *, higher_is_better: bool = True
) -> str | None:
    """The variant whose mean (over the values that exist) is best; ties go to the first listed.
    `rows`: variant -> the selection metric per (suite, seed) run. None when no variant has a value."""
    best, best_value = None, None
    for name, values in rows.items():
        vs = [v for v in values if v is not None]
        if not vs:
            continue
        m = float(np.mean(vs))
        if best_value is None or (m > best_value if higher_is_better else m < best_value):
            best, best_value = name, m
    return best


COMPARED = {  # figure -> kinds of paired comparison
    "final_success": ("difference",),
    "success_auc": ("difference",),
    "visited_states": ("ratio", "difference"),
    "steps_to_threshold": ("ratio",),
}


def suite_comparisons(
    runs: Sequence[RunResult],
    threshold: float,
    *,
    ours: str = "3spo",
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, Interval | None]]]:
    """baseline -> figure -> kind -> Interval over the seeds both have (None with fewer than 2 pairs).
    `ours` is an arm (see `arm`); the baselines are the arms of the other algorithms and, when `ours` is a
    variant, its own algorithm's default arm (what the variant changes, measured on the same seeds).
    steps_to_threshold pairs only seeds where both reached the threshold, and compares theirs / ours
    (how many times fewer steps ours needed); the other ratios are ours / theirs."""
    figs: dict[str, dict[int, dict[str, Any]]] = {}
    algo_of: dict[str, str] = {}
    for r in runs:
        figs.setdefault(arm(r.algo, r.variant), {})[r.seed] = run_figures(r, threshold)
        algo_of[arm(r.algo, r.variant)] = r.algo
    out: dict[str, dict[str, dict[str, Interval | None]]] = {}
    mine_algo = algo_of.get(ours, ours)
    # the other algorithms' arms and, for a variant, its own algorithm's default arm (named after the algorithm)
    for base in sorted(
        a for a in figs if a != ours and (algo_of[a] != mine_algo or a == mine_algo)
    ):
        out[base] = {}
        for fig, kinds in COMPARED.items():
            mine = {s: f[fig] for s, f in figs.get(ours, {}).items()}
            theirs = {s: f[fig] for s, f in figs[base].items()}
            a, b, _ = pair_by_seed(mine, theirs)
            if fig == "steps_to_threshold":
                a, b = b, a
            out[base][fig] = {
                k: (
                    paired_bootstrap(a, b, kind=k, resamples=resamples, seed=seed)
                    if len(a) >= 2
                    else None
                )
                for k in kinds
            }
    return out
