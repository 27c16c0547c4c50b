"""spo3-bench's config handling, per-run files -> RunResult, the report, and sweeps (no training:
tests/integration/test_train.py runs the real thing)."""

import json
from pathlib import Path

import pytest
import yaml

from bench.compare.benchmark import (
    BenchConfig,
    Planned,
    Shard,
    SweepConfig,
    apply_sets,
    bench_plan,
    build_results,
    markdown,
    read_run,
    result_path,
    run_plan,
    select,
    sweep_variants,
    variant_name,
)
from bench.compare.stats import RunResult
from spo3.actors.envs.tasks import task_lists, task_seeds
from spo3.app.train_config import GamesConfig

ROOT = Path(__file__).parents[2]


def test_run_config_merges_suite_over_base_and_select_overrides(tmp_path):
    bench = BenchConfig(
        base={
            "env_steps": 100,
            "rollout": {"max_steps": 8, "choice_mode": True},
            "eval": {"episodes": 8},
        },
        suites={
            "a": {"games": {"kind": "tw-treasure_hunter"}, "rollout": {"max_steps": 12}},
            "b": {"env_steps": 50},
        },
    )
    cfg = bench.run_config("a", "grpo", 2, tmp_path)
    assert (cfg.rollout.max_steps, cfg.rollout.choice_mode, cfg.algo) == (12, True, "grpo")
    assert cfg.games.seed == 2 and cfg.games.kind == "tw-treasure_hunter" and cfg.env_steps == 100
    narrowed = select(bench, ["b"], ["3spo"], [7], 300, None)
    assert list(narrowed.suites) == ["b"] and narrowed.seeds == [7]
    assert narrowed.run_config("b", "3spo", 7, tmp_path).env_steps == 300  # the command line wins
    with pytest.raises(ValueError, match="unknown suite"):
        select(bench, ["nope"], None, None, None, None)
    swept = select(bench, None, None, None, None, None, ["score.alpha=50", "rollout.max_steps=5"])
    assert swept.run_config("a", "3spo", 0, tmp_path).score.model_dump(exclude_unset=True) == {
        "alpha": 50
    }
    assert (
        swept.run_config("a", "3spo", 0, tmp_path).rollout.max_steps == 5
    )  # the suite's own value too
    assert bench.base.get("score") is None  # the original is untouched
    with pytest.raises(ValueError, match="KEY=VALUE"):
        select(bench, None, None, None, None, None, ["alpha"])


def test_the_shipped_warm_starts_train_on_their_suites_games(tmp_path):
    from bench.compare.benchmark import warm_start_config

    bench = BenchConfig.from_yaml(ROOT / "configs" / "bench-v2.yaml")
    assert bench.warm_start
    for suite in bench.warm_start:
        for seed in bench.seeds:
            sft = warm_start_config(
                bench, bench.run_config(suite, "3spo", seed, tmp_path), suite, seed, tmp_path
            )
            assert sft.games.seed == seed == sft.seed and sft.eval_episodes == 0


def test_a_variant_with_suites_runs_on_those_suites_only():
    bench = BenchConfig(
        algos=["3spo"],
        seeds=[0, 1],
        suites={"a": {}, "b": {}},
        variants={"3spo": [{"score.alpha": 2.0}, {"suites": ["b"], "score.xi": 3}]},
    )
    plan = {(p.suite, p.variant, p.overrides) for p in bench_plan(bench)}
    assert plan == {
        ("a", "default", ()),
        ("b", "default", ()),
        ("a", "alpha=2.0", (("score.alpha", 2.0),)),
        ("b", "alpha=2.0", (("score.alpha", 2.0),)),
        ("b", "xi=3", (("score.xi", 3),)),
    }
    with pytest.raises(ValueError, match=r"variant xi=3 of 3spo: suites must be a list of this"):
        BenchConfig(suites={"a": {}}, variants={"3spo": [{"suites": ["c"], "score.xi": 3}]})


def test_the_hazard_bench_changes_one_hazard_per_variant_on_v2s_games(tmp_path):
    """configs/bench-hazards.yaml: each 3SPO variant moves the settings of one hazard only (and
    really moves them), and every suite trains on bench-v2's games at bench-v2's budget, so its
    runs compare with those."""
    hz = BenchConfig.from_yaml(ROOT / "configs" / "bench-hazards.yaml")
    v2 = BenchConfig.from_yaml(ROOT / "configs" / "bench-v2.yaml")
    assert hz.algos == ["3spo", "grpo", "gigpo"] and len(hz.seeds) == 5
    assert hz.algo_settings == v2.algo_settings
    touched = [set(sets) for sets in hz.variants["3spo"]]
    assert touched == [
        {"learner.norm_3spo"},
        {"score.sr_prior_a", "score.sr_prior_b"},
        {"score.count", "score.truncate_won"},
        {"score.dead_end_novelty"},
        {"suites", "learner.groups_per_update"},  # the diagnostic arm
    ]
    diag = [p for p in bench_plan(hz) if p.variant == "groups_per_update=48"]
    assert {p.suite for p in diag} == {"tw-treasure-l15"} and len(diag) == len(hz.seeds)
    for suite in hz.suites:
        a = hz.run_config(suite, "3spo", 0, tmp_path / "a")
        b = v2.run_config(suite, "3spo", 0, tmp_path / "a")
        assert a.games == b.games and a.env_steps == b.env_steps and a.rollout == b.rollout
        for sets in hz.variants["3spo"]:
            sets = {k: v for k, v in sets.items() if k != "suites"}
            varied = hz.run_config(suite, "3spo", 0, tmp_path / "a", sets, "v")
            section, key = next(iter(sets)).split(".")
            assert getattr(getattr(varied, section), key) != getattr(getattr(a, section), key)


