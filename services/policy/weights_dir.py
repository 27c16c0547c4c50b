"""Weight republishing through a directory, for in-process policy engines (the single-machine
default): the learner writes each version as safetensors and records the version in Redis;
every actor's engine checks that key before sampling and loads the new version when it moves.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping, Sequence

import redis

from services.contracts import ChatMessage, Completion, SamplingParams
from services.redis_names import RedisNames


def version_dir(root: str | Path, version: int) -> Path:
    return Path(root) / f"v{version:08d}"


class DirectoryPublisher:
    def __init__(self, root: str | Path, client: redis.Redis, run: str = "default", *, keep: int = 3) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.client = client
        self.key = RedisNames(run).published_version
        self.keep = keep

    def publish(self, version: int, weights: Mapping[str, "object"]) -> None:
        from safetensors.torch import save_file

        target = version_dir(self.root, version)
        tmp = target.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        tmp.replace(target)  # readers never see a half-written version
        self.client.set(self.key, version)
        for old in sorted(p for p in self.root.glob("v*") if p.is_dir())[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


class FollowingPolicy:
    """Wraps an in-process engine: before each sample, moves to the newest published version."""

    def __init__(self, engine, root: str | Path, client: redis.Redis, run: str = "default") -> None:
        self.engine, self.root, self.client = engine, Path(root), client
        self.key = RedisNames(run).published_version
        self.reloads = 0

    def refresh(self) -> int:
        raw = self.client.get(self.key)
        latest = int(raw) if raw is not None else 0
        if latest > self.engine.version:
            from safetensors.torch import load_file

            path = version_dir(self.root, latest) / "model.safetensors"
            try:
                weights = load_file(str(path))
            except FileNotFoundError:
                return self.engine.version  # already rotated away: a newer one is coming
            self.engine.publish(latest, weights)
            self.reloads += 1
        return self.engine.version

    def sample(self, messages: Sequence[ChatMessage], params: SamplingParams) -> list[Completion]:
        self.refresh()
        return self.engine.sample(messages, params)
