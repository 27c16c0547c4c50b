"""A work queue of tasks with leases: an item taken by an actor that dies is handed out again
once its lease expires, so no task is lost with the actor that held it."""

from __future__ import annotations

import time
import uuid

import redis

from spo3.transport.contracts import WorkItem
from spo3.transport.redis_names import RedisNames

# KEYS: ready list, leased zset, items hash. ARGV: now, lease seconds.
# Expired leases go back to the ready list (attempt + 1) before one item is taken.
_TAKE = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[2], id)
  local item = cjson.decode(redis.call('HGET', KEYS[3], id))
  item['attempt'] = item['attempt'] + 1
  redis.call('HSET', KEYS[3], id, cjson.encode(item))
  redis.call('RPUSH', KEYS[1], id)
end
local id = redis.call('LPOP', KEYS[1])
if not id then return false end
redis.call('ZADD', KEYS[2], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
return redis.call('HGET', KEYS[3], id)
"""

# KEYS: leased zset, done set. ARGV: item id. Returns 1 if the caller still held the lease.
_FINISH = """
local held = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[1])
return held
"""


# KEYS: ready list, leased zset, items hash. ARGV: item id. Back to the ready list, attempt + 1.
_RELEASE = """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  local item = cjson.decode(redis.call('HGET', KEYS[3], ARGV[1]))
  item['attempt'] = item['attempt'] + 1
  redis.call('HSET', KEYS[3], ARGV[1], cjson.encode(item))
  redis.call('LPUSH', KEYS[1], ARGV[1])
end
"""


class WorkQueue:
    def __init__(
        self, client: redis.Redis, run: str = "default", *, lease_s: float = 120.0
    ) -> None:
        self.client = client
        self.names = RedisNames(run)
        self.lease_s = lease_s
        self._take = client.register_script(_TAKE)
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)

    def _keys(self) -> list[str]:
        n = self.names
        return [n.work_ready, n.work_leased, n.work_items]

    def put(
        self, env: str, task_id: str, algo: str = "3spo", item_id: str | None = None
    ) -> WorkItem:
        item = WorkItem(item_id=item_id or uuid.uuid4().hex, env=env, task_id=task_id, algo=algo)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.names.work_items, item.item_id, item.model_dump_json())
        pipe.rpush(self.names.work_ready, item.item_id)
        pipe.execute()
        return item

    def take(self) -> WorkItem | None:
        raw = self._take(keys=self._keys(), args=[time.time(), self.lease_s])
        return WorkItem.model_validate_json(raw) if raw else None

    def extend(self, item: WorkItem) -> bool:
        """Renew the lease of an item still held (long rollouts call this as they go)."""
        # XX: only an existing lease is renewed; CH: count it (the deadline always moves).
        return (
            self.client.zadd(
                self.names.work_leased, {item.item_id: time.time() + self.lease_s}, xx=True, ch=True
            )
            == 1
        )

    def release(self, item: WorkItem) -> None:
        """Give an unfinished item back at once (clean shutdown), instead of waiting for its lease."""
        self._release(keys=self._keys(), args=[item.item_id])

    def finish(self, item: WorkItem) -> bool:
        return bool(
            self._finish(keys=[self.names.work_leased, self.names.work_done], args=[item.item_id])
        )

    def counts(self) -> dict[str, int]:
        n = self.names
        pipe = self.client.pipeline(transaction=True)
        pipe.llen(n.work_ready)
        pipe.zcard(n.work_leased)
        pipe.scard(n.work_done)
        ready, leased, done = pipe.execute()
        return {"ready": int(ready), "leased": int(leased), "done": int(done)}
