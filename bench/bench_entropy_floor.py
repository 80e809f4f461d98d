"""Where the entropy pass's time goes, and the floor of counting on this CPU.

    python bench/bench_entropy_floor.py --threads 1     # resnet18, mobilenet_v2, swin_t, batch 128
    python bench/bench_entropy_floor.py --quick         # tiny widths, seconds

Side by side in one process, interleaved rounds (``_common.interleaved``), every figure as a
share of one plain eager forward of the same batch:

* the instrumented pass (capture + counters) with the counters as they were before this change
  ("previous": one reduction over all non-channel axes and a per-channel sum for the finiteness
  check) and as they are now;
* the counters alone, run on the stored pre-activations of every site (no forward);
* the memory-traffic floor: ``z.clamp_(min=0)`` on every site's pre-activation, one read and one
  write of each, i.e. what an in-place activation itself costs; and a bare ``(z > 0).sum(dims)``
  per site, the obvious one-line count (bool reductions are slow on CPU).

Counts of the previous and the current counters are checked equal before timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from typing import Any

import torch
from _common import Table, add_common_args, header, interleaved, write_out

from easier import models
from easier.entropy import counters
from easier.entropy.estimate import EntropyPass
from easier.graph.capture import capture

CURRENT = counters.SiteCounter.forward


def previous(self: counters.SiteCounter, z: torch.Tensor) -> None:
    """The exact counter before this change (kept here to measure against)."""
    z = self._layout(z.detach())
    dims = (0, *range(2, z.ndim))
    if self.bad is None:
        self._allocate(z)
    rows = max(1, counters._CHUNK // max(1, z[:1].numel()))
    for start in range(0, z.shape[0], rows):
        zc = z[start:start + rows]
        if self.strict_finite:
            self.bad += (~torch.isfinite(zc.sum(dim=dims))).sum()  # type: ignore[operator]
        sgn = self.scratch.take(zc)
        torch.sign(zc, out=sgn)
        diff = sgn.sum(dim=dims, dtype=torch.float32)
        both = sgn.abs_().sum(dim=dims, dtype=torch.float32)
        on = ((both + diff) / 2).round().long()
        self.on += on  # type: ignore[operator]
        self.off += both.round().long() - on  # type: ignore[operator]
    self.seen += z.numel() // z.shape[1]  # type: ignore[operator]
    self.batches += 1


def _pass(model: torch.nn.Module, x: torch.Tensor, forward: Any) -> EntropyPass:
    """An entropy pass whose counters run ``forward`` (set per counter, not on the class)."""
    p = EntropyPass(model, x)
    for c in p.counters.values():
        c.forward = types.MethodType(forward, c)  # type: ignore[method-assign]
    return p


def measure(name: str, width: float, batch: int, rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, width=width, image_size=32).eval()
    x = torch.randn(batch, 3, 32, 32)
    before, now = _pass(model, x, previous), _pass(model, x, CURRENT)
    with torch.no_grad():
        before.runner(x)
        now.runner(x)
    for site, c in now.counters.items():
        b = before.counters[site]
        assert torch.equal(b.on, c.on) and torch.equal(b.off, c.off), site
    zs: list[tuple[counters.SiteCounter, torch.Tensor]] = []
    keep = _pass(model, x, lambda self, z: zs.append((self, z.detach().clone())))
    with torch.no_grad():
        keep.runner(x)

    def count(fn: Any) -> None:
        for c, z in zs:
            c.bad = None  # a fresh counter each time: allocation included, as in a pass
            fn(c, z)

    layouts = [c._layout(z) for c, z in zs]
    plain_graph = capture(model, x).gm
    fns = {
        "plain": lambda: model(x),
        "capture": lambda: plain_graph(x),
        "pass_prev": lambda: before.runner(x),
        "pass_now": lambda: now.runner(x),
        "count_prev": lambda: count(previous),
        "count_now": lambda: count(CURRENT),
        "clamp": lambda: [z.clamp_(min=0) for _, z in zs],
        "bare": lambda: [(z > 0).sum(dim=(0, *range(2, z.ndim))) for z in layouts],
    }
    times = interleaved(list(fns.values()), rounds=rounds, min_sample_s=0.05)
    base = times[0][0]
    out: dict[str, Any] = {"sites": len(zs), "plain_ms": base}
    for key, (med, iqr) in zip(fns, times, strict=True):
        out[key], out[key + "_iqr"] = med / base, iqr / base
    return out


def main(argv: list[str] | None = None) -> list[Table]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--models", default="resnet18,mobilenet_v2,swin_t")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    width, batch, rounds = (0.125, 8, 2) if args.quick else (1.0, args.batch, args.rounds)
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    head = header([batch], f"32x32, width {width}, eval + no_grad, medians of {rounds} "
                           f"interleaved rounds; load average at start {load}")
    print(head, flush=True)
    cols = ["model", "sites", "plain (ms)", "capture", "pass, previous", "pass, now",
            "counters, previous", "counters, now", "clamp_ floor", "bare (z>0).sum"]
    table = Table("Entropy pass: where the time goes", cols,
                  formats={"plain (ms)": ".0f", **{c: ".3f" for c in cols[3:]}},
                  note="Each figure is a share of one plain eager forward (median of "
                       "interleaved rounds; IQR in the script's output). 'capture': the "
                       "uninstrumented torch.export graph; 'pass': the instrumented one; "
                       "'counters': the counters alone on the stored pre-activations; "
                       "'clamp_ floor': one read + one write of every pre-activation; 'bare': "
                       "(z>0).sum over the non-channel axes per site.")
    keys = ["capture", "pass_prev", "pass_now", "count_prev", "count_now", "clamp", "bare"]
    for name in args.models.split(","):
        r = measure(name, width, batch, rounds)
        table.add(name, r["sites"], r["plain_ms"], *(r[k] for k in keys))
        print(table.row_line(table.rows[-1]), "| IQR",
              " ".join(f"{k}={r[k + '_iqr']:.3f}" for k in keys),
              f"| load {os.getloadavg()[0]:.1f}", flush=True)
    print(table.markdown())
    write_out(args.out, head, [table])
    return [table]


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
