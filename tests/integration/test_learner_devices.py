"""Device placement in the learner, checked on a CPU: every tensor the trainer makes names its
device, and every tensor it hands to a collective lives on the engine's device.

On a CPU machine both are "cpu", so a tensor made without a device would pass unnoticed (that is
how every GPU learner came to die at its first update: NCCL has no CPU backend). Here the
trainer module's torch makes such tensors on the "meta" device instead, and its collectives
reject any tensor that is not on the engine's device, so the same mistake fails on a CPU.
"""

from __future__ import annotations

import random
import types

import pytest
import torch
import torch.distributed as real_dist

import spo3.learner.trainer as trainer_module
from spo3.app.model_init import init_model
from spo3.learner.batch import Row
from spo3.learner.trainer import Trainer, TrainerConfig, micro_batches, padding_counts

pytestmark = pytest.mark.slow

_FACTORIES = (
    "tensor",
    "as_tensor",
    "zeros",
    "ones",
    "full",
    "empty",
    "arange",
    "rand",
    "randn",
    "randint",
)


def _explicit_device_torch() -> types.SimpleNamespace:
    """torch, but the tensor factories put a tensor made without `device=` on "meta"."""

    def wrap(fn):
        def make(*args, **kwargs):
            kwargs.setdefault("device", "meta")
            return fn(*args, **kwargs)

        return make

    ns = types.SimpleNamespace(
        **{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")}
    )
    for name in _FACTORIES:
        setattr(ns, name, wrap(getattr(torch, name)))
    return ns


class _CheckedCollectives:
    """torch.distributed, but a collective on a tensor off the engine's device is an error."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.calls = device, []

    def __getattr__(self, name):
        return getattr(real_dist, name)

    def _check(self, name: str, tensor: torch.Tensor) -> None:
        self.calls.append((name, tensor.device))
        if tensor.device != self.device:
            raise AssertionError(
                f"dist.{name} on a tensor on {tensor.device}; the engine runs on {self.device}"
            )

    def all_reduce(self, tensor, *args, **kwargs):
        self._check("all_reduce", tensor)
        return real_dist.all_reduce(tensor, *args, **kwargs)

    def broadcast(self, tensor, *args, **kwargs):
        self._check("broadcast", tensor)
        return real_dist.broadcast(tensor, *args, **kwargs)

    def all_gather(self, tensors, tensor, *args, **kwargs):
        self._check("all_gather", tensor)
        return real_dist.all_gather(tensors, tensor, *args, **kwargs)


def rows(n: int = 9, seed: int = 0) -> list[Row]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, 200) for _ in range(rng.randint(2, 30))]
        response = [rng.randrange(3, 200) for _ in range(rng.randint(1, 8))]
        out.append(
            Row(prompt, response, rng.choice([-1.0, 0.5, 1.5]), [-1.0] * len(response), 0, f"g{i}")
        )
    return out


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    model_dir = init_model(tmp_path_factory.mktemp("model"), "tiny", seed=0)
    return Trainer(TrainerConfig(model=str(model_dir), lr=1e-3, micro_batch_rows=4))


def test_every_tensor_states_its_device_and_collectives_run_on_the_engines(trainer, monkeypatch):
    checked = _CheckedCollectives(trainer.device)
    monkeypatch.setattr(trainer_module, "torch", _explicit_device_torch())
    monkeypatch.setattr(trainer_module, "dist", checked)
    out = trainer.update(rows())
    assert out.rows == 9 and out.tokens == sum(len(r.response_ids) for r in rows())
    assert [name for name, _ in checked.calls].count("all_reduce") >= 2


def test_the_check_catches_a_collective_on_a_tensor_without_a_device(trainer, monkeypatch):
    """The mistake that reached the GPU: a tensor made without a device handed to all_reduce."""
    checked = _CheckedCollectives(trainer.device)
    monkeypatch.setattr(trainer_module, "torch", _explicit_device_torch())
    monkeypatch.setattr(trainer_module, "dist", checked)

    def old_sum(self, values):  # the code as it was: no device
        t = trainer_module.torch.tensor(list(values), dtype=torch.float64)
        trainer_module.dist.all_reduce(t)
        return t.tolist()

    monkeypatch.setattr(Trainer, "_sum_across_ranks", old_sum)
    with pytest.raises(AssertionError, match="dist.all_reduce on a tensor on meta"):
        trainer.update(rows())


def test_micro_batches_group_rows_of_like_length():
    batch = rows(32, seed=3)
    plain = [batch[i : i + 8] for i in range(0, 32, 8)]
    bucketed = micro_batches(batch, 8)
    assert sorted(id(r) for mb in bucketed for r in mb) == sorted(id(r) for r in batch)
    assert all(len(mb) <= 8 for mb in bucketed)
    real, padded = padding_counts(bucketed)
    real_plain, padded_plain = padding_counts(plain)
    assert real == real_plain == sum(len(r.prompt_ids) + len(r.response_ids) for r in batch)
    assert real <= padded < padded_plain
    # max_len caps every row as the trainer's padding does
    capped_real, capped_padded = padding_counts(micro_batches(batch, 8, max_len=10), max_len=10)
    assert capped_real == sum(min(10, len(r.prompt_ids) + len(r.response_ids)) for r in batch)
    assert capped_real <= capped_padded <= 32 * 10


def test_rows_longer_than_max_len_are_counted(trainer):
    """A row cut to max_len is trained on a shorter context than the one sampled from; every update
    says how many rows that was."""
    batch = rows(6, seed=5)
    longest = max(len(r.prompt_ids) + len(r.response_ids) for r in batch)
    limit = trainer.cfg.max_len
    try:
        assert trainer.update(batch).truncated_rows == 0
        trainer.cfg.max_len = longest - 1
        expect = sum(len(r.prompt_ids) + len(r.response_ids) > longest - 1 for r in batch)
        assert expect >= 1 and trainer.update(batch).truncated_rows == expect
    finally:
        trainer.cfg.max_len = limit
