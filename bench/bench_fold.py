"""Time hand-built linear chains unmerged vs merged, side by side, on this machine.

Three variants per chain, all BN-folded: "orig" (the chain as built, zero padding between the
layers), "relocated" (all padding moved to the first conv, the form fine-tuning sees after an
activation removal; slightly more work) and "merged" (one layer). They are timed in alternating
rounds, so their ratios hold even on a busy machine.

    python bench/bench_fold.py            # batch 1 and 64
    python bench/bench_fold.py --quick    # batch 1 and 8, shorter timing
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from easier.edit.padding import fold_ready
from easier.merge import fold
from easier.perf.measure import time_side_by_side


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


class InvertedResidual(nn.Module):
    """MobileNetV2 block, stride 1, both ReLU6 removed."""

    def __init__(self, c: int, expand: int = 6) -> None:
        super().__init__()
        h = c * expand
        self.conv = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), _bn(h), nn.Identity(),
            nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), _bn(h), nn.Identity(),
            nn.Conv2d(h, c, 1, bias=False), _bn(c),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def cases() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(name, model, per-sample input shape)."""
    pair = nn.Sequential(
        nn.Conv2d(64, 64, 3, padding=1, bias=False), _bn(64), nn.Identity(),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), _bn(64),
    )  # fmt: skip
    mlp = nn.Sequential(nn.Linear(96, 384), nn.Identity(), nn.Linear(384, 96))
    return [
        ("conv3x3∘conv3x3 64ch, 32x32", pair, (64, 32, 32)),
        ("MBv2 inverted residual 24->144->24, 32x32", InvertedResidual(24), (24, 32, 32)),
        ("Linear MLP 96->384->96, (B,64,96)", mlp, (64, 96)),
    ]


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8, shorter timing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per variant")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = (1, 8) if args.quick else (1, 64)
    run_time = args.min_run_time or (0.3 if args.quick else 1.0)
    torch.manual_seed(0)

    print(
        f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"torch {torch.__version__} | threads {torch.get_num_threads()} | batch sizes "
        f"{list(batches)} | {run_time:g} s per variant per batch size, 5 alternating rounds"
    )
    print()
    print(
        "| chain | batch | FLOPs/sample orig / relocated / merged | orig ms | relocated ms "
        "| merged ms | speed-up vs orig | vs relocated |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, model, shape in cases():
        model.eval()
        x1 = torch.randn(1, *shape)
        ready = fold_ready(model, x1)
        variants = [fold(model, x1, "none"), fold(ready, x1, "none"), fold(ready, x1, "all")]
        flops = " / ".join(f"{_flops(v, x1) / 1e6:.1f}M" for v in variants)
        for b in batches:
            xb = torch.randn(b, *shape)
            timed = time_side_by_side(
                [lambda m=v, x=xb: m(x) for v in variants], min_run_time=run_time
            )
            ms = " | ".join(f"{t:.3g} ± {i:.2g}" for t, i in timed)
            (orig, _), (reloc, _), (merged, _) = timed
            print(
                f"| {name} | {b} | {flops} | {ms} | {orig / merged:.2f}x | {reloc / merged:.2f}x |"
            )


if __name__ == "__main__":
    main()
