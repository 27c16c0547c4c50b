"""A DeepSpeed op build killed mid-way leaves its lock file, and every later learner start waited
on it forever; starts now remove such leftovers."""

import os
import time

from spo3.learner.trainer import clear_stale_build_locks


def test_only_locks_older_than_any_build_are_removed(tmp_path):
    stale, live = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert clear_stale_build_locks(tmp_path, older_than_s=600) == [stale]
    assert not stale.exists() and live.exists()  # a build may hold this one right now
    assert clear_stale_build_locks(tmp_path, older_than_s=600) == []
