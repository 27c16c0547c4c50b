"""How much room to explore a bench suite has: a random policy's distinct states on its real engine.

    python -m bench.compare.suites [--config configs/bench-v2.yaml ...] [--suite NAME ...] [--steps 1200]

For each suite: build its task lists exactly as a run does (`task_lists`: generated games, TWX ids,
ALFWorld game folders), reset one training and one held-out task on the real engine, then walk one
training task with a uniformly random admissible action for `--steps` env steps (episodes of the
suite's `rollout.max_steps`, restarted when won or lost) and count the distinct `(task, state key)`
pairs entered, keyed exactly as the rollout keys them; then the same walk over all its training tasks
in turn (one episode each), as a run spreads its budget. A suite whose count stops growing long before
the budget saturates: every algorithm finds every state, and an exploration ratio says nothing.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.compare.stats import visited_state_curve
from spo3.app.evaluation import checkpoint_steps


def random_walk(
    env: Any, tasks: list[str], steps: int, max_steps: int, *, seed: int = 0, scope: str = "task"
) -> dict[str, Any]:
    """`steps` env steps of a uniformly random admissible action, episodes of at most `max_steps` on
    `tasks` in turn: the visited-state curve at 8 checkpoints, the distinct (task, key) pairs, the env
    step of the last new one, episodes and wins."""
    from spo3.score_store.state_key import state_key

    rng = random.Random(seed)
    visits: list[tuple[int, str, str]] = []
    n, episodes, wins, last_new = 0, 0, 0, 0
    seen: set[tuple[str, str]] = set()
    while n < steps:
        task = tasks[episodes % len(tasks)]
        obs = env.reset(task)
        episodes += 1
        for _ in range(max_steps):
            key = state_key(env.name, task, obs.state_text, scope)
            visits.append((n, task, key))
            if (task, key) not in seen:
                seen.add((task, key))
                last_new = n
            if n >= steps or not obs.admissible_actions:
                break
            result = env.step(rng.choice(sorted(obs.admissible_actions)))
            n += 1
            obs = result.observation
            if result.done:
                wins += result.success >= 1.0
                key = state_key(env.name, task, obs.state_text, scope)
                visits.append((n, task, key))
                if (task, key) not in seen:
                    seen.add((task, key))
                    last_new = n
                break
    return {
        "curve": visited_state_curve(visits, checkpoint_steps(steps, 8)),
        "states": len(seen),
        "last_new_at": last_new,
        "episodes": episodes,
        "wins": wins,
    }


def check_suite(config: str, suite: str, steps: int, out: Path) -> dict[str, Any]:
    from bench.compare.benchmark import BenchConfig
    from spo3.actors.envs.registry import make_env
    from spo3.actors.envs.tasks import task_lists

    bench = BenchConfig.from_yaml(config)
    cfg = bench.run_config(suite, "3spo", 0, out)
    t0 = time.monotonic()
    train, held = task_lists(cfg.games, out / "games" / suite)
    made_s = time.monotonic() - t0
    overlap = set(train) & set(held)
    env = make_env(cfg.games.env)
    try:
        for task in (train[0], held[0]):
            obs = env.reset(task)
            if not obs.admissible_actions:
                raise RuntimeError(f"{suite}: {task} resets to a state with no admissible action")
        t0 = time.monotonic()
        max_steps = cfg.rollout.max_steps
        walk = random_walk(env, train[:1], steps, max_steps)
        walk_s = time.monotonic() - t0
        every = random_walk(env, train, steps, max_steps)
    finally:
        env.close()
    return {
        "config": config,
        "suite": suite,
        "train": len(train),
        "held_out": len(held),
        "overlap": len(overlap),
        "tasks_s": made_s,
        "walk_s": walk_s,
        "task": train[0],
        "max_steps": max_steps,
        "all_tasks": every,
        **walk,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config",
        action="append",
        help="Bench config(s) (default configs/bench-v2.yaml "
        "and, for comparison, configs/bench.yaml).",
    )
    p.add_argument("--suite", action="append", help="Only this suite (repeatable).")
    p.add_argument(
        "--steps", type=int, default=1200, help="Env steps of the random walk per suite."
    )
    p.add_argument("--out", help="Where generated games are kept (default: a temporary directory).")
    args = p.parse_args(argv)
    from bench.compare.benchmark import BenchConfig

    configs = args.config or ["configs/bench-v2.yaml", "configs/bench.yaml"]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-suites-"))
    print(
        "| config | suite | train / held-out tasks | max steps | distinct states in "
        f"{args.steps} steps, one task | by step {args.steps // 2} | last new state at step | episodes (won) | "
        f"walk s | distinct states in {args.steps} steps, all training tasks in turn | by step {args.steps // 2} |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    failed = 0
    for config in configs:
        for suite in BenchConfig.from_yaml(config).suites:
            if args.suite and suite not in args.suite:
                continue
            try:
                r = check_suite(config, suite, args.steps, out)
            except Exception as e:  # report every suite, then fail
                failed += 1
                print(f"| {config} | {suite} | FAILED: {type(e).__name__}: {e} |", flush=True)
                continue
            half = next(v for s, v in r["curve"] if s >= args.steps // 2)
            half_all = next(v for s, v in r["all_tasks"]["curve"] if s >= args.steps // 2)
            print(
                f"| {Path(config).name} | {suite} | {r['train']} / {r['held_out']}"
                f"{' (OVERLAP ' + str(r['overlap']) + ')' if r['overlap'] else ''} | {r['max_steps']} | "
                f"{r['states']} | {half} | {r['last_new_at']} | {r['episodes']} ({r['wins']}) | "
                f"{r['walk_s']:.0f} | {r['all_tasks']['states']} | {half_all} |",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
