"""The groups stream, both ends in one place: actors append finished groups (`GroupStream`), the
learner reads them with a Redis consumer group (`GroupConsumer`), metrics read its depth
(`stream_depth`).

Appends are idempotent per group id (a retried append after a lost reply adds nothing) and
bounded twice, by waiting (back-pressure) instead of trimming, so no group is ever dropped silently:
- `max_len`: entries the learner has not removed yet (read entries stay until a checkpoint
  covers them), which bounds Redis memory;
- `max_unread` (0: off): entries the learner has not read yet. Actors that outrun the learner
  would otherwise spend the env-step budget on groups that wait, and grow stale, in the stream;
  with this bound they wait for the learner instead, which keeps the policy they sample fresh.
  None: `DEFAULT_MAX_UNREAD` once the learner's consumer group exists, no bound before it (so a
  run without a learner never waits on one).
The append is one Lua script (lua/append_group.lua) that reads the learner group's XPENDING.

Entries are schema 3 (`Group.to_stream_json`): a group's distinct prompts travel once, in its
`prompts` table (a 3SPO step group's n(s) members share one prompt). The reader also reads
schema 2 entries (prompts inline, from actors of the previous release during an upgrade): they
give the same rows, so nothing already in the stream is lost to the upgrade.

Exactly-once use across crashes: entries are acknowledged (and deleted, which frees room for
the actors' back-pressure) only once a checkpoint that contains their update exists. A learner
that dies re-claims its pending entries (XAUTOCLAIM) on restart and applies them again to the
checkpointed model; entries a checkpoint already covers but that were not acknowledged yet are
listed in that checkpoint and acknowledged on resume instead of being used again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import redis
from pydantic import ValidationError
from tenacity import (
    RetryError,
    Retrying,
    retry_if_result,
    stop_after_delay,
    stop_when_event_set,
    wait_exponential,
)

from spo3.transport.contracts import READABLE_SCHEMAS, Group
from spo3.transport.redis_names import RedisNames

log = logging.getLogger("spo3.learner")  # the reader runs in the learner
append_log = logging.getLogger("spo3.actors")  # the writers are actors
_APPEND = (Path(__file__).parent / "lua" / "append_group.lua").read_text()


DEFAULT_MAX_UNREAD = 8
"""groups_per_update x max_staleness / 2 at the learner's defaults (8, 2): see ActorConfig."""


class StreamFull(TimeoutError):
    """The learner did not drain the stream within the wait limit."""


class AppendStopped(RuntimeError):
    """The process was told to stop while its append waited on a full stream; nothing was added."""


class GroupStream:
    def __init__(
        self,
        client: redis.Redis,
        run: str = "default",
        *,
        max_len: int = 10_000,
        max_unread: int | None = 0,
        marker_ttl_s: int = 7 * 24 * 3600,
        stop: threading.Event | None = None,
    ) -> None:
        """`stop`: once set, an append that waits on a full stream gives up (`AppendStopped`), so a
        stopping actor does not wait out the limit for a learner that may have finished."""
        self.client = client
        self.stop = stop
        self.names = RedisNames(run)
        self.max_len = max_len
        self.max_unread = max_unread
        self._learner_seen = False
        self.marker_ttl_s = marker_ttl_s
        self._append = client.register_script(_APPEND)
        self.waited_s = 0.0  # total back-pressure wait, for metrics

    def append(self, group: Group, *, wait_limit_s: float = 600.0) -> str | None:
        """Append one group; returns its entry id, or None if this group id was already there.
        Waits while the stream is full, raising StreamFull after `wait_limit_s` (AppendStopped as
        soon as `stop` is set)."""
        n = self.names
        payload = group.to_stream_json()  # schema 3: each distinct prompt once
        start = time.monotonic()
        waits = Retrying(
            retry=retry_if_result(lambda reply: reply == "FULL"),
            wait=wait_exponential(multiplier=0.01, max=1.0),
            stop=stop_after_delay(wait_limit_s)
            | stop_when_event_set(self.stop or threading.Event()),
            before_sleep=lambda state: (
                append_log.info(
                    "group %s waits: the groups stream is full (the learner has not read enough)",
                    group.group_id,
                )
                if state.attempt_number == 1
                else None
            ),
        )
        try:
            reply = waits(self._try_append, n, group.group_id, payload)
        except RetryError:
            self.waited_s += time.monotonic() - start
            if self.stop is not None and self.stop.is_set():
                raise AppendStopped(
                    f"stopped while waiting for room in {n.groups_stream}; group "
                    f"{group.group_id} was not appended"
                ) from None
            raise StreamFull(
                f"groups stream {n.groups_stream} stayed full ({self.max_len} entries or "
                f"{self._unread_bound() or 'unbounded'} unread) for {wait_limit_s:.0f}s: "
                "is the learner running?"
            ) from None
        if waits.statistics.get("attempt_number", 1) > 1:
            self.waited_s += time.monotonic() - start
        return reply or None

    def _unread_bound(self) -> int:
        if self.max_unread is not None:
            return self.max_unread
        if not self._learner_seen:  # checked until the learner's consumer group exists
            try:
                groups = self.client.xinfo_groups(self.names.groups_stream)
            except redis.ResponseError:  # no stream yet
                groups = []
            names = {
                g["name"].decode() if isinstance(g["name"], bytes) else g["name"] for g in groups
            }
            self._learner_seen = self.names.learner_group in names
        return DEFAULT_MAX_UNREAD if self._learner_seen else 0

    def _try_append(self, n: RedisNames, group_id: str, payload: str) -> str:
        reply = self._append(
            keys=[n.groups_stream, n.group_marker(group_id)],
            args=[payload, self.marker_ttl_s, self.max_len, self._unread_bound(), n.learner_group],
        )
        return reply.decode() if isinstance(reply, bytes) else reply

    def length(self) -> int:
        return int(self.client.xlen(self.names.groups_stream))

    def read_all(self) -> list[Group]:
        """Every group in the stream, oldest first (tests, inspection)."""
        entries = self.client.xrange(self.names.groups_stream) or []
        return [
            Group.model_validate_json(fields[b"group"])
            for _, fields in entries
            if fields is not None  # XRANGE lists no deleted entry
        ]


