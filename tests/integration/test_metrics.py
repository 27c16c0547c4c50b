"""Metrics whose meaning takes more than a counter increment: new states, refused weights, and the
metrics endpoints of actors and the learner."""

from __future__ import annotations

import re

import httpx
import pytest
from prometheus_client import REGISTRY

from spo3.actors.worker import _ObservedStore
from spo3.app.model_init import init_model
from spo3.transport.connection import connect

pytestmark = [pytest.mark.redis]


def test_new_states_are_counted_once_when_first_met(store):
    observed = _ObservedStore(store)
    observed.scores(["root", "a"])  # both unseen by any committed path
    observed.commit_leaf(
        "l1", ["root", "a", "b"], 1.0
    )  # b was never scored: looked up before the commit
    observed.commit_leaf("l2", ["root", "a", "b"], 0.0)
    assert observed.new_states() == 3
    later = _ObservedStore(store)  # another rollout: these states are known now
    later.scores(["root", "a", "c"])
    later.commit_leaf("l3", ["root", "a", "c"], 0.0)
    assert later.new_states() == 1


def test_weights_with_a_bad_checksum_are_refused_and_counted(redis_url, tmp_path):
    from safetensors.torch import load_file

    from spo3.policy.follow import FollowingPolicy
    from spo3.policy.inprocess import InProcessPolicy
    from spo3.policy.publish import CHECKSUM_FILE, DirectoryPublisher, version_dir

    model_dir = init_model(tmp_path / "model", "tiny", seed=0)
    client = connect(redis_url)
    weights = load_file(str(model_dir / "model.safetensors"))
    publisher = DirectoryPublisher(tmp_path / "w", client, "ck")
    follower = FollowingPolicy(InProcessPolicy(model_dir, threads=1), tmp_path / "w", client, "ck")
    failures = REGISTRY.get_sample_value("spo3_policy_checksum_failures_total")
    publisher.publish(1, weights)
    (version_dir(tmp_path / "w", 1) / CHECKSUM_FILE).write_text(
        "0" * 64 + "\n"
    )  # as if the file were damaged
    assert (
        follower.refresh() == 0 and follower.refresh() == 0
    )  # refused once, not retried on every sample
    assert REGISTRY.get_sample_value("spo3_policy_checksum_failures_total") == failures + 1
    publisher.publish(2, weights)
    assert follower.refresh() == 2 and follower.reloads == 1


def test_learner_serves_its_metrics_and_the_stream_backlog(redis_url, tmp_path):
    import threading

    from spo3.learner.loop import LearnerConfig, run_learner
    from spo3.learner.trainer import TrainerConfig
    from spo3.transport.procs import free_port
    from spo3.transport.stream import GroupStream
    from tests.integration.test_learner_resume import groups

    model_dir = init_model(tmp_path / "model", "tiny", seed=0)
    stream = GroupStream(connect(redis_url), "lm")
    for g in groups()[:4]:
        stream.append(g)
    port, stop, seen = free_port(), threading.Event(), []
    # The registry is per process: other tests in this process may have counted updates already.
    base = REGISTRY.get_sample_value("spo3_learner_updates_total") or 0.0

    def updates(text: str) -> float:
        m = re.search(r"^spo3_learner_updates_total (\S+)$", text, re.M)
        return float(m.group(1)) if m else -1.0

    def scrape():  # while the learner runs, from another thread, as Prometheus would
        while not stop.is_set():
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                if updates(text) == base + 2:
                    seen.append(text)
                    return
            except httpx.TransportError:
                pass
            stop.wait(0.1)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    cfg = LearnerConfig(
        redis_url=redis_url,
        run="lm",
        checkpoint_dir=str(tmp_path / "ck"),
        groups_per_update=2,
        max_staleness=1000,
        checkpoint_every=100,
        exit_when_idle_s=8.0,
        metrics_port=port,
        trainer=TrainerConfig(model=str(model_dir), lr=0.01),
    )
    result = run_learner(cfg)
    stop.set()
    scraper.join()
    assert result.version == 2 and seen, "the learner's /metrics never showed its updates"
    text = seen[0]
    for name in (
        "spo3_learner_stream_length",
        "spo3_learner_stream_pending",
        "spo3_learner_grad_norm",
        "spo3_learner_kl",
        "spo3_learner_last_update_timestamp_seconds",
    ):
        assert f"\n{name} " in text, name
    # Read but not yet acknowledged (no checkpoint yet): all 4 entries are pending.
    assert "\nspo3_learner_stream_pending 4.0" in text
    with pytest.raises(httpx.TransportError):  # the server stops with the learner
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
