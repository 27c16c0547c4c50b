"""Score-store benchmark: five figures from one run against one real redis-server it starts itself.

    .venv/bin/python -m bench.perf.score [--states 1000000] [--http-seconds 30] \
        [--http-clients 64] [--out bench.json]

1. read path: raw redis-py pipelined HMGET vs RedisScoreStore.scores on the same keys and batch;
2. commit path: sequential commit_leaf and batched commit_leaves, 20-state paths;
3. Redis memory per stored state after filling --states states (leaf markers reported apart);
4. redis-benchmark on the same server: what Redis itself can do on this machine;
5. the real HTTP service (`spo3 score-service` in a subprocess) under concurrent clients.

The memory fill runs first, on the empty server, so that its used_memory delta holds only the
states and markers it wrote; the other figures then run beside those 1M states, as in a real
run. Everything binds to loopback only. Prints a table and writes the numbers as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import redis
import typer

from bench.perf.harness import (
    Phases,
    Row,
    cpu_seconds,
    machine_busy_seconds,
    percentile,
    print_table,
    progress,
    start_score_service,
    wait_healthy,
    write_json,
)
from spo3.score_store.state_key import state_key
from spo3.score_store.store import LeafOutcome, RedisScoreStore
from spo3.transport.connection import LocalRedisServer, connect, redis_server_binary
from spo3.transport.procs import free_port

PATH_LEN = 20  # states per root-to-leaf path: the depth the commit and memory targets assume
READ_TARGET_RATIO = 0.5
COMMIT_TARGET_LEAVES_S = 10_000
MEMORY_TARGET_BYTES = 200

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


# --- helpers -----------------------------------------------------------------------------


def tree_path(env: str, task: str, i: int, depth: int = PATH_LEN, fanout: int = 4) -> list[str]:
    """Path i of a fanout-ary search tree of one task: leaves share their prefixes with their
    siblings (as rollouts branching from common states do) and the root is shared by all."""
    return [state_key(env, task, f"{d}:{i // fanout ** (depth - 1 - d)}") for d in range(depth)]


def unique_path(env: str, i: int, length: int = PATH_LEN) -> list[str]:
    """A path whose states appear nowhere else: every state it commits is a new hash."""
    return [state_key(env, f"task{i}", f"{i}:{d}") for d in range(length)]


def chunks(seq: list, size: int) -> Iterator[list]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def used_memory(client: redis.Redis) -> int:
    """INFO used_memory after a short pause, so client buffers of the last pipeline are freed."""
    time.sleep(0.3)
    return int(client.info("memory")["used_memory"])


def redis_info(client: redis.Redis, binary: str) -> dict:
    server = client.info("server")
    return {
        "binary": binary,
        "version": server.get("redis_version"),
        "malloc": client.info("memory").get("mem_allocator"),
        "cpus": os.cpu_count(),
    }


# --- figure 1: read path -----------------------------------------------------------------


def bench_reads(
    client: redis.Redis, *, n_keys: int, batch: int, reps: int
) -> tuple[dict, list[Row]]:
    """Keys/s of raw pipelined HMGET vs store.scores on the same existing keys and batch size.

    The raw variant is the ceiling for a client in Python (no Lua, no score arithmetic, no
    models); the ratio says how much of it the store keeps. A third, diagnostic variant calls
    the store's Lua script without the Python post-processing, to show where any gap comes from.
    """
    store = RedisScoreStore(client, run="bench-read")
    keys: list[str] = []
    for i in range(math.ceil(n_keys / PATH_LEN)):
        keys += unique_path("read", i)
    keys = keys[:n_keys]
    store.commit_leaves(
        [
            LeafOutcome(leaf_id=f"r{i}", path=p, success=float(i % 3 == 0))
            for i, p in enumerate(chunks(keys, PATH_LEN))
        ]
    )
    names = [store.names.state(k) for k in keys]
    batches = list(zip(chunks(keys, batch), chunks(names, batch)))

    def raw() -> None:
        for _, hashes in batches:
            pipe = client.pipeline(transaction=False)
            for h in hashes:
                pipe.hmget(h, "n", "s")
            pipe.execute()

    def ours() -> None:
        for ks, _ in batches:
            store.scores(ks)

    def lua_only() -> None:
        for _, hashes in batches:
            store._scores(keys=[store.names.leaves, *hashes])

    # Same answers first: a fast wrong read would be no result.
    sample_keys, sample_hashes = batches[0]
    pipe = client.pipeline(transaction=False)
    for h in sample_hashes:
        pipe.hmget(h, "n", "s")
    raw_counts = [(int(n or 0), int(s or 0)) for n, s in pipe.execute()]
    got = [(x.n_total, x.n_success) for x in store.scores(sample_keys).scores]
    if got != raw_counts:
        raise AssertionError("store.scores disagrees with HMGET on the same keys")

    variants = {"raw_hmget": raw, "store_scores": ours, "scores_lua_only": lua_only}
    elapsed = {k: 0.0 for k in variants}
    for fn in variants.values():  # warm-up: scripts loaded, pool connected, caches hot
        fn()
    for _ in range(reps):  # interleaved, so drift on a shared machine hits all variants alike
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            elapsed[name] += time.perf_counter() - t0
    rate = {k: reps * len(keys) / v for k, v in elapsed.items()}
    ratio = rate["store_scores"] / rate["raw_hmget"]
    result = {
        "keys": len(keys),
        "batch": batch,
        "reps": reps,
        "keys_per_s": rate,
        "ratio_scores_to_raw": ratio,
        "target_ratio": READ_TARGET_RATIO,
        "pass": ratio >= READ_TARGET_RATIO,
    }
    rows = [
        Row(
            f"1 raw HMGET n s, pipeline {batch}",
            f"{rate['raw_hmget']:,.0f} keys/s",
            "-",
            "baseline",
        ),
        Row(
            f"1 store.scores, batch {batch}",
            f"{rate['store_scores']:,.0f} keys/s",
            f">= {READ_TARGET_RATIO} x raw",
            f"{ratio:.2f} {'PASS' if result['pass'] else 'FAIL'}",
        ),
        Row(
            "1   (diag) scores Lua, no Python models",
            f"{rate['scores_lua_only']:,.0f} keys/s",
            "-",
            f"{rate['scores_lua_only'] / rate['raw_hmget']:.2f} x raw",
        ),
    ]
    return result, rows


# --- figure 2: commit path ---------------------------------------------------------------


def bench_commits(
    client: redis.Redis, *, seq_leaves: int, batched_leaves: int, batch: int
) -> tuple[dict, list[Row]]:
    """Leaves/s from one client: one commit_leaf per leaf, and commit_leaves in batches.

    Paths come from a 4-ary tree (shared prefixes, new leaves), built before the clock starts:
    hashing observations into keys is the actor's work, not the store's.
    """
    store = RedisScoreStore(client, run="bench-commit")
    rng = random.Random(2)
    seq = [
        LeafOutcome(
            leaf_id=f"seq-{i}",
            path=tree_path("commit", "seq", i),
            success=float(rng.random() < 0.3),
        )
        for i in range(seq_leaves)
    ]
    bat = [
        LeafOutcome(
            leaf_id=f"bat-{i}",
            path=tree_path("commit", "bat", i),
            success=float(rng.random() < 0.3),
        )
        for i in range(batched_leaves)
    ]
    store.commit_leaf("warm-up", seq[0].path, 0.0)  # script load + connection outside the clock

    t0 = time.perf_counter()
    seq_counted = sum(store.commit_leaf(x.leaf_id, x.path, x.success).counted for x in seq)
    seq_s = time.perf_counter() - t0

    client.config_resetstat()  # so commandstats below hold only the batched run's scripts
    t0 = time.perf_counter()
    bat_counted = sum(r.counted for part in chunks(bat, batch) for r in store.commit_leaves(part))
    bat_s = time.perf_counter() - t0
    # Redis's own time per script call: how far one Redis core could go if clients were free.
    lua_us = float(
        client.info("commandstats").get("cmdstat_evalsha", {}).get("usec_per_call", "nan")
    )

    if seq_counted != seq_leaves or bat_counted != batched_leaves:
        raise AssertionError(f"not every fresh leaf was counted: {seq_counted}, {bat_counted}")
    if store.stats().leaves_counted != seq_leaves + batched_leaves + 1:
        raise AssertionError("leaves counter disagrees with the commits made")
    seq_rate, bat_rate = seq_leaves / seq_s, batched_leaves / bat_s
    result = {
        "path_len": PATH_LEN,
        "target_leaves_per_s": COMMIT_TARGET_LEAVES_S,
        "sequential": {
            "leaves": seq_leaves,
            "seconds": seq_s,
            "leaves_per_s": seq_rate,
            "pass": seq_rate >= COMMIT_TARGET_LEAVES_S,
        },
        "batched": {
            "leaves": batched_leaves,
            "batch": batch,
            "seconds": bat_s,
            "leaves_per_s": bat_rate,
            "pass": bat_rate >= COMMIT_TARGET_LEAVES_S,
        },
        "redis_us_per_leaf": lua_us,
    }
    target = f">= {COMMIT_TARGET_LEAVES_S:,}/s"
    rows = [
        Row(
            f"2 commit_leaf sequential, {PATH_LEN}-state paths",
            f"{seq_rate:,.0f} leaves/s",
            target,
            f"{seq_rate / COMMIT_TARGET_LEAVES_S:.2f} {'PASS' if result['sequential']['pass'] else 'FAIL'}",
        ),
        Row(
            f"2 commit_leaves batch {batch}, {PATH_LEN}-state paths",
            f"{bat_rate:,.0f} leaves/s",
            target,
            f"{bat_rate / COMMIT_TARGET_LEAVES_S:.2f} {'PASS' if result['batched']['pass'] else 'FAIL'}",
        ),
        Row(
            "2   (diag) Redis time in commit script",
            f"{lua_us:.1f} us/leaf = {1e6 / lua_us:,.0f} leaves/s max",
        ),
    ]
    return result, rows


# --- figure 3: memory per state ----------------------------------------------------------


def bench_memory(client: redis.Redis, *, states: int, batch: int) -> tuple[dict, list[Row]]:
    """used_memory delta per state after committing `states` unique states in 20-state paths.

    Leaf markers (one small key with a TTL per leaf, for idempotent commits) are part of what a
    run stores, so the headline includes them; deleting them afterwards (UNLINK by name: the
    bench knows every leaf id, so no SCAN over 1M keys is needed) gives the states' own share.
    """
    store = RedisScoreStore(client, run="bench-mem")  # default leaf_ttl_s: markers expire in 7 days
    n_leaves = math.ceil(states / PATH_LEN)
    client.dbsize()
    base = used_memory(client)
    rng = random.Random(3)
    gen_s = commit_s = 0.0
    with progress(states, f"filling {states:,} states") as advance:
        for start in range(0, n_leaves, batch):
            t0 = time.perf_counter()
            leaves = []
            for i in range(start, min(start + batch, n_leaves)):
                length = min(PATH_LEN, states - i * PATH_LEN)
                leaves.append(
                    LeafOutcome(
                        leaf_id=f"m{i}",
                        path=unique_path("mem", i, length),
                        success=float(rng.random() < 0.3),
                    )
                )
            t1 = time.perf_counter()
            store.commit_leaves(leaves)
            commit_s += time.perf_counter() - t1
            gen_s += t1 - t0
            advance(sum(len(x.path) for x in leaves))
    stored = store.stats().n_states
    if stored != states:
        raise AssertionError(f"expected {states} states in the store, it counts {stored}")
    after = used_memory(client)
    # Redis's accounting of the keyspace dict: dictEntry + key robj + bucket arrays (both the
    # old and the new table while an incremental rehash is under way, as just after ~2^20 keys).
    db0 = client.memory_stats().get("db.0", {})
    sample = [
        store.names.state(k)
        for i in range(0, n_leaves, max(1, n_leaves // 200))
        for k in unique_path("mem", i, min(PATH_LEN, states - i * PATH_LEN))[:2]
    ]
    usage = [client.memory_usage(h, samples=0) or 0 for h in sample]

    keys_after = client.dbsize()
    pipe = client.pipeline(transaction=False)
    for part in chunks([store.names.leaf(f"m{i}") for i in range(n_leaves)], 1000):
        pipe.unlink(*part)
    unlinked = sum(pipe.execute())
    without_markers = used_memory(client)
    if unlinked != n_leaves or client.dbsize() != keys_after - n_leaves:
        raise AssertionError("leaf markers were not all removed, or other keys changed")

    gross = (after - base) / states
    net = (without_markers - base) / states
    markers = (after - without_markers) / states
    result = {
        "states": states,
        "leaves": n_leaves,
        "leaf_ttl_s": store.leaf_ttl_s,
        "fill_seconds": gen_s + commit_s,
        "fill_commit_seconds": commit_s,
        "fill_keygen_seconds": gen_s,
        "states_per_s": states / (gen_s + commit_s),
        "used_memory": {
            "before": base,
            "after_fill": after,
            "after_unlinking_markers": without_markers,
        },
        "bytes_per_state": gross,
        "bytes_per_state_without_markers": net,
        "marker_bytes_per_state": markers,
        "bytes_per_marker": (after - without_markers) / n_leaves,
        "memory_stats_db0": db0,
        "keys_after_fill": keys_after,
        "main_dict_bytes_per_key": db0.get("overhead.hashtable.main", 0) / max(1, keys_after),
        "memory_usage_sampled_state_mean": sum(usage) / max(1, len(usage)),
        "target_bytes_per_state": MEMORY_TARGET_BYTES,
        "pass": gross <= MEMORY_TARGET_BYTES,
    }
    target = f"<= {MEMORY_TARGET_BYTES} B"
    rows = [
        Row(
            f"3 memory/state at {states:,} states, all",
            f"{gross:,.1f} B",
            target,
            f"{gross / MEMORY_TARGET_BYTES:.2f} {'PASS' if result['pass'] else 'FAIL'}",
        ),
        Row(
            "3   of which states (markers unlinked)",
            f"{net:,.1f} B",
            target,
            f"{net / MEMORY_TARGET_BYTES:.2f} {'PASS' if net <= MEMORY_TARGET_BYTES else 'FAIL'}",
        ),
        Row(
            "3   of which leaf markers",
            f"{markers:,.1f} B ({result['bytes_per_marker']:,.0f} B/marker)",
        ),
        Row(
            "3   (diag) Redis keyspace overhead/key", f"{result['main_dict_bytes_per_key']:,.1f} B"
        ),
        Row(
            "3   (diag) MEMORY USAGE of a state hash",
            f"{result['memory_usage_sampled_state_mean']:,.0f} B",
        ),
        Row(
            "3 fill time (keygen + commit_leaves)",
            f"{gen_s + commit_s:,.1f} s ({gen_s:,.1f} + {commit_s:,.1f}), {result['states_per_s']:,.0f} states/s",
        ),
    ]
    return result, rows


# --- figure 4: Redis's own limit ---------------------------------------------------------


def bench_redis_benchmark(port: int, server_binary: str) -> tuple[dict, list[Row]]:
    """redis-benchmark against the same server: requests/s Redis itself sustains here, to put
    the store's figures (each leaf is ~60 Redis calls inside Lua) in proportion."""
    tool = Path(server_binary).with_name("redis-benchmark")
    tool = str(tool) if tool.exists() else shutil.which("redis-benchmark")
    if not tool:
        return {"error": "redis-benchmark not found"}, [Row("4 redis-benchmark", "not found")]
    result, rows = {"binary": tool}, []
    for name, cmd in (
        ("hincrby", ["hincrby", "bench:rb:hash", "field", "1"]),
        ("hmget", ["hmget", "bench:rb:hash", "n", "s"]),
    ):
        proc = subprocess.run(
            [tool, "-h", "127.0.0.1", "-p", str(port), "-q", "-n", "100000", "-P", "16", *cmd],
            capture_output=True,
            text=True,
            timeout=120,
        )
        found = re.findall(r"([\d.]+) requests per second", proc.stdout.replace("\r", "\n"))
        rps = float(found[-1]) if found else float("nan")
        result[name] = {"command": " ".join(cmd), "requests_per_s": rps}
        rows.append(
            Row(
                f"4 redis-benchmark -P 16 {cmd[0].upper()}",
                f"{rps:,.0f} req/s",
                "-",
                "server ceiling",
            )
        )
    return result, rows


