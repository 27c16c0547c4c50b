"""Observability end to end. A short real run (Redis, the score service, an actor process on real
TextWorld games with the in-process policy that scores and commits through the service, the
DeepSpeed learner updating and publishing to a weights directory) is scraped every second by a
real Prometheus that loads
deploy/prometheus/rules.yml. Then every query of every panel of every Grafana dashboard must
return data, and every rule must evaluate without error. Nothing is left running."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
SPO3 = str(Path(sys.executable).with_name("spo3"))
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
# Grafana's built-in variables, as Grafana would fill them for a short time range.
BUILTINS = {
    "$__rate_interval": "30s",
    "${__rate_interval}": "30s",
    "$__interval": "5s",
    "${__interval}": "5s",
    "$__range": "10m",
    "${__range}": "10m",
}
RUN_BUDGET_S = 130

needs_prometheus = pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL),
    reason="prometheus/promtool not installed (apt-get install prometheus)",
)


# --- the dashboards as data ------------------------------------------------------------------
def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def _panels(panels):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))  # panels nested in collapsed rows


def concrete(expr: str, board: dict) -> str:
    """The query Grafana would send: built-in intervals filled in, every `All` variable as its regex."""
    for name, value in sorted(BUILTINS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    for var in board.get("templating", {}).get("list", []):
        value = var.get("allValue") or ".*"
        expr = re.sub(r"\$\{" + var["name"] + r"(:[a-z]+)?\}|\$" + var["name"] + r"\b", value, expr)
    return expr


def panel_queries() -> list[tuple[str, str, str, str]]:
    """(dashboard, panel title, refId, concrete PromQL) for every target of every panel."""
    out = []
    for name, board in dashboards().items():
        for panel in _panels(board["panels"]):
            for t in panel.get("targets", []):
                out.append((name, panel["title"], t["refId"], concrete(t["expr"], board)))
    return out


def variable_queries() -> list[tuple[str, str, str]]:
    """label_values(METRIC, LABEL) variables as PromQL: (dashboard, LABEL, `count by (LABEL) (METRIC)`)."""
    out = []
    for name, board in dashboards().items():
        for var in board.get("templating", {}).get("list", []):
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
            assert m, f"{name}: variable {var['name']} is not label_values(...)"
            out.append(
                (name, m.group(2), f"count by ({m.group(2)}) ({concrete(m.group(1), board)})")
            )
    return out


def actor_reloaded(prom) -> bool:
    """The actor has loaded at least one version the learner published (it may be mid-task when
    every panel already has data, so the run goes on until it has)."""
    result = query(prom, "sum(spo3_policy_reloads_total)")
    return bool(result) and float(result[0]["value"][1]) >= 1


def test_dashboards_are_well_formed():
    boards = dashboards()
    assert set(boards) == {"exploration.json", "success.json", "learner.json", "system.json"}
    uids = set()
    for name, board in boards.items():
        assert board["uid"] not in uids
        uids.add(board["uid"])
        ids = [p["id"] for p in _panels(board["panels"])]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in _panels(board["panels"]):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, (
                name,
                panel["title"],
            )
            assert panel["targets"] and all(t.get("expr") for t in panel["targets"]), (
                name,
                panel["title"],
            )
            assert all(t["datasource"]["uid"] == "prometheus" for t in panel["targets"]), (
                name,
                panel["title"],
            )
    for _, title, ref, expr in panel_queries():
        assert "$" not in expr, f"{title} {ref}: unresolved variable in {expr}"


@needs_prometheus
def test_promtool_accepts_the_rules():
    out = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


# --- the real run ----------------------------------------------------------------------------
class Processes:
    """Each process leads its own process group; `stop` ends every group (TERM, then KILL)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir, self.procs = log_dir, {}

    def start(self, name: str, cmd: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "w")
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
        )
        log.close()

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            assert p.poll() is None, f"{name} exited with {p.returncode}:\n{self.tail(name)}"

    def tail(self, name: str, n: int = 3000) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")[-n:]

    def stop(self) -> None:
        for p in self.procs.values():
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(p, signal.SIGKILL)  # the leader, and anything it left in its group
            p.wait()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def prometheus_config(path: Path, targets: dict[str, int]) -> Path:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
            for job, port in targets.items()
        ],
    }
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return path


def query(http: httpx.Client, promql: str) -> list:
    r = http.get("/api/v1/query", params={"query": promql})
    body = r.json()
    assert body.get("status") == "success", f"{promql}: {body.get('errorType')} {body.get('error')}"
    return body["data"]["result"]


def missing_data(http: httpx.Client) -> list[str]:
    """Every panel target and dashboard variable that returns no data (or an error) right now."""
    failed = []
    for board, title, ref, expr in panel_queries():
        try:
            if not query(http, expr):
                failed.append(f"{board} / {title} [{ref}]: no data: {expr}")
        except AssertionError as e:
            failed.append(f"{board} / {title} [{ref}]: error: {e}")
    for board, label, expr in variable_queries():
        if not query(http, expr):
            failed.append(f"{board} / variable {label}: no values: {expr}")
    return failed


def rule_problems(http: httpx.Client) -> list[str]:
    groups = http.get("/api/v1/rules").json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    if not rules:
        return ["no rules loaded"]
    return [
        f"{r['name']}: {r.get('health')} {r.get('lastError', '')}"
        for r in rules
        if r.get("health") != "ok"
    ]


