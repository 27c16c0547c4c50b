"""`spo3 learner`: post-step optimization from the groups stream (docs/algorithm.md "Post-step updates and staleness").

    repeat:
        take groups until `groups_per_update` usable ones (stale ones are dropped and counted)
        rows = advantages of their members, broadcast to their tokens
        one DeepSpeed step on the rows -> version + 1
        publish the weights (every `publish_every` versions), record the version in Redis
        checkpoint every `checkpoint_every` versions, then acknowledge the groups it covers

Only rank 0 talks to Redis and to policy servers; the groups reach the other ranks through
torch.distributed as JSON. Gathering the weights (to publish, to checkpoint) is a collective that
every rank joins (ZeRO-3 holds them partitioned); rank 0 alone publishes and writes them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.distributed as dist

from spo3.learner import checkpoint
from spo3.learner.batch import Row, batch_rows, row_stats
from spo3.learner.config import LearnerConfig
from spo3.learner.staleness import StalenessFilter
from spo3.learner.trainer import Trainer
from spo3.policy.interface import WeightSink
from spo3.transport.contracts import Group
from spo3.transport.metrics import learner_metrics, serve, stop_serving
from spo3.transport.redis_names import RedisNames
from spo3.transport.stream import GroupConsumer

if TYPE_CHECKING:
    import redis

log = logging.getLogger("spo3.learner")


@dataclass
class LearnerResult:
    version: int
    groups_used: int
    groups_dropped_stale: int
    malformed: int
    history: list[dict] = field(default_factory=list)


@dataclass
class _Leader:
    """Rank 0's connections: Redis (the groups stream, the version key). None on other ranks."""

    client: redis.Redis
    consumer: GroupConsumer
    names: RedisNames


@dataclass
class _Position:
    """How far the learner got: what a checkpoint records."""

    version: int = 0
    used: int = 0
    """Groups taken into updates (flat ones included)."""
    unacked: list[str] = field(default_factory=list)
    """Stream entries decided on (trained on, or dropped as stale) and not yet in a checkpoint."""


def run_learner(
    cfg: LearnerConfig, publisher: WeightSink | None = None, stop: threading.Event | None = None
) -> LearnerResult:
    stop = stop or threading.Event()
    trainer = Trainer(cfg.trainer)
    leader: _Leader | None = None
    server = None
    names = RedisNames(cfg.run)
    m = learner_metrics()
    if trainer.rank == 0:
        from spo3.transport.connection import check_reachable, connect

        client = connect(cfg.redis_url)
        check_reachable(client, cfg.redis_url)
        consumer = GroupConsumer(client, cfg.run, consumer=f"learner-{names.run}")
        leader = _Leader(client, consumer, names)
        m.stream.source = (client, names)
        if cfg.metrics_port:
            server = serve(cfg.metrics_port, cfg.metrics_host)
    try:
        return _train(cfg, trainer, leader, publisher, stop)
    finally:
        m.stream.source = None
        stop_serving(server)


def _train(
    cfg: LearnerConfig,
    trainer: Trainer,
    leader: _Leader | None,
    publisher: WeightSink | None,
    stop: threading.Event,
) -> LearnerResult:
    m = learner_metrics()
    staleness = StalenessFilter(cfg.max_staleness)
    pos = _resume(cfg, trainer, leader, staleness)
    # Whether weights are published at all is rank 0's to say: every rank must then join the
    # gather, whether or not it was handed a publisher itself.
    publishing = _agree(publisher is not None)
    # Rank 0 reads the stream; entries delivered before a crash, not yet in a checkpoint, first.
    reader = _GroupReader(cfg, leader.consumer, staleness) if leader else None
    history: list[dict] = []
    m.version.set(pos.version)
    m.last_update.set(time.time())  # "no update since": counted from the start until the first one

    while cfg.max_updates is None or pos.version < cfg.max_updates:
        batch, read_ids = reader.take(pos, stop) if reader else ([], [])
        batch, done = _share(batch, stop.is_set() or not batch)
        if done:
            break
        start = time.perf_counter()
        rows = batch_rows(batch, cfg.advantages)
        pos.used += len(batch)
        if not rows:  # every group was flat: the weights and the version stay as they are,
            m.groups.labels("uninformative").inc(len(batch))  # so these entries are done with now
            if leader:
                leader.consumer.ack(read_ids)
            continue
        pos.unacked.extend(read_ids)
        metrics = _update(trainer, rows, pos, start)
        _publish(cfg, trainer, leader, publisher if publishing else None, pos.version, publishing)
        history.append(
            {
                "version": pos.version,
                "groups": len(batch),
                **metrics,
                "seconds": time.perf_counter() - start,
                "dropped_stale": staleness.dropped,
            }
        )
        if pos.version % cfg.checkpoint_every == 0:
            _checkpoint(trainer, cfg, pos, staleness, leader)
    if pos.unacked or (pos.version and pos.version % cfg.checkpoint_every):
        _checkpoint(trainer, cfg, pos, staleness, leader)
    malformed = leader.consumer.malformed if leader else 0
    return LearnerResult(pos.version, pos.used, staleness.dropped, malformed, history)


def _resume(
    cfg: LearnerConfig, trainer: Trainer, leader: _Leader | None, staleness: StalenessFilter
) -> _Position:
    """The position of the latest checkpoint (weights and optimizer loaded), or the start."""
    resume_from = checkpoint.latest(cfg.checkpoint_dir) if cfg.resume else None
    if resume_from is None:
        return _Position()
    meta = checkpoint.load(trainer, resume_from)
    staleness.dropped = meta.groups_dropped_stale
    if leader:
        leader.consumer.ack(meta.unacked)  # already inside the checkpoint: never used twice
    log.info("resumed at version %d from %s", meta.version, resume_from)
    return _Position(version=meta.version, used=meta.groups_used)


