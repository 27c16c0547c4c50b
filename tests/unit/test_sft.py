"""The warm start's pure parts: batches with prompt/target masking, the loss on target tokens only
(choice mode under the choices' trie), the seeded example order, the choice of expert steps, and
the suites file."""

from __future__ import annotations

import math

import pytest
import torch

from spo3.app.sft import Demo, DemoStep, SftRunConfig, select_steps, suite_config, with_seed
from spo3.learner.restricted import restricted_logprobs
from spo3.learner.sft import SftConfig, SftExample, _order, build_batch, planned_steps, sft_loss
from spo3.transport.contracts import ChatMessage

PAD = 0


def test_batch_masks_exactly_the_target_tokens():
    a = SftExample(prompt_ids=[5, 6, 7], target_ids=[8, 9])
    b = SftExample(prompt_ids=[11], target_ids=[12, 13, 14])
    batch = build_batch([a, b], PAD)
    assert batch.ids.tolist() == [[5, 6, 7, 8, 9], [11, 12, 13, 14, PAD]]
    assert batch.attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # logits position t predicts ids[t+1]: the masked positions' next tokens are exactly the targets
    for row, ex in enumerate([a, b]):
        picked = [
            int(batch.targets[row, t])
            for t in range(batch.targets.shape[1])
            if batch.loss_mask[row, t] == 1
        ]
        assert picked == ex.target_ids
    assert batch.loss_mask.sum() == 5
    assert batch.allowed_ids is None  # free-form rows: the full vocabulary


def test_long_prompts_lose_their_oldest_tokens_never_the_target():
    ex = SftExample(prompt_ids=list(range(1, 21)), target_ids=[30, 31, 32])
    batch = build_batch([ex], PAD, max_len=8)
    assert batch.ids.tolist() == [[16, 17, 18, 19, 20, 30, 31, 32]]
    assert batch.loss_mask.tolist() == [[0, 0, 0, 0, 1, 1, 1]]
    with pytest.raises(ValueError, match="does not fit"):
        build_batch([SftExample([1], [2] * 8)], PAD, max_len=8)
    with pytest.raises(ValueError, match="empty target"):
        build_batch([SftExample([1], [])], PAD)


def test_loss_is_the_mean_nll_of_target_tokens_and_ignores_the_prompt():
    torch.manual_seed(0)
    ex = [SftExample([1, 2, 3], [4, 5]), SftExample([6], [7, 8, 9])]
    batch = build_batch(ex, PAD)
    logits = torch.randn(2, batch.ids.shape[1] - 1, 10, requires_grad=True)
    logp = restricted_logprobs(logits, batch.targets)
    loss = sft_loss(logp, batch.loss_mask)
    full = torch.log_softmax(logits.detach(), -1)
    expected = -(full[0, 2, 4] + full[0, 3, 5] + full[1, 0, 7] + full[1, 1, 8] + full[1, 2, 9]) / 5
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-6)
    loss.backward()
    # no gradient reaches a position whose next token is a prompt token or padding
    grad_rows = logits.grad.abs().sum(-1)
    assert grad_rows[0, :2].sum() == 0 and grad_rows[1, 3].sum() == 0
    assert (grad_rows[batch.loss_mask == 1] > 0).all()


def test_choice_mode_scores_the_target_under_the_choices_trie():
    """Choices [4, 5, EOS=9], [4, 6, 9], [7, 9]: at the first target position the allowed tokens
    are {4, 7}, at the second {5, 6}, at the last only EOS (log-prob 0)."""
    choices = [[4, 5, 9], [4, 6, 9], [7, 9]]
    ex = SftExample([1, 2], [4, 6, 9], choices)
    batch = build_batch([ex], PAD)
    torch.manual_seed(1)
    logits = torch.randn(1, batch.ids.shape[1] - 1, 10)
    logp = restricted_logprobs(logits, batch.targets, batch.allowed_ids, batch.allowed_valid)
    l0 = logits[0, 1]
    l1 = logits[0, 2]
    expected = [
        float(l0[4] - torch.logsumexp(l0[[4, 7]], 0)),
        float(l1[6] - torch.logsumexp(l1[[5, 6]], 0)),
        0.0,
    ]
    got = [float(logp[0, t]) for t in range(logp.shape[1]) if batch.loss_mask[0, t] == 1]
    assert got == pytest.approx(expected, abs=1e-6)
    assert float(sft_loss(logp, batch.loss_mask)) == pytest.approx(-sum(expected) / 3, abs=1e-6)
    with pytest.raises(ValueError, match="not one of its choices"):
        build_batch([SftExample([1], [5, 9], choices)], PAD)


