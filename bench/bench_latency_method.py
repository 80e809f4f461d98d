"""Accuracy against measured latency: easier, easier-latency and random, per iteration.

    python bench/bench_latency_method.py                   # MobileNetV2 + ResNet-18, 3 seeds
    python bench/bench_latency_method.py --quick           # smoke run (seconds)
    python bench/bench_latency_method.py --save D          # also keep every point's model in D
    python bench/bench_latency_method.py --load D          # re-time saved points only

Phase 1 (training; machine load does not matter): per (model, seed) one dense model is trained
and shared by every method (paired). Each method runs the shared loop to K removals
(``delta=100``: every iteration is kept, so the whole front is traced); a wrapper keeps the model
of every iteration. Phase 2 (timing; run it on a quiet machine, ``--load`` re-times saved
points): every point is folded with the latency plan (chain decisions memoised per model and
seed, so each kind of chain is timed once) and timed against its dense model side by side in one
process (paired interleaved rounds, batch 1, one thread). Reported: each point's test top-1,
FLOPs per sample and speed-up over dense; per method the best speed-up among points within
1 point of the dense test accuracy (mean ± sd over seeds) and how often each method's front
dominates the others'.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import Delegate, Table, add_common_args, header, write_out
from torch import nn

import easier
from easier import data
from easier.io.records import model_record, rebuild
from easier.merge import LatencyConfig, build_folded, plan_fold
from easier.methods import Context, Method, Step, create_method
from easier.models import create
from easier.perf.measure import measure
from easier.perf.timing import compare_samples, paired_samples
from easier.train.finetune import FineTune, fine_tune, seed_everything

METHODS = "easier,easier-latency,random"


class Snapshots(Delegate):
    """Runs ``inner`` and keeps the model each iteration starts from (= the previous result)."""

    def __init__(self, inner: Method):
        super().__init__(inner)
        self.models: list[dict[str, Any]] = []

    def step(self, ctx: Context) -> Step:
        self.models.append(model_record(ctx.model))
        return self.inner.step(ctx)


def settings(quick: bool) -> dict[str, dict[str, Any]]:
    if quick:
        return {"resnet18": {"model": "resnet18", "width": 0.125, "data": "digits", "k": 2,
                             "pretrain": FineTune(epochs=1, lr=0.05, batch_size=64),
                             "finetune": FineTune(epochs=1, lr=0.01, batch_size=64,
                                                  max_steps=2)}}
    ft = FineTune(epochs=1, lr=0.01, batch_size=64, max_steps=25)
    return {
        "mobilenet_v2": {"model": "mobilenet_v2", "width": 0.25, "data": "mnist5k", "k": 8,
                         "image_size": 16, "pretrain": FineTune(epochs=3, lr=0.05, batch_size=64),
                         "finetune": ft},
        "resnet18": {"model": "resnet18", "width": 0.25, "data": "mnist5k", "k": 8,
                     "image_size": 16, "pretrain": FineTune(epochs=3, lr=0.05, batch_size=64),
                     "finetune": ft},
    }


def train_points(key: str, cfg: dict[str, Any], seeds: list[int], methods: list[str],
                 log: Any) -> dict[str, Any]:
    """Phase 1: every (seed, method) run; each point = (record, removed, val/test top-1)."""
    out: dict[str, Any] = {}
    for seed in seeds:
        splits = data.load(cfg["data"], seed=seed, image_size=cfg.get("image_size"))
        seed_everything(seed)

        def build(splits: Any = splits) -> nn.Module:
            return create(cfg["model"], num_classes=splits.num_classes,
                          in_channels=splits.in_channels, width=cfg["width"],
                          image_size=splits.image_size)

        dense = build()
        fine_tune(dense, splits.train, cfg["pretrain"], seed=seed, desc="pretrain")
        state = copy.deepcopy(dense.state_dict())
        for name in methods:
            model = build()
            model.load_state_dict(state)
            wrap = Snapshots(create_method(name))
            t0 = time.perf_counter()
            res = easier.reduce(model, splits.train, splits.val, test=splits.test,
                                train_eval=splits.train_eval, method=wrap,
                                finetune=cfg["finetune"],
                                stop=easier.StopRule(delta=100.0, max_removals=cfg["k"]),
                                entropy=easier.EntropyConfig(batches=8),
                                run=easier.RunConfig(seed=seed, verbose=False))
            records = [*wrap.models, model_record(res.model)]
            points = [{"record": r, "removed": len(h["removed"]), "chosen": h["chosen"],
                       "val_acc": h["val_acc"], "test_acc": h["test_acc"],
                       "step_s": h["seconds"].get("step", 0.0)}
                      for r, h in zip(records, res.history, strict=True)]
            out[f"{seed}/{name}"] = points
            log(f"{key} seed {seed} {name:>14}: test "
                + " ".join(f"{p['test_acc']:.1f}" for p in points)
                + f" ({time.perf_counter() - t0:.0f}s)")
    return out


def time_points(key: str, runs: dict[str, Any], example: torch.Tensor, rounds: int,
                log: Any) -> None:
    """Phase 2: fold every point (latency plan, memoised per seed) and time it against its
    dense model in paired rounds; adds flops, folded depth and speed-up to each point."""
    memo: dict[str, dict[str, Any]] = {}
    one = example[:1]
    for run, points in runs.items():
        seed = run.split("/")[0]
        dense = rebuild(points[0]["record"]).eval()
        for p in points:
            model = rebuild(p["record"]).eval()
            plan = plan_fold(model, example, "latency", batch_sizes=(1,),
                             latency=LatencyConfig(rounds=5, min_run_time=0.05),
                             memo=memo.setdefault(seed, {}))
            folded = build_folded(model, example, plan)
            with torch.no_grad():
                a, b = paired_samples([lambda d=dense: d(one), lambda f=folded: f(one)],
                                      rounds=rounds, min_run_time=0.2)
            cmp = compare_samples(a, b)
            m = measure(folded, example, latency=False)
            p.update(flops=m.flops, depth=m.depth, dense_ms=cmp.before_ms, ms=cmp.after_ms,
                     speedup=1 / cmp.ratio, band=[1 / cmp.ratio_hi, 1 / cmp.ratio_lo],
                     merged=len(plan.merged))
        log(f"{key} {run:>18}: speed-up " + " ".join(f"{p['speedup']:.2f}" for p in points))


def pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points no other point beats on both test accuracy (higher) and latency (lower)."""
    return [p for p in points
            if not any(q["test_acc"] >= p["test_acc"] and q["ms"] <= p["ms"]
                       and (q["test_acc"] > p["test_acc"] or q["ms"] < p["ms"])
                       for q in points)]


