"""bench/compare/stats.py: the benchmark's metrics on hand-made data with known answers."""

from __future__ import annotations

import json

import pytest

from bench.compare.stats import (
    RunResult,
    area_under_curve,
    held_out_curve,
    pair_by_seed,
    paired_bootstrap,
    run_figures,
    steps_to_threshold,
    suite_comparisons,
    threshold_met_at_start,
    value_at,
    visited_state_curve,
)
from spo3.app.evaluation import checkpoint_steps

# A hand-made run record: every state stepped into, with the run's new-env-step count at that moment.
# Task t1: the root r (entered at reset, step 0), a, b; a replay back to a (no new step), then c.
# Task t2 has a state also keyed "a": a different (task, key) pair.
RECORD = [
    {"env_steps": 0, "task": "t1", "key": "r"},
    {"env_steps": 1, "task": "t1", "key": "a"},
    {"env_steps": 2, "task": "t1", "key": "b"},
    {"env_steps": 2, "task": "t1", "key": "r"},  # reset for the next branch
    {
        "env_steps": 2,
        "task": "t1",
        "key": "a",
    },  # replayed prefix: visited again, not a new env step
    {"env_steps": 3, "task": "t1", "key": "c"},
    {"env_steps": 3, "task": "t2", "key": "r"},
    {"env_steps": 4, "task": "t2", "key": "a"},
    {"env_steps": 5, "task": "t2", "key": "a"},  # an action that kept the key
    {"env_steps": 6, "task": "t1", "key": "b"},
]


def test_visited_states_counts_task_key_pairs_once():
    curve = visited_state_curve(RECORD, [0, 1, 2, 3, 4, 5, 6])
    assert curve == [[0, 1], [1, 2], [2, 3], [3, 5], [4, 6], [5, 6], [6, 6]]
    # tuples work too, and a checkpoint between events sees everything up to it
    assert visited_state_curve(
        [(e["env_steps"], e["task"], e["key"]) for e in RECORD], [2, 10]
    ) == [[2, 3], [10, 6]]
    with pytest.raises(ValueError, match="back in env steps"):
        visited_state_curve([(3, "t", "a"), (2, "t", "b")], [5])
    with pytest.raises(ValueError, match="strictly increasing"):
        visited_state_curve(RECORD, [2, 2])


