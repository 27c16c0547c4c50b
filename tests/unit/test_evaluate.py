"""Held-out evaluation's record of what the policy did (fakes); `spo3 eval` runs it on real games in
tests/integration/test_eval_cli.py."""

from __future__ import annotations

import pytest

from spo3.actors.evaluate import action_shares, evaluate
from tests.fakes import LineWorld, ScriptedPolicy

SCRIPT = ["forward", "look", "garbage", "forward", "forward"]


def test_evaluation_records_each_episodes_actions_and_the_verb_shares():
    replies = iter(SCRIPT * 2)
    policy = ScriptedPolicy(lambda m, p, i: f"<action>{next(replies)}</action>")
    r = evaluate(LineWorld(length=3), policy, ["line-1"], max_steps=10, episodes=2)
    first = r.per_task[0]
    # the invalid reply costs a turn and is recorded as None; the third forward wins
    assert (
        first["actions"] == ["forward", "look", None, "forward", "forward"]
        and first["success"] == 1.0
    )
    assert r.invalid_rate == pytest.approx(2 / 10)
    shares = action_shares(r.per_task)
    assert list(shares) == ["forward", "look"] and shares["forward"] == pytest.approx(6 / 8)
    assert action_shares([{"actions": [None]}]) == {} and action_shares([]) == {}
    assert action_shares([{"actions": ["go north", "go south", "take key"]}]) == {
        "go": 2 / 3,
        "take": 1 / 3,
    }


def test_a_runs_evaluation_shows_the_prompt_history_of_its_rollouts():
    """`spo3 train` evaluates held-out tasks with the run's rollout.history_len (not evaluate()'s
    default 3): EvalSettings, which its evaluation before/after and its actor processes' checkpoint
    units play with."""
    from spo3.app.evaluation import EvalSettings
    from spo3.app.train_config import TrainConfig

    cfg = TrainConfig(rollout={"history_len": 1, "max_steps": 6}, eval={"episodes": 1})
    settings = EvalSettings.of_run(cfg)
    assert (settings.history_len, settings.max_steps, settings.temperature) == (1, 6, 0.4)
    shown: list[int] = []

    def reply(messages, params, i):
        shown.append(messages[-1].content.count("[step "))
        return "<action>forward</action>"

    r = settings.run(LineWorld(length=5), ScriptedPolicy(reply), ["line-1"])
    assert r.per_task[0]["success"] == 1.0
    assert shown == [0, 1, 1, 1, 1]  # one past step at most, where the default showed up to 3