def best_within(points: list[dict[str, Any]], drop: float) -> dict[str, Any]:
    """The fastest point whose test top-1 is within ``drop`` points of the dense model's."""
    ok = [p for p in points if p["test_acc"] >= points[0]["test_acc"] - drop]
    return max(ok, key=lambda p: p["speedup"])


def _pm(xs: list[float], spec: str = ".2f") -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):{spec}} ± {sd:{spec}}"


def tables(results: dict[str, dict[str, Any]], methods: list[str], drop: float) -> list[Table]:
    summary = Table("Best speed-up within 1 point of dense test top-1 (mean ± sd over seeds)",
                    ["model", "method", "seeds", "speed-up (batch 1)", "removed", "test Δ pts",
                     "FLOPs ratio", "merged chains", "s per step"])
    points = Table("Every point (seed 0): removed, test top-1, speed-up over dense",
                   ["model", "method", "front (removed: test % @ speed-up×)"])
    for key, runs in results.items():
        seeds = sorted({r.split("/")[0] for r in runs}, key=int)
        for name in methods:
            best = [best_within(runs[f"{s}/{name}"], drop) for s in seeds
                    if f"{s}/{name}" in runs]
            dense = [runs[f"{s}/{name}"][0] for s in seeds if f"{s}/{name}" in runs]
            steps = [p["step_s"] for s in seeds for p in runs[f"{s}/{name}"][1:]]
            summary.add(key, name, len(best), _pm([b["speedup"] for b in best]),
                        _pm([b["removed"] for b in best], ".1f"),
                        _pm([b["test_acc"] - d["test_acc"] for b, d in zip(best, dense,
                                                                           strict=True)]),
                        _pm([b["flops"] / d["flops"] for b, d in zip(best, dense, strict=True)]),
                        _pm([b["merged"] for b in best], ".1f"),
                        f"{statistics.mean(steps):.1f}" if steps else "–")
            run0 = runs.get(f"{seeds[0]}/{name}")
            if run0:
                front = {id(p) for p in pareto(run0)}
                points.add(key, name, " ".join(
                    f"{p['removed']}:{p['test_acc']:.1f}@{p['speedup']:.2f}"
                    + ("*" if id(p) in front else "") for p in run0))
    return [summary, points]


