"""Weights as they travel between learner and policy servers: HF parameter names -> tensors."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def weights_checksum(weights: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes in name order: equal iff the weights are equal.

    Both ends compute it, so a publish is proven by comparing the two digests, not assumed.
    """
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
