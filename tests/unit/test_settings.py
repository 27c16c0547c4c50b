"""Settings: one pydantic model per component, every field described once; the command line's
options come from those fields; a misspelt key stops a run before anything starts, naming the key
and the closest valid one."""

from pathlib import Path

import pytest
import typer
import typer.testing
from pydantic import BaseModel, ValidationError
from typer.main import get_command

from bench import cli as bench_cli
from bench.compare.benchmark import BenchConfig, SweepConfig, bench_settings_check, select
from spo3.actors.config import ActorConfig, EvalConfig, RolloutConfig
from spo3.app import cli
from spo3.app.config import settings_error
from spo3.app.score_service import ScoreServiceProcess
from spo3.app.sft import SftRunConfig
from spo3.app.train_config import GamesConfig, LearnerSection, TrainConfig
from spo3.app.wiring import PolicySource, PublishTarget
from spo3.learner.config import (
    AdvantageConfig,
    LearnerConfig,
    LearnerSettings,
    LossConfig,
    TrainerConfig,
    TrainerSettings,
)
from spo3.score_store.score_math import ScoreParams
from spo3.score_store.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
MODELS = [
    RolloutConfig,
    EvalConfig,
    ActorConfig,
    ScoreParams,
    LossConfig,
    AdvantageConfig,
    TrainerSettings,
    TrainerConfig,
    LearnerSettings,
    LearnerConfig,
    PolicySource,
    PublishTarget,
    GamesConfig,
    LearnerSection,
    TrainConfig,
    ServiceSettings,
    ScoreServiceProcess,
    SftRunConfig,
    BenchConfig,
    SweepConfig,
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_field_has_a_description(model: type[BaseModel]):
    missing = [name for name, f in model.model_fields.items() if not (f.description or "").strip()]
    assert not missing, f"{model.__name__}: fields without a description: {missing}"


@pytest.mark.parametrize(
    "command, mapping",
    [
        ("actor", cli.ACTOR_OPTIONS),
        ("learner", cli.LEARNER_OPTIONS),
        ("score-service", cli.SCORE_SERVICE_OPTIONS),
    ],
)
def test_cli_options_are_settings_fields(command, mapping):
    """Every option of `spo3 actor` / `spo3 learner` / `spo3 score-service` sets a field of a settings model: its help is
    that field's description and its default is the field's (or empty: the field's default applies)."""
    group = get_command(cli.app)
    params = [p for p in group.commands[command].params if isinstance(p, typer.core.TyperOption)]
    assert params
    for p in params:
        assert p.name in mapping, (
            f"spo3 {command} --{p.name.replace('_', '-')} maps to no settings field"
        )
        model, field = mapping[p.name]
        info = model.model_fields[field]
        assert p.help.startswith(info.description), (command, p.name)
        if p.default is not None and not p.required:
            assert p.default == info.default, (command, p.name, p.default, info.default)
    assert set(mapping) == {p.name for p in params}


def test_config_files_are_valid():
    TrainConfig.from_yaml(ROOT / "configs" / "demo.yaml")
    for name in ("bench.yaml", "bench-v2.yaml", "bench-hazards.yaml"):
        bench_settings_check(BenchConfig.from_yaml(ROOT / "configs" / name))


def test_misspelt_key_in_yaml_names_the_key_and_the_closest(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: typo\nlearner:\n  groups_per_updat: 4\nrollout:\n  max_steps: 5\n")
    with pytest.raises(ValidationError) as e:
        TrainConfig.from_yaml(path)
    assert (
        "unknown setting 'learner.groups_per_updat'; did you mean 'learner.groups_per_update'?"
        in settings_error(e.value)
    )


@pytest.mark.parametrize(
    "yaml_text, key, closest",
    [
        ("rollout: {max_step: 3}\n", "rollout.max_step", "rollout.max_steps"),
        ("score: {alhpa: 50}\n", "score.alhpa", "score.alpha"),
        ("eval: {episode: 2}\n", "eval.episode", "eval.episodes"),
        ("games: {trian: 3}\n", "games.trian", "games.train"),
        ("learner: {kl_coeff: 0.1}\n", "learner.kl_coeff", "learner.kl_coef"),
        ("actor: 3\n", "actor", "actors"),
    ],
)
def test_every_section_rejects_a_misspelt_key(tmp_path, yaml_text, key, closest):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValidationError) as e:
        TrainConfig.from_yaml(path)
    assert f"unknown setting {key!r}; did you mean {closest!r}?" in settings_error(e.value)


def test_train_command_stops_on_a_misspelt_key_before_starting(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"runs_dir: {tmp_path / 'runs'}\nlearner:\n  groups_per_updat: 4\n")
    result = typer.testing.CliRunner().invoke(cli.app, ["train", "--config", str(path)])
    assert result.exit_code == 2
    assert "did you mean 'learner.groups_per_update'?" in result.output
    assert not (tmp_path / "runs").exists()  # nothing started


def test_bench_set_with_a_misspelt_key_fails_naming_it():
    bench = BenchConfig.from_yaml(ROOT / "configs" / "bench.yaml")
    narrowed = select(bench, None, None, None, None, None, ["learner.lrr=0.1"])
    with pytest.raises(ValueError) as e:
        bench_settings_check(narrowed)
    assert "unknown setting 'learner.lrr'; did you mean 'learner.lr'?" in settings_error(e.value)
    result = typer.testing.CliRunner().invoke(
        bench_cli.app, ["--set", "score.alhpa=50", "--out", "/nonexistent"]
    )
    assert result.exit_code == 2 and "did you mean 'score.alpha'?" in result.output


def test_learner_section_builds_the_learner_config():
    section = LearnerSection(groups_per_update=4, lr=0.5, kl_coef=0.2, ppo_epochs=1)
    cfg = section.learner_config(redis_url="redis://x", run="r", checkpoint_dir="c", model="m")
    assert (
        cfg.groups_per_update,
        cfg.trainer.lr,
        cfg.trainer.loss.kl_coef,
        cfg.trainer.ppo_epochs,
    ) == (4, 0.5, 0.2, 1)
    with pytest.raises(ValidationError):
        LearnerConfig(redis_url="r", trainer=TrainerConfig(model="m"), groups_per_updat=3)


def test_a_runs_learner_section_sets_the_advantage_settings():
    section = LearnerSection(norm_3spo="mean", baseline_std="population", gamma=0.9)
    cfg = section.learner_config(redis_url="redis://x", run="r", checkpoint_dir="c", model="m")
    assert cfg.advantages.norm("3spo") == "mean" and cfg.advantages.norm("grpo") == "std"
    assert (cfg.advantages.baseline_std, cfg.advantages.gamma) == ("population", 0.9)
    with pytest.raises(ValidationError):
        LearnerSection(norm_3spo="median")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["learner", "--model", "m", "--redis-url", "redis://x", "--norm-3spo", "meen"],
            "--norm-3spo: Input should be 'std', 'mean', 'floor' or 'batch'",
        ),
        (
            ["learner", "--model", "m", "--redis-url", "redis://x", "--baseline-stats", "rows"],
            "--baseline-stats: Input should be 'steps' or 'episodes'",
        ),
        (
            ["actor", "--redis-url", "redis://x", "--model", "m", "--count", "leafs"],
            "--count: Input should be 'leaf' or 'rollout'",
        ),
        (
            ["actor", "--redis-url", "redis://x", "--model", "m", "--sr-prior-a", "-1"],
            "--sr-prior-a: Input should be greater than or equal to 0",
        ),
        (
            ["score-service", "--token", "t", "--count", "episode"],
            "--count: Input should be 'leaf' or 'rollout'",
        ),
    ],
)
def test_an_invalid_option_value_names_the_option_and_what_it_takes(args, message):
    """Checked before anything starts (no Redis is reached: the URLs are not even valid)."""
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.replace("│", " ").split())


def test_share_prompts_and_gradient_checkpointing_exclude_each_other():
    from spo3.learner.config import TrainerSettings

    assert TrainerSettings(share_prompts=True).share_prompts
    with pytest.raises(ValidationError, match="share_prompts and gradient_checkpointing"):
        TrainerSettings(share_prompts=True, gradient_checkpointing=True)
