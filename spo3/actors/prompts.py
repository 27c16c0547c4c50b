"""Prompts in the paper's shape and parsing of the model's reply into an action.

The reply format is `<think>...</think><action>...</action>`. Anything that does not yield an
admissible action is an invalid action: the rollout penalizes it, it never raises.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from spo3.transport.contracts import ChatMessage

SYSTEM_PROMPT = (
    "You are an expert agent playing a text-based game. Each turn you see the task, your recent "
    "steps, the current observation and the admissible actions. Think briefly inside <think></think>, "
    "then give exactly one admissible action inside <action></action>."
)

MAX_PARSED_CHARS = 8192  # longer replies are cut before parsing: a runaway output stays cheap
_ACTION = re.compile(r"<action>(.*?)</action>", re.IGNORECASE | re.DOTALL)
_SPACES = re.compile(r"\s+")


def build_messages(
    task: str,
    history: Sequence[tuple[str, str]],
    observation: str,
    admissible: Sequence[str],
    *,
    history_len: int = 3,
) -> list[ChatMessage]:
    """`history`: (action, observation that followed) pairs, oldest first; the last
    `history_len` are shown."""
    lines = [f"Task: {task}"]
    recent = list(history)[-history_len:] if history_len > 0 else []
    if recent:
        lines.append("Your last steps:")
        first = len(history) - len(recent) + 1
        for i, (action, obs) in enumerate(recent, start=first):
            lines.append(f"[step {i}] action: {action}\n  observation: {obs}")
    lines.append(f"Current observation: {observation}")
    lines.append("Admissible actions: " + ", ".join(admissible))
    lines.append("Reply with <think>...</think><action>one admissible action</action>.")
    return [
        ChatMessage(role="system", content=SYSTEM_PROMPT),
        ChatMessage(role="user", content="\n".join(lines)),
    ]


def _norm(text: str) -> str:
    return _SPACES.sub(" ", text).strip().lower()


@dataclass(frozen=True)
class ParsedAction:
    action: str | None
    """The admissible action, spelled as the environment lists it; None when invalid."""
    reason: str = ""
    """Why the reply is invalid ("" when valid): no_action_tag, empty_action, not_admissible."""

    @property
    def invalid(self) -> bool:
        return self.action is None


def parse_action(reply: str, admissible: Sequence[str], *, bare_ok: bool = False) -> ParsedAction:
    """The last <action>...</action> of the reply, matched to the admissible actions ignoring
    case and spacing. `bare_ok` also accepts a reply that is just an action (constrained mode)."""
    text = (reply or "")[:MAX_PARSED_CHARS]
    lookup = {_norm(a): a for a in admissible}
    found = _ACTION.findall(text)
    if found:
        candidate = _norm(found[-1])
    elif bare_ok:
        candidate = _norm(text)
    else:
        return ParsedAction(None, "no_action_tag")
    if not candidate:
        return ParsedAction(None, "empty_action")
    if candidate in lookup:
        return ParsedAction(lookup[candidate])
    return ParsedAction(None, "not_admissible")
