"""Run by the tests under torchrun: a few updates on fixed rows, then each rank writes its
weights to OUT/rank{r}.safetensors."""

import sys

from safetensors.torch import save_file

from spo3.learner.trainer import Trainer, TrainerConfig
from tests.integration.test_learner_trainer import fixed_rows

model_dir, out_dir, updates, micro = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
trainer = Trainer(TrainerConfig(model=model_dir, lr=1e-2, micro_batch_rows=micro, zero_stage=2))
for u in range(updates):
    trainer.update(fixed_rows(u))
save_file(
    # Each rank's own full copy (ZeRO-2): state_dict() gives the weights to rank 0 alone.
    {k: v.detach().contiguous() for k, v in trainer.engine.module.state_dict().items()},
    f"{out_dir}/rank{trainer.rank}.safetensors",
)
