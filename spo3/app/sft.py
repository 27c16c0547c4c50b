"""`spo3 sft`: the warm start. Expert trajectories from the real engines -> SFT examples in the
policy's own format -> a fine-tuned Hugging Face model directory that `spo3 train` starts from
(`model: OUT/model`).

Experts: TextWorld's walkthrough (tw-make's solution stored with the game), TextWorld-Express's
gold action sequence, ALFWorld's hand-coded expert (stored by `spo3 make-games --env alfworld`)
or, for a game without one, its Fast Downward planner: each adapter's `walkthrough()`. Every
expert step is replayed through the adapter, and the prompt is built as the rollout and the
held-out evaluation build it (spo3/actors/prompts.py: the task text of the reset, the last
`history_len` steps, the observation, the admissible actions), tokenized with the chat template
the in-process engine samples with. The target is the action as choice mode samples it (its
tokens + EOS, scored under the choices' trie) or, with `choice_mode: false`, `<action>...</action>`.

Demos come from the training tasks only (never the held-out ones), and only those the expert
won when replayed through the adapter. `tasks` and `fraction` make
the warm start partial: the demos of the first `tasks` training tasks, and a seeded share
`fraction` of their expert steps.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from spo3.app.train_config import GamesConfig
from spo3.transport.contracts import ChatMessage


class SftRunConfig(BaseModel):
    """One warm start. Every field can be set in a YAML file (`spo3 sft --config`)."""

    model_config = ConfigDict(extra="forbid")
    games: GamesConfig = Field(
        default_factory=GamesConfig,
        description=(
            "The tasks, as for `spo3 train`: demos come from the training tasks, the held-out ones only evaluate."
        ),
    )
    model: str | None = Field(
        None,
        description="Hugging Face model directory to fine-tune; empty: make one (model_preset).",
    )
    model_preset: str = Field(
        "tiny",
        description="Preset of `spo3 init-model` used when `model` is empty (seeded by `seed`).",
    )
    out: str = Field(
        "runs/sft",
        description="Output directory: model/ (the warm-started model), base/, sft.json.",
    )
    seed: int = Field(
        0, description="Seeds the base model, the choice of expert steps and the example order."
    )
    tasks: int | None = Field(
        None, ge=1, description="Demos of the first this many training tasks only; empty: all."
    )
    fraction: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Share of the collected expert steps trained on (a seeded random subset).",
    )
    epochs: int = Field(
        3, ge=0, description="Passes over the examples (ignored when `steps` is set)."
    )
    steps: int | None = Field(
        None, ge=0, description="Optimizer steps in all (examples cycled); empty: `epochs` passes."
    )
    lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate.")
    batch_rows: int = Field(16, ge=1, description="Examples per optimizer step.")
    max_len: int = Field(
        2048,
        ge=16,
        description="Longest prompt + target in tokens; longer prompts lose their oldest tokens.",
    )
    choice_mode: bool = Field(
        True, description="Targets as choice mode samples them (the rollout's `choice_mode`)."
    )
    history_len: int = Field(
        3, ge=0, description="Past steps shown in the prompt (the rollout's `history_len`)."
    )
    max_steps: int = Field(
        15, ge=1, description="Most actions per held-out episode (the rollout's `max_steps`)."
    )
    eval_episodes: int = Field(
        0,
        ge=0,
        description="Held-out episodes per task for the before/after success; 0: no evaluation.",
    )
    eval_base: bool = Field(
        True,
        description="With eval_episodes: also evaluate the base model (the same for every setting of a seed).",
    )
    eval_temperature: float = Field(
        0.4, ge=0.0, description="Sampling temperature of the held-out evaluation."
    )
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads (results are reproducible for a given count)."
    )
    demos: str | None = Field(
        None,
        description=(
            "A demos.json written by an earlier `spo3 sft` (OUT/demos.json): train on those expert trajectories "
            "instead of collecting them (TextWorld-Express's gold paths differ from run to run; the same demos "
            "and settings give the same model)."
        ),
    )
    note: str = Field("", description="Why these settings (free text, copied into sft.json).")


@dataclass(frozen=True)
class DemoStep:
    """One expert step as the policy sees it."""

    task_id: str
    index: int
    messages: list[ChatMessage]
    action: str
    admissible: tuple[str, ...]


@dataclass
class Demo:
    task_id: str
    steps: list[DemoStep] = field(default_factory=list)
    expert_len: int = 0
    """Actions in the expert's trajectory."""
    success: float = 0.0
    """What the engine reported when the trajectory ended (1.0: the expert won)."""
    stopped: str = ""
    """"no_expert" when the game has none, else ""."""
    skipped: int = 0
    """Expert actions not among the admissible ones (not stepped, no example)."""


