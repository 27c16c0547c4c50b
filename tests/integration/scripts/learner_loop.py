"""Run by tests/integration/test_learner_distributed.py under torchrun: the learner loop
(`run_learner`) on a real Redis stream, publishing after every update to a recording publisher
and checkpointing as told; then every rank joins the weights' gather and rank 0 writes
OUT/final.safetensors, OUT/published.safetensors (the last weights published) and
OUT/result.json.

    learner_loop.py MODEL REDIS_URL RUN CKPT_DIR OUT ZERO_STAGE MICRO_ROWS UPDATES CKPT_EVERY RESUME [SHARE]

SHARE (0 or 1, default 0): the trainer's share_prompts.
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from spo3.learner.loop import LearnerConfig, run_learner
from spo3.learner.trainer import TrainerConfig

model, redis_url, run, ckpt, out = sys.argv[1:6]
stage, micro, updates, every, resume = (int(a) for a in sys.argv[6:11])
share = bool(int(sys.argv[11])) if len(sys.argv) > 11 else False


class Recorder:
    """A WeightSink that keeps the last weights it was handed (rank 0 only is handed any)."""

    def __init__(self) -> None:
        self.versions: list[int] = []
        self.last: dict = {}

    def publish(self, version, weights) -> None:
        self.versions.append(version)
        self.last = {k: v.detach().clone().contiguous() for k, v in weights.items()}


cfg = LearnerConfig(
    redis_url=redis_url,
    run=run,
    checkpoint_dir=ckpt,
    groups_per_update=1,
    max_staleness=1000,
    publish_every=1,
    checkpoint_every=every,
    max_updates=updates,
    exit_when_idle_s=5.0,
    resume=bool(resume),
    trainer=TrainerConfig(
        model=model,
        lr=1e-2,
        zero_stage=stage,
        micro_batch_rows=micro,
        ppo_epochs=2,
        share_prompts=share,
        # ZeRO-3 keeps parameters under 1e5 elements whole on every rank by default, and keeps
        # gathered ones for reuse: the tiny model's would be gathered once, if at all. Partition
        # every one and gather it again in every forward, as a real model's are.
        deepspeed={
            "zero_optimization": {
                "stage3_param_persistence_threshold": 0,
                "stage3_max_reuse_distance": 0,
                "stage3_prefetch_bucket_size": 0,
            }
        }
        if stage == 3
        else {},
    ),
)
recorder = Recorder()
result = run_learner(cfg, recorder)
# The trainer is gone with run_learner; its checkpoint holds the final weights (rank 0 wrote
# them from the gathered ZeRO-3 partitions).
import torch.distributed as dist  # noqa: E402

from spo3.learner import checkpoint  # noqa: E402

if dist.get_rank() == 0:
    latest = checkpoint.latest(ckpt)
    assert latest is not None
    from safetensors.torch import load_file

    save_file(load_file(str(latest / "hf" / "model.safetensors")), f"{out}/final.safetensors")
    if recorder.last:
        save_file(recorder.last, f"{out}/published.safetensors")
    Path(out, "result.json").write_text(
        json.dumps(
            {
                "version": result.version,
                "published": recorder.versions,
                "checkpoint": latest.name,
                "world": dist.get_world_size(),
            }
        )
    )
dist.barrier()
