"""`python -m bench`: the side-by-side benchmark (bench/bench.py), run from the repository root of a
checkout installed with `make install-dev` (it needs torch and wrk, and reads models/ and git).

bench/ is a tool of the checkout, not of the wheel: its siblings run the same way (`python -m
bench.load`, `python -m bench.report`, `python -m bench.profile` ...)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.bench import main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description="PyTorch vs onnxruntime vs the service over HTTP, side by side"
    )
    p.add_argument("--model-dir", type=Path, default=Path("models/capsnet-mnist"))
    p.add_argument("--output", type=Path, default=Path("bench/results/latest.json"))
    p.add_argument("--quick", action="store_true", help="few iterations, 1 s per HTTP case (CI)")
    p.add_argument("--iterations", type=int, default=30, help="timed runs per raw case")
    p.add_argument("--seconds", type=float, default=10.0, help="wrk duration per HTTP case")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    main(
        model_dir=args.model_dir,
        output=args.output,
        quick=args.quick,
        iterations=args.iterations,
        seconds=args.seconds,
    )