def figure(results: dict[str, dict[str, Any]], methods: list[str], path: Path) -> None:
    from easier.report.files import png_bytes, pyplot

    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4.2 * len(results)), squeeze=False)
    for row, (key, runs) in enumerate(results.items()):
        a, b = axes[row]
        for i, name in enumerate(methods):
            for j, run in enumerate(r for r in runs if r.endswith(f"/{name}")):
                pts = runs[run]
                kw = {"color": f"C{i}", "alpha": 0.8, "marker": "o", "ms": 3,
                      "label": name if j == 0 else None}
                a.plot([p["speedup"] for p in pts], [p["test_acc"] for p in pts], **kw)
                b.plot([p["flops"] / 1e6 for p in pts], [p["test_acc"] for p in pts], **kw)
        a.set_xlabel("speed-up over dense after folding (batch 1, measured)")
        b.set_xlabel("FLOPs per sample after folding (M)")
        for ax in (a, b):
            ax.set_ylabel(f"{key}: test top-1 (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.write_bytes(png_bytes(fig))


def main(argv: list[str] | None = None) -> list[Table]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--models", default=None, help="comma list (default: all)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--save", type=Path, help="keep the trained points here (points.pt)")
    ap.add_argument("--train-only", action="store_true",
                    help="with --save: stop after training (time later with --load)")
    ap.add_argument("--load", type=Path, nargs="+",
                    help="time the points saved by --save (no training); several dirs merge")
    ap.add_argument("--plot", type=Path, default=None, help="write the fronts figure here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # timing: one thread, side by side; training is CPU-light anyway
    methods = args.methods.split(",")
    cfgs = settings(args.quick)
    if args.models:
        cfgs = {k: v for k, v in cfgs.items() if k in args.models.split(",")}
    print(header([1], f"load average {Path('/proc/loadavg').read_text().split()[:3]}"))
    t0 = time.perf_counter()
    if args.load:
        results = {}
        for d in args.load:
            results.update(torch.load(d / "points.pt", weights_only=True))
    else:
        results = {k: train_points(k, c, list(range(1 if args.quick else args.seeds)), methods,
                                   print) for k, c in cfgs.items()}
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            torch.save(results, args.save / "points.pt")
            if args.train_only:
                return []
    for key, runs in results.items():
        splits = data.load(cfgs[key]["data"], seed=0, image_size=cfgs[key].get("image_size"))
        example = torch.stack([splits.val[i][0] for i in range(2)])
        time_points(key, runs, example, 5 if args.quick else args.rounds, print)
    out = tables(results, methods, drop=1.0)
    for t in out:
        print(t.markdown())
    if args.plot:
        figure(results, methods, args.plot)
    if args.save:
        slim = {k: {r: [{f: v for f, v in p.items() if f != "record"} for p in pts]
                    for r, pts in runs.items()} for k, runs in results.items()}
        (args.save / "fronts.json").write_text(json.dumps(slim, indent=1))
    write_out(args.out, header([1], f"{time.perf_counter() - t0:.0f} s"), out)
    return out


if __name__ == "__main__":
    main()
