"""Every Redis key and stream name of the project, in one place.

All names of one run share the prefix `spo3:{<run>}`: the braces are a Redis Cluster hash
tag, so every key of a run lives in one slot and multi-key Lua scripts stay legal there.
"""

from __future__ import annotations

import re

_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class RedisNames:
    """Key names for one run."""

    def __init__(self, run: str = "default", namespace: str = "spo3") -> None:
        if not _RUN_ID.match(run):
            raise ValueError(
                f"run id {run!r} must be 1-64 characters of letters, digits, '_', '.' or '-'"
            )
        self.run = run
        self.prefix = f"{namespace}:{{{run}}}"

    # --- score store -------------------------------------------------------------------
    def state(self, key: str) -> str:
        """Hash of one state: n (paths through it), s (successful ones), r (1 if a task root)."""
        return f"{self.prefix}:st:{key}"

    def rollout_seen(self, rollout_id: str) -> str:
        """Hash of the states one rollout has counted (state hash -> 1 if its success was
        counted); used under `count: rollout`, kept as long as the leaf markers."""
        return f"{self.prefix}:rseen:{rollout_id}"

    @property
    def leaves(self) -> str:
        """Counter of counted leaves; t = leaves + 1."""
        return f"{self.prefix}:leaves"

    @property
    def n_states(self) -> str:
        return f"{self.prefix}:nstates"

    @property
    def truncated(self) -> str:
        """Set of state hashes currently truncated (S = 0)."""
        return f"{self.prefix}:trunc"

    @property
    def duplicate_commits(self) -> str:
        return f"{self.prefix}:dupcommits"

    def leaf(self, leaf_id: str) -> str:
        """Marker that makes commit_leaf idempotent per leaf id."""
        return f"{self.prefix}:leaf:{leaf_id}"

    # --- actor -> learner stream ----------------------------------------------------------
    @property
    def groups_stream(self) -> str:
        """Redis Stream of finished groups (one JSON `Group` per entry)."""
        return f"{self.prefix}:groups"

    def group_marker(self, group_id: str) -> str:
        """Makes appending a group idempotent per group id."""
        return f"{self.prefix}:gid:{group_id}"

    @property
    def learner_group(self) -> str:
        """Consumer-group name of the learner on the groups stream."""
        return "learner"

    @property
    def dead_letters(self) -> str:
        """Stream of entries the learner could not parse, kept for inspection."""
        return f"{self.prefix}:groups:dead"

    @property
    def policy_version(self) -> str:
        """The newest policy version the learner published (a learner without a publisher: the newest
        it made). In-process engines follow it; the run report reads it."""
        return f"{self.prefix}:policy_version"

    @property
    def actor_totals(self) -> str:
        """Hash of counters summed over every actor of the run (env_steps, leaves, ...)."""
        return f"{self.prefix}:actors:totals"

    @property
    def actor_branching(self) -> str:
        """Hash n(s) -> how many expansions sampled n actions, over every actor."""
        return f"{self.prefix}:actors:branching"

    @property
    def actor_visits(self) -> str:
        """List of JSON records, one per rollout in the order its totals were added: {"task", "steps"
        (its new env steps), "visits": [[env step within the rollout, state key], ...]} (actors with
        record_visits; `spo3 train` turns them into the visited-state curve)."""
        return f"{self.prefix}:actors:visits"

    @property
    def actor_depths(self) -> str:
        """Hash depth -> how many 3SPO expansions were at that depth, over every actor."""
        return f"{self.prefix}:actors:depths"

    # --- work queue ---------------------------------------------------------------------
    @property
    def work_ready(self) -> str:
        """List of work item ids waiting for an actor."""
        return f"{self.prefix}:work:ready"

    @property
    def work_leased(self) -> str:
        """Sorted set: item id -> lease deadline (unix seconds)."""
        return f"{self.prefix}:work:leased"

    @property
    def work_items(self) -> str:
        """Hash: item id -> WorkItem JSON."""
        return f"{self.prefix}:work:items"

    @property
    def work_done(self) -> str:
        """Set of finished item ids."""
        return f"{self.prefix}:work:done"

    @property
    def work_owners(self) -> str:
        """Hash: item id -> the token of the take that holds its lease."""
        return f"{self.prefix}:work:owner"

    def all_keys_pattern(self) -> str:
        return f"{self.prefix}:*"