def test_the_shipped_bench_configs_are_valid(tmp_path):
    old = BenchConfig.from_yaml(ROOT / "configs" / "bench.yaml")
    assert {"tw-coin", "tw-treasure", "tw-cooking", "twx-coin", "alfworld"} <= set(old.suites)
    v2 = BenchConfig.from_yaml(ROOT / "configs" / "bench-v2.yaml")
    assert (
        len(v2.seeds) >= 5 and v2.algos == ["3spo", "grpo", "gigpo"] and v2.heldout_checkpoints >= 8
    )
    assert v2.min_heldout_episodes >= 64
    for bench in (old, v2):
        for suite in bench.suites:
            cfg = bench.run_config(suite, "3spo", 0, tmp_path)  # every suite is a valid TrainConfig
            assert cfg.heldout_checkpoints == bench.heldout_checkpoints
            assert cfg.games.eval * cfg.eval.episodes >= bench.min_heldout_episodes
    sweep = SweepConfig.from_yaml(ROOT / "configs" / "bench-sweep.yaml")
    bench = BenchConfig.from_yaml(ROOT / sweep.config)
    assert set(sweep.suites) <= set(bench.suites) and not set(sweep.seeds) & set(bench.seeds)
    assert set(sweep.grid) == {"3spo", "grpo", "gigpo"}
    assert (
        "learner.groups_per_update" in sweep.grid["grpo"]
        and "learner.groups_per_update" in sweep.grid["gigpo"]
    )
    assert {"score.alpha", "score.xi", "score.reward_score", "score.novelty"} <= set(
        sweep.grid["3spo"]
    )
    assert set(sweep.grid["3spo"]["score.alpha"]) == {1, 50}
    for algo, grid in sweep.grid.items():
        for sets in sweep_variants(grid, sweep.mode):
            bench.run_config(
                sweep.suites[0], algo, sweep.seeds[0], tmp_path, sets
            )  # every variant is valid


def test_settings_layers_warm_start_and_bad_input(tmp_path):
    bench = BenchConfig(
        base={"env_steps": 100, "eval": {"episodes": 8}, "learner": {"groups_per_update": 8}},
        suites={"s": {"games": {"env": "twx", "kind": "coin", "eval": 8}}},
        algo_settings={"grpo": {"learner.groups_per_update": 2}},
        min_heldout_episodes=64,
    )
    assert bench.run_config("s", "grpo", 0, tmp_path).learner.groups_per_update == 2
    assert bench.run_config("s", "3spo", 0, tmp_path).learner.groups_per_update == 8
    over = bench.run_config("s", "grpo", 0, tmp_path, {"learner.groups_per_update": 4}, "gpu=4")
    assert over.learner.groups_per_update == 4 and over.name == "s-grpo-gpu=4-s0"
    with pytest.raises(ValueError, match="fewer than min_heldout_episodes 64"):
        BenchConfig(
            base={"eval": {"episodes": 2}}, suites={"s": {"games": {"eval": 8}}}
        ).run_config("s", "3spo", 0, tmp_path)
    with pytest.raises(ValueError, match="unknown algorithm 'ppo'"):
        BenchConfig(algos=["3spo", "ppo"])
    with pytest.raises(ValueError, match="alph'"):  # a misspelt swept setting names the key
        bench.run_config("s", "3spo", 0, tmp_path, {"score.alph": 50})
    with pytest.raises(
        ValueError, match="groups_per_updat'"
    ):  # learner settings too, before any run starts
        bench.run_config("s", "grpo", 0, tmp_path, {"learner.groups_per_updat": 2})
    assert apply_sets({"a": {"b": 1}}, {"a.c": 2, "d": 3}) == {"a": {"b": 1, "c": 2}, "d": 3}
    # warm start: every run of a seed starts from the given directory; a missing one is a clear error
    from bench.compare.benchmark import _model_for

    warm = tmp_path / "sft-s-3"
    warm.mkdir()
    (warm / "config.json").write_text("{}")
    b = bench.model_copy(update={"init_model": str(tmp_path / "sft-{suite}-{seed}")})
    cfg = b.run_config("s", "grpo", 3, tmp_path)
    assert _model_for(b, cfg, "s", 3, tmp_path) == str(warm.resolve())
    with pytest.raises(FileNotFoundError, match="sft-s-4 is not a model directory"):
        _model_for(b, cfg, "s", 4, tmp_path)


def test_sweep_variants_and_names():
    grid = {"score.alpha": [1, 50], "score.novelty": ["parent"]}
    assert sweep_variants(grid, "one-at-a-time") == [
        {},
        {"score.alpha": 1},
        {"score.alpha": 50},
        {"score.novelty": "parent"},
    ]
    assert len(sweep_variants(grid, "grid")) == 2
    assert (
        variant_name({}) == "default"
        and variant_name({"learner.groups_per_update": 2}) == "groups_per_update=2"
    )


def test_task_lists_for_twx_and_explicit_tasks(tmp_path):
    train, held_out = task_lists(
        GamesConfig(env="twx", kind="coin", train=2, eval=1, seed=5, settings={"numLocations": 4}),
        tmp_path,
    )
    assert train == [
        "coin:seed=500000:fold=train:numLocations=4",
        "coin:seed=500001:fold=train:numLocations=4",
    ]
    assert held_out == ["coin:seed=520000:fold=test:numLocations=4"]
    (tmp_path / "g.z8").write_text("")
    train, held_out = task_lists(
        GamesConfig(tasks=[str(tmp_path / "g.z8"), "coin:seed=1"]), tmp_path
    )
    assert train == held_out == [str((tmp_path / "g.z8").resolve()), "coin:seed=1"]
    with pytest.raises(ValueError, match="games.tasks"):
        task_lists(GamesConfig(env="scienceworld"), tmp_path)


