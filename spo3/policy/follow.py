"""Following published weights: an in-process engine moves to the newest version a
`DirectoryPublisher` (spo3.policy.publish) recorded, once its checksum matches."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from spo3.policy.publish import CHECKSUM_FILE, version_dir
from spo3.transport.contracts import ChatMessage, Completion, SamplingParams
from spo3.transport.metrics import follower_metrics
from spo3.transport.redis_names import RedisNames

log = logging.getLogger("spo3.policy")


class FollowingPolicy:
    """Wraps an in-process engine: before each sample, moves to the newest published version.
    A version whose tensors do not match the checksum the learner wrote is not loaded (and is
    counted in spo3_policy_checksum_failures_total); the engine keeps its current weights."""

    def __init__(self, engine, root: str | Path, client: redis.Redis, run: str = "default") -> None:
        self.engine, self.root, self.client = engine, Path(root), client
        self.key = RedisNames(run).policy_version
        self.reloads = 0
        self.rejected: int | None = None  # the last version refused for a bad checksum
        self.metrics = follower_metrics()

    def refresh(self) -> int:
        raw = self.client.get(self.key)
        latest = int(raw) if raw is not None else 0
        if latest > self.engine.version and latest != self.rejected:
            from safetensors.torch import load_file

            from spo3.policy.weights import weights_checksum

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
                log.error(
                    "published weights %s do not match their checksum: staying at version %d",
                    folder,
                    self.engine.version,
                )
                return self.engine.version
            self.engine.publish(latest, weights)
            self.reloads += 1
            self.metrics.reloads.inc()
            self.metrics.reload_seconds.observe(time.perf_counter() - start)
        return self.engine.version

    def sample(self, messages: Sequence[ChatMessage], params: SamplingParams) -> list[Completion]:
        self.refresh()
        return self.engine.sample(messages, params)
