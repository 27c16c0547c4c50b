"""`spo3 sft` against the real engines: expert demos from a real TextWorld-Express and a real
TextWorld game, formatted exactly as the policy sees them during a rollout, a few SFT steps on the
tiny model, saved and loaded by the in-process engine; the expert action's log-prob rises."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from spo3.actors.evaluate import evaluate
from spo3.app.model_init import init_model
from spo3.app.sft import collect_demo, load_demos, save_demos, to_examples
from spo3.learner.sft import SftConfig, target_logprobs, train_sft
from spo3.policy.inprocess import InProcessPolicy
from spo3.policy.weights import weights_checksum
from spo3.transport.contracts import ChatMessage, Completion, SamplingParams

TWX_TASK = "coin:seed=3:numLocations=4,numDistractorItems=1,includeDoors=1,limitInventorySize=0"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a loaded machine two threads spin against each other (7x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("sft-base"), "tiny", seed=0)


@pytest.fixture(scope="module")
def twx_env():
    from spo3.actors.envs.twx_env import TwxEnv

    env = TwxEnv()
    yield env
    env.close()


@pytest.fixture(scope="module")
def tw_env():
    from spo3.actors.envs.textworld_env import TextWorldEnv

    env = TextWorldEnv()
    yield env
    env.close()


@pytest.fixture(scope="module")
def tw_game(tmp_path_factory):
    from spo3.actors.envs.textworld_env import generate_games

    return generate_games(
        tmp_path_factory.mktemp("sft-tw"), "tw-coin_collector", 1, seed=2, level=5
    )[0]


@pytest.fixture(scope="module")
def demos(twx_env, tw_env, tw_game):
    return {"twx": collect_demo(twx_env, TWX_TASK), "textworld": collect_demo(tw_env, tw_game)}


class ScriptedPolicy:
    """Replays a list of actions and records what it was asked (the policy's view of each step)."""

    def __init__(self, actions: list[str]) -> None:
        self.actions, self.seen = list(actions), []

    def sample(self, messages, params: SamplingParams) -> list[Completion]:
        self.seen.append((list(messages), list(params.choices or [])))
        return [
            Completion(
                text=self.actions.pop(0),
                token_ids=[],
                logprobs=[],
                finish_reason="stop",
                policy_version=0,
            )
        ]


@pytest.mark.parametrize("which", ["twx", "textworld"])
def test_expert_demos_win_and_look_like_the_policys_prompts(demos, twx_env, tw_env, tw_game, which):
    env, task = (twx_env, TWX_TASK) if which == "twx" else (tw_env, tw_game)
    demo = demos[which]
    assert (
        demo.success == 1.0
        and demo.stopped == ""
        and demo.skipped == 0
        and len(demo.steps) == demo.expert_len >= 2
    )
    # The held-out evaluation (the rollout's prompt code) playing the same actions sees the same prompts.
    policy = ScriptedPolicy([s.action for s in demo.steps])
    result = evaluate(env, policy, [task], max_steps=len(demo.steps), choice_mode=True)
    assert result.success_rate == 1.0
    assert [m for m, _ in policy.seen] == [s.messages for s in demo.steps]
    assert [c for _, c in policy.seen] == [list(s.admissible) for s in demo.steps]
    assert all(s.action in s.admissible for s in demo.steps)


def test_an_expert_action_the_engine_does_not_list_is_skipped(twx_env):
    """TWX cooking seed 6: the gold path opens the kitchen cupboard, which validActions does not
    list (the policy could not pick it); the demo goes on without it and the expert still wins."""
    task = (
        "cookingworld:seed=6:fold=train:numLocations=4,numIngredients=2,numDistractorItems=2,includeDoors=1,"
        "limitInventorySize=0"
    )
    demo = collect_demo(twx_env, task)
    assert demo.skipped >= 1 and demo.success == 1.0
    assert len(demo.steps) == demo.expert_len - demo.skipped
    assert all(s.action in s.admissible for s in demo.steps)


def test_demos_are_reproducible_and_round_trip(demos, twx_env, tmp_path):
    """TWX's gold path changes from call to call; the shortest of several draws does not (here)."""
    again = collect_demo(twx_env, TWX_TASK)
    assert [s.action for s in again.steps] == [s.action for s in demos["twx"].steps]
    save_demos(tmp_path / "demos.json", list(demos.values()))
    back = load_demos(tmp_path / "demos.json", [d.task_id for d in demos.values()][::-1])
    assert back == list(demos.values())[::-1]
    with pytest.raises(ValueError, match="no demo"):
        load_demos(tmp_path / "demos.json", ["coin:seed=99"])


def test_examples_are_the_engines_tokens(demos, model_dir):
    """Prompt tokens = what the in-process engine samples from; in choice mode the target is
    exactly the completion the engine returns for that action, and the SFT scoring of the target
    equals the engine's own log-prob of it."""
    policy = InProcessPolicy(model_dir)
    steps = demos["twx"].steps[:3]
    examples = to_examples(steps, policy.tokenizer, choice_mode=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for step, ex in zip(steps, examples):
        assert ex.prompt_ids == policy.prompt_ids(step.messages)
        outs = policy.sample(
            step.messages,
            SamplingParams(n=32, temperature=1.0, choices=list(step.admissible), seed=0),
        )
        assert ex.choice_token_ids == outs[0].choice_token_ids
        for c in outs[
            :4
        ]:  # any sampled choice as a target: the learner's score = the engine's log-prob
            as_target = type(ex)(ex.prompt_ids, c.token_ids, ex.choice_token_ids)
            (lp,) = target_logprobs(model, [as_target], policy.tokenizer.pad_token_id)
            assert lp == pytest.approx(sum(c.logprobs), abs=1e-4)
    free = to_examples(steps[:1], policy.tokenizer, choice_mode=False)[0]
    assert (
        policy.tokenizer.decode(free.target_ids, skip_special_tokens=True)
        == f"<action>{steps[0].action}</action>"
    )
    assert free.target_ids[-1] == policy.tokenizer.eos_token_id and free.choice_token_ids is None


def test_sft_raises_the_expert_actions_logprob_and_saves_a_loadable_model(
    demos, model_dir, tmp_path
):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    steps = [s for d in demos.values() for s in d.steps[:3]]  # short prompts: a CI-sized run
    examples = to_examples(steps, tokenizer, choice_mode=True)
    pad = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = target_logprobs(model, examples, pad)
    result = train_sft(model, examples, SftConfig(lr=3e-3, steps=15, batch_rows=6, seed=0), pad)
    after = target_logprobs(model, examples, pad)
    assert result.steps == 15 and len(result.losses) == 15
    assert sum(after) / len(after) > sum(before) / len(before) + 0.5, (sum(before), sum(after))
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    out = tmp_path / "sft"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # The engine loads it and now prefers the expert's action where the base model did not always.
    policy, base = InProcessPolicy(out), InProcessPolicy(model_dir)
    assert policy.checksum() == weights_checksum(model.state_dict()) != base.checksum()
    step = steps[0]
    params = SamplingParams(n=64, temperature=1.0, choices=list(step.admissible), seed=1)
    share = lambda p: sum(c.text == step.action for c in p.sample(step.messages, params)) / 64  # noqa: E731
    assert share(policy) > share(base)


def test_sft_is_deterministic(demos, model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = to_examples(demos["twx"].steps[:4], tokenizer, choice_mode=True)

    def once() -> str:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        train_sft(
            model,
            examples,
            SftConfig(lr=1e-3, steps=3, batch_rows=4, seed=5),
            tokenizer.pad_token_id,
        )
        return weights_checksum(model.state_dict())

    assert once() == once()


@pytest.mark.parametrize("layout", ["untied", "tied"])
def test_spo3_sft_command_end_to_end(tmp_path, model_dir, layout):
    """`spo3 sft` from an untied and a tied base (Qwen2.5-0.5B/1.5B/3B tie lm_head to the
    embedding): the model it saves keeps the base's layout, loads, and a vLLM publisher against it
    accepts the trained weights."""
    from spo3.app.cli import app
    from spo3.policy.publish import VLLMDiskPublisher
    from spo3.policy.weights import tied_map

    if layout == "tied":
        model_dir = init_model(tmp_path / "tied-base", "tiny", seed=0, tied=True)
    out = tmp_path / "run"
    r = CliRunner().invoke(
        app,
        [
            "sft",
            "--env",
            "twx",
            "--kind",
            "coin",
            "--train",
            "2",
            "--heldout",
            "2",
            "--setting",
            "numLocations=4",
            "--model",
            str(model_dir),
            "--steps",
            "3",
            "--eval-episodes",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "sft.json").read_text())
    assert (
        summary["demos_won"] == 2
        and summary["steps"] == 3
        and summary["examples"] == summary["expert_steps"] > 0
    )
    assert (
        len(
            load_demos(
                out / "demos.json", [f"coin:seed={i}:fold=train:numLocations=4" for i in range(2)]
            )
        )
        == 2
    )
    assert set(summary["heldout"]) == {"base", "sft"} and summary["heldout"]["sft"]["episodes"] == 2
    assert InProcessPolicy(out / "model").sample(
        [ChatMessage(role="user", content="hi")], SamplingParams(choices=["look", "go north"])
    )[0].text in ("look", "go north")
    assert bool(tied_map(out / "model")) == (layout == "tied")
    trained = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    VLLMDiskPublisher([], out / "model", tmp_path / "staging").check(trained)
    bad = tmp_path / "bad.yaml"
    bad.write_text("games: {env: twx}\nfractoin: 0.5\n")
    r = CliRunner().invoke(app, ["sft", "--config", str(bad), "--out", str(tmp_path / "no")])
    assert r.exit_code != 0 and "fractoin" in r.output and not (tmp_path / "no").exists()
