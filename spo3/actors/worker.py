"""`spo3 actor`: a stateless worker. It takes tasks from the work queue, rolls them out, streams
groups to the learner and commits leaves to the score store. Kill it at any moment: its task's
lease expires and another actor runs the task again; everything it finished is already in Redis.

The score store is the state-score service when `score_url` is set (scores, leaf commits and the
score parameters all come from it: one source of truth per run), else the store's Lua on Redis
directly. The work queue, the groups stream and the run totals are on Redis either way.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import redis

from spo3.actors.config import ActorConfig
from spo3.actors.envs.base import Env
from spo3.actors.envs.registry import canonical_name, make_env
from spo3.actors.evaluate import evaluate
from spo3.actors.rollout import LEAF_KINDS, Rollout, RolloutStats
from spo3.policy.interface import Policy
from spo3.score_store.client import ScoreServiceError, ServiceScoreStore, reconcile_params
from spo3.score_store.score_math import ScoreParams
from spo3.score_store.store import (
    CommitResult,
    LeafOutcome,
    RedisScoreStore,
    ScoreBatch,
    ScoreStore,
    StoreStats,
)
from spo3.transport.connection import check_reachable, connect
from spo3.transport.contracts import ChatMessage, Completion, SamplingParams, WorkItem
from spo3.transport.metrics import (
    actor_metrics,
    policy_client_metrics,
    serve,
    stop_serving,
    task_type,
)
from spo3.transport.redis_names import RedisNames
from spo3.transport.stream import AppendStopped, GroupStream
from spo3.transport.work_queue import LeasedItem, LeaseKeeper, WorkQueue

log = logging.getLogger("spo3.actor")


def record_totals(client, names, stats: RolloutStats, task: str | None = None) -> None:
    """Run-wide totals in Redis, so launchers and dashboards see every actor's work. With `task`, the
    rollout's visited states go to the `actor_visits` list in the same transaction as its env steps,
    so the list's order is the order the totals grew in."""
    pipe = client.pipeline(transaction=task is not None)
    if task is not None:
        pipe.rpush(
            names.actor_visits,
            json.dumps(
                {"task": task, "steps": stats.env_steps, "visits": [list(v) for v in stats.visits]}
            ),
        )
    for field_name in (
        "env_steps",
        "replay_steps",
        "leaves",
        "successes",
        "groups",
        "invalid_actions",
        "actions",
        "generated_tokens",
        "truncated",
        "restores",
        "expansions",
        "reexpansions",
        "informative_groups",
        "truncated_top_groups",
        "open_at_end",
    ):
        pipe.hincrby(names.actor_totals, field_name, getattr(stats, field_name))
    pipe.hincrby(names.actor_totals, "tasks", 1)
    for kind in LEAF_KINDS:
        pipe.hincrby(names.actor_totals, f"leaves_{kind}", stats.leaf_kinds[kind])
    for reason, count in stats.not_pushed.items():
        pipe.hincrby(names.actor_totals, f"not_pushed_{reason}", count)
    for n, count in stats.branching.items():
        pipe.hincrby(names.actor_branching, str(n), count)
    for depth, count in stats.expansions_by_depth.items():
        pipe.hincrby(names.actor_depths, str(depth), count)
    pipe.execute()


