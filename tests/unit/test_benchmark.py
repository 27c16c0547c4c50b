"""spo3 bench's pure parts: convergence point, aggregation, the paper's ratios, config merging."""

from pathlib import Path

import pytest

from services.app.benchmark import BenchConfig, claim_ratios, markdown, mean_std, select, steps_to_threshold, suite_table
from services.app.launcher import GamesConfig, task_lists


def snaps(rows):
    return [{"env_steps": s, "leaves": n, "successes": w} for s, n, w in rows]


def test_steps_to_threshold_uses_a_rolling_window_of_leaves():
    # 40 leaves at 10% success, then 40 leaves at 90%: the window of 32 crosses 50% only once
    # most of its leaves come from the second stretch.
    rows = [(0, 0, 0), (100, 20, 2), (200, 40, 4), (300, 60, 22), (400, 80, 40)]
    assert steps_to_threshold(snaps(rows), 0.5, 32) == 300
    assert steps_to_threshold(snaps(rows), 0.95, 32) is None
    # a window larger than all the leaves never fires, however good the rate
    assert steps_to_threshold(snaps([(0, 0, 0), (10, 5, 5)]), 0.5, 32) is None


def test_steps_to_threshold_does_not_credit_early_failures_to_late_success():
    rows = [(0, 0, 0), (100, 100, 0), (200, 132, 32)]  # the last 32 leaves all succeeded
    assert steps_to_threshold(snaps(rows), 0.5, 32) == 200
    assert steps_to_threshold(snaps(rows), 0.5, 200) is None


def record(algo, seed, final, unique, steps):
    return {"algo": algo, "seed": seed, "final_success": final, "unique_states_per_1k": unique,
            "unique_states_per_1k_half": 2 * unique,
            "steps_to_threshold": steps, "generated_tokens": 100, "wall_time_s": 10.0}


def test_table_and_ratios_follow_the_paper_directions():
    records = [record("3spo", s, 0.8, 50.0, 400) for s in range(3)] + \
              [record("grpo", 0, 0.5, 20.0, 1000), record("grpo", 1, 0.6, 30.0, None), record("grpo", 2, 0.4, 25.0, 800)]
    table = suite_table(records, ["3spo", "grpo"])
    mean, std, have, runs = table["grpo"]["steps_to_threshold"]
    assert (mean, have, runs) == (900, 2, 3) and std == pytest.approx(141.42, rel=1e-3)
    r = claim_ratios(table)["grpo"]
    assert r["exploration"] == pytest.approx(2.0)
    assert r["convergence"] == pytest.approx(900 / 400)
    assert r["success_points"] == pytest.approx(30.0)
    text = markdown({"algos": ["3spo", "grpo"], "seeds": [0, 1, 2], "success_threshold": 0.5,
                     "window": 32, "suites": {"s": {"table": table, "ratios": {"grpo": r}, "budget": 1500}}})
    assert "## s (1,500 env steps per run)" in text and "(2/3 reached)" in text and "exploration 2.00x" in text and "(threshold reached in 3/3 vs 2/3 runs)" in text and "success +30.0 points" in text


def test_ratios_are_none_when_a_side_never_converged():
    records = [record("3spo", 0, 0.1, 10.0, None), record("grpo", 0, 0.1, 0.0, 500)]
    r = claim_ratios(suite_table(records, ["3spo", "grpo"]))["grpo"]
    assert r["convergence"] is None and r["exploration"] is None
    assert mean_std([None, None]) == (None, None, 0)


