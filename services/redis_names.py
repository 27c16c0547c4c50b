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

    def all_keys_pattern(self) -> str:
        return f"{self.prefix}:*"