def record(stats: RolloutStats, item: WorkItem) -> None:
    m, algo = actor_metrics(), item.algo
    m.env_steps.labels(algo).inc(stats.env_steps)
    m.replay_steps.inc(stats.replay_steps)
    m.leaves.labels(algo).inc(stats.leaves)
    m.successes.labels(algo).inc(stats.successes)
    m.groups.labels(algo).inc(stats.groups)
    m.actions.inc(stats.actions)
    m.tokens.inc(stats.generated_tokens)
    for reason, count in stats.invalid_reasons.items():
        m.invalid.labels(reason).inc(count)
    labels = (item.env, task_type(item.env, item.task_id), algo)
    m.train_leaves.labels(*labels).inc(stats.leaves)
    m.train_successes.labels(*labels).inc(stats.successes)
    m.expansions.labels(*labels).inc(sum(stats.branching.values()))
    m.truncated.labels(*labels).inc(stats.truncated)
    m.restores.inc(stats.restores)
    m.reexpansions.labels(*labels).inc(stats.reexpansions)
    m.informative_groups.labels(*labels).inc(stats.informative_groups)
    m.truncated_top_groups.labels(*labels).inc(stats.truncated_top_groups)
    for kind in LEAF_KINDS:
        m.leaf_kinds.labels(*labels, kind).inc(stats.leaf_kinds[kind])
    for depth, count in stats.expansions_by_depth.items():
        for _ in range(count):
            m.expansion_depth.observe(depth)
    for n, count in stats.branching.items():
        for _ in range(count):
            m.branching.observe(n)
    for score in stats.scores:
        m.state_score.observe(score)
    m.task_seconds.observe(stats.seconds)


class _ObservedStore:
    """The score store as the rollout sees it, counting the states that no committed path had
    reached yet when this rollout first met them (a state's first scoring, or its first commit).
    Concurrent actors that find the same fresh state both count it: a slight overcount."""

    def __init__(self, store: ScoreStore) -> None:
        self.store = store
        self.first_seen: dict[str, bool] = {}  # key -> new when first met

    def _note(self, batch: ScoreBatch) -> None:
        for s in batch.scores:
            self.first_seen.setdefault(s.key, s.n_total == 0)

    def scores(self, keys: Sequence[str]) -> ScoreBatch:
        batch = self.store.scores(keys)
        self._note(batch)
        return batch

    def _note_paths(self, paths: Sequence[Sequence[str]]) -> None:
        unseen = list(dict.fromkeys(k for path in paths for k in path if k not in self.first_seen))
        if unseen:  # GRPO/GiGPO paths are never scored before they are committed
            self._note(self.store.scores(unseen))

    def commit_leaf(self, leaf_id: str, path: Sequence[str], success: float) -> CommitResult:
        self._note_paths([path])
        return self.store.commit_leaf(leaf_id, path, success)

    def commit_leaves(self, leaves: Sequence[LeafOutcome]) -> list[CommitResult]:
        self._note_paths([leaf.path for leaf in leaves])
        return self.store.commit_leaves(leaves)

    def stats(self) -> StoreStats:
        return self.store.stats()

    def new_states(self) -> int:
        return sum(self.first_seen.values())


def open_score_store(
    cfg: ActorConfig, client
) -> tuple[ScoreStore, ScoreParams, ServiceScoreStore | None]:
    """The actor's score store and the parameters it runs with. Through the service: its
    parameters (explicit local ones must agree) and its run id (must be the actor's)."""
    if not cfg.score_url:
        return RedisScoreStore(client, cfg.params, run=cfg.run), cfg.params, None
    service = ServiceScoreStore(cfg.score_url, cfg.score_token or "", retry_s=cfg.score_retry_s)
    try:
        served_run = service.served_run()
        if served_run != cfg.run:
            raise ScoreServiceError(
                f"the score service at {cfg.score_url} serves run {served_run!r}, this actor works on "
                f"run {cfg.run!r}: start both with the same --run"
            )
        params = reconcile_params(
            cfg.params, service.params(), source=f"the score service at {cfg.score_url}"
        )
    except Exception:
        service.close()
        raise
    log.info(
        "score store: service at %s (run %s); parameters from it: %s",
        cfg.score_url,
        served_run,
        ", ".join(f"{k}={v}" for k, v in params.model_dump().items()),
    )
    return service, params, service


