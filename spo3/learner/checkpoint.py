"""Checkpoints: the policy in Hugging Face format (safetensors, loadable by transformers and
vLLM), the DeepSpeed engine state (optimizer, schedulers), and the learner's own position."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import BaseModel


class CheckpointMeta(BaseModel):
    version: int
    unacked: list[str]
    """Stream entries whose updates this checkpoint contains but that were not acknowledged yet."""
    groups_used: int = 0
    groups_dropped_stale: int = 0


def latest(root: str | Path) -> Path | None:
    marker = Path(root) / "latest"
    if not marker.exists():
        return None
    return Path(root) / marker.read_text().strip()


def save(trainer, root: str | Path, meta: CheckpointMeta, *, keep: int = 2) -> Path:
    """Written to a fresh folder, then `latest` is switched to it, so a crash mid-save leaves
    the previous checkpoint in charge. Every rank calls it; rank 0 writes the HF weights, the
    position and `latest`."""
    root = Path(root)
    name = f"v{meta.version:08d}"
    path = root / name
    # Both collectives, called by every rank: the engine state (each rank writes its own
    # partitions of the optimizer state, and under ZeRO-3 of the weights), and the gathered weights.
    trainer.engine.save_checkpoint(str(path / "ds"), tag="state")
    weights = trainer.state_dict()  # rank 0: the full weights; None elsewhere
    if weights is not None:
        trainer.engine.module.save_pretrained(
            path / "hf", safe_serialization=True, state_dict=weights
        )
        _copy_tokenizer(trainer.cfg.model, path / "hf")
        (path / "meta.json").write_text(meta.model_dump_json(indent=1))
        tmp = root / "latest.tmp"
        tmp.write_text(name)
        tmp.replace(root / "latest")
        old = sorted(p for p in root.glob("v*") if p.is_dir() and p.name != name)
        for p in old[: -(keep - 1)] if keep > 1 else old:
            shutil.rmtree(p, ignore_errors=True)
    return path


def load(trainer, path: Path) -> CheckpointMeta:
    """Every rank: its partitions of the engine state (ZeRO-3: of the weights too), and the
    position."""
    trainer.engine.load_checkpoint(str(path / "ds"), tag="state")
    return CheckpointMeta.model_validate_json((path / "meta.json").read_text())


def _copy_tokenizer(src: str, dst: Path) -> None:
    for f in Path(src).iterdir():
        if f.name.startswith(
            ("tokenizer", "special_tokens", "chat_template", "vocab", "merges", "generation_config")
        ):
            shutil.copy2(f, dst / f.name)
