"""The score store: shared per-state statistics and the scores derived from them.

Interface (the verbs the rollout uses): `scores(keys)`, `commit_leaf(leaf_id, path, success)`,
`stats()`. `RedisScoreStore` keeps the counts in Redis and does each verb in one round trip
with a Lua script; the score formula itself is score_math's, applied to the fetched counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import redis
from pydantic import BaseModel, Field

from spo3.score_store.score_math import Counts, ScoreParams, n_rollouts, state_score
from spo3.transport.connection import StoreUnavailable, redact
from spo3.transport.redis_names import RedisNames


class StateScore(BaseModel):
    key: str
    score: float
    n_rollouts: int
    n_total: int
    n_success: int


class ScoreBatch(BaseModel):
    t: int
    scores: list[StateScore]


class LeafOutcome(BaseModel):
    leaf_id: str
    path: list[str]
    success: float


class CommitResult(BaseModel):
    counted: bool | None = Field(
        description="True: this commit counted the leaf; False: its leaf id was counted "
        "before (nothing changed); null: queued by a client that sends it "
        "with its next request (spo3.score_store.client), outcome not known yet."
    )
    t: int | None = Field(
        description="t after this commit (leaves counted + 1); null while queued."
    )


class StoreStats(BaseModel):
    t: int
    n_states: int
    truncated_states: int
    leaves_counted: int
    duplicate_commits: int


class ScoreStore(Protocol):
    def scores(self, keys: Sequence[str]) -> ScoreBatch: ...

    def commit_leaf(self, leaf_id: str, path: Sequence[str], success: float) -> CommitResult: ...

    def commit_leaves(self, leaves: Sequence[LeafOutcome]) -> list[CommitResult]: ...

    def stats(self) -> StoreStats: ...


def rollout_of(leaf_id: str) -> str:
    """The rollout a leaf belongs to: leaf ids are `<work item>:a<attempt>:<sequence>`
    (docs/algorithm.md "Leaf commit"), so the id without its last `:` part; an id without `:` is a
    rollout of its own."""
    head, sep, _ = leaf_id.rpartition(":")
    return head if sep else leaf_id


def _script(name: str) -> str:
    return (Path(__file__).parent / "lua" / name).read_text()


class RedisScoreStore:
    """Score store on a real Redis. Safe to share between threads (redis-py pools connections)."""

    def __init__(
        self,
        client: redis.Redis,
        params: ScoreParams | None = None,
        *,
        run: str = "default",
        success_threshold: float = 1.0,
        leaf_ttl_s: int = 7 * 24 * 3600,
    ) -> None:
        """`success_threshold`: a leaf counts as a success when its success value reaches it
        (1.0: ALFWorld/TextWorld wins, WebShop full score). `leaf_ttl_s`: how long a leaf id is
        remembered for idempotency (0 = forever); retries arrive within seconds."""
        self.client = client
        self.params = params or ScoreParams()
        self.names = RedisNames(run)
        self.success_threshold = success_threshold
        self.leaf_ttl_s = leaf_ttl_s
        self._commit = client.register_script(_script("commit_leaf.lua"))
        self._scores = client.register_script(_script("scores.lua"))

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            where = redact(
                str(
                    self.client.connection_pool.connection_kwargs.get("path")
                    or self.client.connection_pool.connection_kwargs.get("host")
                )
            )
            raise StoreUnavailable(f"Redis at {where} unreachable after retries: {e}") from e

    def scores(self, keys: Sequence[str]) -> ScoreBatch:
        n = self.names
        flat = self._call(self._scores, keys=[n.leaves, *(n.state(k) for k in keys)])
        t = int(flat[0]) + 1
        p = self.params
        out = []
        for i, key in enumerate(keys):
            total, succ, root = flat[1 + 3 * i : 4 + 3 * i]
            s = state_score(Counts(total, succ), t, p, is_root=bool(root))
            out.append(
                StateScore(
                    key=key,
                    score=s,
                    n_rollouts=n_rollouts(s, p.g_max),
                    n_total=total,
                    n_success=succ,
                )
            )
        return ScoreBatch(t=t, scores=out)

    def commit_leaf(self, leaf_id: str, path: Sequence[str], success: float) -> CommitResult:
        """Count one finished path. path[0] is the task's root state (it is never truncated).
        Repeated states count once; a leaf id already committed changes nothing. Under
        `count: rollout` the leaf's rollout is its id without the last `:` part (`rollout_of`)."""
        # One EVALSHA, not a pipeline: redis-py adds a SCRIPT EXISTS round trip to pipelines.
        counted, leaves = self._call(self._commit, **self._commit_args(leaf_id, path, success))
        return CommitResult(counted=bool(counted), t=int(leaves) + 1)

    def commit_leaves(self, leaves: Sequence[LeafOutcome]) -> list[CommitResult]:
        """Many commits in one round trip (a pipeline); each one is atomic on its own."""
        pipe = self.client.pipeline(transaction=False)
        for leaf in leaves:
            self._commit(**self._commit_args(leaf.leaf_id, leaf.path, leaf.success), client=pipe)
        replies = self._call(pipe.execute)
        return [CommitResult(counted=bool(c), t=int(t) + 1) for c, t in replies]

    def _commit_args(self, leaf_id: str, path: Sequence[str], success: float) -> dict:
        if not path:
            raise ValueError("a leaf's path holds at least the root state")
        if not 0.0 <= success <= 1.0:
            raise ValueError(f"success must lie in [0, 1], got {success}")
        n, p = self.names, self.params
        keys = [
            n.leaf(leaf_id),
            n.leaves,
            n.n_states,
            n.truncated,
            n.duplicate_commits,
            self.names.rollout_seen(rollout_of(leaf_id)),
            *(n.state(k) for k in dict.fromkeys(path)),
        ]
        won = 1 if success >= self.success_threshold else 0
        args = [won, self.leaf_ttl_s, p.xi, repr(p.zeta), repr(p.eps)]
        args += [int(p.truncate_won), int(p.count == "rollout")]
        return dict(keys=keys, args=args)

    def stats(self) -> StoreStats:
        n = self.names
        pipe = self.client.pipeline(transaction=True)
        pipe.get(n.leaves)
        pipe.get(n.n_states)
        pipe.scard(n.truncated)
        pipe.get(n.duplicate_commits)
        leaves, states, trunc, dups = self._call(pipe.execute)
        leaves = int(leaves or 0)
        return StoreStats(
            t=leaves + 1,
            n_states=int(states or 0),
            truncated_states=int(trunc),
            leaves_counted=leaves,
            duplicate_commits=int(dups or 0),
        )

    def clear(self) -> int:
        """Delete every key of this run (tests, fresh runs). Returns how many were removed."""
        removed = 0
        for batch in self._batched(
            self.client.scan_iter(match=self.names.all_keys_pattern(), count=1000)
        ):
            removed += self.client.delete(*batch)
        return removed

    @staticmethod
    def _batched(it, size: int = 1000):
        batch = []
        for x in it:
            batch.append(x)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch
