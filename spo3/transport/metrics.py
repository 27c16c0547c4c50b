"""Every Prometheus metric of the project, grouped by the process that exports it.

Conventions: names start with `spo3_<component>_`; counters are declared without `_total`
(prometheus_client appends it); durations are in seconds (`_seconds`); versions are plain
gauges. The dashboards (deploy/grafana/dashboards/*.json) and rules (deploy/prometheus/rules.yml)
use exactly these names, and tests/integration/test_dashboards.py proves that each of their
queries returns data from a real run.

Each group is created on first use, in the process that needs it, so a process exports only its
own metrics (an actor exports no learner counter stuck at 0 that an alert could misread).
Actors and the learner both import this module, never each other.

Deployment ports (Prometheus job names in brackets): score service 8100 on its HTTP port
[score-service], actors 9100 [actor], learner 9200 [learner], vLLM 8000 [vllm].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

import functools
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import PurePath

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily

from spo3.transport.redis_names import RedisNames
from spo3.transport.stream import stream_depth

log = logging.getLogger("spo3.metrics")

SCORE_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
"""S(s) lies in [0, 1]; the 0 bucket holds the truncated states."""


def serve(port: int, host: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY):
    """Serve `registry` at http://host:port/metrics from a daemon thread; returns the server
    (call `shutdown()` then `server_close()` to stop it)."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    log.info("Prometheus metrics on http://%s:%d/metrics", host, port)
    return server


def stop_serving(server) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()


# --- labels ------------------------------------------------------------------------------
_TW_GENERATED = re.compile(r"^(tw-[a-z_]+)-[0-9a-f]{8}-s\d+\.z8$")
ALFWORLD_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)


def task_type(env: str, task_id: str) -> str:
    """The `task_type` label of a task: a small fixed set per environment, never the task id
    itself (one series per task would grow without bound).

    textworld: the generator kind of `spo3 make-games` files (`tw-coin_collector`), else `custom`;
    twx / scienceworld: the game or task name before the first `:`; alfworld: the task type in
    the game folder's name (`pick_and_place_simple`); anything else: `other`."""
    if env == "textworld":
        m = _TW_GENERATED.match(PurePath(task_id).name)
        return m.group(1) if m else "custom"
    if env in ("twx", "scienceworld"):
        name = task_id.split(":", 1)[0].strip().lower()
        return name if re.fullmatch(r"[a-z0-9_-]{1,48}", name) else "other"
    if env == "alfworld":
        for part in reversed(PurePath(task_id).parts):
            for kind in ALFWORLD_TYPES:
                if part.startswith(kind):
                    return kind
    return "other"


# --- state-score service (`spo3 score-service`, /metrics on its HTTP port 8100) -------------
class _StoreStatsCollector:
    """Reads the store's totals at scrape time, so every replica reports the shared truth."""

    def __init__(self, stats: Callable) -> None:
        self._stats = stats

    def collect(self):
        try:
            s = self._stats()
        except Exception:  # a scrape must not fail because Redis is briefly away
            return
        for name, value, doc in (
            ("spo3_store_t", s.t, "t: leaves counted + 1"),
            ("spo3_store_states", s.n_states, "States with statistics (unique states seen)"),
            ("spo3_store_truncated_states", s.truncated_states, "States with S = 0"),
            ("spo3_store_leaves", s.leaves_counted, "Leaves counted"),
            ("spo3_store_duplicate_commits", s.duplicate_commits, "Duplicate leaf commits ignored"),
        ):
            yield GaugeMetricFamily(name, doc, value=value)


