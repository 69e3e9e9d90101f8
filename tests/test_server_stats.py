"""Reading a server's /metrics during a bench run: vLLM's queue gauges and our memory gauge."""

from __future__ import annotations

from sloserve_runtime.measure.server_stats import metrics_url, parse, summarize_samples

METRICS = """# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:num_requests_waiting{engine="1",model_name="m"} 3.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 16.0
# HELP sloserve_server_resident_memory_bytes Resident memory of the server.
# TYPE sloserve_server_resident_memory_bytes gauge
sloserve_server_resident_memory_bytes 2.097152e+09
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.0e+08
"""


def test_gauges_are_summed_over_engines_and_others_ignored():
    assert parse(METRICS) == {
        "vllm:num_requests_waiting": 10.0,
        "vllm:num_requests_running": 16.0,
        "sloserve_server_resident_memory_bytes": 2.097152e09,
    }


def test_a_run_summarises_its_samples_and_skips_the_gaps():
    low = parse(METRICS)
    high = {**low, "vllm:num_requests_waiting": 30.0, "sloserve_server_resident_memory_bytes": 3 * 2**30}
    stats = summarize_samples([low, {}, high, low])
    assert stats.samples == 3 and stats.waiting_max == 30.0 and stats.waiting_mean == 50.0 / 3
    assert stats.running_max == 16.0
    assert (stats.rss_start_mb, stats.rss_peak_mb, stats.rss_end_mb) == (2000.0, 3072.0, 2000.0)
    assert summarize_samples([{}, {}]) is None


def test_metrics_sit_beside_the_openai_base_url():
    assert metrics_url("http://127.0.0.1:8011/v1") == "http://127.0.0.1:8011/metrics"
    assert metrics_url("http://host:9/v1/") == "http://host:9/metrics"


def test_the_prefix_cache_counters_are_read():
    text = """# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1200.0
# HELP vllm:prefix_cache_hits Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 900.0
"""
    assert parse(text) == {"vllm:prefix_cache_queries_total": 1200.0, "vllm:prefix_cache_hits_total": 900.0}
