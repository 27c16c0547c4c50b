"""The real entry points: `spo3 score-service` as a process (uvicorn and Ray Serve)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from spo3.transport.procs import free_port

pytestmark = pytest.mark.redis

SPO3 = str(Path(sys.executable).with_name("spo3"))


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"service exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}"
            )
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"service at {url} not healthy after {timeout_s}s")


def _exercise(url: str, token: str) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    r = httpx.post(
        f"{url}/v1/leaves",
        json={"leaf_id": "cli-1", "path": ["r", "a"], "success": 1.0},
        headers=auth,
    )
    assert r.json() == {"counted": True, "t": 2}
    assert (
        httpx.post(
            f"{url}/v1/leaves", json={"leaf_id": "x", "path": ["r"], "success": 1.0}
        ).status_code
        == 401
    )
    scores = httpx.post(f"{url}/v1/scores", json={"keys": ["a"]}).json()
    assert scores["scores"][0]["n_total"] == 1
    # What actors use: one batch (leaves, then scores) and the parameters.
    batch = httpx.post(
        f"{url}/v1/batch",
        headers=auth,
        json={
            "leaves": [
                {"leaf_id": "cli-1", "path": ["r", "a"], "success": 1.0},
                {"leaf_id": "cli-2", "path": ["r", "b"], "success": 0.0},
            ],
            "keys": ["a", "b"],
        },
    ).json()
    assert batch["committed"] == [{"counted": False, "t": 2}, {"counted": True, "t": 3}]
    assert [s["n_total"] for s in batch["scores"]["scores"]] == [1, 1]
    assert httpx.post(f"{url}/v1/batch", json={"keys": ["a"]}).status_code == 401
    assert httpx.get(f"{url}/v1/params").json()["g_max"] == 8


def test_help_explains_commands():
    out = subprocess.run([SPO3, "--help"], capture_output=True, text=True, check=True).stdout
    assert "score-service" in out
    out = subprocess.run(
        [SPO3, "score-service", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option in (
        "--redis-url",
        "--alpha",
        "--xi",
        "--zeta",
        "--g-max",
        "--omega-k",
        "SPO3_API_TOKEN",
    ):
        assert option in out


def test_score_service_process_on_real_redis(redis_url):
    port = free_port()
    env = {**os.environ, "SPO3_API_TOKEN": "cli-token", "SPO3_ALPHA": "50"}
    proc = subprocess.Popen(
        [SPO3, "score-service", "--port", str(port), "--redis-url", redis_url, "--run", "cli"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, 30)
        _exercise(url, "cli-token")
        assert httpx.get(f"{url}/v1/stats").json()["params"]["alpha"] == 50.0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) in (
            0,
            -signal.SIGTERM,
        )  # uvicorn re-raises the signal after a clean shutdown


def test_unreachable_redis_is_a_clear_error():
    port = free_port()
    env = {**os.environ, "SPO3_API_TOKEN": "t"}
    proc = subprocess.Popen(
        [
            SPO3,
            "score-service",
            "--port",
            str(port),
            "--redis-url",
            f"redis://127.0.0.1:{free_port()}/0",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                r = httpx.post(f"{url}/v1/scores", json={"keys": ["a"]}, timeout=20)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert r.status_code == 503
        assert "Start redis-server" in r.json()["detail"] or "unreachable" in r.json()["detail"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)


@pytest.mark.slow
def test_ray_serve_deployment(redis_url):
    port = free_port()
    env = {
        **os.environ,
        "SPO3_API_TOKEN": "serve-token",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    proc = subprocess.Popen(
        [
            SPO3,
            "score-service",
            "--ray-serve",
            "--port",
            str(port),
            "--redis-url",
            redis_url,
            "--run",
            "serve",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, 120)
        _exercise(url, "serve-token")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_ray_session_of(proc.pid)


def _kill_ray_session_of(driver_pid: int) -> None:
    """Kill the Ray processes of the cluster that `driver_pid` started (its session name ends with
    that pid), and no other: `ray stop` would also kill every other Ray user on the machine."""
    import psutil

    mine = re.compile(rf"session_[0-9_-]+_{driver_pid}(\b|/)")
    for p in psutil.process_iter(["cmdline"]):
        try:
            if mine.search(" ".join(p.info["cmdline"] or [])):
                p.kill()
        except psutil.Error:
            pass


def test_make_games_is_deterministic(tmp_path):
    a = subprocess.run(
        [
            SPO3,
            "make-games",
            str(tmp_path / "a"),
            "--n",
            "2",
            "--seed",
            "4",
            "--setting",
            "level=2",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    b = subprocess.run(
        [
            SPO3,
            "make-games",
            str(tmp_path / "b"),
            "--n",
            "2",
            "--seed",
            "4",
            "--setting",
            "level=2",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(a) == 2 and all(p.endswith(".z8") for p in a)
    assert [Path(p).read_bytes() for p in a] == [Path(p).read_bytes() for p in b]
