"""Entropy-pass overhead: hooked forward pass / plain forward pass, side by side in one process.

    python bench/bench_entropy.py                 # resnet18, mobilenet_v2, swin_t at batch 128
    python bench/bench_entropy.py --quick         # tiny widths, a few seconds

Time: both passes run in eval mode under torch.no_grad() on the same input tensor; they are
interleaved (plain, hooked, plain, hooked, ...) and the medians are compared, so machine noise
hits both alike. Target: <= 1.05x.

Memory: each pass also runs alone in a fresh Python process (one process per variant and repeat,
plain and hooked alternating). The process builds the model and the input, runs a one-sample
warm-up forward (one-time runtime set-up), resets its peak resident set size (RSS) to the current
RSS (Linux: /proc/self/clear_refs), runs the pass once and reads the peak (Linux: VmHWM; elsewhere
getrusage's ru_maxrss, which on Linux would also carry the parent's peak across fork and exec). The
"pass" column is the peak minus the RSS just before the pass: what the pass itself needed (the
activations, plus the counters and their scratch buffer when hooked). The "process" column is the
whole peak while the pass runs (Python, torch, model, input and the pass). Medians over the
repeats. Both depend on the thread count (conv workspaces). Target: hooked <= 1.1x plain.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from _common import Table, add_common_args, header, write_out

import easier
from easier import models

MEM_FLAG = "--memory-child"


def bench(
    name: str, width: float, batch: int, repeats: int, batches: int, check_finite: bool = True
) -> dict[str, float]:
    """Per-batch cost of counting (steady state), the one-off setup, and a whole pass."""
    from easier.entropy.estimate import EntropyPass

    torch.manual_seed(0)
    model = models.create(name, num_classes=10, width=width, image_size=32).eval()
    x = torch.randn(batch, 3, 32, 32)
    data = [x] * batches
    plain, counted, whole_plain, whole, setup = [], [], [], [], []
    with torch.no_grad():
        model(x)  # warm-up
        easier.measure_entropy(model, [x])
        for _ in range(repeats):
            t0 = time.perf_counter()
            counting = EntropyPass(model, x, check_finite=check_finite)
            setup.append(time.perf_counter() - t0)
            counting.runner(x)  # warm the new graph
            t0 = time.perf_counter()
            model(x)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            counting.runner(x)
            counted.append(time.perf_counter() - t0)
            counting.close()
            t0 = time.perf_counter()
            for b in data:
                model(b)
            whole_plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            easier.measure_entropy(model, data, check_finite=check_finite)
            whole.append(time.perf_counter() - t0)
    med = statistics.median
    return {
        "plain_s": med(plain),
        "hooked_s": med(counted),
        "ratio": med(counted) / med(plain),
        "setup_s": med(setup),
        "pass_ratio": med(whole) / med(whole_plain),
        "sites": len(easier.find_sites(model)),
    }


# ---------------------------------------------------------------------------------------------
# peak memory, one fresh process per measurement


def _reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _mib_peak() -> float:
    """Peak RSS of this process, MiB: VmHWM where /proc exists, else getrusage's ru_maxrss.

    On Linux ru_maxrss survives fork and exec, so a child started by a big parent reports the
    parent's peak; VmHWM belongs to the child's own address space.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


def _mib_now() -> float | None:
    """Current RSS, MiB, where /proc is available (else None)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def memory_child(spec: dict) -> dict[str, float | None]:
    """Run one pass in this (fresh) process; return RSS before and peak RSS, MiB."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = models.create(spec["model"], num_classes=10, width=spec["width"], image_size=32).eval()
    data = [torch.randn(spec["batch"], 3, 32, 32)] * spec["batches"]
    with torch.no_grad():
        model(data[0][:1])  # one-time runtime set-up (thread pool, kernels) is not the pass's
    gc.collect()
    reset = _reset_peak()  # the peak then covers the pass only, not imports or model building
    before, peak_before = _mib_now(), _mib_peak()
    with torch.no_grad():
        if spec["variant"] == "plain":
            for b in data:
                model(b)
        else:
            easier.measure_entropy(model, data, check_finite=spec["check_finite"])
    return {"rss_before": before, "peak_before": peak_before, "peak": _mib_peak(), "reset": reset}