class _GroupReader:
    """Rank 0's side of the groups stream: the backlog reclaimed at start first, then fresh
    entries; stale groups are dropped (acknowledged with the next checkpoint) and counted."""

    def __init__(
        self, cfg: LearnerConfig, consumer: GroupConsumer, staleness: StalenessFilter
    ) -> None:
        self.cfg, self.consumer, self.staleness = cfg, consumer, staleness
        self.backlog = consumer.reclaim()  # delivered before a crash, not yet in a checkpoint
        self.idle_since = time.monotonic()
        self.malformed_seen = self.unknown_seen = 0

    def take(self, pos: _Position, stop: threading.Event) -> tuple[list[Group], list[str]]:
        """Up to `groups_per_update` usable groups and their entry ids; fewer when stopped or
        idle for longer than `exit_when_idle_s`."""
        cfg, m = self.cfg, learner_metrics()
        batch: list[Group] = []
        read_ids: list[str] = []
        while len(batch) < cfg.groups_per_update and not stop.is_set():
            entries = self._next_entries()
            for entry_id, group in entries:
                m.staleness.observe(pos.version - group.policy_version)
                if self.staleness.accept(group.policy_version, pos.version):
                    batch.append(group)
                    read_ids.append(entry_id)
                    m.groups.labels("used").inc()
                else:  # decided for good: acknowledged with the next checkpoint
                    pos.unacked.append(entry_id)
                    m.groups.labels("stale").inc()
            self._count_malformed()
            if entries:
                self.idle_since = time.monotonic()
            elif (
                cfg.exit_when_idle_s is not None
                and time.monotonic() - self.idle_since > cfg.exit_when_idle_s
            ):
                break
        return batch, read_ids

    def _next_entries(self) -> list[tuple[str, Group]]:
        n = self.cfg.groups_per_update
        if not self.backlog:
            return self.consumer.read(n, 500)
        entries, self.backlog = self.backlog[:n], self.backlog[n:]
        return entries

    def _count_malformed(self) -> None:
        """Malformed entries the consumer met since the last call; unknown schema versions apart."""
        c, m = self.consumer, learner_metrics()
        if c.malformed > self.malformed_seen:
            unknown = c.unknown_schema - self.unknown_seen
            m.groups.labels("unknown_schema").inc(unknown)
            m.groups.labels("malformed").inc(c.malformed - self.malformed_seen - unknown)
            self.malformed_seen, self.unknown_seen = c.malformed, c.unknown_schema


def _update(trainer: Trainer, rows: list[Row], pos: _Position, start: float) -> dict[str, float]:
    """One optimizer update on the rows -> version + 1; its metrics recorded and returned."""
    m = learner_metrics()
    metrics = {**trainer.update(rows).as_dict(), **row_stats(rows, pos.version)}
    pos.version += 1
    m.updates.inc()
    m.tokens.inc(metrics.get("tokens", 0))
    m.version.set(pos.version)
    m.record_update(metrics)
    m.update_seconds.observe(time.perf_counter() - start)
    m.last_update.set(time.time())
    return metrics


def _publish(
    cfg: LearnerConfig,
    trainer: Trainer,
    leader: _Leader | None,
    publisher: WeightSink | None,
    version: int,
    publishing: bool,
) -> None:
    """The weights to the policy servers every `publish_every` versions (gathered on every rank,
    published by rank 0), and the version to Redis (rank 0); with no publisher, the version key
    alone tells how far the learner got."""
    m = learner_metrics()
    if publishing and version % cfg.publish_every == 0:
        t0 = time.perf_counter()
        weights = trainer.state_dict()  # collective: every rank, rank 0 gets the weights
        if leader is None or publisher is None or weights is None:
            return
        publisher.publish(version, weights)
        m.publish_seconds.observe(time.perf_counter() - t0)
        m.published_version.set(version)
        leader.client.set(leader.names.policy_version, version)
    elif not publishing and leader is not None:
        leader.client.set(leader.names.policy_version, version)


def _checkpoint(
    trainer: Trainer,
    cfg: LearnerConfig,
    pos: _Position,
    staleness: StalenessFilter,
    leader: _Leader | None,
) -> None:
    """Save the position (every rank), then acknowledge the entries it covers (rank 0)."""
    start = time.perf_counter()
    meta = checkpoint.CheckpointMeta(
        version=pos.version,
        unacked=list(pos.unacked),
        groups_used=pos.used,
        groups_dropped_stale=staleness.dropped,
    )
    checkpoint.save(trainer, cfg.checkpoint_dir, meta)
    learner_metrics().checkpoint_seconds.observe(time.perf_counter() - start)
    if leader is not None:
        leader.consumer.ack(pos.unacked)
    pos.unacked = []


def _agree(flag: bool) -> bool:
    """Rank 0's `flag` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    payload = [flag]
    dist.broadcast_object_list(payload, src=0)
    return bool(payload[0])


def _share(batch: list[Group], stop: bool) -> tuple[list[Group], bool]:
    """Rank 0's batch (and whether to stop) for every rank, as JSON."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return batch, stop and not batch
    payload = [
        json.dumps({"stop": stop and not batch, "groups": [g.to_stream_json() for g in batch]})
    ]
    dist.broadcast_object_list(payload, src=0)
    data = json.loads(payload[0])
    return [Group.model_validate_json(g) for g in data["groups"]], data["stop"]
