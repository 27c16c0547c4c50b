"""The groups stream: actors append finished groups, the learner reads them.

Appends are idempotent per group id (a retried append after a lost reply adds nothing) and
bounded twice, by waiting (back-pressure) instead of trimming, so no group is ever dropped silently:
- `max_len`: entries the learner has not removed yet (read entries stay until a checkpoint
  covers them), which bounds Redis memory;
- `max_unread` (0: off): entries the learner has not read yet. Actors that outrun the learner
  would otherwise spend the env-step budget on groups that wait, and grow stale, in the stream;
  with this bound they wait for the learner instead, which keeps the policy they sample fresh.
"""

from __future__ import annotations

import time

import redis

from services.contracts import Group
from services.redis_names import RedisNames

# KEYS[1] stream, KEYS[2] group-id marker; ARGV[1] payload, ARGV[2] marker ttl, ARGV[3] max len,
# ARGV[4] max unread (0: no bound), ARGV[5] the learner's consumer group.
# Returns the entry id, "" if the group id was appended before, or "FULL".
# Unread = length - delivered-but-unacknowledged (acknowledged entries are deleted); before the
# learner made its consumer group, every entry is unread.
_APPEND = """
local len = redis.call('XLEN', KEYS[1])
if len >= tonumber(ARGV[3]) then return 'FULL' end
if tonumber(ARGV[4]) > 0 then
  local pending = redis.pcall('XPENDING', KEYS[1], ARGV[5])
  local delivered = 0
  if type(pending) == 'table' and not pending['err'] then delivered = tonumber(pending[1]) end
  if len - delivered >= tonumber(ARGV[4]) then return 'FULL' end
end
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', tonumber(ARGV[2])) then return '' end
return redis.call('XADD', KEYS[1], '*', 'group', ARGV[1])
"""


class StreamFull(TimeoutError):
    """The learner did not drain the stream within the wait limit."""


class GroupStream:
    def __init__(self, client: redis.Redis, run: str = "default", *, max_len: int = 10_000, max_unread: int = 0,
                 marker_ttl_s: int = 7 * 24 * 3600) -> None:
        self.client = client
        self.names = RedisNames(run)
        self.max_len = max_len
        self.max_unread = max_unread
        self.marker_ttl_s = marker_ttl_s
        self._append = client.register_script(_APPEND)
        self.waited_s = 0.0  # total back-pressure wait, for metrics

    def append(self, group: Group, *, wait_limit_s: float = 600.0) -> str | None:
        """Append one group; returns its entry id, or None if this group id was already there.
        Waits while the stream is full, raising StreamFull after `wait_limit_s`."""
        n = self.names
        payload = group.model_dump_json()
        start = time.monotonic()
        delay = 0.01
        while True:
            reply = self._append(keys=[n.groups_stream, n.group_marker(group.group_id)],
                                 args=[payload, self.marker_ttl_s, self.max_len, self.max_unread, n.learner_group])
            reply = reply.decode() if isinstance(reply, bytes) else reply
            if reply != "FULL":
                self.waited_s += time.monotonic() - start if delay > 0.01 else 0.0
                return reply or None
            if time.monotonic() - start > wait_limit_s:
                raise StreamFull(f"groups stream {n.groups_stream} stayed full ({self.max_len} entries or "
                                 f"{self.max_unread or 'unbounded'} unread) for {wait_limit_s:.0f}s: "
                                 "is the learner running?")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def length(self) -> int:
        return int(self.client.xlen(self.names.groups_stream))

    def read_all(self) -> list[Group]:
        """Every group in the stream, oldest first (tests, inspection)."""
        return [Group.model_validate_json(fields[b"group"])
                for _, fields in self.client.xrange(self.names.groups_stream)]
