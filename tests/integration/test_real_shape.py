"""The path a real instruct checkpoint takes, on a CPU: tied embeddings and Qwen2.5's 151,936-token
vocabulary (on a 64-wide, 2-layer body, so it runs in seconds). One Trainer.update, a publish through
DirectoryPublisher to an in-process engine that follows it, a checkpoint and a resume.
`make check-gpu` runs the same path with the full qwen2.5-1.5b preset on a GPU.
"""

from __future__ import annotations

import random

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from spo3.app.model_init import PRESETS, init_model
from spo3.learner import checkpoint
from spo3.learner.batch import Row
from spo3.learner.trainer import Trainer, TrainerConfig
from spo3.policy.follow import FollowingPolicy
from spo3.policy.inprocess import InProcessPolicy
from spo3.policy.publish import CHECKSUM_FILE, DirectoryPublisher, version_dir
from spo3.policy.weights import drop_tied, tied_map, weights_checksum
from spo3.transport.connection import connect
from spo3.transport.contracts import SamplingParams
from tests import policy_contract as contract

pytestmark = pytest.mark.slow
VOCAB = 151936  # Qwen2.5's embedding rows (its tokenizer has 151,665 tokens)


def rows(seed: int, vocab: int) -> list[Row]:
    """Random transitions whose tokens reach the top of the vocabulary (the padded rows too)."""
    rng = random.Random(seed)
    out = []
    for i in range(6):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(8, 24))]
        response = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 8))]
        response[-1] = vocab - 1
        out.append(Row(prompt, response, rng.choice([-1.0, 0.5, 1.5]), [], 0, f"g{i}"))
    return out


def cpu_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in trainer.state_dict().items()}


def test_the_qwen25_15b_preset_has_the_real_shape(tmp_path, monkeypatch):
    """The preset's config (built on the meta device: no 6 GB of weights here) is Qwen2.5-1.5B's,
    tied by default, with the vocabulary padded to the real size."""
    import transformers

    class Built(Exception):
        pass

    seen = {}

    def capture(config, **kwargs):
        seen["config"] = config
        raise Built

    spec = PRESETS["qwen2.5-1.5b"]
    assert spec["vocab_size"] < VOCAB == spec["model_vocab_size"]
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", capture)
    with pytest.raises(Built):
        init_model(tmp_path / "m", "qwen2.5-1.5b")
    monkeypatch.undo()
    config = seen["config"]
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (
        1536,
        28,
        8960,
    )
    assert (config.num_attention_heads, config.num_key_value_heads) == (12, 2)
    assert config.vocab_size == VOCAB and config.tie_word_embeddings
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    assert 1.50e9 < n < 1.56e9, n  # Qwen2.5-1.5B: 1.54B with the embedding counted once


def test_tied_large_vocabulary_update_publish_follow_checkpoint_resume(tmp_path, redis_url):
    model_dir = init_model(tmp_path / "model", "tiny", seed=0, tied=True, vocab_size=VOCAB)
    config = AutoModelForCausalLM.from_pretrained(model_dir).config
    assert config.tie_word_embeddings and config.vocab_size == VOCAB
    with safe_open(str(model_dir / "model.safetensors"), "pt") as st:
        assert "lm_head.weight" not in set(st.keys())
    cfg = TrainerConfig(model=str(model_dir), lr=1e-3, zero_stage=2, micro_batch_rows=4)

    # 1. one update
    trainer = Trainer(cfg)
    initial = cpu_state(trainer)
    trainer.update(rows(0, VOCAB))
    v1 = cpu_state(trainer)
    assert any(not torch.equal(v1[k], initial[k]) for k in v1)
    assert torch.equal(v1["lm_head.weight"], v1["model.embed_tokens.weight"])  # still tied

    # 2. publish; an in-process engine follows
    client = connect(redis_url)
    weights = tmp_path / "weights"
    publisher = DirectoryPublisher(weights, client, "real-shape", tied=tied_map(model_dir))
    engine = InProcessPolicy(model_dir)
    follower = FollowingPolicy(engine, weights, client, "real-shape")
    assert follower.sample(contract.MESSAGES, SamplingParams(max_tokens=2))[0].policy_version == 0
    publisher.publish(1, trainer.state_dict())
    free = follower.sample(
        contract.MESSAGES, SamplingParams(n=8, max_tokens=8, temperature=1.0, seed=0)
    )
    choices = ["go north", "take knife", "look", "inventory"]
    chosen = follower.sample(
        contract.MESSAGES, SamplingParams(n=8, choices=choices, temperature=1.0, seed=0)
    )
    assert {c.policy_version for c in free + chosen} == {1}
    assert all(len(c.logprobs) == len(c.token_ids) >= 1 for c in free)
    assert all(c.text in choices for c in chosen)
    written = (version_dir(weights, 1) / CHECKSUM_FILE).read_text().strip()
    # The file holds no lm_head (the tie's alias is dropped); the engine refills it from the embedding.
    assert written == weights_checksum(drop_tied(v1, tied_map(model_dir)))
    assert engine.checksum() == weights_checksum(v1)
    served = engine.model.state_dict()
    assert all(torch.equal(served[k], v1[k]) for k in v1)

    # 3. checkpoint, one more update; a fresh trainer resumes and takes the same update
    path = checkpoint.save(
        trainer, tmp_path / "ckpt", checkpoint.CheckpointMeta(version=1, unacked=[])
    )
    hf = AutoModelForCausalLM.from_pretrained(path / "hf")
    assert hf.config.tie_word_embeddings and hf.config.vocab_size == VOCAB
    assert all(torch.equal(hf.state_dict()[k], v1[k]) for k in v1)
    trainer.update(rows(1, VOCAB))
    v2 = cpu_state(trainer)
    del trainer

    resumed = Trainer(cfg)
    latest = checkpoint.latest(tmp_path / "ckpt")
    assert latest is not None
    assert checkpoint.load(resumed, latest).version == 1
    at_resume = cpu_state(resumed)
    assert all(torch.equal(at_resume[k], v1[k]) for k in v1), "weights differ after resume"
    resumed.update(rows(1, VOCAB))
    v2_resumed = cpu_state(resumed)
    assert all(torch.allclose(v2_resumed[k], v2[k], rtol=0, atol=1e-6) for k in v2), (
        "the resumed trainer's update differs (optimizer state not restored?)"
    )
