"""What a run shows a person: a live progress bar, metrics.jsonl, plots and a summary table."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from spo3.actors.rollout import LEAF_KINDS
from spo3.score_store.score_math import Counts, state_score
from spo3.score_store.state_key import KeyScope

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from spo3.actors.evaluate import EvalResult
    from spo3.app.train_config import TrainConfig
    from spo3.learner.loop import LearnerResult


class ProgressWatcher:
    """Polls the run's totals in Redis, appends a snapshot to metrics.jsonl, drives the bar."""

    def __init__(self, client, names, store, metrics_path: Path) -> None:
        self.client, self.names, self.store = client, names, store
        self.path = metrics_path
        self.snapshots: list[dict] = []
        self._t0 = time.monotonic()

    def snapshot(self) -> dict:
        totals = {
            k.decode(): int(v) for k, v in self.client.hgetall(self.names.actor_totals).items()
        }
        stats = self.store.stats()
        version = int(self.client.get(self.names.policy_version) or 0)
        # run-wide expansions by n(s) so far: per-window shares are differences of two snapshots
        branching = {
            int(k): int(v) for k, v in self.client.hgetall(self.names.actor_branching).items()
        }
        prev = self.snapshots[-1] if self.snapshots else {"leaves": 0, "successes": 0}
        d_leaves = totals.get("leaves", 0) - prev["leaves"]
        snap = {
            "time_s": round(time.monotonic() - self._t0, 2),
            "env_steps": totals.get("env_steps", 0),
            "leaves": totals.get("leaves", 0),
            "successes": totals.get("successes", 0),
            "groups": totals.get("groups", 0),
            "tasks": totals.get("tasks", 0),
            "generated_tokens": totals.get("generated_tokens", 0),
            "invalid_actions": totals.get("invalid_actions", 0),
            "actions": totals.get("actions", 0),
            "unique_states": stats.n_states,
            "truncated_states": stats.truncated_states,
            "policy_version": version,
            "branching": {str(n): branching[n] for n in sorted(branching)},
            # Success rate of the leaves finished since the last snapshot (the learning curve).
            "success_rate": (totals.get("successes", 0) - prev["successes"]) / d_leaves
            if d_leaves > 0
            else None,
        }
        self.snapshots.append(snap)
        with self.path.open("a") as f:
            f.write(json.dumps(snap) + "\n")
        return snap

    @contextmanager
    def live(self, total_steps: int, enabled: bool = True):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        columns = [
            TextColumn("[bold]training"),
            BarColumn(),
            TextColumn("{task.completed:,}/{task.total:,} env steps"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
        ]
        with Progress(*columns, disable=not enabled, refresh_per_second=2) as bar:
            task = bar.add_task("train", total=total_steps, info="")

            def tick() -> dict:
                s = self.snapshot()
                rate = s["env_steps"] / max(s["time_s"], 1e-9)
                recent = [
                    x["success_rate"] for x in self.snapshots[-10:] if x["success_rate"] is not None
                ]
                sr = sum(recent) / len(recent) if recent else 0.0
                bar.update(
                    task,
                    completed=min(s["env_steps"], total_steps),
                    info=f"success {sr:.0%} | states {s['unique_states']:,} | v{s['policy_version']} | "
                    f"{rate:,.0f} steps/s",
                )
                return s

            yield tick


def _binned_success(snaps: list[dict], bins: int = 25) -> list[tuple[int, float]]:
    """Success rate of the leaves finished in each of `bins` equal stretches of env steps."""
    if not snaps or snaps[-1]["env_steps"] == 0:
        return []
    width = snaps[-1]["env_steps"] / bins
    out, prev = [], {"env_steps": 0, "leaves": 0, "successes": 0}
    edge = width
    for s in snaps:
        if s["env_steps"] >= edge or s is snaps[-1]:
            leaves = s["leaves"] - prev["leaves"]
            if leaves > 0:
                out.append((s["env_steps"], (s["successes"] - prev["successes"]) / leaves))
            prev, edge = s, s["env_steps"] + width
    return out


def state_scores(client, names, params) -> list[float]:
    """S(s) of every stored state at the current t (for the score distribution plot)."""
    t = int(client.get(names.leaves) or 0) + 1
    out = []
    for key in client.scan_iter(match=f"{names.prefix}:st:*", count=1000):
        n, s, r = client.hmget(key, "n", "s", "r")
        out.append(state_score(Counts(int(n or 0), int(s or 0)), t, params, is_root=r is not None))
    return out


def diagnostics(totals: dict[str, int], depths: dict[int, int], walkthrough: dict | None) -> dict:
    """The DFS diagnostics of a run (results.json / summary.json `diagnostics`), from the actors'
    run-wide totals: fraction of expansions that re-expanded a key already expanded in the same
    rollout, leaves by kind, fraction of informative groups whose top reward is a child on a
    truncated state, expansions by depth, replay steps per new env step, and the walkthrough
    states found truncated (None when no task has a walkthrough). A ratio without a denominator
    (GRPO: no expansions) is None."""

    def ratio(a: str, b: str) -> float | None:
        return totals.get(a, 0) / totals[b] if totals.get(b) else None

    return {
        "reexpand_frac": ratio("reexpansions", "expansions"),
        "leaves": {k: totals.get(f"leaves_{k}", 0) for k in LEAF_KINDS},
        "truncated_top_frac": ratio("truncated_top_groups", "informative_groups"),
        "expansions_by_depth": {str(d): depths[d] for d in sorted(depths)},
        "replay_per_new_step": ratio("replay_steps", "env_steps"),
        "walkthrough_truncated": walkthrough,
    }


def walkthrough_truncated(
    env, tasks: list[str], store, key_scope: KeyScope = "task"
) -> dict | None:
    """How many states on the tasks' known solutions the score store now truncates (S = 0): a
    truncated walkthrough state cuts every path to success through it. Tasks whose adapter has no
    walkthrough (or whose walkthrough cannot be played) are skipped; None when none has one."""
    from spo3.score_store.state_key import state_key

    walk = getattr(env, "walkthrough", None)
    if walk is None:
        return None
    states = truncated = played = 0
    for task in dict.fromkeys(tasks):
        try:
            env.reset(task)
            actions = walk()
            obs = env.reset(task)
            keys = [state_key(env.name, task, obs.state_text, key_scope)]
            for action in actions:
                result = env.step(action)
                if result.done:  # the terminal state is never expanded: not counted
                    break
                keys.append(state_key(env.name, task, result.observation.state_text, key_scope))
        except Exception:  # noqa: BLE001 - a task without a playable walkthrough is skipped
            continue
        keys = list(dict.fromkeys(keys))
        scores = store.scores(keys).scores
        played += 1
        states += len(keys)
        truncated += sum(s.n_rollouts == 0 for s in scores)
    if not played:
        return None
    return {"truncated": truncated, "states": states, "tasks": played}


def _windows(snaps: list[dict], bins: int = 25) -> list[tuple[dict, dict]]:
    """(first, last) snapshot pairs of `bins` equal stretches of env steps; a window's counts are
    the differences of its pair's run-wide totals."""
    if not snaps or snaps[-1]["env_steps"] == 0:
        return []
    width = snaps[-1]["env_steps"] / bins
    out: list[tuple[dict, dict]] = []
    prev: dict = {"env_steps": 0, "leaves": 0, "successes": 0, "branching": {}}
    edge = width
    for s in snaps:
        if s["env_steps"] >= edge or s is snaps[-1]:
            out.append((prev, s))
            prev, edge = s, s["env_steps"] + width
    return out


def _expansions(snap: dict) -> tuple[int, int]:
    """(expansions, those with n(s) > 1) the actors reported by this snapshot."""
    branching = snap.get("branching") or {}
    total = sum(branching.values())
    return total, total - branching.get("1", 0) - branching.get("0", 0)


def binned_branching(snaps: list[dict], bins: int = 15) -> list[tuple[int, float, float, int]]:
    """Per stretch of env steps: (its last env step, share of its expansions with n(s) > 1, mean
    n(s) of its expansions, expansions)."""
    out = []
    for a, b in _windows(snaps, bins):
        ba, bb = a.get("branching") or {}, b.get("branching") or {}
        d = {n: bb[n] - ba.get(n, 0) for n in bb}
        total = sum(d.values())
        if total > 0:
            wide = total - d.get("1", 0) - d.get("0", 0)
            mean = sum(int(n) * c for n, c in d.items()) / total
            out.append((b["env_steps"], wide / total, mean, total))
    return out


def _at_steps(snaps: list[dict], env_steps: float) -> dict:
    """The first snapshot at or past `env_steps` (the last one if none is)."""
    return next((s for s in snaps if s["env_steps"] >= env_steps), snaps[-1])


def _update_steps(snaps: list[dict]) -> list[int]:
    """The env steps at which each new policy version was first seen."""
    out, seen = [], 0
    for s in snaps:
        if s["policy_version"] > seen:
            out += [s["env_steps"]] * (s["policy_version"] - seen)
            seen = s["policy_version"]
    return out


def curve_lines(
    snaps: list[dict],
    before: EvalResult,
    after: EvalResult,
    scores: list[float],
    g_max: int,
) -> dict[str, str]:
    """One line per plot of curves.png saying what it shows (the end-of-run table, summary.json
    `curves`)."""
    out: dict[str, str] = {}
    nb, na = len(before.per_task), len(after.per_task)
    gain = 100 * (after.success_rate - before.success_rate)
    out["held-out success"] = (
        f"{before.success_rate:.1%} ({nb} episodes) -> {after.success_rate:.1%} ({na} episodes): "
        f"{gain:+.1f} points"
    )
    if not snaps or snaps[-1]["env_steps"] == 0:
        return out
    last = snaps[-1]
    half = _at_steps(snaps, last["env_steps"] / 2)
    out["visited states"] = (
        f"{half['unique_states']:,} by env step {half['env_steps']:,} (half), "
        f"{last['unique_states']:,} by {last['env_steps']:,}: "
        f"+{last['unique_states'] - half['unique_states']:,} in the second half"
    )
    total, wide = _expansions(last)
    if total:
        h_total, h_wide = _expansions(half)
        first = h_wide / h_total if h_total else 0.0
        second = (wide - h_wide) / (total - h_total) if total > h_total else 0.0
        out["n(s) > 1"] = (
            f"{wide / total:.0%} of {total:,} expansions branched "
            f"({first:.0%} in the first half, {second:.0%} in the second)"
        )
    if scores:
        branching = sum(s > 1 / g_max + 1e-9 for s in scores)
        truncated = sum(s == 0 for s in scores)
        out["S(s) at the end"] = (
            f"{len(scores):,} states: {branching:,} still branch (S > 1/{g_max}), "
            f"{truncated:,} truncated (S = 0), {len(scores) - branching - truncated:,} in between "
            "(n = 1: followed, no group)"
        )
    ups = _update_steps(snaps)
    if ups:
        later = sum(u > half["env_steps"] for u in ups)
        out["updates"] = (
            f"{len(ups)} policy versions while the actors ran, the first at env step {ups[0]:,}, "
            f"the last at {ups[-1]:,}: {len(ups) - later} in the first half, {later} in the second"
        )
    else:
        out["updates"] = "no policy update within the budget"
    pts = _binned_success(snaps)
    if pts:
        out["training success"] = (
            f"leaf success {pts[0][1]:.0%} in the first window, {pts[-1][1]:.0%} in the last "
            "(the search's, not the greedy policy's)"
        )
    return out


def _plot_curves(
    path: Path,
    snaps: list[dict],
    before: EvalResult,
    after: EvalResult,
    scores: list[float],
    g_max: int,
) -> None:
    """curves.png, one question per plot: did held-out success rise, are new states still found,
    where does 3SPO branch (n(s) > 1) over time, what S(s) do the states end with, do updates keep
    coming, and the training leaves' success."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s["env_steps"] for s in snaps]
    fig, ax = plt.subplots(2, 3, figsize=(15, 8))
    ax = ax.ravel()

    labels = [
        f"before\n({len(before.per_task)} episodes)",
        f"after\n({len(after.per_task)} episodes)",
    ]
    rates = [before.success_rate, after.success_rate]
    bars = ax[0].bar(labels, rates, color=["#999999", "#2a7ab9"])
    for bar, r in zip(bars, rates, strict=True):
        ax[0].annotate(f"{r:.1%}", (bar.get_x() + bar.get_width() / 2, r), ha="center", va="bottom")
    ax[0].set(title="held-out success before / after training", ylabel="success rate")
    ax[0].set_ylim(0, 1.08)

    ax[1].plot(steps, [s["unique_states"] for s in snaps], color="#2a7ab9")
    if steps and steps[-1]:
        ax[1].axvline(steps[-1] / 2, color="#bbbbbb", ls="--", lw=1, label="half of the run")
        ax[1].legend(loc="lower right")
    ax[1].set(title="visited states", xlabel="env steps", ylabel="states with statistics")

    pts = binned_branching(snaps)
    if pts:
        x = [p[0] for p in pts]
        width = 0.8 * (x[-1] / len(x))
        ax[2].bar(x, [p[1] for p in pts], width=width, color="#2a7ab9")
        twin = ax[2].twinx()
        twin.plot(x, [p[2] for p in pts], color="#d62728", marker=".", label="mean n(s)")
        twin.set_ylabel("mean n(s)", color="#d62728")
        twin.set_ylim(0, g_max + 0.5)
    ax[2].set(
        title="branching: expansions with n(s) > 1, per window",
        xlabel="env steps",
        ylabel="share of expansions",
        ylim=(0, 1.02),
    )

    ax[3].hist(scores, bins=[i / (4 * g_max) for i in range(4 * g_max + 1)], color="#2a7ab9")
    ax[3].axvline(1 / g_max, color="#d62728", ls="--", lw=1, label=f"S = 1/{g_max}: n(s) > 1 above")
    ax[3].legend(loc="upper right")
    ax[3].set(title="S(s) of the visited states at the end", xlabel="S(s)", ylabel="states")
    if scores:
        ax[3].set_yscale("log")

    ax[4].step(steps, [s["policy_version"] for s in snaps], where="post", color="#2a7ab9")
    ax[4].set(title="policy updates", xlabel="env steps", ylabel="policy version")

    succ = _binned_success(snaps)
    if succ:
        ax[5].plot(*zip(*succ), marker="o", lw=1.5, color="#2a7ab9")
    ax[5].set(
        title="training leaves' success (search + policy)",
        xlabel="env steps",
        ylabel="success rate",
        ylim=(-0.02, 1.02),
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _summary(
    snaps: list[dict],
    before: EvalResult,
    after: EvalResult,
    result: LearnerResult | None,
    final_checkpoint: Path,
    client,
    names,
    walkthrough: dict | None,
) -> dict:
    """summary.json's content."""
    last = snaps[-1] if snaps else {}
    return {
        "held_out_success_before": before.success_rate,
        "held_out_success_after": after.success_rate,
        "held_out_invalid_before": before.invalid_rate,
        "held_out_invalid_after": after.invalid_rate,
        "held_out_episodes_before": len(before.per_task),
        "held_out_episodes_after": len(after.per_task),
        "env_steps": last.get("env_steps", 0),
        "unique_states": last.get("unique_states", 0),
        "leaves": last.get("leaves", 0),
        "groups": last.get("groups", 0),
        "policy_version": result.version if result else None,
        "groups_dropped_stale": result.groups_dropped_stale if result else None,
        "generated_tokens": last.get("generated_tokens", 0),
        "wall_time_s": last.get("time_s", 0),
        "final_checkpoint": str(final_checkpoint),
        "diagnostics": diagnostics(
            {k.decode(): int(v) for k, v in client.hgetall(names.actor_totals).items()},
            {int(k): int(v) for k, v in client.hgetall(names.actor_depths).items()},
            walkthrough,
        ),
    }


def _summary_table(run_name: str, summary: dict, before: EvalResult, after: EvalResult) -> Table:
    from rich.table import Table

    table = Table(title=f"run {run_name}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("held-out success", f"{before.success_rate:.1%}", f"{after.success_rate:.1%}")
    table.add_row("held-out mean steps", f"{before.mean_steps:.1f}", f"{after.mean_steps:.1f}")
    table.add_row(
        "held-out invalid actions", f"{before.invalid_rate:.1%}", f"{after.invalid_rate:.1%}"
    )
    for k in (
        "env_steps",
        "unique_states",
        "leaves",
        "groups",
        "policy_version",
        "generated_tokens",
        "wall_time_s",
    ):
        table.add_row(
            k.replace("_", " "),
            "",
            f"{summary[k]:,}" if isinstance(summary[k], int) else str(summary[k]),
        )
    return table


def _curves_table(lines: dict[str, str]) -> Table:
    from rich.table import Table

    table = Table(title="what the curves show (curves.png)")
    table.add_column("plot")
    table.add_column("")
    for k, v in lines.items():
        table.add_row(k, v)
    return table


def write_report(
    run_dir: Path,
    cfg: TrainConfig,
    watcher: ProgressWatcher,
    before: EvalResult,
    after: EvalResult,
    result: LearnerResult | None,
    final_checkpoint: Path,
    client,
    names,
    console: Console,
    walkthrough: dict | None = None,
) -> dict:
    """A finished run's curves.png, summary.json and learner.jsonl, and its summary table."""
    snaps = watcher.snapshots
    scores = state_scores(client, names, cfg.score)
    _plot_curves(run_dir / "curves.png", snaps, before, after, scores, cfg.score.g_max)
    summary = _summary(snaps, before, after, result, final_checkpoint, client, names, walkthrough)
    summary["curves"] = curve_lines(snaps, before, after, scores, cfg.score.g_max)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if result:
        with (run_dir / "learner.jsonl").open("w") as f:
            for h in result.history:
                f.write(json.dumps(h) + "\n")
    console.print(_summary_table(run_dir.name, summary, before, after))
    console.print(_curves_table(summary["curves"]))
    console.print(f"plots: {run_dir / 'curves.png'}   checkpoint: {final_checkpoint}")
    return summary
