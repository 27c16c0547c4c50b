"""Weight republishing through a directory, for in-process policy engines (the single-machine
default): the learner writes each version as safetensors (with the sha256 `weights_checksum` of
the tensors next to it) and records the version in Redis; every actor's engine checks that key
before sampling and loads the new version when it moves, once its checksum matches.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Mapping, Sequence

import redis

from services.transport.contracts import ChatMessage, Completion, SamplingParams
from services.transport.metrics import follower_metrics
from services.transport.redis_names import RedisNames

log = logging.getLogger("spo3.policy")
CHECKSUM_FILE = "weights.sha256"


def version_dir(root: str | Path, version: int) -> Path:
    return Path(root) / f"v{version:08d}"


class DirectoryPublisher:
    def __init__(self, root: str | Path, client: redis.Redis, run: str = "default", *, keep: int = 3) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.client = client
        self.key = RedisNames(run).published_version
        self.keep = keep

    def publish(self, version: int, weights: Mapping[str, "object"]) -> None:
        from safetensors.torch import save_file

        from services.policy.weights import weights_checksum

        target = version_dir(self.root, version)
        tmp = target.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        save_file(cpu, str(tmp / "model.safetensors"))
        (tmp / CHECKSUM_FILE).write_text(weights_checksum(cpu) + "\n")
        tmp.replace(target)  # readers never see a half-written version
        self.client.set(self.key, version)
        for old in sorted(p for p in self.root.glob("v*") if p.is_dir())[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


class FollowingPolicy:
    """Wraps an in-process engine: before each sample, moves to the newest published version.
    A version whose tensors do not match the checksum the learner wrote is not loaded (and is
    counted in spo3_policy_checksum_failures_total); the engine keeps its current weights."""

    def __init__(self, engine, root: str | Path, client: redis.Redis, run: str = "default") -> None:
        self.engine, self.root, self.client = engine, Path(root), client
        self.key = RedisNames(run).published_version
        self.reloads = 0
        self.rejected: int | None = None  # the last version refused for a bad checksum
        self.metrics = follower_metrics()

    def refresh(self) -> int:
        raw = self.client.get(self.key)
        latest = int(raw) if raw is not None else 0
        if latest > self.engine.version and latest != self.rejected:
            from safetensors.torch import load_file

            from services.policy.weights import weights_checksum

            start = time.perf_counter()
            folder = version_dir(self.root, latest)
            try:
                weights = load_file(str(folder / "model.safetensors"))
                expected = (folder / CHECKSUM_FILE).read_text().strip()
            except FileNotFoundError:
                return self.engine.version  # already rotated away: a newer one is coming
            if weights_checksum(weights) != expected:
                self.rejected = latest
                self.metrics.checksum_failures.inc()
                log.error("published weights %s do not match their checksum: staying at version %d",
                          folder, self.engine.version)
                return self.engine.version
            self.engine.publish(latest, weights)
            self.reloads += 1
            self.metrics.reloads.inc()
            self.metrics.reload_seconds.observe(time.perf_counter() - start)
        return self.engine.version

    def sample(self, messages: Sequence[ChatMessage], params: SamplingParams) -> list[Completion]:
        self.refresh()
        return self.engine.sample(messages, params)