def memory(
    name: str, width: float, batch: int, batches: int, repeats: int, check_finite: bool
) -> dict[str, dict[str, float]]:
    """Median pass and process peak (MiB) of each variant, from fresh processes."""
    runs: dict[str, list[dict]] = {"plain": [], "hooked": []}
    for _ in range(repeats):
        for variant in runs:
            spec = {
                "model": name,
                "width": width,
                "batch": batch,
                "batches": batches,
                "variant": variant,
                "check_finite": check_finite,
                "threads": torch.get_num_threads(),
            }
            proc = subprocess.run(
                [sys.executable, __file__, MEM_FLAG, json.dumps(spec)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"memory child for {name}/{variant} failed:\n{proc.stderr}")
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = {}
    for variant, rs in runs.items():
        # without /proc, the pre-pass peak stands in for the RSS before the pass
        passes = [
            r["peak"] - (r["rss_before"] if r["rss_before"] is not None else r["peak_before"])
            for r in rs
        ]
        out[variant] = {
            "pass": statistics.median(passes),
            "process": statistics.median(r["peak"] for r in rs),
        }
    return out


def main(argv: list[str] | None = None) -> list[Table]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--models", default="resnet18,mobilenet_v2,swin_t")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--memory-repeats",
        type=int,
        default=None,
        help="fresh processes per variant and model (default 3; quick: 1)",
    )
    ap.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the peak-memory table (quick: measured for the first model only)",
    )
    ap.add_argument(
        "--no-check-finite",
        action="store_true",
        help="measure with check_finite=False (skips the Inf check)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    width, batch, repeats, batches = (
        (0.125, 8, 2, 2) if args.quick else (1.0, args.batch, args.repeats, 8)
    )
    mem_repeats = args.memory_repeats or (1 if args.quick else 3)
    check = not args.no_check_finite
    head = header(
        [batch],
        f"32x32, width {width}, eval + no_grad, {batches} batches per pass, "
        f"medians of {repeats} interleaved repeats, check_finite={check}",
    )
    print(head)
    time_table = Table(
        "Entropy pass: time overhead",
        ["model", "sites", "plain forward (s/batch)", "entropy pass (s/batch)", "ratio",
         "setup (s)", f"whole pass of {batches} batches"],
        formats={"plain forward (s/batch)": ".4f", "entropy pass (s/batch)": ".4f", "ratio": ".3f",
                 "setup (s)": ".3f", f"whole pass of {batches} batches": ".3f"},
        suffix={"ratio": "x", f"whole pass of {batches} batches": "x"},
        note="Per-batch time of the instrumented forward pass (streaming ON/OFF counters on every "
        "site) over a plain forward pass, interleaved in one process (steady state, the "
        "target: <= 1.05x); the one-off setup (trace + instrument); and a whole "
        f"measure_entropy call over {batches} batches vs {batches} plain forwards.",
    )
    print("\n".join(time_table.header_lines()))
    names = args.models.split(",")
    for name in names:
        r = bench(name, width, batch, repeats, batches, check)
        row = time_table.add(name, r["sites"], r["plain_s"], r["hooked_s"], r["ratio"],
                             r["setup_s"], r["pass_ratio"])
        print(time_table.row_line(row), flush=True)
    tables = [time_table]
    if not args.no_memory:
        mem = Table(
            "Entropy pass: peak memory",
            [
                "model",
                "plain pass (MiB)",
                "entropy pass (MiB)",
                "pass ratio",
                "plain process (MiB)",
                "entropy process (MiB)",
                "process ratio",
            ],
            formats={
                c: ".1f"
                for c in (
                    "plain pass (MiB)",
                    "entropy pass (MiB)",
                    "plain process (MiB)",
                    "entropy process (MiB)",
                )
            }
            | {"pass ratio": ".2f", "process ratio": ".2f"},
            suffix={"pass ratio": "x", "process ratio": "x"},
            note=f"Peak resident memory of one pass of {batches} batches, each variant in "
            f"{mem_repeats} fresh process(es) (median), peak reset just before the pass: "
            "'pass' is the peak minus the RSS just before the pass, 'process' the peak RSS of "
            "the whole process while the pass runs. Target: hooked <= 1.1x plain.",
        )
        print()
        print(mem.note)
        print("\n".join(mem.header_lines()))
        for name in names[:1] if args.quick else names:
            m = memory(name, width, batch, batches, mem_repeats, check)
            p, h = m["plain"], m["hooked"]
            row = mem.add(
                name,
                p["pass"],
                h["pass"],
                h["pass"] / p["pass"] if p["pass"] > 0 else None,
                p["process"],
                h["process"],
                h["process"] / p["process"],
            )
            print(mem.row_line(row), flush=True)
        tables.append(mem)
    write_out(args.out, head, tables)
    return tables


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == MEM_FLAG:
        print(json.dumps(memory_child(json.loads(sys.argv[2]))))
    else:
        main(sys.argv[1:])