def test_seeds_of_the_shipped_bench_and_sweep_share_no_task(tmp_path):
    bench = BenchConfig.from_yaml(ROOT / "configs" / "bench-v2.yaml")
    seeds = bench.seeds + SweepConfig.from_yaml(ROOT / "configs" / "bench-sweep.yaml").seeds
    for suite in (
        "twx-coin-big",
        "tw-treasure-l15",
    ):  # one TWX suite (ids), one TextWorld suite (game seeds)
        games = bench.run_config(suite, "grpo", 0, tmp_path).games
        seen: dict[str, tuple[int, str]] = {}
        for seed in seeds:
            split = games.model_copy(update={"seed": seed})
            if games.env == "twx":
                train, held = task_lists(split, tmp_path)
            else:
                train, held = (list(map(str, s)) for s in task_seeds(split))
            assert len(set(train)) == games.train and len(set(held)) == games.eval
            for part, ids in (("train", train), ("held-out", held)):
                for t in ids:
                    assert t not in seen, (
                        f"{suite}: {t} is in seed {seen[t]} and in seed {seed} {part}"
                    )
                    seen[t] = (seed, part)
    shared = GamesConfig(
        env="twx", kind="coin", train=4, eval=2, seed=1, seed_stride=1
    )  # the old, overlapping split
    assert task_lists(shared, tmp_path)[0][:3] == [f"coin:seed={s}:fold=train" for s in (1, 2, 3)]
    with pytest.raises(
        ValueError, match="seed_stride=5000: the game seeds of one seed span 30,000"
    ):
        GamesConfig(seed_stride=5000)


def test_a_record_from_before_seed_stride_stands_only_for_seed_0(tmp_path):
    """Records without games.seed_stride generated their tasks at stride 1: seed 0's tasks are the same at
    any stride, seed 1's are not, so resume keeps the first and refuses the second."""
    bench = BenchConfig(
        base={"env_steps": 80, "eval": {"episodes": 8}},
        suites={"s": {"games": {"env": "twx", "kind": "coin", "eval": 8}}},
        algos=["grpo"],
        seeds=[0, 1],
    )
    plan = [Planned(suite="s", algo="grpo", seed=seed) for seed in (0, 1)]
    for p in plan:
        settings = bench.run_config("s", "grpo", p.seed, tmp_path).model_dump(mode="json")
        del settings["games"]["seed_stride"]
        path = result_path(tmp_path, "s", "grpo", "default", p.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            run("grpo", p.seed, 0.5, 10).model_copy(update={"settings": settings}).model_dump_json()
        )
    assert set(run_plan(bench, plan[:1], tmp_path, progress=False)[0]) == {plan[0]}
    with pytest.raises(
        ValueError, match=r"grpo-default-s1.json was recorded with other settings \(\['games'\]\)"
    ):
        run_plan(bench, plan, tmp_path, progress=False)


def test_set_reaches_the_new_score_settings_and_misspellings_stop_the_run(tmp_path):
    from spo3.app.train_config import TrainConfig

    bench = BenchConfig(
        base={"env_steps": 10, "eval": {"episodes": 8}},
        suites={"s": {"games": {"env": "twx", "kind": "coin"}}},
    )
    b = select(
        bench,
        None,
        None,
        None,
        None,
        None,
        ["score.reward_score=truncated", "score.novelty=parent"],
    )
    cfg = b.run_config("s", "3spo", 0, tmp_path)
    assert cfg.score.model_dump(exclude_unset=True) == {
        "reward_score": "truncated",
        "novelty": "parent",
    }
    with pytest.raises(ValueError, match="reward_scor'"):
        TrainConfig(score={"reward_scor": "raw"})
    with pytest.raises(ValueError, match="reward_score"):
        TrainConfig(score={"reward_score": "literal"})
    with pytest.raises(ValueError, match="train_eval_tasks needs heldout_checkpoints"):
        TrainConfig(train_eval_tasks=4)
    assert TrainConfig(train_eval_tasks=4, heldout_checkpoints=8).train_eval_tasks == 4


def test_diagnostics_names_and_ratios():
    from spo3.app.report import diagnostics

    totals = {
        "expansions": 40,
        "reexpansions": 2,
        "informative_groups": 10,
        "truncated_top_groups": 1,
        "replay_steps": 90,
        "env_steps": 120,
        "leaves_success": 3,
        "leaves_depth": 5,
        "leaves_truncated": 2,
    }
    d = diagnostics(totals, {1: 5, 0: 10}, {"truncated": 1, "states": 8, "tasks": 2})
    assert list(d) == [
        "reexpand_frac",
        "leaves",
        "truncated_top_frac",
        "expansions_by_depth",
        "replay_per_new_step",
        "walkthrough_truncated",
    ]
    assert (
        d["reexpand_frac"] == 0.05
        and d["truncated_top_frac"] == 0.1
        and d["replay_per_new_step"] == 0.75
    )
    assert d["leaves"] == {"success": 3, "failure": 0, "truncated": 2, "depth": 5}
    assert d["expansions_by_depth"] == {"0": 10, "1": 5}
    grpo = diagnostics({"env_steps": 100, "leaves_success": 1}, {}, None)
    assert (
        grpo["reexpand_frac"] is None
        and grpo["truncated_top_frac"] is None
        and grpo["replay_per_new_step"] == 0
    )