def expert_actions(env: Any, task_id: str, *, draws: int = 16) -> list[str]:
    """The expert's actions for `task_id`. TextWorld-Express's gold path is not reproducible (the
    same game gives paths of 4, 7 or 9 steps from one call to the next, some with detours), so
    when two draws differ, up to `draws` are taken and the shortest kept (ties: the first in
    sort order): the demos, and so the warm-started model, do not change from run to run.
    EnvError when the game has no expert."""
    seen: set[tuple[str, ...]] = set()
    for i in range(max(1, draws)):
        env.reset(task_id)
        seen.add(tuple(env.walkthrough()))
        if i == 1 and len(seen) == 1:  # a stored or deterministic expert
            break
    return list(min((len(w), w) for w in seen)[1])


def collect_demo(env: Any, task_id: str, *, history_len: int = 3) -> Demo:
    """Replay the expert of `task_id` through `env` (an spo3.actors.envs adapter with `walkthrough()`)
    and record each step's prompt as the rollout would build it."""
    from spo3.actors.envs.base import EnvError
    from spo3.actors.prompts import build_messages, parse_action

    demo = Demo(task_id)
    try:
        actions = expert_actions(env, task_id)
    except EnvError:
        demo.stopped = "no_expert"
        return demo
    demo.expert_len = len(actions)
    obs = env.reset(
        task_id
    )  # the state a rollout starts from (TWX's walkthrough() resets for the gold path)
    task_text = obs.text
    history: list[tuple[str, str]] = []
    for i, action in enumerate(actions):
        admissible = tuple(obs.admissible_actions)
        taken = parse_action(action, admissible, bare_ok=True).action
        if taken is None:
            # Not in the engine's list, so the policy could not pick it (TWX cooking's gold path may
            # "open" a cupboard that is open already): skipped, and the replay goes on; a step that
            # mattered shows as a demo the expert no longer wins.
            demo.skipped += 1
            continue
        messages = build_messages(
            task_text, history, obs.text, list(admissible), history_len=history_len
        )
        demo.steps.append(DemoStep(task_id, i, messages, taken, admissible))
        result = env.step(taken)
        history.append((taken, result.observation.text))
        obs = result.observation
        if result.done:
            demo.success = result.success
            break
    return demo


def save_demos(path: str | Path, demos: Sequence[Demo]) -> None:
    """Write `demos` as JSON (what `load_demos` reads)."""
    rows = [
        {
            "task_id": d.task_id,
            "expert_len": d.expert_len,
            "success": d.success,
            "stopped": d.stopped,
            "skipped": d.skipped,
            "steps": [
                {
                    "index": s.index,
                    "messages": [m.model_dump() for m in s.messages],
                    "action": s.action,
                    "admissible": list(s.admissible),
                }
                for s in d.steps
            ],
        }
        for d in demos
    ]
    Path(path).write_text(json.dumps({"version": 1, "demos": rows}))


def load_demos(path: str | Path, tasks: Sequence[str]) -> list[Demo]:
    """The demos of `tasks` (in that order) from a file `save_demos` wrote; ValueError naming a
    task the file has no demo of."""
    data = json.loads(Path(path).read_text())
    by_task = {}
    for d in data["demos"]:
        steps = [
            DemoStep(
                d["task_id"],
                s["index"],
                [ChatMessage(**m) for m in s["messages"]],
                s["action"],
                tuple(s["admissible"]),
            )
            for s in d["steps"]
        ]
        by_task[d["task_id"]] = Demo(
            d["task_id"], steps, d["expert_len"], d["success"], d["stopped"], d.get("skipped", 0)
        )
    missing = [t for t in tasks if t not in by_task]
    if missing:
        raise ValueError(
            f"{path} has no demo of {len(missing)} of the {len(tasks)} tasks, e.g. {missing[0]!r}"
        )
    return [by_task[t] for t in tasks]


