"""What a run shows a person: a live progress bar, metrics.jsonl, plots and a summary table."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from spo3.actors.rollout import LEAF_KINDS
from spo3.score_store.score_math import Counts, ScoreParams, state_score
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


def _plot_curves(path: Path, snaps: list[dict], client, names, params: ScoreParams) -> None:
    """curves.png: training success, unique states, n(s) at expanded states, final state scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s["env_steps"] for s in snaps]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    pts = _binned_success(snaps)
    if pts:
        axes[0, 0].plot(*zip(*pts), marker="o", lw=1.5)
    axes[0, 0].set(
        title="training success rate (leaves)",
        xlabel="env steps",
        ylabel="success rate",
        ylim=(-0.02, 1.02),
    )
    axes[0, 1].plot(steps, [s["unique_states"] for s in snaps])
    axes[0, 1].set(title="unique states", xlabel="env steps", ylabel="states with statistics")
    branching = {int(k): int(v) for k, v in client.hgetall(names.actor_branching).items()}
    if branching:
        axes[1, 0].bar(list(branching), list(branching.values()))
    axes[1, 0].set(title="n(s) at expanded states", xlabel="n(s)", ylabel="expansions")
    scores = state_scores(client, names, params)
    axes[1, 1].hist(scores, bins=20, range=(0, 1))
    axes[1, 1].set(title="state scores S(s) at the end", xlabel="S(s)", ylabel="states")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
    _plot_curves(run_dir / "curves.png", snaps, client, names, cfg.score)
    summary = _summary(snaps, before, after, result, final_checkpoint, client, names, walkthrough)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if result:
        with (run_dir / "learner.jsonl").open("w") as f:
            for h in result.history:
                f.write(json.dumps(h) + "\n")
    console.print(_summary_table(run_dir.name, summary, before, after))
    console.print(f"plots: {run_dir / 'curves.png'}   checkpoint: {final_checkpoint}")
    return summary
