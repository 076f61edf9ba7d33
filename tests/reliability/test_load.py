"""Sustained load, overload and SIGTERM against the real `capsnet serve` (quick mode; the full run is
`python -m bench.load --seconds 300`, figures in the README)."""

import os

import pytest

from bench.load import graceful_shutdown, overload, sustained_load
from tests.tools import installed_tool

pytestmark = pytest.mark.slow
SECONDS = float(os.environ.get("CAPSNET_LOAD_SECONDS", "20"))


def test_sustained_load_has_no_errors_and_flat_memory():
    installed_tool("wrk", "Debian package wrk")
    r = sustained_load(SECONDS, concurrency=64)
    assert r["requests_per_s"] > 0 and r["p99_ms"] > 0
    assert r["non_2xx"] == 0 and r["socket_errors"] == ""
    assert r["rss_growth"] <= 0.10, r
    assert r["log_tracebacks"] == 0, r  # wrk drops its connections mid-request when it stops


def test_overload_is_refused_quickly_and_the_service_recovers():
    r = overload(6.0, factor=4.0, queue_size=32)
    statuses = r["flood"]["status"]
    assert set(statuses) <= {"200", "503"}, r  # no 5xx other than the documented 503, no dropped socket
    assert statuses["503"]["count"] > statuses.get("200", {"count": 0})["count"] / 2, r
    assert r["rejected_with_retry_after"] == statuses["503"]["count"]
    # a refusal is fast, and what was accepted waited at most a bounded queue
    assert statuses["503"]["p99_ms"] < 1000, r
    assert statuses["200"]["p99_ms"] < 10_000, r
    assert set(r["recovery"]["status"]) == {"200"}, r
    assert r["log_tracebacks"] == 0, r


def test_sigterm_lets_in_flight_requests_finish_and_refuses_new_ones():
    r = graceful_shutdown(load_seconds=2.0, concurrency=16)
    assert r["exit_code"] in (0, -15) and r["clean_shutdown_logged"], r
    assert r["exit_after_sigterm_s"] < 30, r  # uvicorn's graceful-shutdown limit in `capsnet serve`
    assert r["in_flight_at_sigterm"] > 0 and r["in_flight_answered_200"] == r["in_flight_at_sigterm"], r
    assert set(r["before_sigterm"]["status"]) == {"200"}, r
    assert set(r["after_sigterm_0_25_s"]["status"]) <= {"0"}, r  # refused, never a half answer or a 5xx
    assert r["new_connection_accepted_after_0_5_s"] is False
    assert r["log_tracebacks"] == 0, r