# --- figure 5: the HTTP service ----------------------------------------------------------


async def drive(
    base: str,
    token: str,
    *,
    seconds: float,
    clients: int,
    key_pool: list[str],
    score_share: float = 0.8,
    keys_per_score: int = 32,
) -> dict:
    """`clients` tasks, each sending one request at a time on its own connection until the
    deadline: ~80% reads of 32 keys, ~20% commits of a fresh 20-state path. Returns the raw
    latencies (recorded only inside the timed window) and errors by kind."""
    import httpx

    lat: dict[str, list[float]] = {"scores": [], "leaves": []}
    errors: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {token}"}
    async with contextlib.AsyncExitStack() as stack:
        # One AsyncClient (one keep-alive connection) per task: a single client shared by 64
        # tasks spends its CPU in httpcore's pool bookkeeping (encode/httpx#3215) and measured
        # ~3x fewer requests/s here, with the service mostly idle: it measured httpx, not us.
        https = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=base,
                    timeout=10.0,
                    headers=headers,
                    limits=httpx.Limits(max_connections=1),
                )
            )
            for _ in range(clients)
        ]

        async def worker(w: int, deadline: float, record: bool) -> None:
            http, rng, i = https[w], random.Random(w), 0
            while time.perf_counter() < deadline:
                i += 1
                if rng.random() < score_share:
                    route, url, body = (
                        "scores",
                        "/v1/scores",
                        {"keys": rng.sample(key_pool, keys_per_score)},
                    )
                else:
                    leaf = f"http-{'run' if record else 'warm'}-{w}-{i}"
                    route, url, body = (
                        "leaves",
                        "/v1/leaves",
                        {
                            "leaf_id": leaf,
                            "path": tree_path("http", f"task{w % 8}", w * 1_000_000 + i),
                            "success": float(rng.random() < 0.3),
                        },
                    )
                t0 = time.perf_counter()
                try:
                    r = await http.post(url, json=body)
                    bad = None if 200 <= r.status_code < 300 else f"HTTP {r.status_code}"
                except Exception as e:  # a timeout or reset counts as an error, not a crash
                    bad = type(e).__name__
                if record:
                    lat[route].append(time.perf_counter() - t0)
                    if bad:
                        errors[bad] = errors.get(bad, 0) + 1

        # Warm-up (not recorded): opens the connections and fills the server's thread pool.
        await asyncio.gather(*(worker(w, time.perf_counter() + 1.0, False) for w in range(clients)))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w, t0 + seconds, True) for w in range(clients)))
        elapsed = time.perf_counter() - t0
    return {"lat": lat, "errors": errors, "elapsed": elapsed}


