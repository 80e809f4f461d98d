"""Entropy-pass overhead: hooked forward pass / plain forward pass, side by side in one process.

    python bench/bench_entropy.py                 # resnet18, mobilenet_v2, swin_t at batch 128
    python bench/bench_entropy.py --quick         # tiny widths, a few seconds

Both passes run in eval mode under torch.no_grad() on the same input tensor; they are
interleaved (plain, hooked, plain, hooked, ...) and the medians are compared, so machine noise
hits both alike. Target: <= 1.05x.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

import easier
from easier import models


def bench(name: str, width: float, batch: int, repeats: int, batches: int,
          check_finite: bool = True) -> dict[str, float]:
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, width=width, image_size=32).eval()
    x = torch.randn(batch, 3, 32, 32)
    data = [x] * batches
    plain, hooked = [], []
    with torch.no_grad():
        model(x)  # warm-up
        easier.measure_entropy(model, [x])
        for _ in range(repeats):
            t0 = time.perf_counter()
            for b in data:
                model(b)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            easier.measure_entropy(model, data, check_finite=check_finite)
            hooked.append(time.perf_counter() - t0)
    p, h = statistics.median(plain), statistics.median(hooked)
    return {"plain_s": p / batches, "hooked_s": h / batches, "ratio": h / p,
            "sites": len(easier.find_sites(model))}


def main(argv: list[str] | None = None) -> list[tuple]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny widths and batch: seconds")
    ap.add_argument("--models", default="resnet18,mobilenet_v2,swin_t")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-check-finite", action="store_true",
                    help="measure with check_finite=False (skips the Inf check)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    width, batch, repeats, batches = (0.125, 8, 2, 2) if args.quick else (1.0, args.batch,
                                                                        args.repeats, 3)
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, {platform.processor() or '?'}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {batch}, 32x32, "
          f"width {width}, eval + no_grad, medians of {repeats} interleaved repeats, "
          f"check_finite={not args.no_check_finite}")
    rows = []
    print("| model | sites | plain forward (s/batch) | entropy pass (s/batch) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        r = bench(name, width, batch, repeats, batches, not args.no_check_finite)
        rows.append((name, r))
        print(f"| {name} | {r['sites']} | {r['plain_s']:.4f} | {r['hooked_s']:.4f} | "
              f"{r['ratio']:.3f}x |", flush=True)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