def select_steps(
    demos: Sequence[Demo], *, tasks: int | None, fraction: float, seed: int
) -> list[DemoStep]:
    """The expert steps trained on: those of the first `tasks` demos, then a seeded random share
    `fraction` of them (at least one), in their original order. Pure."""
    steps = [s for d in list(demos)[:tasks] for s in d.steps]
    if not steps:
        return []
    keep = max(1, round(fraction * len(steps)))
    chosen = sorted(random.Random(seed).sample(range(len(steps)), keep))
    return [steps[i] for i in chosen]


def to_examples(steps: Sequence[DemoStep], tokenizer, *, choice_mode: bool) -> list:
    """SFT examples (spo3.learner.sft.SftExample) of `steps` with the tokenizer the policy samples with."""
    from spo3.learner.restricted import tokenize_choices
    from spo3.learner.sft import SftExample
    from spo3.policy.inprocess import chat_prompt_ids

    out = []
    for s in steps:
        prompt = chat_prompt_ids(tokenizer, s.messages)
        if choice_mode:
            out.append(
                SftExample(
                    prompt,
                    tokenize_choices(tokenizer, [s.action])[0],
                    tokenize_choices(tokenizer, list(s.admissible)),
                )
            )
        else:
            target = tokenizer.encode(f"<action>{s.action}</action>", add_special_tokens=False)
            out.append(SftExample(prompt, target + [tokenizer.eos_token_id]))
    return out


def _bar_columns() -> list:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]


def _collect_demos(
    cfg: SftRunConfig, env: Any, wanted: Sequence[str], progress: bool, console: Any
) -> list[Demo]:
    """The expert's demo of every task in `wanted`, with a progress bar."""
    from rich.progress import Progress

    demos: list[Demo] = []
    with Progress(*_bar_columns(), disable=not progress, console=console) as bar:
        job = bar.add_task("expert demos", total=len(wanted), info="")
        for task in wanted:
            demos.append(collect_demo(env, task, history_len=cfg.history_len))
            won = sum(d.success >= 1.0 for d in demos)
            bar.update(
                job,
                advance=1,
                info=f"{won}/{len(demos)} won, {sum(len(d.steps) for d in demos)} steps",
            )
    return demos