def test_order_is_seeded_and_covers_every_example():
    cfg = SftConfig(epochs=3, batch_rows=4, seed=7)
    batches = _order(10, cfg)
    assert len(batches) == planned_steps(10, cfg) == 9
    flat = [i for b in batches for i in b]
    assert sorted(flat) == sorted(list(range(10)) * 3)  # each example once per pass
    assert _order(10, cfg) == batches
    assert _order(10, SftConfig(epochs=3, batch_rows=4, seed=8)) != batches
    by_steps = _order(10, SftConfig(steps=7, batch_rows=4, seed=7))
    assert len(by_steps) == 7 and all(len(b) == 4 for b in by_steps)
    assert all(len(b) == 8 for b in _order(3, SftConfig(steps=2, batch_rows=8)))


def _demo(task: str, n: int) -> Demo:
    msgs = [ChatMessage(role="user", content=task)]
    return Demo(task, [DemoStep(task, i, msgs, f"a{i}", ("a0", "a1")) for i in range(n)], n, 1.0)


def test_select_steps_takes_the_first_tasks_then_a_seeded_share():
    demos = [_demo("t0", 4), _demo("t1", 6), _demo("t2", 10)]
    assert len(select_steps(demos, tasks=None, fraction=1.0, seed=0)) == 20
    two = select_steps(demos, tasks=2, fraction=1.0, seed=0)
    assert {s.task_id for s in two} == {"t0", "t1"} and len(two) == 10
    half = select_steps(demos, tasks=None, fraction=0.5, seed=3)
    assert len(half) == 10
    assert half == select_steps(demos, tasks=None, fraction=0.5, seed=3)
    assert half != select_steps(demos, tasks=None, fraction=0.5, seed=4)
    order = [(s.task_id, s.index) for s in half]
    assert order == sorted(order)  # original order kept
    assert len(select_steps(demos, tasks=1, fraction=0.01, seed=0)) == 1
    assert select_steps([], tasks=None, fraction=1.0, seed=0) == []


def test_suite_config_takes_games_from_the_bench_file(tmp_path):
    bench = tmp_path / "bench.yaml"
    bench.write_text(
        "base: {model_preset: tiny, rollout: {max_steps: 20, choice_mode: true}, eval: {temperature: 0.4}}\n"
        "suites:\n  s1: {games: {env: twx, kind: coin, train: 32, eval: 16, settings: {numLocations: 9}},"
        " rollout: {max_steps: 25}}\n"
    )
    sft = tmp_path / "sft.yaml"
    sft.write_text(
        f"bench: {bench}\ndefaults: {{lr: 0.002}}\nsuites:\n  s1: {{tasks: 4, fraction: 0.5, note: why}}\n"
    )
    cfg = suite_config(sft, "s1", out="x")
    assert cfg.games.kind == "coin" and cfg.games.settings == {"numLocations": 9}
    assert (cfg.max_steps, cfg.choice_mode, cfg.eval_temperature) == (25, True, 0.4)
    assert (cfg.lr, cfg.tasks, cfg.fraction, cfg.out, cfg.note) == (0.002, 4, 0.5, "x", "why")
    seeded = with_seed(cfg, 3)
    assert seeded.seed == 3 and seeded.games.seed == 3 and cfg.games.seed == 0
    with pytest.raises(ValueError, match="unknown suite 'nope'"):
        suite_config(sft, "nope")
    with pytest.raises(ValueError, match="--suite"):
        suite_config(sft, "")
    sft.write_text(f"bench: {bench}\nsuites:\n  s1: {{fractoin: 0.5}}\n")
    with pytest.raises(ValueError, match="fractoin"):
        suite_config(sft, "s1")
    with pytest.raises(ValueError, match="fraction"):
        SftRunConfig(fraction=0.0)


def test_the_repository_suites_file_names_every_bench_v2_suite():
    import yaml

    bench = yaml.safe_load(open("configs/bench-v2.yaml"))
    for suite in bench["suites"]:  # a warm suite's entry is the one its warm_start names
        cfg = suite_config("configs/sft.yaml", bench.get("warm_start", {}).get(suite, suite))
        assert cfg.games.env == bench["suites"][suite]["games"]["env"]
        assert cfg.note, f"configs/sft.yaml: suite {suite} says nothing about why its settings"
        assert math.isfinite(cfg.lr)
