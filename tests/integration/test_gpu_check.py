"""`make check-gpu`'s own logic on the CPU: every stage runs on tiny models and passes, the table
and the JSON say so, and a failing stage is reported (exit code 1) without stopping the others."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from bench.perf import gpu_check

pytestmark = pytest.mark.slow


def test_every_stage_runs_on_cpu_and_writes_table_and_json(tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.perf.gpu_check",
            "--device",
            "cpu",
            "--reps",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads(out.read_text())
    assert data["failed"] == []
    stages = data["stages"]
    assert set(stages) == {
        "updates/tiny-a",
        "updates/tiny-b",
        "checkpoint",
        "publish",
        "engine",
        "learner",
    }
    for name in ("tiny-a", "tiny-b"):
        u = stages[f"updates/{name}"]
        c = u["batch"]
        assert c["total_tokens"] <= c["padded_tokens"] <= c["padded_tokens_arrival_order"]
        assert u["trainer_reports"]["seq_tokens"] == c["total_tokens"]
        assert u["trainer_reports"]["padded_tokens"] == c["padded_tokens"]
        assert u["ratio_trainer_to_plain"] > 0 and u["tflops"]["trainer"] > 0
        assert 0 < u["weights_after_one_update"]["max_abs_move"]
    assert (
        stages["checkpoint"]["pass"]
        and stages["checkpoint"]["resumed_vs_uninterrupted_max_abs_diff"] == 0.0
    )
    assert stages["publish"]["versions_seen"] == [1]
    assert stages["publish"]["checksum_served"] == stages["publish"]["checksum_written"]
    assert stages["engine"]["tokens_per_s"]["threads_batched"] > 0
    assert stages["learner"]["published_version"] == 4 and stages["learner"]["pending_entries"] == 0
    assert stages["updates/tiny-a"]["trainer_zero_stage"] == 1  # one rank: ZeRO-2 runs as ZeRO-1
    engine = stages["engine"]
    assert len(engine["threaded_batches"]) == engine["reps"]  # every request served once per round
    assert all(sum(sizes) == engine["prompts"] for sizes in engine["threaded_batches"])
    assert set(engine["tokens_per_s"]) == {
        "one_request_at_a_time",
        "threads_batched",
        "engine_generate_one_batch",
        "raw_generate",
    }
    for figure in (
        "1 tiny-a: Trainer ZeRO-1 bf16",
        "2 checkpoint",
        "3 publish",
        "4 in-process engine",
        "5 spo3 learner",
    ):
        assert figure in proc.stdout


def test_a_failing_stage_is_reported_and_the_rest_still_run(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gpu_check, "stage_checkpoint", broken)
    out = tmp_path / "gpu-check.json"
    result = CliRunner().invoke(
        gpu_check.app, ["--device", "cpu", "--stages", "checkpoint,engine", "--out", str(out)]
    )
    assert result.exit_code == 1, result.output
    data = json.loads(out.read_text())
    assert data["failed"] == ["checkpoint"]
    assert data["stages"]["checkpoint"]["error"] == "RuntimeError: disk full"
    assert data["stages"]["engine"]["tokens_per_s"]["raw_generate"] > 0
    assert "FAIL" in result.output


def test_unknown_stage_or_shape_is_refused_before_anything_runs(tmp_path):
    runner = CliRunner()
    bad_stage = runner.invoke(gpu_check.app, ["--device", "cpu", "--stages", "updates,chekpoint"])
    assert bad_stage.exit_code == 2 and "chekpoint" in bad_stage.output
    bad_shape = runner.invoke(gpu_check.app, ["--device", "cpu", "--shapes", "qwen-7b"])
    assert bad_shape.exit_code == 2 and "qwen-7b" in bad_shape.output


def test_flops_count_the_output_projection_once():
    tied = dict(vocab_size=100, hidden_size=10, tie_word_embeddings=True)
    untied = dict(tied, tie_word_embeddings=False)
    assert (
        gpu_check.matmul_params(tied, 5000) == 5000
    )  # the tied embedding is the output projection
    assert gpu_check.matmul_params(untied, 6000) == 5000  # the input embedding is a lookup
    assert gpu_check.update_flops(tied, 5000, 3) == 8 * 5000 * 3
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0 and gpu_check.peak_tflops("cpu") is None
