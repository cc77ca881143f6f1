"""The serving benchmark's statistics and its loopback-only rule."""

import pytest

from jobs.bench.serving import (
    Outcome,
    batching_summary,
    check_loopback,
    format_table,
    summarize,
)


def test_summary_counts_errors_by_kind_and_takes_percentiles_of_successes():
    outcomes = [Outcome(200, s, 2) for s in (1.0, 2.0, 3.0, 4.0, 5.0)] + [Outcome(400, 0.01, 0), Outcome(503, 9.0, 0), Outcome(0, 30.0, 0)]
    summary = summarize(outcomes, wall_seconds=5.0)
    assert (summary["requests"], summary["ok"], summary["errors_4xx"], summary["errors_5xx"], summary["errors_connection"]) == (
        8,
        5,
        1,
        1,
        1,
    )
    assert summary["images"] == 10 and summary["images_per_s"] == pytest.approx(2.0)
    # numpy's linear interpolation over the 5 successful latencies 1..5: p50 = 3, p95 = 4.8, p99 = 4.96.
    assert (summary["latency_p50_s"], summary["latency_p95_s"], summary["latency_p99_s"]) == pytest.approx((3.0, 4.8, 4.96))
    assert "4.800" in format_table({"run": summary})


def test_summary_of_only_failures_has_no_latencies():
    summary = summarize([Outcome(500, 1.0, 0)], wall_seconds=1.0)
    assert summary["ok"] == 0 and summary["latency_p50_s"] is None and summary["images_per_s"] == 0.0
    assert "      -" in format_table({"run": summary})


@pytest.mark.parametrize(
    "url, port", [("http://127.0.0.1:8000", 8000), ("http://localhost:9", 9), ("http://127.3.2.1", 80), ("http://[::1]:8000", 8000)]
)
def test_loopback_urls_pass(url, port):
    assert check_loopback(url)[1] == port


@pytest.mark.parametrize(
    "url, words",
    [
        ("http://10.0.0.5:8000", "only to this machine"),
        ("http://example.com", "only to this machine"),
        ("https://127.0.0.1:8000", "must look like"),
        ("127.0.0.1:8000", "must look like"),
    ],
)
def test_other_hosts_are_refused(url, words):
    with pytest.raises(ValueError, match=words):
        check_loopback(url)


def test_batching_summary_reads_one_replicas_counters():
    before = {"replica": "r1", "batches": 10, "images": 100, "padding": 60}
    after = {"replica": "r1", "batches": 14, "images": 156, "padding": 68}
    assert batching_summary(before, after) == pytest.approx({"mean_batch": 14.0, "padding_fraction": 8 / 64})
    # Counters of two different replicas (or a missing reading) say nothing about batching.
    assert batching_summary(before, {**after, "replica": "r2"}) == {}
    assert batching_summary(None, after) == {} and batching_summary(before, before) == {}
