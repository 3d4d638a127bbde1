"""The benchmark report's arithmetic (benchmarks/run.py), on recorded figures."""

from __future__ import annotations

import pytest

from benchmarks import run


def _summary(cpu_us, loadgen_us, fake_us, cores, tokens_per_s=20_000.0):
    return {
        "server_cpu_us_per_token": cpu_us,
        "loadgen_cpu_us_per_token": loadgen_us,
        "fake_cpu_us_per_token": fake_us,
        "server_cpu_s_each": {f"daphne-{i}": c * 10 for i, c in enumerate(cores)},
        "elapsed_s": 10,
        "tokens_per_s": tokens_per_s,
        "errors": 0,
        **dict.fromkeys(("complete", "requests"), 4000),
        **dict.fromkeys(("ttft_p50_ms", "ttft_p99_ms", "gap_p99_ms", "tokens_per_frame"), 1.0),
        "other_cpu_pct": 1.0,
    }


def test_scaling_ceiling_counts_the_harness_on_the_shared_cores():
    # The recorded run at 5adea4f: 38.9 µs a token on 0.98 of a core alone; the harness
    # 1.4 + 4.5 µs a token then and 6.3 + 4.3 with two processes (the lower one counts).
    one = _summary(38.9, 1.4, 4.5, [0.98])
    two = _summary(51.0, 6.3, 4.3, [0.86, 0.64])
    assert run.harness_cpu_us_per_token(one, two) == pytest.approx(5.9)
    assert run.scaling_ceiling(one, two) == pytest.approx(2 * 38.9 / (0.98 * 44.8))
    assert run.scaling_ceiling(one, two) < 1.8


def test_the_ceiling_is_two_for_a_free_harness_and_a_whole_core():
    one = _summary(40.0, 0.0, 0.0, [1.0])
    assert run.scaling_ceiling(one, _summary(40.0, 0.0, 0.0, [1.0, 1.0])) == pytest.approx(2.0)


def test_the_report_states_the_ceiling_beside_the_measured_ratio():
    one = _summary(48.5, 2.2, 10.3, [0.99], tokens_per_s=20_344.5)
    two = _summary(70.9, 7.3, 9.9, [0.82, 0.63], tokens_per_s=20_474.4)
    results = {"scaling": {"1000:4000": {"chatsite-1": one, "chatsite-2": two}}}
    text = "\n".join(run.scaling_lines(results))
    assert "= **1.61x**; measured: 1.01x." in text
    assert "2 × 48.5 / (0.99 × (48.5 + 12.5))" in text