class GroupConsumer:
    def __init__(
        self, client: redis.Redis, run: str = "default", consumer: str = "learner-0"
    ) -> None:
        self.client = client
        self.names = RedisNames(run)
        self.consumer = consumer
        self.malformed = 0
        self.unknown_schema = 0
        """Of `malformed`: entries whose schema_version this learner does not read."""
        try:
            self.client.xgroup_create(
                self.names.groups_stream, self.names.learner_group, id="0", mkstream=True
            )
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
                if version not in READABLE_SCHEMAS:
                    self.unknown_schema += 1
                    raise ValueError(
                        f"unknown stream schema_version {version!r}: this learner reads version "
                        f"{' or '.join(map(str, READABLE_SCHEMAS))} only (2: prompts inline, 3: "
                        "a group's prompts once); run actors of the same release as the learner"
                    )
                out.append((entry_id, Group.model_validate_json(raw)))
            except (KeyError, ValidationError, ValueError) as e:
                self._dead_letter(entry_id, fields, e)
        return out

    def _dead_letter(self, entry_id: str, fields: dict, error: Exception) -> None:
        """Move an unreadable entry aside (kept for inspection) so it never blocks the learner."""
        self.malformed += 1
        log.error(
            "malformed stream entry %s moved to %s: %s", entry_id, self.names.dead_letters, error
        )
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(
            self.names.dead_letters,
            {**fields, b"error": str(error)[:2000].encode(), b"entry": entry_id.encode()},
            maxlen=10_000,
            approximate=True,
        )
        pipe.xack(self.names.groups_stream, self.names.learner_group, entry_id)
        pipe.xdel(self.names.groups_stream, entry_id)
        pipe.execute()

    def reclaim(self, min_idle_ms: int = 0) -> list[tuple[str, Group]]:
        """Entries delivered to a learner that never acknowledged them (it died): take them over."""
        out, start = [], "0-0"
        while True:
            reply = self.client.xautoclaim(
                self.names.groups_stream,
                self.names.learner_group,
                self.consumer,
                min_idle_time=min_idle_ms,
                start_id=start,
                count=100,
            )
            start, entries = reply[0], reply[1]
            out.extend(self._decode([e for e in entries if e is not None]))
            if start in (b"0-0", "0-0"):
                return out

    def read(self, count: int, block_ms: int = 1000) -> list[tuple[str, Group]]:
        reply = self.client.xreadgroup(
            self.names.learner_group,
            self.consumer,
            {self.names.groups_stream: ">"},
            count=count,
            block=block_ms,
        )
        if not reply:
            return []
        # [[stream, entries]]: redis-py also types the dict of legacy_responses=False, not used here.
        return self._decode(cast(list[list[Any]], reply)[0][1])

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


def stream_depth(client: redis.Redis, names: RedisNames) -> tuple[int, int]:
    """(entries in the stream, entries delivered to the learner and not yet acknowledged)."""
    length = int(client.xlen(names.groups_stream))
    groups = {
        g["name"].decode() if isinstance(g["name"], bytes) else g["name"]: g
        for g in client.xinfo_groups(names.groups_stream)
    }
    return length, int(groups.get(names.learner_group, {}).get("pending", 0))
