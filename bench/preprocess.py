"""Photo preprocessing before and after OpenCV (issue 17), side by side in one run: median time per
image, the photo test's accuracy and the examples' predictions, and how far the outputs moved.

"Before" is `service/preprocess.py` as it was at `--baseline` (the numpy + Pillow code), loaded from
git into a module of its own; "after" is the working tree's. Both run in the same process on the same
inputs, interleaved, so that the ratios hold on a machine other work is slowing down.

    python -m bench.preprocess [--quick] [--output bench/results/preprocess-2core.json]

Run it from the repository root: the photos are rendered by `tests/service/photos.py`.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "331dcf8"  # the last commit of the numpy + Pillow preprocessing
MAX_PIXELS = 16_000_000  # the service's default CAPSNET_MAX_IMAGE_PIXELS
TARGETS_MS = {"png-28-mnist": 0.3, "scan-227x224": 1.5, "phone-jpeg-4000x3000": 15.0}  # issue 17


def load_baseline(rev: str) -> ModuleType | None:
    """service/preprocess.py at `rev` as a module of its own, or None where git does not have it."""
    try:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:service/preprocess.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    name = f"preprocess_at_{rev}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    exec(compile(source, f"{rev}:service/preprocess.py", "exec"), module.__dict__)  # noqa: S102
    return module


def machine() -> dict[str, Any]:
    import cv2
    import PIL

    from bench.bench import machine as common

    return {
        **common(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "opencv": cv2.__version__,
        "load_average_at_start": os.getloadavg()[0],
    }


def inputs() -> dict[str, tuple[bytes, str, str]]:
    """name -> (encoded image, preprocess mode, what it is)."""
    from PIL import Image

    from capsnet.model_export.data import load_split
    from tests.service.photos import render_photo

    digit = load_split("mnist", "test")[0][0]  # a 7
    png = io.BytesIO()
    Image.fromarray(digit).save(png, "PNG")
    # A phone photo: 12 megapixels, tinted paper, JPEG quality 75, about 400 KB.
    phone = render_photo(
        digit,
        np.random.default_rng(0),
        canvas=(3000, 4000),
        scale=50.0,
        noise=0.0085,
        quality=75,
        tint=(1.0, 0.96, 0.88),
    )
    return {
        "png-28-none": (png.getvalue(), "none", "28x28 PNG, preprocess=none"),
        "png-28-mnist": (png.getvalue(), "mnist", "28x28 PNG, preprocess=mnist"),
        "scan-227x224": (
            (ROOT / "examples" / "7.png").read_bytes(),
            "mnist",
            "examples/7.png, a 227x224 scan",
        ),
        "phone-jpeg-4000x3000": (phone, "mnist", f"4000x3000 RGB JPEG, {len(phone) / 1000:.0f} KB"),
    }


def time_cases(
    impls: dict[str, ModuleType], cases: dict[str, tuple[bytes, str, str]], quick: bool
) -> dict[str, dict[str, Any]]:
    """Median ms per image of each implementation on each case, the two taking turns in rounds: wall
    time, and the process's CPU time (all its threads), which other work on the machine inflates less."""
    out: dict[str, dict[str, Any]] = {}
    for name, (data, mode, what) in cases.items():
        budget = 0.3 if quick else 4.0  # seconds per implementation and case
        samples: dict[str, list[float]] = {k: [] for k in impls}
        cpu: dict[str, list[float]] = {k: [] for k in impls}
        for impl in impls.values():  # warm-up: imports, caches, first-call costs
            impl.preprocess_bytes(data, mode=mode, max_pixels=MAX_PIXELS)
        spent = dict.fromkeys(impls, 0.0)
        while min(spent.values()) < budget or min(len(s) for s in samples.values()) < 5:
            for key, impl in impls.items():
                for _ in range(5):
                    t0, c0 = time.perf_counter(), time.process_time()
                    impl.preprocess_bytes(data, mode=mode, max_pixels=MAX_PIXELS)
                    dt = time.perf_counter() - t0
                    cpu[key].append((time.process_time() - c0) * 1e3)
                    samples[key].append(dt * 1e3)
                    spent[key] += dt
        out[name] = {"what": what, "bytes": len(data), "iterations": {k: len(v) for k, v in samples.items()}}
        for key, values in samples.items():
            out[name][f"{key}_ms"] = statistics.median(values)
            out[name][f"{key}_cpu_ms"] = statistics.median(cpu[key])
    return out


