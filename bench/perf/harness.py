"""The benchmarks' shared harness: result rows and their table, JSON output, progress, phases
timed with the machine's CPU load beside them (other processes' load makes every figure low and
noisy, so each phase reports it and flags it above a threshold), and the score service started
as its own process.

Every benchmark (score, actor, policy, learner) prints one table of `Row`s and writes its numbers
as JSON with `write_json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spo3.transport.procs import NotReady, die_with_parent, wait_ready

OTHER_LOAD_WARN = 0.2  # cores used by other processes above which a phase's figures are flagged


@dataclass
class Row:
    figure: str
    value: str
    target: str = "-"
    verdict: str = ""


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine spent busy (/proc/stat), to see other load."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    except (OSError, ValueError, IndexError):
        return 0.0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc; 0 where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


@contextlib.contextmanager
def progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar when rich is importable, else a line every 10%."""
    try:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
    except ImportError:
        done, next_mark, start = 0, 0.1, time.perf_counter()

        def advance(n: int) -> None:
            nonlocal done, next_mark
            done += n
            while done >= next_mark * total and next_mark <= 1.0:
                print(
                    f"  {label}: {done:,}/{total:,} ({time.perf_counter() - start:.1f} s)",
                    flush=True,
                )
                next_mark += 0.1

        yield advance
        return
    with Progress(
        TextColumn("  {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def process_cpu() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far) of every process on the machine (/proc)."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
                out[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
            except (OSError, IndexError, ValueError):
                pass
    return out


def foreign_cores(before: dict, after: dict, wall: float) -> float:
    """Cores used meanwhile by processes that are not this one or its descendants (other jobs
    on the machine: their load makes every figure here low and noisy)."""
    parent = {pid: v[0] for pid, v in {**before, **after}.items()}
    ours, me = set(), os.getpid()
    for pid in parent:
        chain, p = [], pid
        while p and p not in ours and p != me and p in parent and len(chain) < 64:
            chain.append(p)
            p = parent[p]
        if p == me or p in ours:
            ours.update(chain)
    used = sum(
        after[p][1] - before[p][1]
        for p in after.keys() & before.keys()
        if p not in ours and p != me
    )
    return used / wall if wall > 0 else 0.0


def busy_cores(fn: Callable[[], Any]) -> tuple[Any, float, float, float]:
    """Run fn; return its result, its wall seconds, the machine's busy cores meanwhile and the
    cores used by other processes than ours."""
    b0, p0, t0 = machine_busy_seconds(), process_cpu(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    return out, wall, (machine_busy_seconds() - b0) / wall, foreign_cores(p0, process_cpu(), wall)


def other_load(seconds: float = 1.0) -> float:
    """Busy cores of the machine while this process sleeps: load from others (pytest, ...)."""
    b0 = machine_busy_seconds()
    time.sleep(seconds)
    return (machine_busy_seconds() - b0) / seconds


def load_at_start() -> float:
    """Cores other processes use now (other_load), printing a warning when that flags the figures."""
    load = other_load()
    if load > OTHER_LOAD_WARN:
        print(
            f"warning: {load:.2f} cores busy before the benchmark started (other processes share "
            "the cores): figures will be low and noisy",
            flush=True,
        )
    return load


def process_tree_cpu_seconds(root: int) -> float:
    """utime + stime of a process and all its live descendants (/proc); 0 where /proc is missing."""
    procs = process_cpu()
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += procs.get(pid, (0, 0.0))[1]
        todo += [child for child, (parent, _) in procs.items() if parent == pid]
    return total


def print_table(rows: list[Row], header: str) -> None:
    cols = [
        ("figure", [r.figure for r in rows]),
        ("value", [r.value for r in rows]),
        ("target", [r.target for r in rows]),
        ("ratio / pass", [r.verdict for r in rows]),
    ]
    widths = [max(len(title), *(len(v) for v in values)) for title, values in cols]
    line = "+".join("-" * (w + 2) for w in widths)
    print(header)
    print(" | ".join(title.ljust(w) for (title, _), w in zip(cols, widths)))
    print(line)
    for i, r in enumerate(rows):
        if i and r.figure[0] != rows[i - 1].figure[0]:
            print(line)
        print(
            " | ".join(v.ljust(w) for v, w in zip((r.figure, r.value, r.target, r.verdict), widths))
        )


def write_json(out: Path, results: dict) -> None:
    """The benchmark's numbers as JSON (values JSON does not know are written as text)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))


class Phases:
    """Runs a benchmark's phases one after the other: prints each with the time since the start,
    records its wall seconds and the cores other processes used meanwhile, and warns when they
    exceed OTHER_LOAD_WARN."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.other_cores: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, key: str, label: str, fn: Callable[[], Any], *, load: bool = True) -> Any:
        """fn's result; a dict result also gets the phase's busy and other-process cores."""
        print(f"[{self.elapsed():6.1f} s] {label} ...", flush=True)
        if not load:
            t0 = time.perf_counter()
            out = fn()
            self.seconds[key] = time.perf_counter() - t0
            return out
        out, self.seconds[key], busy, self.other_cores[key] = busy_cores(fn)
        if isinstance(out, dict):
            out["machine_busy_cores_phase"], out["other_processes_cores_phase"] = (
                busy,
                self.other_cores[key],
            )
        if self.other_cores[key] > OTHER_LOAD_WARN:
            print(
                f"  warning: other processes used {self.other_cores[key]:.2f} cores during this phase",
                flush=True,
            )
        return out

    def worst(self, at_start: float = 0.0) -> tuple[str, float]:
        """(phase, cores) with the most load from other processes (`at_start`: measured before)."""
        if not self.other_cores or at_start > max(self.other_cores.values()):
            return "at start", at_start
        key = max(self.other_cores, key=self.other_cores.get)
        return key, self.other_cores[key]

    def summary(self) -> str:
        return "phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items())


def spo3_command() -> str:
    """The `spo3` command of this interpreter's environment."""
    import shutil

    spo3 = Path(sys.executable).with_name("spo3")
    found = str(spo3) if spo3.exists() else shutil.which("spo3")
    if not found:
        raise RuntimeError("the spo3 command is not installed (pip install -e .)")
    return found


def start_score_service(
    redis_url: str,
    *,
    run: str,
    token: str,
    port: int,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.STDOUT,
) -> subprocess.Popen:
    """The real CLI (`spo3 score-service`, uvicorn) on loopback for one run; stops with this process."""
    env = {**os.environ, "SPO3_API_TOKEN": token}
    return subprocess.Popen(
        [
            spo3_command(),
            "score-service",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--redis-url",
            redis_url,
            "--run",
            run,
        ],
        env=env,
        stdout=stdout,
        stderr=stderr,
        preexec_fn=die_with_parent,
    )


def wait_healthy(
    base: str, proc: subprocess.Popen, timeout_s: float = 60.0, path: str = "/healthz"
) -> float:
    """Seconds until `base + path` answered 200; RuntimeError if `proc` exited or time ran out."""
    import httpx

    def answers() -> None:
        if httpx.get(f"{base}{path}", timeout=1.0).status_code != 200:
            raise NotReady

    t0 = time.perf_counter()
    if wait_ready(
        answers, timeout_s=timeout_s, interval_s=0.1, proc=proc, retry_on=(httpx.HTTPError,)
    ):
        return time.perf_counter() - t0
    if proc.poll() is not None:
        raise RuntimeError(f"{base} exited with {proc.returncode} before it answered")
    raise RuntimeError(f"{base} did not answer {path} within {timeout_s} s")
