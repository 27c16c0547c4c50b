"""Actors through the state-score service: real `spo3 score-service` processes on a real Redis,
actor processes playing real TextWorld games with a seeded (deterministic) policy.

The direct path (the store's Lua on Redis) is the reference: the same actor on the same tasks
with the same seed must leave exactly the same counts through the service, also when the
service is killed and restarted while the actor works."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from spo3.actors.envs.textworld_env import generate_games
from spo3.score_store.client import ScoreServiceError, ServiceScoreStore
from spo3.score_store.store import LeafOutcome
from spo3.transport.connection import connect
from spo3.transport.procs import free_port
from spo3.transport.redis_names import RedisNames
from spo3.transport.stream import GroupStream
from spo3.transport.work_queue import WorkQueue

pytestmark = [pytest.mark.redis, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SPO3 = str(Path(sys.executable).with_name("spo3"))
ACTOR = str(REPO / "tests" / "integration" / "scripts" / "scripted_actor.py")
TOKEN = "actor-test-token"
ROLLOUT = {"max_steps": 3, "max_leaves": 30, "choice_mode": True, "env_step_budget": 40}


@pytest.fixture(scope="module")
def games(tmp_path_factory):
    return generate_games(tmp_path_factory.mktemp("games"), "tw-coin_collector", 6, seed=3)


class Service:
    """`spo3 score-service` as a process on a fixed port, so it can be killed and started again."""

    def __init__(self, redis_url: str, run: str, *extra: str) -> None:
        self.port, self.args = (
            free_port(),
            [
                SPO3,
                "score-service",
                "--redis-url",
                redis_url,
                "--run",
                run,
                "--token",
                TOKEN,
                *extra,
            ],
        )
        self.url, self.proc = f"http://127.0.0.1:{self.port}", None

    def start(self) -> Service:
        self.proc = subprocess.Popen(
            [*self.args, "--port", str(self.port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read().decode()[-2000:]
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("score service did not become healthy")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=15)

    def metric(self, sample: str) -> float:
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        return 0.0


def start_actor(redis_url: str, run: str, seed: int, **extra) -> subprocess.Popen:
    spec = {
        "redis_url": redis_url,
        "run": run,
        "seed": seed,
        "exit_when_idle_s": 1.0,
        "rollout": ROLLOUT,
        **extra,
    }
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, ACTOR, json.dumps(spec)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(actor: subprocess.Popen, timeout: float = 300) -> dict:
    out, _ = actor.communicate(timeout=timeout)
    assert actor.returncode == 0, out[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def fill_queue(redis_url: str, run: str, games: list[str]) -> None:
    queue = WorkQueue(connect(redis_url), run)
    for i, game in enumerate(games * 2):  # each game twice: the second pass sees the first's counts
        queue.put("textworld", game, item_id=f"item-{i}")


def counts(redis_url: str, run: str) -> dict:
    """Every state's (n, s) and the run's totals, keyed without the run prefix."""
    client, names = connect(redis_url), RedisNames(run)
    prefix = names.state("")
    states = {}
    for key in client.scan_iter(match=prefix + "*", count=1000):
        h = client.hgetall(key)
        states[key.decode()[len(prefix) :]] = (int(h[b"n"]), int(h.get(b"s", 0)))
    totals = {k.decode(): int(v) for k, v in client.hgetall(names.actor_totals).items()}
    groups = sorted((g.group_id, len(g.members)) for g in GroupStream(client, run).read_all())
    return {
        "leaves": int(client.get(names.leaves) or 0),
        "states": states,
        "totals": totals,
        "groups": groups,
    }


def direct_reference(redis_url: str, games: list[str], seed: int) -> dict:
    fill_queue(redis_url, "direct", games)
    assert finish(start_actor(redis_url, "direct", seed))["finished"] == 2 * len(games)
    ref = counts(redis_url, "direct")
    assert ref["leaves"] >= 6 and len(ref["states"]) >= 5 and ref["groups"], ref
    return ref


def test_actor_through_the_service_counts_what_the_direct_path_counts(redis_url, games):
    ref = direct_reference(redis_url, games, seed=7)
    service = Service(redis_url, "svc").start()
    try:
        fill_queue(redis_url, "svc", games)
        report = finish(start_actor(redis_url, "svc", 7, score_url=service.url, score_token=TOKEN))
        got = counts(redis_url, "svc")
        assert report["finished"] == 2 * len(games)
        assert got == ref  # same states, same counts, same groups: the same rollouts
        assert report["score_errors"] == 0
        # Every score request went to the service; leaves rode along (one request per scoring).
        batches = service.metric('spo3_score_requests_total{route="/v1/batch",status="200"}')
        assert (
            batches == report["score_requests"] - 2
        )  # minus the start's GET /v1/stats and /v1/params
        assert service.metric('spo3_score_leaves_total{counted="true"}') == ref["leaves"]
        stats = httpx.get(f"{service.url}/v1/stats").json()
        assert (stats["leaves_counted"], stats["duplicate_commits"]) == (ref["leaves"], 0)
    finally:
        service.stop()


def test_service_killed_and_restarted_mid_rollout_loses_and_doubles_nothing(redis_url, games):
    ref = direct_reference(redis_url, games, seed=11)
    service = Service(redis_url, "restart").start()
    try:
        fill_queue(redis_url, "restart", games)
        actor = start_actor(
            redis_url, "restart", 11, score_url=service.url, score_token=TOKEN, score_retry_s=90
        )
        leaves = RedisNames("restart").leaves
        client = connect(redis_url)
        deadline = time.monotonic() + 120
        while int(client.get(leaves) or 0) < 5:  # mid-rollout: some leaves counted, more to come
            assert actor.poll() is None and time.monotonic() < deadline, actor.stdout.read()[-3000:]
            time.sleep(0.02)
        service.kill()
        at_kill = int(client.get(leaves) or 0)
        time.sleep(1.5)  # the actor meets a dead service and keeps retrying
        assert actor.poll() is None
        service.start()
        report = finish(actor)
        got = counts(redis_url, "restart")
        assert at_kill < ref["leaves"], "the kill came after the last leaf: nothing was tested"
        assert (
            report["finished"] == 2 * len(games) and report["score_errors"] >= 1
        )  # it met the dead service
        assert (
            got == ref
        )  # exact: no leaf counted twice or lost, and the rollouts went on unchanged
    finally:
        service.stop()


def test_actor_refuses_parameters_that_differ_from_the_service(redis_url, games):
    service = Service(redis_url, "params", "--alpha", "50").start()
    try:
        WorkQueue(connect(redis_url), "params").put("textworld", games[0], item_id="p-1")
        # The policy server is never asked: the actor stops before its first task.
        base = [
            SPO3,
            "actor",
            "--redis-url",
            redis_url,
            "--run",
            "params",
            "--policy-url",
            f"http://127.0.0.1:{free_port()}",
            "--score-url",
            service.url,
            "--score-token",
            TOKEN,
        ]
        out = subprocess.run(
            [*base, "--alpha", "2", "--g-max", "8"], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 2, out.stdout + out.stderr
        assert (
            "alpha: actor 2.0, service 50.0" in out.stderr
            and "g_max" not in out.stderr.split("differ")[1]
        )
        assert WorkQueue(connect(redis_url), "params").counts()["ready"] == 1  # it took no work
        # No explicit parameters: the actor takes the service's (and says so).
        actor = start_actor(redis_url, "params", 0, score_url=service.url, score_token=TOKEN)
        out, _ = actor.communicate(timeout=300)
        assert actor.returncode == 0 and json.loads(out.splitlines()[-1])["finished"] == 1, out[
            -3000:
        ]
        assert "parameters from it: alpha=50.0" in out
    finally:
        service.stop()


def test_client_errors_are_clear_and_retries_are_bounded(redis_url):
    service = Service(redis_url, "client").start()
    try:
        with ServiceScoreStore(service.url, "wrong-token", retry_s=2) as bad:
            with pytest.raises(ScoreServiceError, match="401.*--score-token"):
                bad.scores(["a"])
        with ServiceScoreStore(service.url, TOKEN) as store:
            assert store.commit_leaf("l1", ["r", "a"], 1.0).counted is None  # queued
            assert store.pending and store.requests == 0
            batch = store.scores(
                ["a", "b"]
            )  # the queued leaf is counted first, in the same request
            assert store.requests == 1 and not store.pending
            assert [(s.key, s.n_total, s.n_success) for s in batch.scores] == [
                ("a", 1, 1),
                ("b", 0, 0),
            ]
            results = store.commit_leaves(
                [
                    LeafOutcome(leaf_id="l1", path=["r", "a"], success=1.0),
                    LeafOutcome(leaf_id="l2", path=["r", "b"], success=0.0),
                ]
            )
            assert [r.counted for r in results] == [False, True]  # l1 again: idempotent
            assert store.stats().leaves_counted == 2
            assert store.params().alpha == 1.0 and store.served_run() == "client"
        service.kill()
        with ServiceScoreStore(service.url, TOKEN, retry_s=1.5) as store:
            store.commit_leaf("l3", ["r"], 1.0)
            start = time.monotonic()
            with pytest.raises(Exception, match="unreachable.*spo3 score-service"):
                store.scores(["a"])
            assert time.monotonic() - start < 6
            assert (
                len(store.pending) == 1
            )  # not confirmed: still queued, sent with the next request
    finally:
        service.stop()
    with pytest.raises(ValueError, match="http"):
        ServiceScoreStore("redis://x", TOKEN)
