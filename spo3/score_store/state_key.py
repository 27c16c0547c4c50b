"""State keys: a stable identity for an environment state, independent of the prompt around it."""

from __future__ import annotations

import hashlib
import re
from typing import Literal

KeyScope = Literal["task", "global"]

_WHITESPACE = re.compile(r"\s+")


def canonical_text(text: str) -> str:
    """Default canonical form of an observation: whitespace and case differences are not state."""
    return _WHITESPACE.sub(" ", text).strip().lower()


def state_key(env: str, task_id: str, text: str, scope: KeyScope = "task") -> str:
    """blake2b-128 hex of (env, task id, canonical text).

    With scope "task" the task id is part of the key, so a generic text such as
    "Nothing happens." seen in two tasks gives two states; "global" merges them.
    Adapters that know the real state (room + inventory) pass that as `text`.
    """
    if scope not in ("task", "global"):
        raise ValueError(f"state_key_scope must be 'task' or 'global', got {scope!r}")
    task_part = task_id if scope == "task" else ""
    h = hashlib.blake2b(digest_size=16)
    # Length-prefix each part so ("ab", "c") and ("a", "bc") cannot collide.
    for part in (env, task_part, canonical_text(text)):
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()