def peak_memory(which: str, rev: str, image: Path) -> float:
    """MB by which one preprocessing of `image` raises the peak RSS of a fresh process (the peak
    only grows, so each implementation gets a process of its own)."""
    impl = load_baseline(rev) if which == "before" else importlib.import_module("capsnet.service.preprocess")
    assert impl is not None
    impl.preprocess_bytes((ROOT / "examples" / "7.png").read_bytes(), mode="mnist", max_pixels=MAX_PIXELS)
    start = _peak_rss_kib()
    impl.preprocess_bytes(image.read_bytes(), mode="mnist", max_pixels=MAX_PIXELS)
    return (_peak_rss_kib() - start) / 1024


def _peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM: getrusage's ru_maxrss would carry over the parent's)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def peak_memory_of(impls: dict[str, ModuleType], rev: str, data: bytes, tmp: Path) -> dict[str, float]:
    image = tmp / "phone.jpg"
    image.write_bytes(data)
    out = {}
    for key in impls:
        run = subprocess.run(
            [sys.executable, "-m", "bench.preprocess", "--peak-memory", key, str(image), "--baseline", rev],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
        out[key] = float(run.stdout.split()[-1])
    return out


def accuracy(impls: dict[str, ModuleType], model: Path, n_digits: int) -> dict[str, Any]:
    """The photo test's procedure (tests/service/test_preprocess_accuracy.py): MNIST test digits
    rendered as photos, brought back by each implementation, classified by the shipped model."""
    from capsnet.model_export.data import load_split
    from tests.service.photos import render_photo
    from tests.service.test_preprocess_accuracy import classify

    images, labels = load_split("mnist", "test")
    images, labels = images[:n_digits], labels[:n_digits]
    rng = np.random.default_rng(2017)
    photos = [
        render_photo(digit, rng, canvas=(300, 224), scale=rng.uniform(5.0, 8.0), noise=0.03, quality=75)
        for digit in images
    ]
    result: dict[str, Any] = {
        "digits": n_digits,
        "raw_mnist": float((classify(model, images / 255.0) == labels).mean()),
    }
    outputs = {}
    for key, impl in impls.items():
        outputs[key] = np.stack(
            [impl.preprocess_bytes(p, mode="mnist", max_pixels=MAX_PIXELS) for p in photos]
        )
        result[key] = float((classify(model, outputs[key]) == labels).mean())
    if "before" in outputs:
        diff = np.abs(outputs["after"] - outputs["before"])
        result["mean_abs_change"] = float(diff.mean())
        result["max_abs_change"] = float(diff.max())
    return result


def examples(impls: dict[str, ModuleType], model: Path) -> dict[str, dict[str, int]]:
    """The predicted digit of every file in examples/ (named after the digit it shows)."""
    from tests.service.test_preprocess_accuracy import classify

    files = sorted(p for p in (ROOT / "examples").iterdir() if p.suffix in (".png", ".jpg"))
    out: dict[str, dict[str, int]] = {}
    for key, impl in impls.items():
        batch = np.stack(
            [impl.preprocess_bytes(p.read_bytes(), mode="mnist", max_pixels=MAX_PIXELS) for p in files]
        )
        out[key] = {p.name: int(c) for p, c in zip(files, classify(model, batch), strict=True)}
    return out


def main(*, baseline: str, quick: bool, output: Path) -> dict[str, Any]:
    import capsnet.service.preprocess as after
    from capsnet.service.settings import SHIPPED_MODEL

    before = load_baseline(baseline)
    impls: dict[str, ModuleType] = {"after": after} if before is None else {"before": before, "after": after}
    model = Path(SHIPPED_MODEL) / "capsnet.onnx"
    result: dict[str, Any] = {
        "machine": machine(),
        "baseline": baseline if before is not None else None,
        "quick": quick,
    }
    if before is None:
        result["baseline_missing"] = f"git has no {baseline}:service/preprocess.py here (a shallow clone?)"
    cases = inputs()
    result["cases"] = time_cases(impls, cases, quick)
    with tempfile.TemporaryDirectory() as tmp:
        result["phone_peak_rss_mb"] = peak_memory_of(
            impls, baseline, cases["phone-jpeg-4000x3000"][0], Path(tmp)
        )
    result["targets"] = {
        name: {
            "target_ms": target,
            "after_ms": result["cases"][name]["after_ms"],
            "met": result["cases"][name]["after_ms"] <= target,
        }
        for name, target in TARGETS_MS.items()
    }
    if before is not None:
        for case in result["cases"].values():
            case["speedup"] = case["before_ms"] / case["after_ms"]
            case["cpu_speedup"] = case["before_cpu_ms"] / case["after_cpu_ms"]
    result["accuracy"] = accuracy(impls, model, 50 if quick else 2000)
    result["examples"] = examples(impls, model)
    result["machine"]["load_average_at_end"] = os.getloadavg()[0]

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    return result


def report(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(f"{m['cpu']}, {m['cores']} cores; OpenCV {m['opencv']}, Pillow {m['pillow']}, numpy {m['numpy']}")
    print(
        f"load average {m['load_average_at_start']:.1f} at the start, {m['load_average_at_end']:.1f} at the end"
    )
    has_before = r["baseline"] is not None
    print(f"\nmedian ms per image, wall (CPU) (before: {r['baseline'] or 'not available'}; after: this tree)")
    print(f"{'case':<38} {'before':>17} {'after':>15} {'speed-up':>14} {'target':>9}")
    for name, case in r["cases"].items():
        after = f"{case['after_ms']:7.3f} ({case['after_cpu_ms']:6.3f})"
        before = f"{case['before_ms']:8.3f} ({case['before_cpu_ms']:7.3f})" if has_before else f"{'-':>17}"
        ratio = f"{case['speedup']:5.1f}x ({case['cpu_speedup']:4.1f}x)" if has_before else f"{'-':>14}"
        target = r["targets"].get(name)
        goal = f"{'<=' + str(target['target_ms']):>6} {'ok' if target['met'] else 'NO'}" if target else ""
        print(f"{case['what']:<38} {before} {after} {ratio} {goal}")
    mem = r["phone_peak_rss_mb"]
    print("peak memory for the phone JPEG: " + ", ".join(f"{k} {v:.1f} MB" for k, v in mem.items()))
    a = r["accuracy"]
    line = f"\nphoto accuracy, {a['digits']} MNIST test digits: raw MNIST {a['raw_mnist']:.4f}"
    line += f", before {a['before']:.4f}" if has_before else ""
    print(line + f", after {a['after']:.4f}")
    if has_before:
        print(f"outputs moved by {a['mean_abs_change']:.4f} on average (at most {a['max_abs_change']:.3f})")
    for key, predictions in r["examples"].items():
        right = sum(int(name[0]) == digit for name, digit in predictions.items())
        print(f"examples/ {key}: {right} of {len(predictions)} right")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run (CI): fewer iterations and digits")
    p.add_argument("--baseline", default=BASELINE, help="the git revision whose preprocessing is 'before'")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "preprocess-2core.json")
    p.add_argument("--peak-memory", nargs=2, metavar=("before|after", "IMAGE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    if args.peak_memory:  # one measurement, in a process of its own (see peak_memory_of)
        print(peak_memory(args.peak_memory[0], args.baseline, Path(args.peak_memory[1])))
    else:
        main(baseline=args.baseline, quick=args.quick, output=args.output)