def write_run_dir(
    d: Path,
    *,
    successes_by_version: dict[int, list[float]],
    kept: list[tuple[int, int]],
    stopped: bool = False,
    train_eval: dict | None = None,
) -> Path:
    """A hand-made `spo3 train` run directory with held-out checkpoints (the files read_run reads)."""
    d.mkdir(parents=True)
    (d / "summary.json").write_text(
        json.dumps({"env_steps": 82, "policy_version": 3, "wall_time_s": 12.5})
    )
    (d / "actor_totals.json").write_text(
        json.dumps({"env_steps": 82, "replay_steps": 30, "generated_tokens": 900})
    )
    (d / "learner.jsonl").write_text(
        "".join(json.dumps({"version": v, "tokens": 100 * v}) + "\n" for v in (1, 2, 3))
    )
    (d / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"env_steps": s, "leaves": n, "successes": w}) + "\n"
            for s, n, w in [(0, 0, 0), (40, 10, 1), (60, 20, 3), (82, 30, 8)]
        )
    )
    # two rollouts: 40 steps on t1 (root, then states at steps 1 and 40), 42 steps on t2
    rollouts = [
        {"task": "t1", "steps": 40, "visits": [[0, "r"], [1, "a"], [40, "b"]]},
        {"task": "t2", "steps": 42, "visits": [[0, "r"], [2, "a"], [42, "c"]]},
    ]
    (d / "visits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rollouts))
    (d / "heldout.json").write_text(
        json.dumps(
            {
                "checkpoints": [{"env_steps": s, "version": v} for s, v in kept],
                "evaluations": {
                    str(v): {
                        "successes": s,
                        **({"actions": {"go": 0.75, "take": 0.25}} if train_eval else {}),
                    }
                    for v, s in successes_by_version.items()
                },
                "eval_wall_s": 3.0,
                "eval_env_steps": 77,
                "stopped_by_time_limit": stopped,
                **({"train_eval": train_eval} if train_eval else {}),
            }
        )
    )
    return d


def test_read_run_turns_a_run_directory_into_a_run_result(tmp_path):
    kept = [(0, 0), (10, 0), (20, 1), (30, 1), (40, 2), (50, 2), (60, 3), (70, 3), (80, 3)]
    d = write_run_dir(
        tmp_path / "run",
        successes_by_version={0: [0, 0, 1, 0], 1: [0, 1, 1, 0], 2: [1, 1, 1, 0], 3: [1, 1, 1, 1]},
        kept=kept,
    )
    r = read_run(
        d,
        suite="s",
        algo="grpo",
        seed=1,
        variant="default",
        budget=80,
        checkpoints=8,
        curve_points=4,
        settings={"algo": "grpo"},
    )
    assert (
        r.held_out[0] == [0, 0.25, 4]
        and r.held_out[2] == [20, 0.5, 4]
        and r.held_out[-1] == [80, 1.0, 4]
    )
    assert r.updates_at == [[s, v] for s, v in kept]  # the version evaluated at each checkpoint
    assert r.train_eval_success is None  # not measured
    assert r.actions_at_budget == {}  # an evaluation recorded without its actions
    measured = read_run(
        write_run_dir(
            tmp_path / "te",
            successes_by_version={0: [0.0], 3: [1.0]},
            kept=kept[:1] + [(s, 3) for s, _ in kept[1:]],
            train_eval={"success": 0.75, "episodes": 4, "tasks": 2},
        ),
        suite="s",
        algo="3spo",
        seed=1,
        variant="default",
        budget=80,
        checkpoints=8,
        curve_points=4,
        settings={},
    )
    assert measured.train_eval_success == 0.75
    assert measured.actions_at_budget == {"go": 0.75, "take": 0.25}
    # rollout 1 covers run steps 0-40, rollout 2 steps 40-82: t2's "a" is at 42, its "c" at 82 (after the budget)
    assert r.visited_states == [[0, 1], [20, 2], [40, 4], [60, 5], [80, 5]]
    assert (
        r.new_env_steps,
        r.replay_env_steps,
        r.generated_tokens,
        r.learner_tokens,
        r.updates,
    ) == (82, 30, 900, 600, 3)
    assert r.train_success == pytest.approx(
        5 / 10
    )  # the last quarter (after step 61.5): from the snapshot at 60
    assert r.eval_env_steps == 77 and r.budget == 80 and not r.stopped_by_time_limit
    with pytest.raises(ValueError, match="need >= 8"):  # too few checkpoints for a finished run
        read_run(
            write_run_dir(
                tmp_path / "short", successes_by_version={0: [0.0]}, kept=[(0, 0), (10, 0)]
            ),
            suite="s",
            algo="grpo",
            seed=1,
            variant="default",
            budget=80,
            checkpoints=8,
            curve_points=4,
            settings={},
        )
    # a run stopped by its time limit keeps the checkpoints it reached, flagged
    cut = read_run(
        write_run_dir(
            tmp_path / "cut",
            successes_by_version={0: [0.0], 1: [1.0]},
            kept=[(0, 0), (10, 0), (20, 1)],
            stopped=True,
        ),
        suite="s",
        algo="grpo",
        seed=1,
        variant="default",
        budget=80,
        checkpoints=8,
        curve_points=4,
        settings={},
    )
    assert cut.stopped_by_time_limit and [p[0] for p in cut.held_out] == [0, 10, 20]


def run(algo, seed, final, visited, *, start=0.1, stopped=False):
    curve = [[0, start, 64]] + [[100 * i, start + (final - start) * i / 8, 64] for i in range(1, 9)]
    return RunResult(
        suite="s",
        algo=algo,
        seed=seed,
        visited_states=[[0, 1], [800, visited]],
        held_out=curve,
        new_env_steps=810,
        budget=800,
        replay_env_steps=81,
        updates=10,
        stopped_by_time_limit=stopped,
    )


def test_report_tables_say_where_intervals_include_no_difference(tmp_path):
    runs = (
        [run("3spo", s, 0.8, 400 + s) for s in range(5)]
        + [run("grpo", s, 0.3, 100 + 10 * s) for s in range(5)]
        + [
            run("gigpo", s, [0.9, 0.7, 0.9, 0.7, 0.8][s], 200 * s + 1, start=0.6, stopped=s == 0)
            for s in range(5)
        ]
    )
    bench = BenchConfig(algos=["3spo", "grpo", "gigpo"], resamples=500)
    results = build_results(bench, runs)
    json.dumps(results)  # JSON all the way
    suite = results["suites"]["s"]
    assert suite["budget"] == 800 and suite["checkpoints"] == [100 * i for i in range(9)]
    g = suite["comparisons"]["grpo"]
    assert g["final_success"]["difference"]["estimate"] == pytest.approx(0.5)
    assert not g["final_success"]["difference"]["includes_no_difference"]
    assert g["visited_states"]["ratio"]["low"] > 1
    gi = suite["comparisons"]["gigpo"]["final_success"]["difference"]
    assert gi["includes_no_difference"] and gi["low"] < 0 < gi["high"]
    t = suite["table"]
    assert t["gigpo"]["threshold_met_at_start"] == 5 and t["grpo"]["threshold_met_at_start"] == 0
    assert t["gigpo"]["stopped_by_time_limit"] == 1 and t["grpo"]["steps_to_threshold"]["n"] == 0
    assert t["3spo"]["replay_per_new_step"]["mean"] == pytest.approx(0.1)
    text = markdown(results)
    assert "## s (800 env steps per run" in text and "| gigpo | 5 (1 hit the time limit) |" in text
    assert (
        "| gigpo | held-out success at budget, ours - theirs | +" in text
        and "**includes no difference**" in text
    )
    assert (
        "| grpo | held-out success at budget, ours - theirs | +50.0 points |" in text
        and "excludes it" in text
    )
    assert "(reached 0/5)" in text and "5 at start)" in text
    assert "| arm | seed 0 | seed 1 | seed 2 | seed 3 | seed 4 |" in text
    assert "| gigpo | 60.0% -> 90.0% (10) | 60.0% -> 70.0% (10) |" in text
    from bench.compare.benchmark import cost_line

    line = cost_line(
        [
            {"algo": "3spo", "wall_time_s": 100.0, "eval_wall_s": 200.0},
            {"algo": "3spo", "wall_time_s": 140.0, "eval_wall_s": 160.0},
            {"algo": "grpo", "wall_time_s": 30.0, "eval_wall_s": None},
        ]
    )
    assert line == (
        "Cost: 3 runs, training 4.5 min + held-out evaluation 6.0 min = 10.5 min "
        "(per run, training + evaluation: 3spo 120 s + 180 s; grpo 30 s + 0 s)."
    )
    assert text.count("Cost: 15 runs") == 1
    from bench.compare.benchmark import target_verdict

    assert target_verdict({"low": 2.5, "high": 3.0}, 2.4) == "**met**"
    assert target_verdict({"low": 2.3, "high": 3.0}, 2.4).startswith("open")
    assert target_verdict({"low": -0.1, "high": 0.0}, 0.0) == "not met"
    assert target_verdict(None, 0.0).startswith("n/a")
    assert (
        "| s | 3spo | final held-out success above GRPO's | +50.0 points [" in text
    )  # grpo: 0.3 vs ours 0.8
    assert (
        "| s | 3spo | >= 1.8x fewer env steps to the threshold than GRPO | n/a | n/a (fewer than 2 seed pairs"
        in text
    )


def test_a_variant_is_its_own_row_compared_with_the_baselines_on_the_same_seeds():
    variant = [
        run("3spo", s, 0.2, 300).model_copy(update={"variant": "novelty_use=order"})
        for s in range(3)
    ]
    runs = (
        [run("3spo", s, 0.8, 400) for s in range(3)]
        + [run("grpo", s, 0.3, 100) for s in range(3)]
        + variant
    )
    results = build_results(BenchConfig(algos=["3spo", "grpo"], resamples=500), runs)
    suite = results["suites"]["s"]
    assert set(suite["table"]) == {"3spo", "grpo", "3spo novelty_use=order"}
    assert suite["table"]["3spo novelty_use=order"]["final_success"]["mean"] == pytest.approx(0.2)
    # the default arm against the baselines; the variant against them and against the default arm
    assert set(suite["comparisons"]) == {"grpo"}
    assert set(suite["variant_comparisons"]) == {"3spo novelty_use=order"}
    order = suite["variant_comparisons"]["3spo novelty_use=order"]
    assert set(order) == {"grpo", "3spo"}
    assert order["3spo"]["final_success"]["difference"]["estimate"] == pytest.approx(
        -0.6
    )  # 0.2 - 0.8
    assert order["3spo"]["visited_states"]["ratio"]["estimate"] == pytest.approx(0.75)  # 300 / 400
    order = order["grpo"]
    assert order["final_success"]["difference"]["estimate"] == pytest.approx(-0.1)
    assert order["visited_states"]["ratio"]["estimate"] == pytest.approx(3.0)
    text = markdown(results)
    assert "Held-out actions" not in text  # no run recorded them
    runs[0] = runs[0].model_copy(update={"actions_at_budget": {"go": 1.0}})
    runs[1] = runs[1].model_copy(update={"actions_at_budget": {"go": 0.5, "take": 0.5}})
    results = build_results(BenchConfig(algos=["3spo", "grpo"], resamples=500), runs)
    assert results["suites"]["s"]["table"]["3spo"]["actions_at_budget"] == {
        "go": 0.75,
        "take": 0.25,
    }
    text = markdown(results)
    assert "- 3spo: go 75%, take 25%" in text and "- grpo:" not in text
    assert "| 3spo novelty_use=order vs | figure |" in text
    assert "| 3spo | held-out success at budget, ours - theirs | -60.0 points | [" in text
    assert (
        "| s | 3spo novelty_use=order | final held-out success above GRPO's | -10.0 points ["
        in text
    )
    assert "3spo novelty_use=order 0 s + 0 s" in text


def test_a_bench_plans_each_variant_beside_its_algorithms_default():
    bench = BenchConfig(
        algos=["3spo", "grpo"],
        seeds=[0],
        variants={"3spo": [{"score.novelty_use": "order"}]},
        suites={"s": {"games": {"env": "twx", "kind": "coin", "eval": 16}}},
        min_heldout_episodes=32,
    )
    plan = bench_plan(bench)
    assert [(p.algo, p.variant) for p in plan] == [
        ("3spo", "default"),
        ("3spo", "novelty_use=order"),
        ("grpo", "default"),
    ]
    p = plan[1]
    cfg = bench.run_config(p.suite, p.algo, p.seed, Path("out"), dict(p.overrides), p.variant)
    assert cfg.score.novelty_use == "order" and cfg.name == "s-3spo-novelty_use=order-s0"
    assert bench.run_config("s", "3spo", 0, Path("out")).score.novelty_use == "reward"
    with pytest.raises(ValueError, match="unknown algorithm"):
        BenchConfig(variants={"ppo": [{"learner.lr": 0.1}]})


def test_resume_refuses_results_made_with_other_settings_and_report_only_runs_nothing(tmp_path):
    bench = BenchConfig(
        base={"env_steps": 80, "eval": {"episodes": 8}},
        suites={"s": {"games": {"env": "twx", "kind": "coin", "eval": 8}}},
        algos=["grpo"],
        seeds=[1],
    )
    p = Planned(suite="s", algo="grpo", seed=1)
    cfg = bench.run_config("s", "grpo", 1, tmp_path)
    recorded = run("grpo", 1, 0.5, 10).model_copy(update={"settings": cfg.model_dump(mode="json")})
    path = result_path(tmp_path, "s", "grpo", "default", 1)
    path.parent.mkdir(parents=True)
    path.write_text(recorded.model_dump_json())
    done, failures = run_plan(bench, [p], tmp_path, progress=False)  # recorded: nothing to run
    assert done[p] == recorded and failures == []
    longer = select(
        bench, None, None, None, None, 999.0
    )  # only the time limit changed: still the same run
    assert run_plan(longer, [p], tmp_path, progress=False)[0][p] == recorded
    other = select(bench, None, None, None, None, None, ["learner.lr=0.1"])
    with pytest.raises(ValueError, match="recorded with other settings.*learner"):
        run_plan(other, [p], tmp_path, progress=False)
    missing = Planned(suite="s", algo="grpo", seed=2)
    assert run_plan(bench, [p, missing], tmp_path, progress=False, report_only=True)[0] == {
        p: recorded
    }


def test_a_shard_starts_only_its_runs_and_reports_every_recorded_one(tmp_path, monkeypatch):
    """--seed 1 into an OUT that holds seed 0: only seed 1 is started and seed 0 is reported beside it.
    A recorded run made with other settings is left out of the report when the shard does not name it,
    and stops the plan when it does (resuming it would mix settings)."""
    import bench.compare.benchmark as bm
    import spo3.app.launcher as launcher

    bench = BenchConfig(
        base={"env_steps": 80, "eval": {"episodes": 8}},
        suites={"s": {"games": {"env": "twx", "kind": "coin", "eval": 8}}},
        algos=["grpo"],
        seeds=[0, 1, 2],
    )
    plan = bench_plan(bench)
    for p, lr in ((plan[0], None), (plan[2], 0.1)):
        cfg = bench.run_config("s", "grpo", p.seed, tmp_path, {"learner.lr": lr} if lr else {})
        path = result_path(tmp_path, "s", "grpo", "default", p.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            run("grpo", p.seed, 0.5, 10)
            .model_copy(update={"settings": cfg.model_dump(mode="json")})
            .model_dump_json()
        )

    def no_training(cfg, **kw):
        raise RuntimeError("not trained in unit tests")

    monkeypatch.setattr(bm, "_model_for", lambda *a, **kw: "/m")
    monkeypatch.setattr(launcher, "train", no_training)
    done, failures = run_plan(bench, plan, tmp_path, progress=False, shard=Shard(seeds=(1,)))
    assert set(done) == {
        plan[0]
    }  # seed 2's record has another learning rate: not reported as this bench's
    assert [(f["seed"], f["error"]) for f in failures] == [
        (1, "RuntimeError: not trained in unit tests")
    ]
    with pytest.raises(
        ValueError, match=r"grpo-default-s2.json was recorded with other settings \(\['learner'\]\)"
    ):
        run_plan(bench, plan, tmp_path, progress=False, shard=Shard(seeds=(2,)))
    assert plan[2] in Shard() and plan[2] not in Shard(algos=("3spo",), seeds=(2,))


def sweep_with_scores(
    tmp_path, monkeypatch, bench: dict, grid: dict, scores: dict, check=None, **sweep_kw
):
    """run_sweep over a hand-made bench with run_plan replaced (this checks the plan and the choice, not
    training): every run gets train_eval_success scores[variant]; `check(bench, plan, out)` looks at what
    run_plan was given, `sweep_kw` goes to run_sweep (its filters). Returns (planned runs, report)."""
    import bench.compare.benchmark as bm

    (tmp_path / "bench.yaml").write_text(
        yaml.safe_dump(
            {
                "base": {"env_steps": 80, "eval": {"episodes": 8}},
                "suites": {"s": {"games": {"env": "twx", "kind": "coin", "eval": 8}}},
                **bench,
            }
        )
    )
    sweep = SweepConfig(config=str(tmp_path / "bench.yaml"), suites=["s"], seeds=[7], grid=grid)
    planned, shards = [], []

    def fake_run_plan(bench, plan, out, **kw):
        planned.extend(plan)
        shards.append(kw["shard"])
        if check:
            check(bench, plan, out)
        return {
            p: run(p.algo, p.seed, 0.5, 10).model_copy(
                update={"variant": p.variant, "train_eval_success": scores[p.variant]}
            )
            for p in plan
        }, []

    monkeypatch.setattr(bm, "run_plan", fake_run_plan)
    report = bm.run_sweep(sweep, tmp_path / "out", progress=False, **sweep_kw)
    report["shard"] = shards[0]
    return planned, report


def test_a_sweep_runs_a_variant_equal_to_the_defaults_once(tmp_path, monkeypatch):
    """`score.alpha: [1, 50]` with alpha 1.0 the default: the 'alpha=1' variant is the default one and
    is not run twice."""

    def every_run_evaluates_training_tasks(bench, plan, out):  # which selects by default
        assert all(
            bench.run_config(p.suite, p.algo, p.seed, out, dict(p.overrides)).train_eval_tasks == 16
            for p in plan
        )

    planned, report = sweep_with_scores(
        tmp_path,
        monkeypatch,
        {"base": {"env_steps": 80, "eval": {"episodes": 8}, "score": {"alpha": 1.0}}},
        {"3spo": {"score.alpha": [1, 50]}, "grpo": {"learner.groups_per_update": [2]}},
        {"default": 0.2, "alpha=50": 0.4, "groups_per_update=2": 0.1},
        every_run_evaluates_training_tasks,
    )
    assert [(p.algo, p.variant) for p in planned] == [
        ("3spo", "default"),
        ("3spo", "alpha=50"),
        ("grpo", "default"),
        ("grpo", "groups_per_update=2"),
    ]
    assert (
        report["algos"]["3spo"]["best"] == "alpha=50"
        and report["algos"]["grpo"]["best"] == "default"
    )
    assert report["algo_settings"] == {"3spo": {"score.alpha": 50}}
    text = (tmp_path / "out" / "sweep.md").read_text()
    assert "## 3spo: best `alpha=50`" in text and "score.alpha: 50" in text


def test_a_sweep_shard_runs_its_algorithm_and_reports_every_one(tmp_path, monkeypatch):
    """`--algo grpo`: only GRPO's runs may start, every algorithm's recorded runs are reported (the block
    the sweep prints is the whole bench's); with --report-only the filter narrows the report instead."""
    grid = {"3spo": {"score.alpha": [50]}, "grpo": {"learner.groups_per_update": [2]}}
    scores = {"default": 0.2, "alpha=50": 0.4, "groups_per_update=2": 0.1}
    planned, report = sweep_with_scores(tmp_path, monkeypatch, {}, grid, scores, algos=["grpo"])
    assert {p.algo for p in planned} == {"3spo", "grpo"} and report["shard"] == Shard(
        algos=("grpo",)
    )
    assert set(report["algos"]) == {"3spo", "grpo"} and report["algo_settings"] == {
        "3spo": {"score.alpha": 50}
    }
    planned, report = sweep_with_scores(
        tmp_path, monkeypatch, {}, grid, scores, algos=["grpo"], report_only=True
    )
    assert {p.algo for p in planned} == {"grpo"} and set(report["algos"]) == {"grpo"}
    with pytest.raises(ValueError, match="--algo \\['ppo'\\]: the sweep has no grid"):
        sweep_with_scores(tmp_path, monkeypatch, {}, grid, scores, algos=["ppo"])


def test_a_sweep_starts_from_the_benchs_own_algo_settings(tmp_path, monkeypatch):
    """GRPO runs at groups_per_update 1 in the bench: the sweep's default is that, the listed 1 is not run
    again, and the block it prints keeps it when no variant beats it."""

    def grpo_default_is_the_benchs(bench, plan, out):
        assert bench.run_config("s", "grpo", 7, out).learner.groups_per_update == 1

    planned, report = sweep_with_scores(
        tmp_path,
        monkeypatch,
        {"algo_settings": {"grpo": {"learner.groups_per_update": 1}}},
        {"grpo": {"learner.groups_per_update": [1, 2]}, "3spo": {"score.alpha": [50]}},
        {"default": 0.2, "groups_per_update=2": 0.1, "alpha=50": 0.3},
        grpo_default_is_the_benchs,
    )
    assert [(p.algo, p.variant) for p in planned] == [
        ("grpo", "default"),
        ("grpo", "groups_per_update=2"),
        ("3spo", "default"),
        ("3spo", "alpha=50"),
    ]
    assert report["algo_settings"] == {
        "grpo": {"learner.groups_per_update": 1},
        "3spo": {"score.alpha": 50},
    }


def test_results_copied_into_another_out_are_reported(tmp_path):
    bench = BenchConfig(
        base={"env_steps": 80, "eval": {"episodes": 8}},
        suites={"s": {"games": {"env": "twx", "kind": "coin", "eval": 8}}},
        algos=["grpo"],
        seeds=[1],
    )
    p = Planned(suite="s", algo="grpo", seed=1)
    recorded = run("grpo", 1, 0.5, 10).model_copy(
        update={
            "settings": {
                **bench.run_config("s", "grpo", 1, tmp_path / "elsewhere").model_dump(mode="json"),
                "model": "/m",
            }
        }
    )
    path = result_path(tmp_path / "here", "s", "grpo", "default", 1)
    path.parent.mkdir(parents=True)
    path.write_text(recorded.model_dump_json())
    assert run_plan(bench, [p], tmp_path / "here", progress=False, report_only=True)[0] == {
        p: recorded
    }


def test_warm_start_names_known_suites_checks_games_and_reuses_a_finished_sft(
    tmp_path, monkeypatch
):
    import spo3.app.sft as sft_module
    from bench.compare.benchmark import warm_start_model

    games = {"env": "twx", "kind": "coin", "eval": 8, "settings": {"numLocations": 9}}
    bench_file = tmp_path / "bench.yaml"
    bench_file.write_text(
        yaml.safe_dump(
            {
                "suites": {
                    "coin": {"games": games},
                    "other": {"games": {**games, "settings": {"numLocations": 4}}},
                }
            }
        )
    )
    sft_file = tmp_path / "sft.yaml"
    sft_file.write_text(
        yaml.safe_dump(
            {
                "bench": str(bench_file),
                "defaults": {"steps": 5},
                "suites": {"coin": {"tasks": 2}, "other": {}},
            }
        )
    )
    base = {"eval": {"episodes": 8}}
    with pytest.raises(ValueError, match=r"warm_start names suite\(s\) \['nope'\]"):
        BenchConfig(base=base, suites={"coin": {"games": games}}, warm_start={"nope": "coin"})
    with pytest.raises(ValueError, match="init_model or warm_start"):
        BenchConfig(
            base=base,
            suites={"coin": {"games": games}},
            warm_start={"coin": "coin"},
            init_model="m",
        )
    bench = BenchConfig(
        base=base,
        suites={"coin": {"games": games}, "cold": {"games": games}},
        warm_start={"coin": "coin"},
        sft_config=str(sft_file),
        min_heldout_episodes=64,
    )
    assert select(bench, ["cold"], None, None, None, None).warm_start == {}
    made = []

    def fake_sft(cfg, **_):  # what run_sft leaves behind, its sft.json last
        made.append(cfg)
        Path(cfg.out).mkdir(parents=True)
        (Path(cfg.out) / "sft.json").write_text(json.dumps({"config": cfg.model_dump(mode="json")}))
        return {"examples": 3, "loss_first": 1.0, "loss_last": 0.5, "seconds": 1.0}

    monkeypatch.setattr(sft_module, "run_sft", fake_sft)
    cfg = bench.run_config("coin", "grpo", 3, tmp_path)
    model = warm_start_model(bench, cfg, "coin", 3, tmp_path)
    assert model == tmp_path / "sft" / "coin-s3" / "model"
    (sft_cfg,) = made  # the suite's entry, for this seed, with the run's games and no evaluation
    assert (
        sft_cfg.seed == 3 and sft_cfg.games.seed == 3 and sft_cfg.tasks == 2 and sft_cfg.steps == 5
    )
    assert sft_cfg.eval_episodes == 0 and sft_cfg.games.cache_dir == cfg.games.cache_dir
    warm_start_model(bench, cfg, "coin", 3, tmp_path)
    assert (
        len(made) == 1
    )  # a finished warm start (its sft.json) is reused by every algorithm of the seed
    (tmp_path / "sft" / "coin-s4").mkdir(parents=True)
    (tmp_path / "sft" / "coin-s4" / "stale").write_text("cut short")
    warm_start_model(bench, bench.run_config("coin", "3spo", 4, tmp_path), "coin", 4, tmp_path)
    assert (
        len(made) == 2 and not (tmp_path / "sft" / "coin-s4" / "stale").exists()
    )  # made again, whole
    sft_json = (
        tmp_path / "sft" / "coin-s3" / "sft.json"
    )  # made before games.seed_stride: other tasks than seed 3's now
    made_before = json.loads(sft_json.read_text())
    del made_before["config"]["games"]["seed_stride"]
    sft_json.write_text(json.dumps(made_before))
    with pytest.raises(ValueError, match=r"coin-s3 was made with other settings \(\['games'\]\)"):
        warm_start_model(bench, cfg, "coin", 3, tmp_path)
    strided = BenchConfig(
        base={**base, "games": {"seed_stride": 1}},
        suites=bench.suites,
        warm_start={"coin": "coin"},
        sft_config=str(sft_file),
        min_heldout_episodes=64,
    )  # the SFT entry keeps the default
    with pytest.raises(ValueError, match=r"other games than suite 'coin' \(\['seed_stride'\]\)"):
        warm_start_model(
            strided, strided.run_config("coin", "grpo", 3, tmp_path), "coin", 3, tmp_path
        )
    mismatched = bench.model_copy(update={"warm_start": {"coin": "other"}})
    with pytest.raises(
        ValueError, match=r"entry 'other' has other games than suite 'coin' \(\['settings'\]\)"
    ):
        warm_start_model(mismatched, cfg, "coin", 3, tmp_path)


def test_make_bench_runs_suites_of_the_bench_config():
    line = next(
        l for l in (ROOT / "Makefile").read_text().splitlines() if l.startswith("BENCH_SUITES ?=")
    )
    suites = line.split("?=")[1].split()
    bench = BenchConfig.from_yaml(ROOT / "configs" / "bench-v2.yaml")
    assert suites and set(suites) <= set(bench.suites), (
        f"Makefile BENCH_SUITES names suites not in bench-v2: {suites}"
    )


def test_the_report_plots_held_out_success_against_updates_where_runs_recorded_them(tmp_path):
    from bench.compare.benchmark import write_report

    with_updates = [
        run("3spo", s, 0.5, 300).model_copy(
            update={"updates_at": [[100 * i, 3 * i] for i in range(9)]}
        )
        for s in range(2)
    ]
    runs = with_updates + [
        run("grpo", s, 0.3, 100) for s in range(2)
    ]  # grpo: an older record without them
    results = write_report(BenchConfig(algos=["3spo", "grpo"], resamples=200), runs, tmp_path)
    assert (tmp_path / "s.png").stat().st_size > 10_000 and results["arms"] == ["3spo", "grpo"]
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["updates_at"][-1] == [
        800,
        24,
    ]