@pytest.mark.slow
@pytest.mark.redis
@needs_prometheus
def test_every_panel_shows_data_from_a_real_run(redis_url, tmp_path):
    from spo3.actors.envs.textworld_env import generate_games
    from spo3.app.model_init import init_model
    from spo3.transport.connection import connect
    from spo3.transport.procs import free_port
    from spo3.transport.work_queue import WorkQueue

    start = time.monotonic()
    run, token = "obs", "obs-token"
    model = init_model(tmp_path / "model", "tiny", seed=0)
    train_games = generate_games(tmp_path / "games", "tw-coin_collector", 2, seed=40, level=1)
    eval_game = generate_games(tmp_path / "games", "tw-coin_collector", 1, seed=90, level=1)[0]
    queue = WorkQueue(connect(redis_url), run)

    def keep_the_actor_busy() -> None:
        # As the score statistics settle, 3SPO stops branching and items take a fraction of a
        # second: without more work the actor would idle (and never sample, so never reload)
        # before the learner's first version.
        while queue.counts()["ready"] < 20:
            for g in train_games:
                queue.put("textworld", g)

    keep_the_actor_busy()
    ports = {"score-service": free_port(), "actor": free_port(), "learner": free_port()}
    prom_port = free_port()
    weights = tmp_path / "weights"
    procs = Processes(tmp_path)
    try:
        procs.start(
            "score-service",
            [
                SPO3,
                "score-service",
                "--port",
                str(ports["score-service"]),
                "--redis-url",
                redis_url,
                "--run",
                run,
                "--token",
                token,
            ],
        )
        procs.start(
            "learner",
            [
                SPO3,
                "learner",
                "--model",
                str(model),
                "--redis-url",
                redis_url,
                "--run",
                run,
                "--weights-dir",
                str(weights),
                "--checkpoint-dir",
                str(tmp_path / "ckpt"),
                "--groups-per-update",
                "2",
                "--max-staleness",
                "4",
                "--checkpoint-every",
                "3",
                "--lr",
                "0.01",
                "--micro-batch-rows",
                "16",
                "--metrics-port",
                str(ports["learner"]),
            ],
        )
        # The actor scores states and commits leaves through the score service, as deployed.
        procs.start(
            "actor",
            [
                SPO3,
                "actor",
                "--model",
                str(model),
                "--weights-dir",
                str(weights),
                "--redis-url",
                redis_url,
                "--run",
                run,
                "--score-url",
                f"http://127.0.0.1:{ports['score-service']}",
                "--score-token",
                token,
                "--max-steps",
                "5",
                "--max-leaves",
                "12",
                "--choice-mode",
                "--metrics-port",
                str(ports["actor"]),
                "--eval-task",
                f"textworld:{eval_game}",
                "--eval-every",
                "1",
            ],
        )
        procs.start(
            "prometheus",
            [
                PROMETHEUS,
                f"--config.file={prometheus_config(tmp_path / 'prometheus.yml', ports)}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
        )
        prom = httpx.Client(base_url=f"http://127.0.0.1:{prom_port}", timeout=10)
        service = httpx.Client(base_url=f"http://127.0.0.1:{ports['score-service']}", timeout=10)
        served = False
        failed: list[str] = ["not checked yet"]
        problems: list[str] = []
        deadline, learner_up = start + RUN_BUDGET_S, False
        while time.monotonic() < deadline:
            time.sleep(3)
            procs.check_alive()
            keep_the_actor_busy()
            if (
                not learner_up
            ):  # its first start compiles a DeepSpeed op: the budget counts from its start
                try:
                    httpx.get(f"http://127.0.0.1:{ports['learner']}/metrics", timeout=2)
                    learner_up, deadline = True, max(deadline, time.monotonic() + 90)
                except httpx.TransportError:
                    pass
            if not served:  # a client of the score service besides Prometheus
                try:
                    keys = [f"probe-{i}" for i in range(8)]
                    service.post("/v1/scores", json={"keys": keys}).raise_for_status()
                    service.post(
                        "/v1/leaves",
                        json={"leaf_id": "probe", "path": keys, "success": 1.0},
                        headers={"Authorization": f"Bearer {token}"},
                    ).raise_for_status()
                    served = True
                except httpx.TransportError:
                    continue
            try:
                if prom.get("/-/ready").status_code != 200:
                    continue
            except httpx.TransportError:
                continue
            failed, problems = missing_data(prom), rule_problems(prom)
            if not failed and not problems and actor_reloaded(prom):
                break
        print(f"\n{len(panel_queries())} panel queries checked in {time.monotonic() - start:.0f} s")
        for line in failed + problems:
            print("FAILED", line)
        targets = prom.get("/api/v1/targets").json()["data"]["activeTargets"]
        assert all(t["health"] == "up" for t in targets), [
            (t["labels"]["job"], t["lastError"]) for t in targets
        ]
        assert not failed, (
            f"{len(failed)} panel queries without data:\n"
            + "\n".join(failed)
            + "".join(f"\n--- {n} log ---\n{procs.tail(n, 1500)}" for n in ("actor", "learner"))
        )
        assert not problems, "rules that do not evaluate cleanly:\n" + "\n".join(problems)
        # The learner really updated and published; the actor followed and evaluated.
        assert float(query(prom, "max(spo3_learner_published_version)")[0]["value"][1]) >= 1
        assert float(query(prom, "sum(spo3_policy_reloads_total)")[0]["value"][1]) >= 1, procs.tail(
            "actor", 1500
        )
        assert float(query(prom, "sum(spo3_actor_eval_episodes_total)")[0]["value"][1]) >= 1
        assert float(query(prom, "sum(spo3_policy_checksum_failures_total)")[0]["value"][1]) == 0
    finally:
        procs.stop()
    assert all(p.poll() is not None for p in procs.procs.values())
