"""Reading groups from the stream with a Redis consumer group.

Exactly-once use across crashes: entries are acknowledged (and deleted, which frees room for
the actors' back-pressure) only once a checkpoint that contains their update exists. A learner
that dies re-claims its pending entries (XAUTOCLAIM) on restart and applies them again to the
checkpointed model; entries a checkpoint already covers but that were not acknowledged yet are
listed in that checkpoint and acknowledged on resume instead of being used again.
"""

from __future__ import annotations

import json
import logging
from typing import Sequence

import redis
from pydantic import ValidationError

from services.contracts import SCHEMA_VERSION, Group
from services.redis_names import RedisNames

log = logging.getLogger("spo3.learner")


class GroupConsumer:
    def __init__(self, client: redis.Redis, run: str = "default", consumer: str = "learner-0") -> None:
        self.client = client
        self.names = RedisNames(run)
        self.consumer = consumer
        self.malformed = 0
        self.unknown_schema = 0
        """Of `malformed`: entries whose schema_version this learner does not read."""
        try:
            self.client.xgroup_create(self.names.groups_stream, self.names.learner_group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _decode(self, entries) -> list[tuple[str, Group]]:
        out = []
        for entry_id, fields in entries:
            entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            try:
                raw = fields[b"group"]
                version = _schema_version(raw)
                if version != SCHEMA_VERSION:
                    self.unknown_schema += 1
                    raise ValueError(f"unknown stream schema_version {version!r}: this learner reads version "
                                     f"{SCHEMA_VERSION} only (transitions that say how they were sampled); "
                                     f"run actors of the same release as the learner")
                out.append((entry_id, Group.model_validate_json(raw)))
            except (KeyError, ValidationError, ValueError) as e:
                self._dead_letter(entry_id, fields, e)
        return out

    def _dead_letter(self, entry_id: str, fields: dict, error: Exception) -> None:
        """Move an unreadable entry aside (kept for inspection) so it never blocks the learner."""
        self.malformed += 1
        log.error("malformed stream entry %s moved to %s: %s", entry_id, self.names.dead_letters, error)
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.names.dead_letters, {**fields, b"error": str(error)[:2000].encode(), b"entry": entry_id.encode()},
                  maxlen=10_000, approximate=True)
        pipe.xack(self.names.groups_stream, self.names.learner_group, entry_id)
        pipe.xdel(self.names.groups_stream, entry_id)
        pipe.execute()

    def reclaim(self, min_idle_ms: int = 0) -> list[tuple[str, Group]]:
        """Entries delivered to a learner that never acknowledged them (it died): take them over."""
        out, start = [], "0-0"
        while True:
            reply = self.client.xautoclaim(self.names.groups_stream, self.names.learner_group, self.consumer,
                                           min_idle_time=min_idle_ms, start_id=start, count=100)
            start, entries = reply[0], reply[1]
            out.extend(self._decode([e for e in entries if e is not None]))
            if start in (b"0-0", "0-0"):
                return out

    def read(self, count: int, block_ms: int = 1000) -> list[tuple[str, Group]]:
        reply = self.client.xreadgroup(self.names.learner_group, self.consumer, {self.names.groups_stream: ">"},
                                       count=count, block=block_ms)
        if not reply:
            return []
        return self._decode(reply[0][1])

    def ack(self, entry_ids: Sequence[str]) -> int:
        if not entry_ids:
            return 0
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.names.groups_stream, self.names.learner_group, *entry_ids)
        pipe.xdel(self.names.groups_stream, *entry_ids)
        acked, _ = pipe.execute()
        return int(acked)

    def pending(self) -> int:
        info = self.client.xpending(self.names.groups_stream, self.names.learner_group)
        return int(info["pending"])


def _schema_version(raw: bytes) -> object:
    """The entry's declared schema_version (None if it declares none); ValueError if not a JSON object.
    Read before validation, so an entry of another version gets an error that says so, not a field list."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError(f"stream entry is a JSON {type(data).__name__}, not a group object")
    return data.get("schema_version")
