"""`spo3 eval` on a real TextWorld-Express game: a kept weights file over the initial model, every
episode's actions, the verb shares."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SPO3 = str(Path(sys.executable).with_name("spo3"))


def test_eval_loads_a_weights_file_and_shows_what_the_policy_did(tmp_path):
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    model = tmp_path / "model"
    subprocess.run(
        [SPO3, "init-model", str(model), "--preset", "tiny"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # a "published version": the final norm scaled up sharpens every distribution, so replies change
    net = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        net.model.norm.weight.mul_(50)
    save_model(net, str(tmp_path / "v1.safetensors"))
    game = "coin:seed=3:fold=test:numLocations=2,includeDoors=0"
    cmd = [
        SPO3,
        "eval",
        "--checkpoint",
        str(model),
        "--env",
        "twx",
        "--max-steps",
        "4",
        "--episodes",
        "2",
        "--show-actions",
        game,
    ]
    before = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    after = subprocess.run(
        cmd + ["--weights", str(tmp_path / "v1.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    for proc in (before, after):
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        lines = proc.stdout.splitlines()
        episodes = [line for line in lines if line.startswith(("WIN ", "fail "))]
        assert len(episodes) == 2 and all(game in line for line in episodes), proc.stdout
        assert any(line.startswith("success ") and "over 2 episodes" in line for line in lines), (
            proc.stdout
        )
        shares = next(line for line in lines if line.startswith("actions: "))
        assert "%" in shares, proc.stdout
    # the weights file was really loaded: the same seed samples other actions
    assert before.stdout != after.stdout
    bad = subprocess.run(
        cmd + ["--weights", str(tmp_path / "missing.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "400"},
    )  # the error box unwrapped
    assert bad.returncode == 2 and "no such file" in bad.stderr, bad.stderr[-2000:]
    odd = subprocess.run(
        cmd + ["--dtype", "float64"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "400"},
    )  # an engine dtype it does not run: stopped before loading, the option named
    assert odd.returncode == 2 and "--dtype" in odd.stderr and "bfloat16" in odd.stderr, odd.stderr[
        -2000:
    ]
