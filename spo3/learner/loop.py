"""`spo3 learner`: post-step optimization from the groups stream (ALGORITHM.md section 5).

    repeat:
        take groups until `groups_per_update` usable ones (stale ones are dropped and counted)
        rows = advantages of their members, broadcast to their tokens
        one DeepSpeed step on the rows -> version + 1
        publish the weights (every `publish_every` versions), record the version in Redis
        checkpoint every `checkpoint_every` versions, then acknowledge the groups it covers

Only rank 0 talks to Redis and to policy servers; the groups reach the other ranks through
torch.distributed as JSON.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

import torch.distributed as dist

from spo3.learner import checkpoint
from spo3.learner.batch import batch_rows, row_stats
from spo3.learner.config import LearnerConfig
from spo3.learner.staleness import StalenessFilter
from spo3.learner.trainer import Trainer
from spo3.policy.interface import WeightSink
from spo3.transport.contracts import Group
from spo3.transport.metrics import learner_metrics, serve, stop_serving
from spo3.transport.redis_names import RedisNames
from spo3.transport.stream import GroupConsumer

log = logging.getLogger("spo3.learner")


@dataclass
class LearnerResult:
    version: int
    groups_used: int
    groups_dropped_stale: int
    malformed: int
    history: list[dict] = field(default_factory=list)


def run_learner(
    cfg: LearnerConfig, publisher: WeightSink | None = None, stop: threading.Event | None = None
) -> LearnerResult:
    stop = stop or threading.Event()
    trainer = Trainer(cfg.trainer)
    leader = trainer.rank == 0
    client = consumer = server = None
    names = RedisNames(cfg.run)
    m = learner_metrics()
    if leader:
        from spo3.transport.connection import check_reachable, connect

        client = connect(cfg.redis_url)
        check_reachable(client, cfg.redis_url)
        consumer = GroupConsumer(client, cfg.run, consumer=f"learner-{names.run}")
        m.stream.source = (client, names)
        if cfg.metrics_port:
            server = serve(cfg.metrics_port, cfg.metrics_host)
    try:
        return _train(cfg, trainer, leader, client, consumer, names, publisher, stop)
    finally:
        m.stream.source = None
        stop_serving(server)


def _train(
    cfg: LearnerConfig,
    trainer: Trainer,
    leader: bool,
    client,
    consumer: GroupConsumer | None,
    names: RedisNames,
    publisher: WeightSink | None,
    stop: threading.Event,
) -> LearnerResult:
    m = learner_metrics()
    staleness = StalenessFilter(cfg.max_staleness)
    version, used, unacked = 0, 0, []
    resume_from = checkpoint.latest(cfg.checkpoint_dir) if cfg.resume else None
    if resume_from is not None:
        meta = checkpoint.load(trainer, resume_from)
        version, used = meta.version, meta.groups_used
        staleness.dropped = meta.groups_dropped_stale
        if leader:
            consumer.ack(meta.unacked)  # already inside the checkpoint: never used twice
        log.info("resumed at version %d from %s", version, resume_from)
    backlog = (
        consumer.reclaim() if leader else []
    )  # delivered before a crash, not yet in a checkpoint
    history: list[dict] = []
    idle_since = time.monotonic()
    malformed_seen = unknown_seen = 0
    m.version.set(version)
    m.last_update.set(time.time())  # "no update since": counted from the start until the first one

    while cfg.max_updates is None or version < cfg.max_updates:
        batch: list[Group] = []
        read_ids: list[str] = []
        if leader:
            while len(batch) < cfg.groups_per_update and not stop.is_set():
                entries = (
                    backlog[: cfg.groups_per_update]
                    if backlog
                    else consumer.read(cfg.groups_per_update, 500)
                )
                backlog = backlog[len(entries) :] if backlog else backlog
                for entry_id, group in entries:
                    m.staleness.observe(version - group.policy_version)
                    if staleness.accept(group.policy_version, version):
                        batch.append(group)
                        read_ids.append(entry_id)
                        m.groups.labels("used").inc()
                    else:  # decided for good: acknowledged with the next checkpoint
                        unacked.append(entry_id)
                        m.groups.labels("stale").inc()
                if consumer.malformed > malformed_seen:  # unknown schema versions are counted apart
                    unknown = consumer.unknown_schema - unknown_seen
                    m.groups.labels("unknown_schema").inc(unknown)
                    m.groups.labels("malformed").inc(consumer.malformed - malformed_seen - unknown)
                    malformed_seen, unknown_seen = consumer.malformed, consumer.unknown_schema
                if entries:
                    idle_since = time.monotonic()
                elif (
                    cfg.exit_when_idle_s is not None
                    and time.monotonic() - idle_since > cfg.exit_when_idle_s
                ):
                    break
        batch, done = _share(batch, stop.is_set() or not batch)
        if done:
            break
        start = time.perf_counter()
        rows = batch_rows(batch, cfg.advantages)
        used += len(batch)
        if not rows:  # every group was flat: the weights and the version stay as they are,
            m.groups.labels("uninformative").inc(len(batch))  # so these entries are done with now
            if leader:
                consumer.ack(read_ids)
            continue
        unacked.extend(read_ids)
        metrics = {**trainer.update(rows), **row_stats(rows, version)}
        version += 1
        m.updates.inc()
        m.tokens.inc(metrics.get("tokens", 0))
        m.version.set(version)
        m.record_update(metrics)
        m.update_seconds.observe(time.perf_counter() - start)
        m.last_update.set(time.time())
        if leader and publisher is not None and version % cfg.publish_every == 0:
            t0 = time.perf_counter()
            publisher.publish(version, trainer.state_dict())
            m.publish_seconds.observe(time.perf_counter() - t0)
            m.published_version.set(version)
            client.set(names.policy_version, version)
        elif (
            leader and publisher is None
        ):  # nothing to follow: the key tells how far the learner got
            client.set(names.policy_version, version)
        history.append(
            {
                "version": version,
                "groups": len(batch),
                **metrics,
                "seconds": time.perf_counter() - start,
                "dropped_stale": staleness.dropped,
            }
        )
        if version % cfg.checkpoint_every == 0:
            _checkpoint(trainer, cfg, version, used, staleness, unacked, consumer)
            unacked = []
    if unacked or (version and version % cfg.checkpoint_every):
        _checkpoint(trainer, cfg, version, used, staleness, unacked, consumer)
    return LearnerResult(
        version, used, staleness.dropped, consumer.malformed if consumer else 0, history
    )


def _checkpoint(trainer, cfg, version, used, staleness, unacked, consumer) -> None:
    start = time.perf_counter()
    meta = checkpoint.CheckpointMeta(
        version=version,
        unacked=list(unacked),
        groups_used=used,
        groups_dropped_stale=staleness.dropped,
    )
    checkpoint.save(trainer, cfg.checkpoint_dir, meta)
    learner_metrics().checkpoint_seconds.observe(time.perf_counter() - start)
    if consumer is not None:
        consumer.ack(unacked)


def _share(batch: list[Group], stop: bool) -> tuple[list[Group], bool]:
    """Rank 0's batch (and whether to stop) for every rank, as JSON."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return batch, stop and not batch
    payload = [
        json.dumps({"stop": stop and not batch, "groups": [g.model_dump_json() for g in batch]})
    ]
    dist.broadcast_object_list(payload, src=0)
    data = json.loads(payload[0])
    return [Group.model_validate_json(g) for g in data["groups"]], data["stop"]