def test_run_config_merges_suite_over_base_and_select_overrides(tmp_path):
    bench = BenchConfig(base={"env_steps": 100, "rollout": {"max_steps": 8, "choice_mode": True}},
                        suites={"a": {"games": {"kind": "tw-treasure_hunter"}, "rollout": {"max_steps": 12}},
                                "b": {"env_steps": 50}})
    cfg = bench.run_config("a", "grpo", 2, tmp_path)
    assert (cfg.rollout.max_steps, cfg.rollout.choice_mode, cfg.algo) == (12, True, "grpo")
    assert cfg.games.seed == 2 and cfg.games.kind == "tw-treasure_hunter" and cfg.env_steps == 100
    narrowed = select(bench, ["b"], ["3spo"], [7], 300, None)
    assert list(narrowed.suites) == ["b"] and narrowed.seeds == [7]
    assert narrowed.run_config("b", "3spo", 7, tmp_path).env_steps == 300  # the command line wins
    with pytest.raises(ValueError, match="unknown suite"):
        select(bench, ["nope"], None, None, None, None)
    swept = select(bench, None, None, None, None, None, ["score.alpha=50", "rollout.max_steps=5"])
    assert swept.run_config("a", "3spo", 0, tmp_path).score.model_dump(exclude_unset=True) == {"alpha": 50}
    assert swept.run_config("a", "3spo", 0, tmp_path).rollout.max_steps == 5  # the suite's own value too
    assert bench.base.get("score") is None  # the original is untouched
    with pytest.raises(ValueError, match="KEY=VALUE"):
        select(bench, None, None, None, None, None, ["alpha"])


def test_the_shipped_bench_config_is_valid(tmp_path):
    bench = BenchConfig.from_yaml(Path(__file__).parents[2] / "configs" / "bench.yaml")
    assert {"tw-coin", "tw-treasure", "tw-cooking", "twx-coin", "alfworld"} <= set(bench.suites)
    assert len(bench.seeds) >= 3 and bench.algos == ["3spo", "grpo", "gigpo"]
    for suite in bench.suites:
        bench.run_config(suite, "3spo", 0, tmp_path)  # every suite is a valid TrainConfig


def test_task_lists_for_twx_and_explicit_tasks(tmp_path):
    train, held_out = task_lists(GamesConfig(env="twx", kind="coin", train=2, eval=1, seed=5,
                                             settings={"numLocations": 4}), tmp_path)
    assert train == ["coin:seed=5:fold=train:numLocations=4", "coin:seed=6:fold=train:numLocations=4"]
    assert held_out == ["coin:seed=20005:fold=test:numLocations=4"]
    (tmp_path / "g.z8").write_text("")
    train, held_out = task_lists(GamesConfig(tasks=[str(tmp_path / "g.z8"), "coin:seed=1"]), tmp_path)
    assert train == held_out == [str((tmp_path / "g.z8").resolve()), "coin:seed=1"]
    with pytest.raises(ValueError, match="games.tasks"):
        task_lists(GamesConfig(env="scienceworld"), tmp_path)


def test_set_reaches_the_new_score_settings_and_misspellings_stop_the_run(tmp_path):
    from services.app.launcher import TrainConfig

    bench = BenchConfig(base={"env_steps": 10}, suites={"s": {"games": {"env": "twx", "kind": "coin"}}})
    b = select(bench, None, None, None, None, None, ["score.reward_score=truncated", "score.novelty=parent"])
    cfg = b.run_config("s", "3spo", 0, tmp_path)
    assert cfg.score.model_dump(exclude_unset=True) == {"reward_score": "truncated", "novelty": "parent"}
    with pytest.raises(ValueError, match="reward_scor'"):
        TrainConfig(score={"reward_scor": "raw"})
    with pytest.raises(ValueError, match="reward_score"):
        TrainConfig(score={"reward_score": "literal"})


def test_diagnostics_names_and_ratios():
    from services.app.report import diagnostics

    totals = {"expansions": 40, "reexpansions": 2, "informative_groups": 10, "truncated_top_groups": 1,
              "replay_steps": 90, "env_steps": 120, "leaves_success": 3, "leaves_depth": 5, "leaves_truncated": 2}
    d = diagnostics(totals, {1: 5, 0: 10}, {"truncated": 1, "states": 8, "tasks": 2})
    assert list(d) == ["reexpand_frac", "leaves", "truncated_top_frac", "expansions_by_depth",
                       "replay_per_new_step", "walkthrough_truncated"]
    assert d["reexpand_frac"] == 0.05 and d["truncated_top_frac"] == 0.1 and d["replay_per_new_step"] == 0.75
    assert d["leaves"] == {"success": 3, "failure": 0, "truncated": 2, "depth": 5}
    assert d["expansions_by_depth"] == {"0": 10, "1": 5}
    grpo = diagnostics({"env_steps": 100, "leaves_success": 1}, {}, None)
    assert grpo["reexpand_frac"] is None and grpo["truncated_top_frac"] is None and grpo["replay_per_new_step"] == 0
