"""bench/report.py's tables read the right figures out of a run's JSON."""

from bench.report import routing_before_after

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