def test_checkpoints_and_held_out_curve():
    assert checkpoint_steps(1200, 8) == [0, 150, 300, 450, 600, 750, 900, 1050, 1200]
    evals = [(s, [0.0] * 60 + [1.0] * (4 + i)) for i, s in enumerate(checkpoint_steps(800, 8))]
    curve = held_out_curve(evals)
    assert len(curve) == 9 and curve[0] == [0, 4 / 64, 64] and curve[-1] == [800, 12 / 72, 72]
    with pytest.raises(ValueError, match="need >= 8"):
        held_out_curve(evals[:5])
    with pytest.raises(ValueError, match="starts at env step 0"):
        held_out_curve(evals[1:], min_checkpoints=1)
    with pytest.raises(ValueError, match="no episodes"):
        held_out_curve([(0, [])], min_checkpoints=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        held_out_curve([(0, [2.0])], min_checkpoints=0)


def test_threshold_steps_auc_and_flag():
    curve = [[0, 0.1, 64], [100, 0.3, 64], [200, 0.5, 64], [300, 0.7, 64], [400, 0.6, 64]]
    assert steps_to_threshold(curve, 0.5) == 200
    assert steps_to_threshold(curve, 0.9) is None
    assert not threshold_met_at_start(curve, 0.5)
    warm = [[0, 0.7, 64], [100, 0.8, 64]]
    assert steps_to_threshold(warm, 0.5) == 0 and threshold_met_at_start(warm, 0.5)
    # trapezoids: (0.1+0.3)/2 + (0.3+0.5)/2 + (0.5+0.7)/2 + (0.7+0.6)/2 = 1.85 over 4 spans of 100 -> 0.4625
    assert area_under_curve(curve) == pytest.approx(0.4625)
    assert area_under_curve([[0, 0.5], [10, 0.5], [30, 0.5]]) == pytest.approx(0.5)
    assert value_at(curve, 250) == 0.5 and value_at(curve, 400) == 0.6
    with pytest.raises(ValueError):
        value_at([[10, 1.0]], 5)


def test_bootstrap_identical_pairs_give_exactly_zero():
    x = [0.12, 0.5, 0.33, 0.9, 0.41]
    d = paired_bootstrap(x, x)
    assert (
        (d.estimate, d.low, d.high) == (0.0, 0.0, 0.0) and d.includes_no_difference and d.pairs == 5
    )
    r = paired_bootstrap(x, x, kind="ratio")
    assert (r.estimate, r.low, r.high) == (1.0, 1.0, 1.0) and r.includes_no_difference


def test_bootstrap_constant_shift_and_factor():
    theirs = [0.25, 0.5, 0.125, 0.375, 0.0]
    d = paired_bootstrap([t + 0.25 for t in theirs], theirs)
    assert d.estimate == d.low == d.high == 0.25 and not d.includes_no_difference
    r = paired_bootstrap([2.5 * t for t in [10.0, 20.0, 30.0]], [10.0, 20.0, 30.0], kind="ratio")
    assert (
        r.estimate == pytest.approx(2.5)
        and r.low == pytest.approx(2.5)
        and r.high == pytest.approx(2.5)
    )


def test_bootstrap_noisy_data_covers_the_truth_and_is_reproducible():
    ours = [0.60, 0.35, 0.55, 0.40, 0.52, 0.47]
    theirs = [0.50, 0.45, 0.40, 0.45, 0.42, 0.45]
    d = paired_bootstrap(ours, theirs, resamples=4000, seed=1)
    assert d.low < d.estimate < d.high and d.estimate == pytest.approx(0.22 / 6)
    assert (
        d.includes_no_difference
    )  # +3.7 points on average, -10..+15 per seed: not distinguishable
    assert paired_bootstrap(ours, theirs, resamples=4000, seed=1) == d
    big = paired_bootstrap([o + 0.3 for o in ours], theirs, resamples=4000, seed=1)
    assert big.low > 0 and not big.includes_no_difference
    zero = paired_bootstrap([1.0, 2.0], [0.0, 0.0], kind="ratio")
    assert zero.estimate is None and zero.high is None and not zero.includes_no_difference
    with pytest.raises(ValueError, match=">= 2 seed pairs"):
        paired_bootstrap([1.0], [1.0])
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap([1.0, 2.0], [1.0])


def test_pairing_keeps_common_seeds_with_values():
    a, b, seeds = pair_by_seed({0: 1.0, 1: 2.0, 2: None, 3: 4.0}, {0: 0.5, 2: 1.0, 3: 3.0, 4: 9.0})
    assert (a, b, seeds) == ([1.0, 4.0], [0.5, 3.0], [0, 3])


def _run(algo: str, seed: int, succ: list[float], visited: list[int]) -> RunResult:
    steps = checkpoint_steps(800, 8)
    return RunResult(
        suite="s",
        algo=algo,
        seed=seed,
        settings={"algo": algo},
        visited_states=[[s, v] for s, v in zip(steps, visited)],
        held_out=[[s, p, 64] for s, p in zip(steps, succ)],
        new_env_steps=800,
    )


def test_run_figures_and_suite_comparisons_round_trip_json():
    ramp = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.6, 0.7, 0.7]
    flat = [0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.4]
    runs = []
    for seed in range(3):
        runs.append(_run("3spo", seed, ramp, [1, 20, 40, 60, 80, 100, 120, 140, 160 + seed]))
        runs.append(_run("grpo", seed, flat, [1, 10, 20, 30, 40, 50, 60, 70, 80]))
    f = run_figures(runs[0], 0.5)
    assert (
        f["steps_to_threshold"] == 400
        and not f["threshold_met_at_start"]
        and f["visited_states"] == 160
    )
    assert f["visited_per_1k_steps"] == 200.0 and f["final_success"] == 0.7
    comp = suite_comparisons(runs, 0.5, resamples=2000)
    v = comp["grpo"]["visited_states"]["ratio"]
    assert v.estimate == pytest.approx((160 + 161 + 162) / 240) and not v.includes_no_difference
    s = comp["grpo"]["final_success"]["difference"]
    assert s.estimate == pytest.approx(0.3) and s.low == pytest.approx(0.3)
    assert comp["grpo"]["steps_to_threshold"]["ratio"] is None  # grpo never reached 0.5: no pairs
    again = [RunResult.model_validate(json.loads(r.model_dump_json())) for r in runs]
    assert again == runs


