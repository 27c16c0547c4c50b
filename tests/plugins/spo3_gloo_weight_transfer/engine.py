"""The worker side of the test-only "gloo" weight-transfer backend (see the package docstring)."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLWeightTransferEngine,
    NCCLWeightTransferInitInfo,
    NCCLWeightTransferUpdateInfo,
)

TIMEOUT = timedelta(seconds=300)
STORE_PREFIX = "spo3-weight-transfer"


class GlooGroup:
    """A gloo process group on a TCPStore, with PyNcclCommunicator's `broadcast(tensor, src)`."""

    def __init__(self, host: str, port: int, rank: int, world_size: int) -> None:
        self.store = dist.TCPStore(host, port, world_size, is_master=False, timeout=TIMEOUT)
        self.pg = dist.ProcessGroupGloo(
            dist.PrefixStore(STORE_PREFIX, self.store), rank, world_size, TIMEOUT
        )
        self.rank = rank

    def broadcast(self, tensor: torch.Tensor, src: int, stream: Any = None) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([tensor], opts).wait()

    def destroy(self) -> None:
        self.pg = None  # type: ignore[assignment]
        self.store = None  # type: ignore[assignment]


class GlooWeightTransferEngine(NCCLWeightTransferEngine):
    """`NCCLWeightTransferEngine` (same payloads, packing and reload) over a gloo group."""

    def init_transfer_engine(self, init_info: NCCLWeightTransferInitInfo) -> None:
        if init_info.master_address is None or init_info.master_port is None:
            raise ValueError("the gloo backend needs master_address and master_port")
        self.packed = init_info.packed
        self.packed_buffer_size_bytes = init_info.packed_buffer_size_bytes
        self.packed_num_buffers = init_info.packed_num_buffers
        # The rank as vLLM's worker_init_process_group (nccl_common.py) computes it.
        pc = self.parallel_config
        rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
        self.model_update_group = GlooGroup(  # type: ignore[assignment]
            init_info.master_address, init_info.master_port, rank, init_info.world_size
        )

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(): nothing to wait for on CPU.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: NCCLWeightTransferUpdateInfo) -> None:
        group = self.model_update_group
        if group is None:
            raise RuntimeError("gloo weight transfer not initialized")
        from vllm.model_executor.model_loader.mtp_validation import (
            disable_mtp_completeness_check,
        )

        metas = [
            (name, list(shape), getattr(torch, dtype_name))
            for name, dtype_name, shape in zip(
                update_info.names, update_info.dtype_names, update_info.shapes
            )
        ]
        with disable_mtp_completeness_check():
            if not self.packed:
                for name, shape, dtype in metas:
                    weight = torch.empty(shape, dtype=dtype, device=self.device)
                    group.broadcast(weight, src=0)
                    self.model.load_weights([(name, weight)])
                return
            # packed_nccl_broadcast_consumer's chunking: a chunk closes on the tensor that takes
            # its byte count past the buffer size (that tensor included), the last on what is left.
            chunk: list[tuple[str, list[int], torch.dtype, int]] = []
            size = 0
            for name, shape, dtype in metas:
                nbytes = math.prod(shape) * dtype.itemsize
                chunk.append((name, shape, dtype, nbytes))
                size += nbytes
                if size > self.packed_buffer_size_bytes:
                    self._receive_chunk(chunk, size)
                    chunk, size = [], 0
            if chunk:
                self._receive_chunk(chunk, size)

    def _receive_chunk(
        self, chunk: list[tuple[str, list[int], torch.dtype, int]], size: int
    ) -> None:
        from vllm.distributed.weight_transfer.packed_tensor import unpack_tensor

        packed = torch.empty(size, dtype=torch.uint8, device=self.device)
        self.model_update_group.broadcast(packed, src=0)  # type: ignore[union-attr]
        names, shapes, dtypes, sizes = zip(*chunk)
        self.model.load_weights(
            unpack_tensor(packed, list(names), list(shapes), list(dtypes), list(sizes))
        )

    def shutdown(self) -> None:
        if self.model_update_group is not None:
            self.model_update_group.destroy()
            self.model_update_group = None
