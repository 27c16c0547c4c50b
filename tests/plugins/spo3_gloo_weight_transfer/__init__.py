"""Test-only vLLM plugin: weight-transfer backend "gloo", vLLM's dense NCCL engine over a gloo group.

vLLM 0.32's weight-transfer engines are chosen by name (`--weight-transfer-config
'{"backend": "gloo"}'`) from `WeightTransferEngineFactory` (vllm/distributed/weight_transfer/
factory.py), which takes extra engines through `register_engine`; this package registers one from
a `vllm.general_plugins` entry point, which vLLM runs in every process (`load_general_plugins`),
the worker that builds the engine in `Worker.load_model` included.

The engine is `NCCLWeightTransferEngine` with only the communicator and the receive loop swapped:
- the same init and update payloads (`NCCLWeightTransferInitInfo`: master_address/master_port,
  rank_offset, world_size, packed, packed_buffer_size_bytes, packed_num_buffers;
  `NCCLWeightTransferUpdateInfo`: names, dtype_names, shapes), parsed by the same classes;
- the same layerwise reload in start/finish_weight_update;
- the same packing: the packed loop is `packed_nccl_broadcast_consumer`'s (chunks cut where the
  running byte count first exceeds `packed_buffer_size_bytes`), less its CUDA streams;
- a gloo process group (TCPStore at master_address:master_port, the trainer its master) in place of
  `PyNcclCommunicator`, so the trainer side runs on CPU too (spo3's publisher with a gloo
  communicator, tests/integration/test_weight_transfer.py).

It is not for production: gloo copies through host memory and TCP.
"""

from __future__ import annotations

BACKEND = "gloo"


def register() -> None:
    """The `vllm.general_plugins` entry point; vLLM may call it more than once per process."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(
            BACKEND, "spo3_gloo_weight_transfer.engine", "GlooWeightTransferEngine"
        )