def _fine_tune(
    cfg: SftRunConfig,
    base_dir: Path,
    steps: Sequence[DemoStep],
    model_dir: Path,
    progress: bool,
    console: Any,
) -> dict[str, Any]:
    """Fine-tune the model of `base_dir` on `steps`, save it to `model_dir`; returns the training
    part of the summary."""
    import torch
    from rich.progress import Progress
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spo3.learner.sft import SftConfig, planned_steps, target_logprobs, train_sft, truncated

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    examples = to_examples(steps, tokenizer, choice_mode=cfg.choice_mode)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    sft = SftConfig(
        lr=cfg.lr,
        epochs=cfg.epochs,
        steps=cfg.steps,
        batch_rows=cfg.batch_rows,
        max_len=cfg.max_len,
        seed=cfg.seed,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    before_lp = target_logprobs(model, examples, pad, max_len=cfg.max_len)
    with Progress(*_bar_columns(), disable=not progress, console=console) as bar:
        job = bar.add_task("fine-tuning", total=planned_steps(len(examples), sft), info="")
        result = train_sft(
            model,
            examples,
            sft,
            pad,
            on_step=lambda s, loss: bar.update(job, completed=s, info=f"loss {loss:.3f}"),
        )
    after_lp = target_logprobs(model, examples, pad, max_len=cfg.max_len)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return {
        "examples": len(examples),
        "prompt_tokens_max": max(len(e.prompt_ids) for e in examples),
        "truncated_examples": truncated(examples, cfg.max_len),
        "steps": result.steps,
        "target_tokens": result.target_tokens,
        "loss_first": result.losses[0] if result.losses else None,
        "loss_last": result.losses[-1] if result.losses else None,
        "target_logprob_before": sum(before_lp) / len(before_lp),
        "target_logprob_after": sum(after_lp) / len(after_lp),
    }


def _demo_summary(demos: Sequence[Demo]) -> dict[str, Any]:
    return {
        "demo_tasks": len(demos),
        "demos_won": sum(d.success >= 1.0 for d in demos),
        "demos_without_expert": sum(d.stopped == "no_expert" for d in demos),
        "expert_actions_skipped": sum(d.skipped for d in demos),
        "expert_steps": sum(len(d.steps) for d in demos),
    }


def _say_trained(cfg: SftRunConfig, summary: dict[str, Any], say: Callable[[str], None]) -> None:
    examples = summary["examples"]
    if summary["truncated_examples"]:
        say(
            f"[yellow]{summary['truncated_examples']} of {examples} examples are longer than max_len="
            f"{cfg.max_len} tokens (longest prompt {summary['prompt_tokens_max']}): their prompts lose their oldest tokens"
        )
    say(
        f"fine-tuned on {examples} expert steps from {summary['demo_tasks']} tasks "
        f"({summary['demos_won']} won by the expert): {summary['steps']} steps, loss "
        f"{summary['loss_first']:.3f} -> {summary['loss_last']:.3f}, mean target log-prob "
        f"{summary['target_logprob_before']:.2f} -> {summary['target_logprob_after']:.2f}"
    )


def run_sft(
    cfg: SftRunConfig, *, progress: bool = True, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Collect demos, fine-tune, save OUT/model, evaluate before/after if asked; returns the
    summary also written to OUT/sft.json."""
    import torch
    from rich.console import Console

    from spo3.actors.envs.registry import make_env
    from spo3.actors.envs.tasks import task_lists
    from spo3.app.model_init import init_model

    console = Console()
    say = log or console.print
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.monotonic()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = (
        Path(cfg.model) if cfg.model else init_model(out / "base", cfg.model_preset, seed=cfg.seed)
    )
    with console.status("preparing tasks") if progress else contextlib.nullcontext():
        train_tasks, eval_tasks = task_lists(
            cfg.games, Path(cfg.games.cache_dir) if cfg.games.cache_dir else out / "games"
        )
    wanted = train_tasks[: cfg.tasks] if cfg.tasks else train_tasks
    env = make_env(cfg.games.env)
    try:
        if cfg.demos:
            demos = load_demos(cfg.demos, wanted)
            say(f"expert demos of {len(demos)} tasks read from {cfg.demos}")
        else:
            demos = _collect_demos(cfg, env, wanted, progress, console)
        save_demos(out / "demos.json", demos)
        # Only trajectories the expert won (a skipped action may have mattered).
        steps = select_steps(
            [d for d in demos if d.success >= 1.0], tasks=None, fraction=cfg.fraction, seed=cfg.seed
        )
        if not steps:
            raise ValueError(
                f"no expert steps from {len(wanted)} training tasks of {cfg.games.env} "
                f"(stopped: {sorted({d.stopped for d in demos})})"
            )
        model_dir = out / "model"
        summary: dict[str, Any] = {
            "config": cfg.model_dump(),
            "base_model": str(base_dir),
            "model": str(model_dir),
            "train_tasks": len(train_tasks),
            **_demo_summary(demos),
            **_fine_tune(cfg, base_dir, steps, model_dir, progress, console),
        }
        _say_trained(cfg, summary, say)
        if cfg.eval_episodes:
            models = {"base": base_dir, "sft": model_dir} if cfg.eval_base else {"sft": model_dir}
            summary["heldout"] = heldout_success(cfg, env, eval_tasks, models, say)
        summary["seconds"] = round(time.monotonic() - started, 1)
        (out / "sft.json").write_text(json.dumps(summary, indent=2, default=str))
        say(f"model: {model_dir}")
        return summary
    finally:
        env.close()


def heldout_success(
    cfg: SftRunConfig,
    env: Any,
    eval_tasks: Sequence[str],
    models: dict[str, Path],
    say: Callable[[str], None],
) -> dict[str, dict[str, float]]:
    """Held-out success of each model, as `spo3 train` evaluates (spo3.actors.evaluate)."""
    from spo3.actors.evaluate import evaluate
    from spo3.policy.inprocess import InProcessPolicy

    out = {}
    for name, path in models.items():
        t0 = time.monotonic()
        r = evaluate(
            env,
            InProcessPolicy(path, threads=cfg.threads),
            eval_tasks,
            max_steps=cfg.max_steps,
            temperature=cfg.eval_temperature,
            choice_mode=cfg.choice_mode,
            history_len=cfg.history_len,
            episodes=cfg.eval_episodes,
        )
        out[name] = {
            "success": r.success_rate,
            "episodes": len(r.per_task),
            "mean_steps": r.mean_steps,
            "invalid_rate": r.invalid_rate,
            "seconds": round(time.monotonic() - t0, 1),
        }
        say(
            f"held-out success of the {name} model: {r.success_rate:.1%} over {len(r.per_task)} episodes "
            f"(mean steps {r.mean_steps:.1f})"
        )
    return out


# --- configuration files ----------------------------------------------------------------------
def suite_config(path: str | Path, suite: str, **overrides: Any) -> SftRunConfig:
    """The warm start of `suite` in a suites file (configs/sft.yaml): the games, rollout
    (max_steps, choice_mode, history_len) and evaluation settings come from the bench file it
    names (`bench:`, base merged with the suite), the SFT settings from `defaults` merged with the
    suite's entry; then `overrides` (e.g. seed, out). A file without `suites:` is one SftRunConfig."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if "suites" not in data:
        if suite:
            raise ValueError(f"{path} has no suites: give no --suite")
        return SftRunConfig.model_validate({**data, **overrides})
    unknown = sorted(set(data) - {"bench", "defaults", "suites"})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: bench, defaults, suites")
    if not suite:
        raise ValueError(
            f"{path} holds suites ({', '.join(data['suites'])}): choose one with --suite"
        )
    if suite not in data["suites"]:
        raise ValueError(f"unknown suite {suite!r} in {path}; one of {', '.join(data['suites'])}")
    merged: dict[str, Any] = {}
    if data.get("bench"):
        bench_path = Path(data["bench"])
        if not bench_path.is_file() and (path.parent.parent / bench_path).is_file():
            bench_path = path.parent.parent / bench_path  # relative to the repository root
        bench = yaml.safe_load(bench_path.read_text()) or {}
        if suite not in (bench.get("suites") or {}):
            raise ValueError(f"suite {suite!r} is not in {bench_path}")
        base, entry = bench.get("base") or {}, bench["suites"][suite] or {}
        rollout = {**(base.get("rollout") or {}), **(entry.get("rollout") or {})}
        evaluation = {**(base.get("eval") or {}), **(entry.get("eval") or {})}
        merged["games"] = entry["games"]
        merged.update(
            {k: rollout[k] for k in ("max_steps", "choice_mode", "history_len") if k in rollout}
        )
        if "temperature" in evaluation:
            merged["eval_temperature"] = evaluation["temperature"]
        if entry.get("model_preset") or base.get("model_preset"):
            merged["model_preset"] = entry.get("model_preset") or base.get("model_preset")
    merged.update(data.get("defaults") or {})
    merged.update(data["suites"][suite] or {})
    merged.update(overrides)
    return SftRunConfig.model_validate(merged)


def with_seed(cfg: SftRunConfig, seed: int) -> SftRunConfig:
    """`cfg` for seed `seed`: the task split (games.seed) and the base model, expert-step choice
    and example order (seed) all follow it, as `spo3 train` seeds its initial model with games.seed."""
    return cfg.model_copy(
        update={"seed": seed, "games": cfg.games.model_copy(update={"seed": seed})}
    )
