import pytest

from spo3.score_store.state_key import canonical_text, state_key


def test_key_is_stable_hex_and_ignores_whitespace_and_case():
    k = state_key("textworld", "game-1", "You are in the Kitchen.\n  A fridge.")
    assert len(k) == 32 and int(k, 16) >= 0
    assert k == state_key("textworld", "game-1", "you are in the kitchen. a fridge.")
    assert canonical_text("  A\n\tB  ") == "a b"


def test_scope_task_separates_tasks_and_global_merges_them():
    a = state_key("alfworld", "task-a", "Nothing happens.")
    b = state_key("alfworld", "task-b", "Nothing happens.")
    assert a != b
    assert state_key("alfworld", "task-a", "Nothing happens.", "global") == state_key(
        "alfworld", "task-b", "Nothing happens.", "global"
    )


def test_parts_cannot_shift_into_each_other():
    assert state_key("ab", "c", "x") != state_key("a", "bc", "x")
    assert state_key("tw", "t", "x") != state_key("tw2", "t", "x")


def test_bad_scope():
    with pytest.raises(ValueError, match="state_key_scope"):
        state_key("tw", "t", "x", scope="room")  # type: ignore[arg-type]