def bench_http(
    client: redis.Redis, redis_url: str, redis_pid: int, *, seconds: float, clients: int
) -> tuple[dict, list[Row]]:
    """Requests/s, latency and errors of the real service; CPU use of client, service and Redis
    is reported too, because on a small machine all three share the same cores."""
    token, port = secrets.token_urlsafe(24), free_port()
    base = f"http://127.0.0.1:{port}"
    # Existing states for the reads: a few thousand committed paths of the service's run.
    seeded = RedisScoreStore(client, run="bench-http")
    pool: list[str] = []
    for part in chunks(list(range(2000)), 256):
        leaves = [
            LeafOutcome(
                leaf_id=f"seed-{i}",
                path=tree_path("http", f"task{i % 8}", i),
                success=float(i % 4 == 0),
            )
            for i in part
        ]
        seeded.commit_leaves(leaves)
        pool += [k for x in leaves for k in x.path]
    pool = list(dict.fromkeys(pool))

    log = tempfile.NamedTemporaryFile(prefix="spo3-bench-service-", suffix=".log", delete=False)
    proc = start_score_service(redis_url, run="bench-http", token=token, port=port, stdout=log)
    try:
        startup = wait_healthy(base, proc)
        cpu0 = (os.times(), cpu_seconds(proc.pid), cpu_seconds(redis_pid), machine_busy_seconds())
        out = asyncio.run(drive(base, token, seconds=seconds, clients=clients, key_pool=pool))
        cpu1 = (os.times(), cpu_seconds(proc.pid), cpu_seconds(redis_pid), machine_busy_seconds())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

    elapsed = out["elapsed"]
    everything = sorted(out["lat"]["scores"] + out["lat"]["leaves"])
    n_err = sum(out["errors"].values())
    per_route = {}
    for route, values in out["lat"].items():
        values.sort()
        per_route[route] = {
            "requests": len(values),
            "requests_per_s": len(values) / elapsed,
            "p50_ms": 1e3 * percentile(values, 0.5),
            "p99_ms": 1e3 * percentile(values, 0.99),
        }
    cpu = {
        "bench_client": (cpu1[0].user + cpu1[0].system - cpu0[0].user - cpu0[0].system) / elapsed,
        "service": (cpu1[1] - cpu0[1]) / elapsed,
        "redis": (cpu1[2] - cpu0[2]) / elapsed,
    }
    cpu["other_processes"] = max(0.0, (cpu1[3] - cpu0[3]) / elapsed - sum(cpu.values()))
    result = {
        "clients": clients,
        "seconds": elapsed,
        "service_startup_s": startup,
        "requests": len(everything),
        "requests_per_s": len(everything) / elapsed,
        "p50_ms": 1e3 * percentile(everything, 0.5),
        "p99_ms": 1e3 * percentile(everything, 0.99),
        "routes": per_route,
        "errors": n_err,
        "error_kinds": out["errors"],
        "cpu_cores_used": cpu,
        "service_log": log.name,
        "pass": n_err == 0,
    }
    rows = [
        Row(
            f"5 HTTP {clients} clients x {seconds:g} s, all",
            f"{result['requests_per_s']:,.0f} req/s",
        ),
        Row("5   latency p50 / p99, all", f"{result['p50_ms']:.1f} / {result['p99_ms']:.1f} ms"),
        *[
            Row(
                f"5   {r} (p50 / p99)",
                f"{v['requests_per_s']:,.0f} req/s ({v['p50_ms']:.1f} / {v['p99_ms']:.1f} ms)",
            )
            for r, v in per_route.items()
        ],
        Row(
            "5   errors (non-2xx + exceptions)",
            f"{n_err} of {len(everything):,}",
            "0",
            "PASS" if n_err == 0 else f"FAIL {out['errors']}",
        ),
        Row(
            "5   (diag) CPU cores: client/service/redis/other",
            f"{cpu['bench_client']:.2f} / {cpu['service']:.2f} / {cpu['redis']:.2f} / "
            f"{cpu['other_processes']:.2f} of {os.cpu_count()}",
        ),
    ]
    return result, rows


