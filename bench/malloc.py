"""Training steps under the C library's malloc and under tcmalloc, side by side in one run: images/s
and minor page faults per step of the paper-size CapsNet, one process per measurement, the two
allocators taking turns round after round (capsnet/model_export/malloc.py says why they differ).

    python -m bench.malloc [--rounds 4] [--steps 6] [--batch-size 128] [--threads 2]

Stop any training first: the two cores are the measurement. Prints each round and the median ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any


def child(steps: int, batch_size: int, threads: int) -> dict[str, Any]:
    """Time `steps` training steps (after 2 warm-up steps) in this process: random images, real model."""
    import torch

    from capsnet.model_export import malloc
    from capsnet.model_export.config import CapsNetConfig
    from capsnet.model_export.model import CapsNet, capsnet_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = CapsNet(CapsNetConfig())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, targets = torch.rand(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))

    def step() -> None:
        loss, _ = capsnet_loss(model, images, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t0
    return {
        "allocator": malloc.in_use(),
        "images_per_s": batch_size * steps / seconds,
        "minor_faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps,
    }


def measure(preload: str | None, args: argparse.Namespace) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | (
        {"LD_PRELOAD": preload} if preload else {}
    )
    cmd = [sys.executable, "-m", "bench.malloc", "--child", "--steps", str(args.steps)]
    cmd += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out.splitlines()[-1]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.steps, args.batch_size, args.threads)))
        return {}

    from capsnet.model_export.malloc import tcmalloc

    library = tcmalloc()
    if library is None:
        raise SystemExit("bench.malloc: no tcmalloc library here (Debian: libtcmalloc-minimal4)")
    rounds = []
    print(f"{args.steps} steps of B = {args.batch_size} on {args.threads} threads per measurement")
    for r in range(args.rounds):
        glibc, tc = measure(None, args), measure(library, args)
        if (glibc["allocator"], tc["allocator"]) != ("glibc", "tcmalloc"):
            raise SystemExit(f"bench.malloc: measured {glibc['allocator']} and {tc['allocator']}")
        rounds.append({"glibc": glibc, "tcmalloc": tc, "ratio": tc["images_per_s"] / glibc["images_per_s"]})
        print(
            f"round {r + 1}: glibc {glibc['images_per_s']:.1f} images/s, "
            f"{glibc['minor_faults_per_step']:.0f} faults/step; tcmalloc {tc['images_per_s']:.1f} images/s, "
            f"{tc['minor_faults_per_step']:.0f} faults/step; ratio {rounds[-1]['ratio']:.2f}"
        )
    ratios = [r["ratio"] for r in rounds]
    median = statistics.median(ratios)
    print(f"tcmalloc / glibc images/s: median {median:.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
    return {"rounds": rounds, "median_ratio": median}


if __name__ == "__main__":
    main()
