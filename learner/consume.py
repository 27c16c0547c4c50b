"""Reading groups from the stream with a Redis consumer group.

Exactly-once use across crashes: entries are acknowledged (and deleted, which frees room for
the actors' back-pressure) only once a checkpoint that contains their update exists. A learner
that dies re-claims its pending entries (XAUTOCLAIM) on restart and applies them again to the
checkpointed model; entries a checkpoint already covers but that were not acknowledged yet are
listed in that checkpoint and acknowledged on resume instead of being used again.
"""

from __future__ import annotations

import logging
from typing import Sequence

import redis
from pydantic import ValidationError

from services.contracts import Group
from services.redis_names import RedisNames

log = logging.getLogger("spo3.learner")


class GroupConsumer:
    def __init__(self, client: redis.Redis, run: str = "default", consumer: str = "learner-0") -> None:
        self.client = client
        self.names = RedisNames(run)
        self.consumer = consumer
        self.malformed = 0
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
                out.append((entry_id, Group.model_validate_json(fields[b"group"])))
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