# --- driver ------------------------------------------------------------------------------


@app.command()
def main(
    states: Annotated[
        int, typer.Option(help="States to store for the memory figure.", min=PATH_LEN)
    ] = 1_000_000,
    http_seconds: Annotated[float, typer.Option(help="Duration of the HTTP load.", min=1)] = 30.0,
    http_clients: Annotated[int, typer.Option(help="Concurrent HTTP clients.", min=1)] = 64,
    read_keys: Annotated[
        int, typer.Option(help="Existing state keys read in figure 1.", min=1)
    ] = 20_000,
    read_batch: Annotated[
        int, typer.Option(help="Keys per pipeline / scores() call.", min=1)
    ] = 1024,
    read_reps: Annotated[int, typer.Option(help="Timed passes over the read keys.", min=1)] = 5,
    seq_leaves: Annotated[int, typer.Option(help="Leaves committed one by one.", min=1)] = 5_000,
    batched_leaves: Annotated[
        int, typer.Option(help="Leaves committed with commit_leaves.", min=1)
    ] = 25_600,
    commit_batch: Annotated[int, typer.Option(help="Leaves per commit_leaves call.", min=1)] = 256,
    redis_server: Annotated[
        str | None, typer.Option(help="redis-server binary (default: the system one).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Where to write the numbers as JSON.")] = Path(
        "score_store_bench.json"
    ),
) -> None:
    """Benchmark the score store and its HTTP service on a redis-server started for the run."""
    phases = Phases()
    binary = redis_server or redis_server_binary()
    results: dict = {
        "args": {
            "states": states,
            "http_seconds": http_seconds,
            "http_clients": http_clients,
            "read_keys": read_keys,
            "read_batch": read_batch,
            "read_reps": read_reps,
            "seq_leaves": seq_leaves,
            "batched_leaves": batched_leaves,
            "commit_batch": commit_batch,
        }
    }
    rows: dict[str, list[Row]] = {}
    with LocalRedisServer(binary=binary) as server:
        client = connect(server.url)
        results["redis"] = redis_info(client, binary)
        r = results["redis"]
        print(
            f"redis-server {r['version']} ({r['malloc']}) at {server.url}, {r['cpus']} CPUs",
            flush=True,
        )
        # Memory first: on the empty server its delta holds only what the fill wrote.
        for key, label, fn in (
            ("memory", "3 memory", lambda: bench_memory(client, states=states, batch=1024)),
            (
                "reads",
                "1 reads",
                lambda: bench_reads(client, n_keys=read_keys, batch=read_batch, reps=read_reps),
            ),
            (
                "commits",
                "2 commits",
                lambda: bench_commits(
                    client, seq_leaves=seq_leaves, batched_leaves=batched_leaves, batch=commit_batch
                ),
            ),
            (
                "redis_benchmark",
                "4 redis-benchmark",
                lambda: bench_redis_benchmark(server.port, binary),
            ),
            (
                "http",
                "5 http",
                lambda: bench_http(
                    client, server.url, server._proc.pid, seconds=http_seconds, clients=http_clients
                ),
            ),
        ):
            results[key], rows[key] = phases.run(key, label, fn, load=False)
        client.close()
    total = phases.elapsed()
    results["phase_seconds"], results["total_seconds"] = phases.seconds, total
    write_json(out, results)
    ordered = [
        row
        for key in ("reads", "commits", "memory", "redis_benchmark", "http")
        for row in rows[key]
    ]
    print()
    print_table(
        ordered,
        f"score store benchmark: redis {r['version']} ({r['malloc']}), "
        f"{r['cpus']} CPUs, total {total:.0f} s",
    )
    print(f"\n{phases.summary()}")
    print(f"JSON: {out}")


if __name__ == "__main__":
    app()
