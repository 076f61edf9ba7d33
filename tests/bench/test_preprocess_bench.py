"""bench/preprocess.py runs in its quick mode so that it cannot rot; its timings are not asserted as
speed (CI machines vary), only as the figures of a run that happened."""

import json

import pytest

from bench.preprocess import BASELINE, TARGETS_MS, main


@pytest.mark.slow
def test_quick_preprocess_benchmark_writes_every_case_target_and_accuracy(tmp_path, capsys):
    out = tmp_path / "preprocess.json"
    r = main(baseline=BASELINE, quick=True, output=out)
    assert json.loads(out.read_text()) == r
    cases = r["cases"]
    assert set(cases) == {"png-28-none", "png-28-mnist", "scan-227x224", "phone-jpeg-4000x3000"}
    assert 300_000 < cases["phone-jpeg-4000x3000"]["bytes"] < 600_000  # a phone's 12-megapixel JPEG
    impls = ["before", "after"] if r["baseline"] else ["after"]  # before: from git, absent in a shallow clone
    for case in cases.values():
        for key in impls:
            assert case[f"{key}_ms"] > 0 and case[f"{key}_cpu_ms"] >= 0 and case["iterations"][key] >= 5
        if r["baseline"]:
            assert case["speedup"] == case["before_ms"] / case["after_ms"]
    assert set(r["phone_peak_rss_mb"]) == set(impls)
    assert 0 < r["phone_peak_rss_mb"]["after"] < 12  # never the 12-megapixel decode (12 MB of grey alone)
    if r["baseline"]:
        assert r["phone_peak_rss_mb"]["before"] > 12 * 4  # which the old code decoded and made float32
    assert set(r["targets"]) == set(TARGETS_MS)
    for name, target in r["targets"].items():
        assert target["met"] == (cases[name]["after_ms"] <= target["target_ms"])

    a = r["accuracy"]
    assert a["digits"] == 50
    for key in impls:
        assert a[key] >= a["raw_mnist"] - 0.04, a  # two of 50 photos at most
        right = [int(name[0]) == digit for name, digit in r["examples"][key].items()]
        assert len(right) == 13 and sum(right) >= 12, r["examples"][key]
    if r["baseline"]:
        assert 0 < a["mean_abs_change"] < 0.05  # the outputs moved, a little
    printed = capsys.readouterr().out
    assert "median ms per image" in printed and "photo accuracy" in printed
