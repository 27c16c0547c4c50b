"""The learner scores what the actor sampled: the real in-process engine samples (choice mode and
free-form), the real DeepSpeed trainer recomputes. For the same weights the learner's log-prob of
every sampled token equals the sampler's (tolerance 1e-4, float32 on CPU), so the importance
weight of on-policy rows is 1; with ppo_epochs = 2 the PPO clip acts."""

from __future__ import annotations

import pytest
import torch

from spo3.app.model_init import init_model
from spo3.learner.batch import Row
from spo3.learner.restricted import restricted_logprobs
from spo3.learner.trainer import Trainer, TrainerConfig
from spo3.policy.inprocess import InProcessPolicy
from spo3.transport.contracts import SamplingParams
from tests import policy_contract as contract

pytestmark = pytest.mark.slow
TOL = 1e-4
CHOICES = [
    "go north",
    "go south",
    "take apple",
    "take apple from table",
    "take red apple",
    "take red pen",
    "look",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("model"), "tiny", seed=0)


@pytest.fixture(scope="module")
def policy(model_dir):
    return InProcessPolicy(model_dir)


@pytest.fixture(scope="module")
def trainer(model_dir):
    return Trainer(TrainerConfig(model=str(model_dir), lr=0.05, zero_stage=0, micro_batch_rows=8))


def rows_from(outs, advantages, with_token_ids: bool = True, choices=CHOICES) -> list[Row]:
    return [
        Row(
            c.prompt_token_ids,
            c.token_ids,
            a,
            c.logprobs,
            c.policy_version,
            f"g{i}",
            choices=choices,
            choice_token_ids=c.choice_token_ids if with_token_ids else None,
        )
        for i, (c, a) in enumerate(zip(outs, advantages))
    ]


def learner_logprobs(trainer: Trainer, rows: list[Row]) -> list[list[float]]:
    """The trainer's own log-probs of each row's response tokens (its padding and trie index)."""
    prep = trainer._prepare(rows)
    assert prep is not None
    with torch.no_grad():
        logits = trainer.engine(input_ids=prep.ids, attention_mask=prep.attn).logits[:, :-1]
        lp = restricted_logprobs(logits, prep.targets, prep.allowed_ids, prep.allowed_valid)
    return [lp[b][prep.mask[b] != 0].tolist() for b in range(len(rows))]


def test_learner_restricted_logprobs_equal_the_samplers(policy, trainer):
    outs = policy.sample(
        contract.MESSAGES, SamplingParams(n=32, choices=CHOICES, temperature=1.0, seed=3)
    )
    assert len({c.text for c in outs}) >= 3
    rows = rows_from(outs, [1.0] * len(outs))
    got = learner_logprobs(trainer, rows)
    for c, lp in zip(outs, got):
        assert len(lp) == len(c.logprobs)
        assert max(abs(a - b) for a, b in zip(lp, c.logprobs)) < TOL, (c.text, lp, c.logprobs)
    # Without the token ids the learner assumes a guided decoder (any tokenization of a choice's
    # text): a larger set of admissible tokens, so other log-probs; the trie must travel.
    guided = learner_logprobs(trainer, rows_from(outs, [1.0] * len(outs), with_token_ids=False))
    assert max(abs(a - b) for c, lp in zip(outs, guided) for a, b in zip(lp, c.logprobs)) > 1e-3
    # The full-vocabulary log-probs are another distribution (what the learner used to optimize).
    free = learner_logprobs(
        trainer, [Row(r.prompt_ids, r.response_ids, 1.0, [], 0, "x") for r in rows]
    )
    assert max(abs(a - b) for c, lp in zip(outs, free) for a, b in zip(lp, c.logprobs)) > 0.1


def test_on_policy_rows_have_importance_weight_one_then_the_clip_acts(policy, trainer, model_dir):
    outs = policy.sample(
        contract.MESSAGES, SamplingParams(n=16, choices=CHOICES, temperature=1.0, seed=4)
    )
    free = policy.sample(
        contract.MESSAGES, SamplingParams(n=8, max_tokens=6, temperature=1.0, seed=5)
    )
    rows = rows_from(outs, [2.0 if i % 2 else -2.0 for i in range(16)])
    rows += [
        Row(c.prompt_token_ids, c.token_ids, 1.5 if i % 2 else -1.5, c.logprobs, 0, f"f{i}")
        for i, c in enumerate(free)
    ]
    trainer.cfg.ppo_epochs = 1
    one = trainer.update(rows)  # same weights as the sampler: importance weights and ratios are 1
    assert one.imp_weight_mean == pytest.approx(1.0, abs=TOL)
    assert one.imp_weight_max == pytest.approx(1.0, abs=TOL)
    assert one.imp_weight_clipped_frac == 0.0 and one.clip_frac == 0.0
    assert one.ratio_mean == pytest.approx(1.0, abs=1e-6)
    # Token mean over restricted choice tokens (at most ln 7) and free-form ones (at most ln 1024).
    assert 0 < one.entropy < 6.94

    # The same rows again, now one version stale: the weight is pi_prox / pi_behav != 1, and a
    # second pass at lr 0.05 moves the ratio past 1 +- clip on some tokens.
    trainer.cfg.ppo_epochs = 2
    two = trainer.update(rows)
    assert abs(two.imp_weight_mean - 1.0) > 1e-3 and two.behav_kl > 1e-4
    assert two.clip_frac > 0.0
    assert two.ppo_epochs == 2.0


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_rows_sampled_at_a_temperature_are_scored_at_it(policy, model_dir, temperature):
    """Sampled at T != 1 (choice mode and free-form), rows that carry their temperature are scored
    from logits / T: on the sampler's own weights every importance weight is 1 and the behaviour
    KL 0. Scored at T = 1 instead, the weights describe another policy."""
    choice = policy.sample(
        contract.MESSAGES,
        SamplingParams(n=8, choices=CHOICES, temperature=temperature, seed=6),
    )
    free = policy.sample(
        contract.MESSAGES, SamplingParams(n=8, max_tokens=6, temperature=temperature, seed=7)
    )
    outs = choice + free

    def rows(t: float) -> list[Row]:
        return [
            Row(
                c.prompt_token_ids,
                c.token_ids,
                1.0 if i % 2 else -1.0,
                c.logprobs,
                0,
                f"t{i}",
                choices=CHOICES if i < len(choice) else None,
                choice_token_ids=c.choice_token_ids if i < len(choice) else None,
                temperature=t,
            )
            for i, c in enumerate(outs)
        ]

    cfg = TrainerConfig(model=str(model_dir), lr=1e-6, zero_stage=0, micro_batch_rows=16)
    cfg.ppo_epochs = 1
    at_t = Trainer(cfg).update(rows(temperature))
    assert at_t.imp_weight_mean == pytest.approx(1.0, abs=TOL)
    assert at_t.imp_weight_max == pytest.approx(1.0, abs=TOL)
    assert abs(at_t.behav_kl) < TOL
    at_1 = Trainer(cfg).update(rows(1.0))
    assert abs(at_1.imp_weight_mean - 1.0) > 1e-3 and abs(at_1.imp_weight_max - 1.0) > 1e-2