class _ObservedPolicy:
    """The policy with its request latency and the version of the weights it last served."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def sample(self, messages: Sequence[ChatMessage], params: SamplingParams) -> list[Completion]:
        m = actor_metrics()
        start = time.perf_counter()
        out = self.policy.sample(messages, params)
        m.policy_seconds.observe(time.perf_counter() - start)
        if out:
            m.policy_version.set(max(c.policy_version for c in out))
        return out


def _evaluate_one(
    cfg: ActorConfig,
    envs: dict[str, Env],
    policy: Policy,
    k: int,
    make: Callable[[str], Env] | None = None,
) -> None:
    """One held-out episode (no branching, no groups, no score-store commit), counted as eval.
    `make` builds a missing engine (default: make_env with cfg's options)."""
    env_name, task = cfg.eval_tasks[k % len(cfg.eval_tasks)]
    r = cfg.rollout
    try:
        if env_name not in envs:
            envs[env_name] = (
                make(env_name)
                if make is not None
                else make_env(env_name, **cfg.env_options.get(env_name, {}))
            )
        result = evaluate(
            envs[env_name],
            policy,
            [task],
            max_steps=r.max_steps,
            temperature=cfg.eval_temperature,
            choice_mode=r.choice_mode,
            max_tokens=r.max_tokens,
            history_len=r.history_len,
        )
    except Exception:
        log.exception("evaluation episode of %s %s failed", env_name, task)
        if env_name in envs:
            envs.pop(env_name).close()
        return
    m, labels = actor_metrics(), (env_name, task_type(env_name, task))
    m.eval_episodes.labels(*labels).inc()
    m.eval_successes.labels(*labels).inc(int(result.success_rate >= 1.0))
    log.info(
        "eval %s %s: success %.0f in %.0f steps",
        env_name,
        task,
        result.success_rate,
        result.mean_steps,
    )


# Engines whose library keeps module-level state that concurrent calls corrupt: TextWorld parses
# every game it loads with one global logic parser (two lanes loading at once fail with tatsu's
# "pop from empty list"), and ALFWorld runs on TextWorld. Lanes of one process call these one at
# a time (policy requests and the score store still overlap); twx and scienceworld have a JVM per
# instance and run in parallel.
_SERIAL_ENVS = frozenset({"textworld", "alfworld"})
_SERIAL_LOCKS = {name: threading.RLock() for name in _SERIAL_ENVS}


class _Serialized:
    """An engine whose every call holds its library's process-wide lock (see _SERIAL_ENVS)."""

    def __init__(self, env: Env, lock: threading.RLock) -> None:
        self._env, self._lock = env, lock

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._env, name)
        if not callable(attr):
            return attr
        lock = self._lock

        def locked(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return attr(*args, **kwargs)

        return locked


def _make_lane_env(name: str, options: dict, shared: bool) -> Env:
    """A lane's engine; with other lanes in the process, one of _SERIAL_ENVS is serialized."""
    lock = _SERIAL_LOCKS.get(canonical_name(name)) if shared else None
    if lock is None:
        return make_env(name, **options)
    with lock:
        env = make_env(name, **options)
    return cast(Env, _Serialized(env, lock))


class _Slot:
    """One rollout lane of an actor process (`concurrency` of them): its own environment engines,
    groups-stream handle (its back-pressure wait is counted per lane) and, through the score
    service, its own score client (that client's leaf queue is not shared). Only its thread
    touches it."""

    def __init__(self, actor: _Actor, index: int, store: ScoreStore, service) -> None:
        cfg = actor.cfg
        self.index = index
        self.store: ScoreStore = store
        self.service: ServiceScoreStore | None = service
        self.stream = GroupStream(
            actor.client,
            cfg.run,
            max_len=cfg.stream_max_len,
            max_unread=cfg.stream_max_unread,
            stop=actor.stop,  # a stopping actor does not wait out a full stream
        )
        self.envs: dict[str, Env] = {}

    def close(self) -> None:
        """Close the engines; send the leaves still queued for the score service, then close it."""
        for env in self.envs.values():
            env.close()
        self.envs.clear()
        service = self.service
        if service is not None:
            try:
                service.flush()  # leaves of a failed item that were queued when it failed
            except Exception as e:
                log.error(
                    "%d finished leaves could not be sent to the score service: %s",
                    len(service.pending),
                    e,
                )
            service.close()


class _Actor:
    """One actor process's work: its connections, its rollout lanes (`cfg.concurrency` threads,
    each taking and rolling out one work item at a time on engines of its own), the lease keeper
    that renews every lease it holds, and its counts."""

    def __init__(
        self,
        cfg: ActorConfig,
        policy: Policy,
        stop: threading.Event,
        client: redis.Redis,
        store: ScoreStore,
        params: ScoreParams,
        service: ServiceScoreStore | None,
    ) -> None:
        self.cfg, self.policy, self.stop, self.client = cfg, policy, stop, client
        self.params = params
        self.metrics = actor_metrics()
        self.names = RedisNames(cfg.run)
        self.queue = WorkQueue(client, cfg.run, lease_s=cfg.lease_s)
        self.leases = LeaseKeeper(self.queue)
        self.finished, self.evaluated = 0, 0
        self._counts = threading.Lock()
        self.slots = [_Slot(self, 0, store, service)]
        for i in range(1, cfg.concurrency):
            # ServiceScoreStore is one per thread; the store's Lua on Redis is shared.
            extra = (
                ServiceScoreStore(cfg.score_url, cfg.score_token or "", retry_s=cfg.score_retry_s)
                if service is not None and cfg.score_url
                else None
            )
            self.slots.append(_Slot(self, i, extra or store, extra))

    def loop(self) -> None:
        """Run the lanes until stopped, or each idle for cfg.exit_when_idle_s. One lane runs in
        the calling thread; with more, each has a thread and the first error stops them all."""
        self.leases.start()
        try:
            if len(self.slots) == 1:
                self._lane(self.slots[0])
                return
            errors: list[BaseException] = []

            def lane(slot: _Slot) -> None:
                try:
                    self._lane(slot)
                except BaseException as e:
                    errors.append(e)
                    self.stop.set()

            threads = [
                threading.Thread(target=lane, args=(s,), name=f"rollout-{s.index}", daemon=True)
                for s in self.slots
            ]
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():  # with a timeout: the main thread still handles signals
                    t.join(0.5)
            if errors:
                raise errors[0]
        finally:
            self.leases.stop()

    def _lane(self, slot: _Slot) -> None:
        """Take and roll out work items one at a time until stopped, or idle for cfg.exit_when_idle_s."""
        cfg, idle_since = self.cfg, time.monotonic()
        while not self.stop.is_set():
            item = self.queue.take()
            if item is None:
                if (
                    cfg.exit_when_idle_s is not None
                    and time.monotonic() - idle_since > cfg.exit_when_idle_s
                ):
                    break
                self.stop.wait(0.2)
                continue
            idle_since = time.monotonic()
            self.leases.hold(item)
            try:
                done = self.work(slot, item)
            finally:
                self.leases.drop(item)
            if done:
                idle_since = time.monotonic()  # idle time counts from the end of the last item

    def _make_env(self, name: str) -> Env:
        return _make_lane_env(name, self.cfg.env_options.get(name, {}), len(self.slots) > 1)

    def work(self, slot: _Slot, item: LeasedItem) -> bool:
        """Roll out one item; False when it failed (it goes back to the queue, or is given up)."""
        cfg = self.cfg
        if item.env not in slot.envs:
            slot.envs[item.env] = self._make_env(item.env)
        rollout_cfg = (
            cfg.rollout
            if cfg.rollout.algo == item.algo
            else cfg.rollout.model_copy(update={"algo": item.algo})
        )
        observed = _ObservedStore(slot.store)
        waited = slot.stream.waited_s
        rollout = Rollout(
            slot.envs[item.env],
            self.policy,
            observed,
            slot.stream,
            self.params,
            rollout_cfg,
            run=cfg.run,
            # The lease keeper renews the lease; a lease lost anyway ends the rollout early.
            should_stop=lambda: self.stop.is_set() or self.leases.lost(item),
        )
        started = time.perf_counter()
        try:
            stats = rollout.run(item)
            if slot.service is not None:
                slot.service.flush()  # the item's last leaves, before the item counts as done
        except AppendStopped as e:
            # Stopped while the stream was full: the item goes back unfinished, counted as any
            # rollout stopped mid-task is (its env steps were spent); its engines stay usable.
            log.info("work item %s: %s", item.item_id, e)
            stats = rollout.stats
            stats.complete, stats.seconds = False, time.perf_counter() - started
            if slot.service is not None:
                try:
                    slot.service.flush()  # before the item can go to another actor
                except Exception as flush_error:  # noqa: BLE001 - tried again when the lane closes
                    log.warning("leaves not sent to the score service yet: %s", flush_error)
        except Exception:
            self._failed(slot, item)
            return False
        self._done(slot, item, stats, observed.new_states(), slot.stream.waited_s - waited)
        return True

    def _failed(self, slot: _Slot, item: LeasedItem) -> None:
        log.exception(
            "work item %s (%s %s) failed on attempt %d",
            item.item_id,
            item.env,
            item.task_id,
            item.attempt + 1,
        )
        self.leases.drop(item)  # not renewed any more: the queue takes it back now
        if item.attempt + 1 >= self.cfg.max_attempts:
            self.queue.finish(item)
            self.metrics.tasks.labels("gave_up").inc()
        else:
            self.queue.release(item)
            self.metrics.tasks.labels("failed").inc()
        slot.envs.pop(item.env).close()  # a fresh engine for the next item

    def _done(
        self, slot: _Slot, item: LeasedItem, stats: RolloutStats, new_states: int, waited: float
    ) -> None:
        cfg, metrics = self.cfg, self.metrics
        record(stats, item)
        metrics.new_states.labels(item.env, task_type(item.env, item.task_id), item.algo).inc(
            new_states
        )
        metrics.stream_wait.inc(waited)
        record_totals(self.client, self.names, stats, item.task_id if cfg.record_visits else None)
        lost = self.leases.lost(item)
        self.leases.drop(item)  # not renewed any more: the queue takes it back now
        if lost:
            self.queue.release(item)  # a no-op unless the lease came back
            metrics.tasks.labels("lease_lost").inc()
        elif stats.complete:
            self.queue.finish(item)
            with self._counts:
                self.finished += 1
                evaluate_now = (
                    cfg.eval_tasks
                    and cfg.eval_every
                    and self.finished % cfg.eval_every == 0
                    and not self.stop.is_set()
                )
                k = self.evaluated
                if evaluate_now:
                    self.evaluated += 1
            metrics.tasks.labels("finished").inc()
            if evaluate_now:
                _evaluate_one(cfg, slot.envs, self.policy, k, make=self._make_env)
        else:
            self.queue.release(item)
            metrics.tasks.labels("released").inc()
        log.info(
            "item %s: %d env steps, %d leaves (%d won), %d groups, %.1fs",
            item.item_id,
            stats.env_steps,
            stats.leaves,
            stats.successes,
            stats.groups,
            stats.seconds,
        )

    def close(self) -> None:
        """Close every lane's engines and score client."""
        for slot in self.slots:
            slot.close()


def run_actor(cfg: ActorConfig, policy: Policy, stop: threading.Event | None = None) -> int:
    """Work until stopped (SIGTERM/SIGINT finish the current expansion first) or idle.
    Returns the number of work items finished."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    actor_metrics()  # the actor's metrics exist before they are served,
    policy_client_metrics()  # the vLLM client's too (zeros under an in-process policy)
    server = serve(cfg.metrics_port, cfg.metrics_host) if cfg.metrics_port else None
    observed_policy = _ObservedPolicy(policy)
    client = connect(cfg.redis_url)
    check_reachable(client, cfg.redis_url)
    store, params, service = open_score_store(cfg, client)
    actor = _Actor(cfg, observed_policy, stop, client, store, params, service)
    try:
        actor.loop()
    finally:
        actor.close()
        stop_serving(server)
    return actor.finished
