"""A work queue of tasks with leases: an item taken by an actor that dies is handed out again
once its lease expires, so no task is lost with the actor that held it.

Every take is a lease of its own, named by a random token kept in the run's lease-owner hash:
renewing (`extend`), finishing and releasing act only while the caller's token is still the
item's, so an actor whose lease lapsed (and whose item another actor took) can no longer renew,
finish or release the other actor's lease. A live actor keeps its leases with a `LeaseKeeper`
(one thread per actor process renewing every lease it holds each lease_s / 3), whatever its
rollouts are waiting on (the policy, the environment, the groups stream's back-pressure).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import redis
from pydantic import Field

from spo3.transport.contracts import WorkItem
from spo3.transport.redis_names import RedisNames

log = logging.getLogger("spo3.actor")

# KEYS: ready list, leased zset, items hash, owner hash. ARGV: now, lease seconds, token.
# Expired leases go back to the ready list (attempt + 1) before one item is taken.
_TAKE = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[4], id)
  local item = cjson.decode(redis.call('HGET', KEYS[3], id))
  item['attempt'] = item['attempt'] + 1
  redis.call('HSET', KEYS[3], id, cjson.encode(item))
  redis.call('RPUSH', KEYS[1], id)
end
local id = redis.call('LPOP', KEYS[1])
if not id then return false end
redis.call('ZADD', KEYS[2], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
redis.call('HSET', KEYS[4], id, ARGV[3])
return redis.call('HGET', KEYS[3], id)
"""

# KEYS: leased zset, owner hash. ARGV: new deadline, then (item id, token) pairs.
# Returns one 1/0 per pair: 1 where the lease is still the token's (its deadline moved).
_EXTEND = """
local out = {}
for i = 2, #ARGV, 2 do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[i + 1]
     and redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]), ARGV[i])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# KEYS: leased zset, done set, owner hash. ARGV: item id, token.
# Returns 1 if the caller still held the lease (the item is done), else 0 (nothing changes).
_FINISH = """
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
local held = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[1])
return held
"""

# KEYS: ready list, leased zset, items hash, owner hash. ARGV: item id, token.
# Back to the ready list (attempt + 1) if the caller still held the lease; returns 1 then.
_RELEASE = """
if redis.call('HGET', KEYS[4], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[4], ARGV[1])
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  local item = cjson.decode(redis.call('HGET', KEYS[3], ARGV[1]))
  item['attempt'] = item['attempt'] + 1
  redis.call('HSET', KEYS[3], ARGV[1], cjson.encode(item))
  redis.call('LPUSH', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


class LeasedItem(WorkItem):
    """A work item as one take handed it out: `lease` names that take (not serialized)."""

    lease: str = Field("", exclude=True)


class WorkQueue:
    def __init__(
        self, client: redis.Redis, run: str = "default", *, lease_s: float = 120.0
    ) -> None:
        self.client = client
        self.names = RedisNames(run)
        self.lease_s = lease_s
        self.owners = self.names.work_owners
        self._take = client.register_script(_TAKE)
        self._extend = client.register_script(_EXTEND)
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)

    def _keys(self) -> list[str]:
        n = self.names
        return [n.work_ready, n.work_leased, n.work_items, self.owners]

    def put(
        self, env: str, task_id: str, algo: str = "3spo", item_id: str | None = None
    ) -> WorkItem:
        item = WorkItem(item_id=item_id or uuid.uuid4().hex, env=env, task_id=task_id, algo=algo)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.names.work_items, item.item_id, item.model_dump_json())
        pipe.rpush(self.names.work_ready, item.item_id)
        pipe.execute()
        return item

    def take(self) -> LeasedItem | None:
        token = uuid.uuid4().hex
        raw = self._take(keys=self._keys(), args=[time.time(), self.lease_s, token])
        if not raw:
            return None
        return LeasedItem.model_validate_json(raw).model_copy(update={"lease": token})

    def extend_many(self, items: list[LeasedItem]) -> list[bool]:
        """Renew the leases of `items` in one call; False for each lease no longer the caller's."""
        if not items:
            return []
        args: list[str | float] = [time.time() + self.lease_s]
        for item in items:
            args += [item.item_id, item.lease]
        held = self._extend(keys=[self.names.work_leased, self.owners], args=args)
        return [bool(h) for h in held]

    def extend(self, item: LeasedItem) -> bool:
        """Renew the lease of an item still held by this take."""
        return self.extend_many([item])[0]

    def release(self, item: LeasedItem) -> bool:
        """Give an unfinished item back at once (clean shutdown), instead of waiting for its lease.
        False (and nothing changes) when the lease is no longer this take's."""
        return bool(self._release(keys=self._keys(), args=[item.item_id, item.lease]))

    def finish(self, item: LeasedItem) -> bool:
        """Mark the item done; False (and nothing changes) when the lease is no longer this take's."""
        return bool(
            self._finish(
                keys=[self.names.work_leased, self.names.work_done, self.owners],
                args=[item.item_id, item.lease],
            )
        )

    def counts(self) -> dict[str, int]:
        n = self.names
        pipe = self.client.pipeline(transaction=True)
        pipe.llen(n.work_ready)
        pipe.zcard(n.work_leased)
        pipe.scard(n.work_done)
        ready, leased, done = pipe.execute()
        return {"ready": int(ready), "leased": int(leased), "done": int(done)}


class LeaseKeeper:
    """Renews the leases of the items an actor process holds, every lease_s / 3 from one thread,
    until each is dropped. A lease found lost (it lapsed and was handed out again, e.g. after Redis
    was unreachable for longer than a lease) is reported by `lost`, so its rollout can stop."""

    def __init__(self, queue: WorkQueue, *, every_s: float | None = None) -> None:
        self.queue = queue
        self.every_s = every_s if every_s is not None else queue.lease_s / 3
        self._held: dict[str, LeasedItem] = {}  # lease token -> item
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> LeaseKeeper:
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()
        return self

    def hold(self, item: LeasedItem) -> None:
        with self._lock:
            self._held[item.lease] = item

    def drop(self, item: LeasedItem) -> None:
        with self._lock:
            self._held.pop(item.lease, None)
            self._lost.discard(item.lease)

    def lost(self, item: LeasedItem) -> bool:
        with self._lock:
            return item.lease in self._lost

    def renew(self) -> None:
        """One renewal of every lease held (the thread's tick)."""
        with self._lock:
            items = list(self._held.values())
        held = self.queue.extend_many(items)
        with self._lock:
            for item, ok in zip(items, held, strict=True):
                if not ok and item.lease in self._held and item.lease not in self._lost:
                    self._lost.add(item.lease)
                    log.warning(
                        "lost the lease of work item %s (%s %s): another actor may run it",
                        item.item_id,
                        item.env,
                        item.task_id,
                    )

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.renew()
            except redis.RedisError as e:  # tried again at the next tick, well before expiry
                log.warning("lease renewal failed: %s", e)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