def test_visits_from_rollouts_lays_rollouts_end_to_end_in_record_order():
    from bench.compare.stats import visits_from_rollouts

    records = [
        {"task": "t1", "steps": 3, "visits": [[0, "r"], [1, "a"], [3, "b"]]},
        {"task": "t2", "steps": 0, "visits": [[0, "r"]]},  # a rollout that stopped at once
        {"task": "t1", "steps": 2, "visits": [[0, "r"], [2, "c"]]},
    ]  # r again: one pair, counted once
    visits = visits_from_rollouts(records)
    assert visits == [
        (0, "t1", "r"),
        (1, "t1", "a"),
        (3, "t1", "b"),
        (3, "t2", "r"),
        (3, "t1", "r"),
        (5, "t1", "c"),
    ]
    assert visited_state_curve(visits, [0, 2, 3, 5]) == [[0, 1], [2, 2], [3, 4], [5, 5]]
    with pytest.raises(ValueError, match="visit at step 4 of a rollout of 3 steps"):
        visits_from_rollouts([{"task": "t", "steps": 3, "visits": [[4, "x"]]}])


def test_late_success_reads_the_last_quarter_of_the_budget():
    from bench.compare.stats import late_success

    snaps = [
        {"env_steps": s, "leaves": n, "successes": w}
        for s, n, w in [(0, 0, 0), (50, 40, 0), (80, 50, 2), (100, 60, 8)]
    ]
    assert late_success(snaps) == pytest.approx(
        8 / 20
    )  # from the snapshot at 50 (<= 75) to the end
    assert late_success(snaps, fraction=1.0) == pytest.approx(8 / 60)
    assert late_success([]) is None and late_success(snaps[:1]) is None


def test_curve_band_means_and_brackets_over_runs():
    from bench.compare.stats import curve_band

    curves = [[[0, 0.0], [10, 0.5]], [[0, 0.0], [10, 1.0]], [[0, 0.0], [10, 0.0]]]
    band = curve_band(curves, [0, 5, 10], resamples=500)
    assert band["steps"] == [0, 5, 10] and band["mean"] == pytest.approx(
        [0.0, 0.0, 0.5]
    )  # a step curve
    assert band["low"][0] == band["high"][0] == 0.0  # no spread, no band
    assert 0.0 <= band["low"][2] < 0.5 < band["high"][2] <= 1.0
    one = curve_band(curves[:1], [0, 10])
    assert one["low"] == one["mean"] == one["high"] == [0.0, 0.5]


def test_best_variant_by_mean_with_missing_values():
    from bench.compare.stats import best_variant

    assert (
        best_variant({"default": [0.2, 0.4], "alpha=50": [0.5, None], "xi=5": [None]}) == "alpha=50"
    )
    assert (
        best_variant({"a": [1.0], "b": [1.0]}) == "a"
    )  # ties: the first listed (the defaults come first)
    assert best_variant({"a": [3.0], "b": [1.0]}, higher_is_better=False) == "b"
    assert best_variant({"a": [None]}) is None
