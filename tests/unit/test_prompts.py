"""Prompt building and action parsing: garbage in never raises, it is an invalid action."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spo3.actors.prompts import MAX_PARSED_CHARS, build_messages, parse_action

ADMISSIBLE = ["go north", "take apple from table", "open fridge"]


def test_prompt_has_task_history_observation_and_actions():
    msgs = build_messages(
        "Put the apple in the fridge.",
        [("go north", "Kitchen."), ("look", "A fridge."), ("open fridge", "Opened."), ("x", "y")],
        "You see a fridge.",
        ADMISSIBLE,
        history_len=2,
    )
    user = msgs[-1].content
    assert msgs[0].role == "system" and "<action>" in msgs[0].content
    assert "Task: Put the apple in the fridge." in user
    assert "[step 3] action: open fridge" in user and "[step 4] action: x" in user
    assert "go north" not in user.split("Current observation")[0]  # only the last 2 steps
    assert "Admissible actions: go north, take apple from table, open fridge" in user


@pytest.mark.parametrize(
    "reply,action,reason",
    [
        ("<think>north it is</think><action>go north</action>", "go north", ""),
        ("<action>  Go   NORTH </action>", "go north", ""),
        ("<action>look</action> then <action>open fridge</action>", "open fridge", ""),
        ("<ACTION>\nopen fridge\n</ACTION>", "open fridge", ""),
        ("go north", None, "no_action_tag"),
        ("<action></action>", None, "empty_action"),
        ("<action>fly away</action>", None, "not_admissible"),
        ("", None, "no_action_tag"),
        ("<action>go north", None, "no_action_tag"),
        ("\x00\xff\ufffd<action>\x00</action>", None, "not_admissible"),
    ],
)
def test_parse(reply, action, reason):
    p = parse_action(reply, ADMISSIBLE)
    assert (p.action, p.reason) == (action, reason)
    assert p.invalid is (action is None)


def test_bare_replies_count_in_constrained_mode_only():
    assert parse_action("open fridge", ADMISSIBLE, bare_ok=True).action == "open fridge"
    assert parse_action("open fridge", ADMISSIBLE).invalid


def test_huge_reply_is_cut_not_scanned_whole():
    reply = "x" * (MAX_PARSED_CHARS * 100) + "<action>go north</action>"
    assert parse_action(reply, ADMISSIBLE).reason == "no_action_tag"


@settings(max_examples=300, deadline=None)
@given(st.text() | st.binary().map(lambda b: b.decode("latin-1")))
def test_any_text_parses_without_raising(reply):
    p = parse_action(reply, ADMISSIBLE)
    assert p.action is None or p.action in ADMISSIBLE
