"""bench/report.py's tables read the right figures out of a run's JSON."""

from bench.bench import FORM_NONE, FORM_SCAN
from bench.report import forms_table, routing_before_after

Rates = dict[int, float]  # images/s by batch size


def run(fp32: Rates, int8: Rates, again: Rates, c32: float, c1_ms: float) -> dict:
    """A `python -m bench` result with only what the routing table reads (each p50 = B / rate)."""

    def rows(rates: Rates) -> list[dict]:
        return [{"batch": b, "images_per_s": v, "p50_ms": 1e3 * b / v} for b, v in rates.items()]

    def http(case: str, c: int, rps: float, p50: float) -> dict:
        return {"case": case, "connections": c, "requests_per_s": rps, "p50_ms": p50}

    ratio = {"ort_best_vs_conv_ceiling": {"value": 0.8}, "int8_best_vs_fp32_best": {"value": 2.5}}
    return {
        "raw": {"onnxruntime": rows(fp32), "onnxruntime_int8": rows(int8)},
        "raw_again": {"onnxruntime": rows(again)},
        "http": [
            http("service, batcher on", 32, c32, 80.0),
            http("service, batcher on", 1, 250.0, c1_ms),
            http("service int8, batcher on", 32, 2 * c32, 30.0),
            http("service int8, batcher on", 64, 3 * c32, 60.0),
            http("service int8, batcher on", 1, 500.0, c1_ms / 2),
        ],
        "ratios": ratio,
    }


def test_routing_table_takes_each_reference_from_the_better_pass():
    before = run({1: 250.0, 32: 400.0}, {1: 500.0, 32: 1000.0}, {1: 200.0, 32: 440.0}, 401.0, 3.3)
    after = run({1: 200.0, 128: 460.0}, {1: 400.0, 32: 1300.0}, {1: 225.0, 128: 450.0}, 409.0, 3.5)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in routing_before_after(before, after)]
    rows = {c[0]: c[1:] for c in cells if len(c) == 3}
    # the second pass's 440 at B = 32 beats the first pass's 400; after, the first pass's 460 at B = 128
    assert rows["raw fp32 onnxruntime, images/s at its best batch"] == ["440 (B = 32)", "460 (B = 128)"]
    # B = 1 p50: the faster of the two passes (1000 / 250 = 4.00 ms before, 1000 / 225 = 4.44 after)
    assert rows["raw fp32 B = 1, p50 ms"] == ["4.00", "4.44"]
    assert rows["raw int8 onnxruntime, images/s at its best batch"] == ["1,000 (B = 32)", "1,300 (B = 32)"]
    assert rows["service fp32, requests/s at concurrency 32"] == ["401", "409"]
    assert rows["service int8, requests/s at concurrency 64"] == ["1,203", "1,227"]
    assert rows["service int8, p50 ms at concurrency 1"] == ["1.65", "1.75"]


def form_row(case: str, c: int, p50: float, own: float, cold: float, in_process: float | None) -> dict:
    row = {"case": case, "connections": c, "p50_ms": p50, "server_core_ms_per_request": 6.0 + own,
           "event_loop_core_ms_per_request": 0.5 + own, "own_cost_ms": own,
           "own_cost_after_inference_ms": cold}  # fmt: skip
    return row if in_process is None else {**row, "in_process_ms": in_process}


def forms_run(with_in_process: bool) -> dict:
    def ip(ms: float) -> float | None:
        return ms if with_in_process else None

    return {
        "http": [
            form_row(FORM_NONE, 1, 6.00, 0.03, 0.13, ip(4.60)),
            form_row(FORM_NONE, 32, 90.0, 0.03, 0.13, ip(4.60)),
            form_row(FORM_SCAN, 1, 8.75, 1.77, 2.20, ip(7.20)),
            form_row(FORM_SCAN, 32, 120.0, 1.77, 2.20, ip(7.20)),
        ]
    }


def test_forms_table_holds_the_server_against_one_process_at_concurrency_1():
    lines = forms_table(forms_run(with_in_process=True))
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    rows = {(c[0], c[1]): c[2:] for c in cells[2:]}
    # the scan at 1: its p50 2.75 ms beyond a PNG taken as it is, the same sequence in one process
    # 7.20 - 4.60 = 2.60 ms beyond: the server adds 0.15 ms of its own
    own, cold, _, _, _, p50, one, server = rows[FORM_SCAN, "1"]
    assert (own, cold, p50) == ("1.74", "2.07", "2.75")
    assert (one, server) == ("2.60", "0.15")
    assert rows[FORM_SCAN, "32"][-2:] == ["—", "—"]  # a p50 under load is mostly queueing
    assert cells[0][-2:] == ["in one process, ms", "the server's own, ms"]
    # a result file from before the column: the table as it was
    old = [[c.strip() for c in line.strip("|").split("|")] for line in forms_table(forms_run(False))]
    assert len(old[0]) == 8 and old[2][:2] == [FORM_SCAN, "1"] and len(old[2]) == 8
