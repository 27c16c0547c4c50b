"""`spo3 make-games --env alfworld`: generated ALFWorld-format games on ALFWorld's real engine.

The games are made once per module by the real command (the CLI, in a subprocess), 5 of each task type
(3 training + 2 held-out); every one must be listed by the adapter the way AlfredTWEnv lists games,
load in the real engine, and be won by ALFWorld's hand-coded expert: once during generation (inside
the generator, exactly as alfworld-generate checks), and again here by replaying the stored expert
trajectory through the project's adapter (AlfWorldEnv) until the PDDL goal holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("alfworld")

from spo3.actors.envs.alfworld_env import TASK_TYPES, AlfWorldEnv, list_games  # noqa: E402
from spo3.actors.envs.base import EnvError  # noqa: E402

SPO3 = str(Path(sys.executable).with_name("spo3"))
PER_TYPE_TRAIN, PER_TYPE_HELDOUT = 3, 2


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("alfgen")
    r = subprocess.run(
        [
            SPO3,
            "make-games",
            str(out),
            "--env",
            "alfworld",
            "--n",
            str(PER_TYPE_TRAIN),
            "--heldout",
            str(PER_TYPE_HELDOUT),
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def test_every_task_type_in_both_splits(made):
    out, stdout = made
    printed = [line.split("\t") for line in stdout.strip().splitlines()]
    assert len(printed) == len(TASK_TYPES) * (PER_TYPE_TRAIN + PER_TYPE_HELDOUT)
    for split, n in (("train", PER_TYPE_TRAIN), ("heldout", PER_TYPE_HELDOUT)):
        games = list_games(
            out / split
        )  # the adapter's (AlfredTWEnv's) listing: solvable games only
        types = Counter(
            json.loads((Path(g) / "traj_data.json").read_text())["task_type"] for g in games
        )
        assert types == {t: n for t in TASK_TYPES.values()}, (split, types)


def test_games_differ_and_splits_use_other_floor_plans(made):
    out, _ = made
    train, held = list_games(out / "train"), list_games(out / "heldout")
    problems = [(Path(g) / "initial_state.pddl").read_text() for g in train + held]
    assert len(set(problems)) == len(problems)  # no two games alike
    plans = {
        s: {
            json.loads((Path(g) / "traj_data.json").read_text())["scene"]["scene_num"]
            for g in games
        }
        for s, games in (("train", train), ("heldout", held))
    }
    assert plans["train"] and plans["heldout"] and not plans["train"] & plans["heldout"]
    # rooms differ: several floor plans and receptacle counts among the games
    n_receps = {p.count(" - receptacle") for p in problems}
    assert len(plans["train"]) >= 5 and len(n_receps) >= 4


def test_expert_wins_every_game_in_the_real_engine(made):
    out, _ = made
    env = AlfWorldEnv(str(out), state="facts")
    try:
        games = list_games(out)
        assert len(games) == len(TASK_TYPES) * (PER_TYPE_TRAIN + PER_TYPE_HELDOUT)
        for game in games:
            obs = env.reset(game)
            assert "Your task is to:" in obs.text and obs.admissible_actions
            expert = (
                env.walkthrough()
            )  # stored by the generator: ALFWorld's hand-coded expert's trajectory
            assert expert, game
            result = None
            for i, action in enumerate(expert):
                assert action in env._last["admissible_commands"], (game, i, action)
                result = env.step(action)
                if i < len(expert) - 1:
                    assert not result.done, (game, i)  # not won before the expert's last action
            assert result is not None and result.done and result.success == 1.0, game
    finally:
        env.close()


def test_same_seed_same_games_and_bad_input(made, tmp_path):
    out, _ = made
    from spo3.actors.envs.alfworld_gen import make_games

    again = make_games(
        tmp_path / "again", n_train=1, n_heldout=0, seed=3, task_types=["pick", "light"]
    )
    for g in again:
        rel = Path(g.path).relative_to(tmp_path / "again")
        for name in ("initial_state.pddl", "traj_data.json", "game.tw-pddl"):
            assert (Path(g.path) / name).read_bytes() == (out / rel / name).read_bytes(), (
                rel,
                name,
            )
    with pytest.raises(EnvError, match="unknown task type 'boil'"):
        make_games(tmp_path / "bad", n_train=1, n_heldout=0, task_types=["boil"])
    r = subprocess.run(
        [SPO3, "make-games", str(tmp_path / "x"), "--env", "alfworld", "--setting", "level=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "--setting is for --env textworld" in r.stderr


def test_suite_reads_the_two_splits(made):
    out, _ = made
    from spo3.actors.envs.tasks import task_lists
    from spo3.app.train_config import GamesConfig

    games = GamesConfig(
        env="alfworld",
        train=10,
        eval=6,
        settings={"data_dir": str(out / "train"), "eval_data_dir": str(out / "heldout")},
    )
    train, held = task_lists(games, out)
    assert len(train) == 10 and len(held) == 6 and not set(train) & set(held)
    assert all("/train/" in t for t in train) and all("/heldout/" in t for t in held)