class ScoreServiceMetrics:
    """One set per app, in the app's own registry (several apps may live in one test process)."""

    def __init__(self, registry: CollectorRegistry, stats: Callable) -> None:
        self.requests = Counter(
            "spo3_score_requests", "HTTP requests", ["route", "status"], registry=registry
        )
        self.latency = Histogram(
            "spo3_score_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        self.keys_scored = Counter("spo3_score_keys_scored", "State keys scored", registry=registry)
        self.leaves = Counter("spo3_score_leaves", "Leaf commits", ["counted"], registry=registry)
        self.store_errors = Counter(
            "spo3_score_store_errors", "Redis unreachable after retries", registry=registry
        )
        registry.register(_StoreStatsCollector(stats))
        ProcessCollector(
            registry=registry
        )  # process_cpu_seconds_total, process_resident_memory_bytes, ...


# --- actors (`spo3 actor`, port 9100) -----------------------------------------------------
TRAIN = ("env", "task_type", "algo")
INVALID_REASONS = (
    "no_action_tag",
    "empty_action",
    "not_admissible",
)  # spo3.actors.prompts.parse_action
TASK_OUTCOMES = ("finished", "released", "failed", "gave_up")
EVAL = ("env", "task_type")


def _counter(
    registry: CollectorRegistry, name: str, doc: str, labels: Sequence[str] = ()
) -> Counter:
    return Counter(name, doc, labels, registry=registry)


def _gauge(registry: CollectorRegistry, name: str, doc: str) -> Gauge:
    return Gauge(name, doc, registry=registry)


def _histogram(
    registry: CollectorRegistry, name: str, doc: str, buckets: Sequence[float]
) -> Histogram:
    return Histogram(name, doc, buckets=buckets, registry=registry)


class ActorMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self._add_totals(registry)
        self._add_by_task_type(registry)
        self._add_eval_and_policy(registry)
        # Known label values start at 0, so "no errors" reads as 0 rather than as no data.
        for reason in INVALID_REASONS:
            self.invalid.labels(reason)
        for outcome in TASK_OUTCOMES:
            self.tasks.labels(outcome)

    def _add_totals(self, registry: CollectorRegistry) -> None:
        # Kept exactly as bench.perf.actor reads them.
        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return _counter(registry, name, doc, labels)

        self.env_steps = counter(
            "spo3_actor_env_steps", "Environment steps (new transitions)", ["algo"]
        )
        self.replay_steps = counter(
            "spo3_actor_replay_steps", "Environment steps spent restoring nodes by replay"
        )
        self.leaves = counter("spo3_actor_leaves", "Leaves committed", ["algo"])
        self.successes = counter("spo3_actor_successes", "Successful leaves", ["algo"])
        self.groups = counter("spo3_actor_groups", "Groups streamed", ["algo"])
        self.invalid = counter(
            "spo3_actor_invalid_actions", "Replies that gave no admissible action", ["reason"]
        )
        self.actions = counter("spo3_actor_actions", "Replies parsed")
        self.tokens = counter("spo3_actor_generated_tokens", "Tokens generated by the policy")
        self.tasks = counter(
            "spo3_actor_tasks",
            "Work items by outcome (finished, released, failed, gave_up)",
            ["outcome"],
        )
        self.branching = _histogram(
            registry,
            "spo3_actor_branching",
            "n(s): actions sampled at an expanded state",
            (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16),
        )
        self.task_seconds = _histogram(
            registry,
            "spo3_actor_task_seconds",
            "Wall time per work item",
            (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
        )

    def _add_by_task_type(self, registry: CollectorRegistry) -> None:
        # By environment and task type.
        def counter(name: str, doc: str, labels: Sequence[str] = TRAIN) -> Counter:
            return _counter(registry, name, doc, labels)

        self.train_leaves = counter("spo3_actor_train_leaves", "Training leaves committed")
        self.train_successes = counter(
            "spo3_actor_train_successes", "Training leaves that succeeded"
        )
        self.expansions = counter(
            "spo3_actor_expansions", "States expanded (3SPO: one n(s) decision each)"
        )
        self.truncated = counter(
            "spo3_actor_truncated_paths", "Paths cut because their state scored S = 0"
        )
        # Diagnostics of the 3SPO DFS rules (docs/algorithm.md "Rollout"). Replay steps per new step:
        # spo3_actor_replay_steps_total / spo3_actor_env_steps_total.
        self.reexpansions = counter(
            "spo3_actor_reexpansions",
            "3SPO expansions of a state key already expanded in the same rollout (should be 0)",
        )
        self.leaf_kinds = counter(
            "spo3_actor_leaves_by_kind",
            "Leaves committed by kind: success, failure (terminal), truncated, depth",
            (*TRAIN, "kind"),
        )
        self.informative_groups = counter(
            "spo3_actor_informative_groups", "3SPO groups whose rewards are not all equal"
        )
        self.truncated_top_groups = counter(
            "spo3_actor_truncated_top_groups",
            "Informative 3SPO groups whose top reward is a child on a truncated state",
        )
        self.expansion_depth = _histogram(
            registry,
            "spo3_actor_expansion_depth",
            "Depth of the states 3SPO expanded",
            (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50),
        )
        self.restores = counter("spo3_actor_restores", "Nodes restored by reset + replay", ())
        self.new_states = counter(
            "spo3_actor_new_states",
            "States no committed path had reached when this actor first scored them",
        )

    def _add_eval_and_policy(self, registry: CollectorRegistry) -> None:
        self.eval_episodes = _counter(
            registry, "spo3_actor_eval_episodes", "Held-out evaluation episodes", EVAL
        )
        self.eval_successes = _counter(
            registry, "spo3_actor_eval_successes", "Held-out evaluation episodes won", EVAL
        )
        self.state_score = _histogram(
            registry, "spo3_actor_state_score", "S(s) of the states expanded", SCORE_BUCKETS
        )
        self.policy_version = _gauge(
            registry, "spo3_actor_policy_version", "Version of the weights of the last completion"
        )
        self.policy_seconds = _histogram(
            registry,
            "spo3_actor_policy_request_seconds",
            "Wall time of one policy sample call",
            (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.stream_wait = _counter(
            registry,
            "spo3_actor_stream_wait_seconds",
            "Time spent waiting for room in the full groups stream (back-pressure)",
        )
        self.policy_in_flight = _gauge(
            registry,
            "spo3_actor_policy_requests_in_flight",
            "Rollout policy sample calls under way (the actors' autoscaling signal: "
            "k8s/components/actors-hpa)",
        )


@functools.cache
def actor_metrics() -> ActorMetrics:
    return ActorMetrics()


# --- the score-service client in actors (spo3.score_store.client, actor port 9100) ---------------
SCORE_CLIENT_ERRORS = ("transport", "unavailable", "refused")


class ScoreClientMetrics:
    """An actor's side of its requests to the state-score service (the service counts its own
    side in spo3_score_requests_total / spo3_score_request_seconds)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.requests = Counter(
            "spo3_actor_score_requests",
            "Requests sent to the score service, retries included",
            ["route"],
            registry=registry,
        )
        self.latency = Histogram(
            "spo3_actor_score_request_seconds",
            "Wall time of one request to the score service, as the actor sees it",
            ["route"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=registry,
        )
        self.errors = Counter(
            "spo3_actor_score_errors",
            "Failed requests to the score service: transport (no answer), unavailable "
            "(502/503/504; both retried), refused (other 4xx, not retried)",
            ["kind"],
            registry=registry,
        )
        self.gave_up = Counter(
            "spo3_actor_score_gave_up",
            "Requests abandoned after the client's whole retry window",
            registry=registry,
        )
        for kind in SCORE_CLIENT_ERRORS:
            self.errors.labels(kind)


@functools.cache
def score_client_metrics() -> ScoreClientMetrics:
    return ScoreClientMetrics()


# --- the vLLM client in actors: several servers, rotation (spo3.policy.vllm_client) ------------
POLICY_SERVER_STATES = ("in_rotation", "out_of_rotation")
POLICY_SKIP_REASONS = ("behind", "unreachable")


class PolicyClientMetrics:
    """An actor's view of its vLLM servers: which ones it samples from, and why it skipped one."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.servers = Gauge(
            "spo3_actor_policy_servers",
            "vLLM servers by state: in_rotation (healthy, at the newest version seen), "
            "out_of_rotation (unreachable, or behind the newest version: missed a publish)",
            ["state"],
            registry=registry,
        )
        self.skips = Counter(
            "spo3_actor_policy_server_skips",
            "Requests moved off a server: behind (older weights than another server) or "
            "unreachable",
            ["reason"],
            registry=registry,
        )
        self.resamples = Counter(
            "spo3_actor_policy_resamples",
            "Sampling requests made again because the weights changed while they ran (their "
            "tokens came from two weight versions)",
            registry=registry,
        )
        for state in POLICY_SERVER_STATES:
            self.servers.labels(state)
        for reason in POLICY_SKIP_REASONS:
            self.skips.labels(reason)


@functools.cache
def policy_client_metrics() -> PolicyClientMetrics:
    return PolicyClientMetrics()


# --- policy engines that follow published weights (actor processes) --------------------------
class FollowerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.reloads = Counter(
            "spo3_policy_reloads", "Published weight versions loaded", registry=registry
        )
        self.checksum_failures = Counter(
            "spo3_policy_checksum_failures",
            "Published weights whose checksum did not match (not loaded)",
            registry=registry,
        )
        self.reload_seconds = Histogram(
            "spo3_policy_reload_seconds",
            "Wall time to load one published version",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )


@functools.cache
def follower_metrics() -> FollowerMetrics:
    return FollowerMetrics()


# --- learner (`spo3 learner`, port 9200, rank 0 only) -----------------------------------------
class _StreamCollector:
    """Length and pending count of the groups stream, and the work queue's depth, read at scrape
    time."""

    def __init__(self) -> None:
        self.source: tuple[redis.Redis, RedisNames] | None = None  # the running learner's

    def collect(self):
        if self.source is None:
            return
        client, names = self.source
        try:
            length, pending = stream_depth(client, names)
        except Exception:  # a scrape must not fail because Redis is briefly away
            return
        yield GaugeMetricFamily(
            "spo3_learner_stream_length",
            "Entries in the groups stream (waiting + delivered but not yet acknowledged)",
            value=length,
        )
        yield GaugeMetricFamily(
            "spo3_learner_stream_pending",
            "Entries delivered to the learner and not yet acknowledged (checkpoint pending)",
            value=pending,
        )
        try:
            ready, leased = client.llen(names.work_ready), client.zcard(names.work_leased)
        except Exception:
            return
        yield GaugeMetricFamily(
            "spo3_learner_work_queue_ready",
            "Work items waiting for an actor (the actors' autoscaling signal: "
            "k8s/components/actors-hpa)",
            value=int(ready),
        )
        yield GaugeMetricFamily(
            "spo3_learner_work_queue_leased", "Work items leased by actors now", value=int(leased)
        )


GROUP_OUTCOMES = ("used", "stale", "malformed", "unknown_schema", "uninformative")


class LearnerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.updates = _counter(registry, "spo3_learner_updates", "Optimizer steps")
        self.groups = _counter(
            registry,
            "spo3_learner_groups",
            "Groups read, by outcome (used, stale, malformed, unknown_schema, uninformative)",
            ["outcome"],
        )
        self.tokens = _counter(registry, "spo3_learner_tokens", "Response tokens trained on")
        self.version = _gauge(registry, "spo3_learner_policy_version", "Current policy version")
        self._add_last_update(registry)
        self._add_timings(registry)
        self.stream = _StreamCollector()
        registry.register(self.stream)
        for outcome in GROUP_OUTCOMES:
            self.groups.labels(outcome)

    def _add_last_update(self, registry: CollectorRegistry) -> None:
        """Gauges of the last update (`record_update` sets them)."""

        def gauge(name: str, doc: str) -> Gauge:
            return _gauge(registry, name, doc)

        self.loss = gauge(
            "spo3_learner_loss", "Last update: PPO-clip loss + kl_coef * KL (- entropy bonus)"
        )
        self.pg_loss = gauge("spo3_learner_pg_loss", "Last update: PPO-clip surrogate loss")
        self.kl = gauge(
            "spo3_learner_kl", "Last update: k3 KL to the reference policy (token mean)"
        )
        self.clip_fraction = gauge(
            "spo3_learner_clip_fraction", "Last update: fraction of tokens where clipping is active"
        )
        self.grad_norm = gauge(
            "spo3_learner_grad_norm", "Last update: global gradient 2-norm before clipping"
        )
        self.entropy = gauge(
            "spo3_learner_entropy",
            "Last update: entropy of the sampled (choice mode: restricted) distribution, token mean",
        )
        self.imp_weight_mean = gauge(
            "spo3_learner_imp_weight_mean",
            "Last update: importance weight pi_prox / pi_behav (after the cap), token mean",
        )
        self.imp_weight_max = gauge(
            "spo3_learner_imp_weight_max",
            "Last update: largest importance weight pi_prox / pi_behav (after the cap)",
        )
        self.imp_weight_clipped = gauge(
            "spo3_learner_imp_weight_clipped_fraction",
            "Last update: fraction of tokens whose importance weight hit the cap",
        )
        self.behav_kl = gauge(
            "spo3_learner_behav_kl",
            "Last update: k3 KL between the proximal and the behaviour policy (staleness drift)",
        )
        self.advantage_mean = gauge(
            "spo3_learner_advantage_mean", "Last update: mean advantage of the rows"
        )
        self.advantage_std = gauge(
            "spo3_learner_advantage_std", "Last update: standard deviation of the rows' advantages"
        )
        self.rows = gauge("spo3_learner_rows", "Last update: rows (actions) trained on")
        self.row_staleness = gauge(
            "spo3_learner_row_staleness_mean",
            "Last update: mean versions between a row's sampling policy and the learner's",
        )
        self.last_update = gauge(
            "spo3_learner_last_update_timestamp_seconds",
            "Unix time of the last optimizer step (the learner's start before the first)",
        )

    def _add_timings(self, registry: CollectorRegistry) -> None:
        self.update_seconds = _histogram(
            registry,
            "spo3_learner_update_seconds",
            "Wall time of one update",
            (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.staleness = _histogram(
            registry,
            "spo3_learner_group_staleness",
            "Versions between a group's policy and the learner's when read",
            (0, 1, 2, 3, 4, 6, 8, 16),
        )
        self.publish_seconds = _histogram(
            registry,
            "spo3_learner_publish_seconds",
            "Wall time of one weight publish",
            (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
        )
        self.published_version = _gauge(
            registry, "spo3_learner_published_version", "Last weights version published"
        )
        self.policy_servers = Gauge(
            "spo3_learner_policy_servers",
            "Policy servers after the last publish: in_sync (serve the published version), "
            "behind (missed it: error or timeout; actors skip them until a publish reaches them)",
            ["state"],
            registry=registry,
        )
        for state in ("in_sync", "behind"):
            self.policy_servers.labels(state)
        self.publish_failures = _counter(
            registry,
            "spo3_learner_publish_failures",
            "Publishes that failed on one policy server (error or timeout), by server",
            ["server"],
        )
        self.checkpoint_seconds = _histogram(
            registry,
            "spo3_learner_checkpoint_seconds",
            "Wall time of one checkpoint",
            (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )

    def record_update(self, metrics: dict[str, float]) -> None:
        for gauge, key in (
            (self.loss, "loss"),
            (self.pg_loss, "pg_loss"),
            (self.kl, "kl"),
            (self.clip_fraction, "clip_frac"),
            (self.grad_norm, "grad_norm"),
            (self.entropy, "entropy"),
            (self.imp_weight_mean, "imp_weight_mean"),
            (self.imp_weight_max, "imp_weight_max"),
            (self.imp_weight_clipped, "imp_weight_clipped_frac"),
            (self.behav_kl, "behav_kl"),
            (self.advantage_mean, "adv_mean"),
            (self.advantage_std, "adv_std"),
            (self.rows, "rows"),
            (self.row_staleness, "staleness_mean"),
        ):
            if key in metrics:
                gauge.set(metrics[key])


@functools.cache
def learner_metrics() -> LearnerMetrics:
    return LearnerMetrics()
