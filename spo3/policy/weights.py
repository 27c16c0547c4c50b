"""Weights as they travel between learner and policy servers: HF parameter names -> tensors."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import torch

from spo3.policy.interface import PolicyError

T = TypeVar("T")


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


def tied_map(model_dir: str | Path) -> dict[str, str]:
    """The tensors a checkpoint ties, as {alias: source} (e.g. {"lm_head.weight":
    "model.embed_tokens.weight"} for Qwen2.5-0.5B..3B), read from its HF config: empty unless
    `tie_word_embeddings` is set, else the tied keys of the model class the config names."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "tie_word_embeddings", False):
        return {}
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if cls is None:
        raise ValueError(f"{model_dir}: {type(config).__name__} names no causal LM class")
    keys = getattr(cls, "_tied_weights_keys", None)
    if isinstance(keys, dict) and all(_PLAIN_NAME.fullmatch(k + "|" + v) for k, v in keys.items()):
        return dict(keys)
    # Patterns or module names: let the model expand them (on the meta device: no memory).
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return dict(model.get_expanded_tied_weights_keys(all_submodels=True))


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.]+(weight|bias)\|[A-Za-z0-9_.]+(weight|bias)")


def drop_tied(weights: Mapping[str, T], tied: Mapping[str, str]) -> dict[str, T]:
    """`weights` without the aliases of `tied` ({alias: source}), which the receiving model fills
    from their sources; each alias present must equal its source (a PolicyError names it if not:
    publishing one of two tensors that should be one would silently lose the other)."""
    out = dict(weights)
    for alias, source in tied.items():
        if alias not in out:
            continue
        a = out.pop(alias)
        if source not in out:
            raise PolicyError(f"tied tensor {alias!r} is present but its source {source!r} is not")
        if not _same(a, out[source]):
            raise PolicyError(
                f"tensor {alias!r} is tied to {source!r} in the served model but differs from it"
            )
    return out


def _same(a: object, b: object) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return a is b
    if a.shape != b.shape:
        return False
    if a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return bool(torch.equal(a.detach(), b.detach().to(a.device, a.dtype)))
