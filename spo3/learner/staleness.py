"""Staleness control: a group is used only if it is recent enough for the current policy.

    use(group)  <=>  current_version - group.policy_version <= max_staleness

group.policy_version is the oldest policy that produced any of its tokens. Dropped groups are
counted, never silently lost.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StalenessFilter:
    max_staleness: int = 2
    accepted: int = 0
    dropped: int = 0

    def accept(self, group_version: int, current_version: int) -> bool:
        ok = current_version - group_version <= self.max_staleness
        if ok:
            self.accepted += 1
        else:
            self.dropped += 1
        return ok
