"""`spo3-bench`: 3SPO vs GRPO vs GiGPO at equal env steps (configs/bench-v2.yaml), or a settings sweep
(configs/bench-sweep.yaml). The parts' own benchmarks are modules: `python -m bench.perf.score` etc.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def bench_cmd(
    config: Annotated[
        str, typer.Option(help="Suites and shared run settings (YAML, see configs/bench-v2.yaml).")
    ] = "configs/bench-v2.yaml",
    suite: Annotated[
        list[str] | None,
        typer.Option(help="Only this suite (repeatable). Default: every suite in the config."),
    ] = None,
    algo: Annotated[
        list[str] | None, typer.Option(help="Only this algorithm: 3spo, grpo, gigpo (repeatable).")
    ] = None,
    seed: Annotated[
        list[int] | None, typer.Option(help="Only these seeds (repeatable; default the config's).")
    ] = None,
    env_steps: Annotated[
        int | None, typer.Option(help="Budget of new env steps per run (overrides the config).")
    ] = None,
    time_limit_s: Annotated[
        float | None,
        typer.Option(
            help="Per-run wall-time guard on training, in seconds (overrides the config)."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a run setting for every run, "
            "KEY=VALUE with a dotted key (repeatable), e.g. score.alpha=50.",
        ),
    ] = None,
    sweep: Annotated[
        str | None,
        typer.Option(
            help="Run a settings sweep (YAML, see configs/bench-sweep.yaml) "
            "instead of the bench: best variant per algorithm on its tuning suites."
        ),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            help="Output directory; re-running with the same one skips the runs "
            "already recorded there (results/<suite>/*.json)."
        ),
    ] = None,
    report_only: Annotated[
        bool,
        typer.Option(
            help="Run nothing: write the tables and plots from the runs "
            "already recorded in --out (only those --suite/--algo/--seed "
            "name, if given)."
        ),
    ] = False,
    no_progress: Annotated[bool, typer.Option(help="No live progress bar.")] = False,
) -> None:
    """3SPO vs GRPO vs GiGPO at equal env steps over paired seeds: held-out success at fixed env-step
    checkpoints, visited (task, key) pairs, steps to threshold, costs; bootstrap 95% intervals on the
    paired differences and ratios (results.json, summary.md, one plot per suite). Shardable
    (--suite/--algo/--seed run only those runs; the report covers every run of the config recorded in
    --out) and resumable (same --out)."""
    from pydantic import ValidationError

    from bench.compare.benchmark import (
        BenchConfig,
        Shard,
        SweepConfig,
        bench_settings_check,
        now_tag,
        run_bench,
        run_sweep,
        select,
    )
    from spo3.app.config import settings_error

    for a in algo or []:
        if a not in ("3spo", "grpo", "gigpo"):
            raise typer.BadParameter(f"--algo must be 3spo, grpo or gigpo, not {a!r}")
    if report_only and not out:
        raise typer.BadParameter("--report-only needs --out (the directory of an earlier bench)")
    try:
        if sweep:
            if env_steps or time_limit_s or set_:
                raise typer.BadParameter(
                    "--sweep takes its budget and settings from the sweep file"
                )
            out_dir = Path(out) if out else Path("bench-results") / f"sweep-{now_tag()}"
            report = run_sweep(
                SweepConfig.from_yaml(sweep),
                out_dir,
                algos=algo,
                seeds=seed,
                suites=suite,
                progress=not no_progress,
                report_only=report_only,
            )
            typer.echo(f"results: {out_dir / 'sweep.md'}")
            if report["failed"]:
                raise typer.Exit(1)
            return
        whole = BenchConfig.from_yaml(config)
        bench = select(whole, suite, algo, seed, env_steps, time_limit_s, set_)
        bench_settings_check(bench)  # every planned run's settings, before the first starts
        shard = Shard()
        if not report_only:  # run the runs the filters name; report every recorded run of the bench
            shard = Shard(tuple(suite or ()), tuple(algo or ()), tuple(seed or ()))
            bench = select(
                whole,
                None,
                None,
                sorted({*whole.seeds, *(seed or [])}),
                env_steps,
                time_limit_s,
                set_,
            )
        out_dir = Path(out) if out else Path("bench-results") / f"algos-{now_tag()}"
        results = run_bench(
            bench, out_dir, shard=shard, progress=not no_progress, report_only=report_only
        )
    except (ValueError, ValidationError, FileNotFoundError) as e:
        raise typer.BadParameter(settings_error(e)) from None
    typer.echo(f"results: {out_dir / 'summary.md'}")
    if results["failed"]:
        typer.echo(
            f"{len(results['failed'])} run(s) failed: {out_dir / 'failures.jsonl'}", err=True
        )
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
