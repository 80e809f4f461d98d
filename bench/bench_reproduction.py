"""Does the entropy order matter? EASIER vs random vs max-entropy orders, several seeds.

    python bench/bench_reproduction.py                 # resnet18 w0.25 on mnist5k, seeds 0,1,2
    python bench/bench_reproduction.py --quick         # convnet on digits, 2 sites, seconds

For every seed the dense model is trained once (the pretrain schedule) and its weights are
shared by the three orders, which then run the same loop (``easier.reduce`` with ``run_all=True``:
remove one activation per iteration to the last site, fine-tune with the same budget, log
everything). Reported: mean ± std over seeds of the TEST top-1 after each number of removed
sites, per order; the area under that curve; how many sites each order removed before its
first drop of more than delta points; and the retraining budget the EASIER loop spent to reach
its final depth, next to what the paper's recipe (a full retrain per removal) would cost.

The paper's claim (Quétu et al., ECML PKDD 2024): removing the lowest-entropy activation first
keeps accuracy longest. This script measures that claim on a small budget; it reports what it
finds either way.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import Table, add_common_args, header, write_out

import easier
from easier import data, models
from easier.train.finetune import FineTune, fine_tune, seed_everything

PAPER_EPOCHS = 160  # appendix Table 4: ResNet-18 / CIFAR-10, re-run in full for every removal


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _pm(xs: list[float], spec: str = ".2f") -> str:
    m, s = _mean_std(xs)
    return f"{m:{spec}} ± {s:{spec}}"


def curve(history: list[dict[str, Any]], key: str = "test_acc") -> dict[int, float]:
    """Accuracy by number of removed sites, from a reduce history (failed iterations skipped)."""
    return {
        len(h["removed"]): h[key] for h in history if not h.get("failed") and h.get(key) is not None
    }


def area(points: dict[int, float]) -> float:
    """Mean accuracy over removed = 0..L (trapezoid area / L): 100 = no loss anywhere."""
    ks = sorted(points)
    if len(ks) < 2:
        return points[ks[0]]
    total = sum((points[a] + points[b]) / 2 * (b - a) for a, b in itertools.pairwise(ks))
    return total / (ks[-1] - ks[0])


def removed_before_drop(points: dict[int, float], delta: float) -> int:
    """Sites removed before the first point more than ``delta`` below the dense point (k=0)."""
    base = points[0]
    for k in sorted(points):
        if points[k] < base - delta:
            return k - 1
    return max(points)


def first_rejection(history: list[dict[str, Any]]) -> int | None:
    """Iteration of the loop's first rejection (val top-1 below baseline - delta), if any."""
    return next(
        (
            h["iteration"]
            for h in history
            if h["iteration"] > 0 and not h.get("meets_threshold", True)
        ),
        None,
    )


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Model, data and budgets of this run (quick: tiny; full: about 10-15 min on 2 cores)."""
    if args.quick:
        s = {
            "model": "convnet",
            "width": 1.0,
            "data": "digits",
            "image_size": None,
            "pretrain": FineTune(epochs=3, lr=0.05, batch_size=64),
            "finetune": FineTune(epochs=1, lr=0.01, batch_size=64, max_steps=5),
            "entropy_batches": 2,
            "max_removals": 2,
        }
    else:
        s = {
            "model": "resnet18",
            "width": 0.25,
            "data": "mnist5k",
            "image_size": None,
            "pretrain": FineTune(epochs=args.pretrain_epochs or 4, lr=0.05, batch_size=64),
            "finetune": FineTune(
                epochs=1, lr=0.01, batch_size=64, max_steps=args.finetune_steps or 40
            ),
            "entropy_batches": args.entropy_batches or 8,
            "max_removals": None,
        }
    if args.image_size:
        s["image_size"] = args.image_size
    return s


def run(
    args: argparse.Namespace, cfg: dict[str, Any], work: Path | None, log: Any = print
) -> dict[str, Any]:
    """All (seed, method) reduce runs; returns histories, baselines and wall times."""
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    out: dict[str, Any] = {
        "seeds": seeds,
        "methods": methods,
        "histories": {},
        "pretrain_s": {},
        "run_s": {},
        "train_size": None,
    }
    for seed in seeds:
        splits = data.load(cfg["data"], seed=seed, image_size=cfg["image_size"])
        out["train_size"] = len(splits.train)
        seed_everything(seed)
        model = models.create(
            cfg["model"],
            num_classes=splits.num_classes,
            in_channels=splits.in_channels,
            width=cfg["width"],
            image_size=splits.image_size,
        )
        t0 = time.perf_counter()
        seed_everything(seed)
        pre = fine_tune(model, splits.train, cfg["pretrain"], seed=seed, desc="pretrain")
        out["pretrain_s"][seed] = time.perf_counter() - t0
        if pre.failed:
            raise SystemExit(f"pretraining failed for seed {seed}: {pre.failed}; lower its lr")
        state = copy.deepcopy(model.state_dict())
        if work is not None:
            (work / f"seed{seed}").mkdir(parents=True, exist_ok=True)
            torch.save(state, work / f"seed{seed}" / "pretrained.pt")
        log(
            f"seed {seed}: pretrained in {out['pretrain_s'][seed]:.0f}s "
            f"(train acc {pre.accuracy:.1f}%)"
        )
        for method in methods:
            fresh = models.create(
                cfg["model"],
                num_classes=splits.num_classes,
                in_channels=splits.in_channels,
                width=cfg["width"],
                image_size=splits.image_size,
            )
            fresh.load_state_dict(state)
            run_dir = (
                work / f"seed{seed}" / method if work is not None and method == "easier" else None
            )
            t0 = time.perf_counter()
            res = easier.reduce(
                fresh,
                splits.train,
                splits.val,
                test=splits.test,
                train_eval=splits.train_eval,
                method=method,
                finetune=cfg["finetune"],
                pretrain=None,
                out=run_dir,
                stop=easier.StopRule(
                    delta=args.delta, run_all=True, max_removals=cfg["max_removals"]
                ),
                entropy=easier.EntropyConfig(batches=cfg["entropy_batches"]),
                run=easier.RunConfig(
                    seed=seed,
                    extra={"model": cfg["model"], "data": cfg["data"], "bench": "reproduction"},
                ),
            )
            out["run_s"][(seed, method)] = time.perf_counter() - t0
            out["histories"][(seed, method)] = res.history
            c = curve(res.history)
            log(
                f"seed {seed} {method:>11}: test top-1 by removed sites "
                + " ".join(f"{c[k]:.1f}" for k in sorted(c))
                + f" ({out['run_s'][(seed, method)]:.0f}s)"
            )
    return out


def tables(res: dict[str, Any], cfg: dict[str, Any], delta: float) -> tuple[list[Table], str]:
    """(accuracy table, summary table, budget table) and the verdict sentence."""
    seeds, methods = res["seeds"], res["methods"]
    curves = {(s, m): curve(res["histories"][(s, m)]) for s in seeds for m in methods}
    ks = sorted(set.intersection(*(set(c) for c in curves.values())))
    acc = Table(
        "Test top-1 by number of removed sites (mean ± std over seeds)",
        ["removed", *methods],
        note=f"{cfg['model']} (width {cfg['width']}) on {cfg['data']}, seeds "
        f"{', '.join(map(str, seeds))}: each order starts from the same pretrained weights "
        "and gets the same fine-tune budget after every removal; test top-1 (%) after "
        "each iteration. Paper's claim: the entropy order (easier) stays highest longest.",
    )
    for k in ks:
        acc.add(k, *[_pm([curves[(s, m)][k] for s in seeds]) for m in methods])

    summary = Table(
        "Orders compared",
        [
            "method",
            "area under test curve",
            "sites removed before first drop > delta (test)",
            "sites kept by the loop (val rule)",
            "final test top-1",
        ],
        note=f"Area: mean test top-1 over removed = 0..{ks[-1]} (trapezoids; higher = accuracy "
        f"kept longer). Drop: more than delta = {delta} points below the dense model. The "
        "loop's own rule (val top-1 >= baseline - delta) decides how many sites it keeps.",
    )
    areas: dict[str, list[float]] = {}
    before: dict[str, list[int]] = {}
    for m in methods:
        areas[m] = [area({k: curves[(s, m)][k] for k in ks}) for s in seeds]
        before[m] = [removed_before_drop(curves[(s, m)], delta) for s in seeds]
        kept = [
            len(next(h for h in reversed(res["histories"][(s, m)]) if h["accepted"])["removed"])
            for s in seeds
        ]
        summary.add(
            m,
            _pm(areas[m]),
            _pm(before[m], ".1f"),
            _pm(kept, ".1f"),
            _pm([curves[(s, m)][ks[-1]] for s in seeds]),
        )
    verdict = _verdict(areas, before, methods)

    budget = Table(
        "Retraining budget of the EASIER loop",
        [
            "seed",
            "sites removed (kept model, <= delta)",
            "fine-tunes to find it",
            "fine-tune epochs (effective)",
            "wall s (pretrain + loop)",
            "paper recipe, this run's scale (epochs)",
            "paper recipe, ResNet-18/CIFAR-10 (epochs)",
        ],
        formats={"fine-tune epochs (effective)": ".2f", "wall s (pretrain + loop)": ".0f"},
        note="The loop fine-tunes once per removal until its first rejection (the rejected "
        "candidate is fine-tuned too), with the short budget above. The paper's recipe "
        f"re-runs the full training for every removed layer: pretrain epochs x fine-tunes "
        f"at this run's scale, and {PAPER_EPOCHS} epochs x fine-tunes for "
        "ResNet-18/CIFAR-10 (appendix Table 4).",
    )
    if "easier" in methods:
        ft, pre = cfg["finetune"], cfg["pretrain"]
        for s in seeds:
            hist = res["histories"][(s, "easier")]
            rej = first_rejection(hist)
            n = rej if rej is not None else hist[-1]["iteration"]
            depth = len(next(h for h in reversed(hist) if h["accepted"])["removed"])
            steps = sum(h.get("finetune_steps") or 0 for h in hist[1 : n + 1])
            epochs = steps * ft.batch_size / res["train_size"]
            wall = res["pretrain_s"][s] + sum(h["seconds"]["total"] for h in hist[1 : n + 1])
            budget.add(s, depth, n, epochs, wall, pre.epochs * n, PAPER_EPOCHS * n)
    return [acc, summary, budget], verdict


def _verdict(
    areas: dict[str, list[float]], before: dict[str, list[int]], methods: list[str]
) -> str:
    """The paper's claim against the areas, compared per seed (same pretrained model)."""
    if "easier" not in methods or len(methods) < 2:
        return "(the verdict needs the 'easier' order and at least one control)"
    parts, status = [], {}
    for m in (m for m in methods if m != "easier"):
        diff = [a - b for a, b in zip(areas["easier"], areas[m], strict=True)]
        pos, neg = sum(d > 0 for d in diff), sum(d < 0 for d in diff)
        status[m] = "ahead" if pos == len(diff) else "behind" if neg == len(diff) else "tie"
        parts.append(f"easier - {m} = {_pm(diff)} points ({pos}/{len(diff)} seeds positive)")
    behind = [m for m, st in status.items() if st == "behind"]
    if all(st == "ahead" for st in status.values()):
        found = "supported here (easier's area is larger in every seed against every control)"
    elif behind:
        found = f"contradicted here ({', '.join(behind)} larger in every seed)"
    else:
        ties = [m for m, st in status.items() if st == "tie"]
        found = (
            f"not distinguishable here (against {', '.join(ties)} the sign of the "
            "difference changes with the seed)"
        )
    mean_before = {m: statistics.fmean(v) for m, v in before.items()}
    return (
        f"Paper's claim (the entropy order keeps accuracy longest): {found}. Area under the "
        f"test curve, paired by seed: " + "; ".join(parts) + ". Sites removed before the "
        "first drop > delta, mean: " + ", ".join(f"{m} {mean_before[m]:.1f}" for m in methods) + "."
    )


def plot(res: dict[str, Any], delta: float, path: Path, title: str) -> Path | None:
    """Test top-1 vs removed sites, mean ± std band per order; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    seeds, methods = res["seeds"], res["methods"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    base = statistics.fmean(curve(res["histories"][(s, methods[0])])[0] for s in seeds)
    for m in methods:
        cs = [curve(res["histories"][(s, m)]) for s in seeds]
        ks = sorted(set.intersection(*(set(c) for c in cs)))
        mean = [statistics.fmean(c[k] for c in cs) for k in ks]
        std = [statistics.stdev([c[k] for c in cs]) if len(cs) > 1 else 0.0 for k in ks]
        ax.plot(ks, mean, marker="o", ms=3, label=m)
        ax.fill_between(
            ks,
            [a - b for a, b in zip(mean, std, strict=True)],
            [a + b for a, b in zip(mean, std, strict=True)],
            alpha=0.2,
        )
    ax.axhline(base - delta, color="grey", ls="--", lw=1, label=f"dense - {delta:g} pt")
    ax.set_xlabel("activations removed")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Table]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; quick: 0,1)")
    ap.add_argument("--methods", default="easier,random,max-entropy")
    ap.add_argument("--delta", type=float, default=1.0, help="allowed drop, top-1 points")
    ap.add_argument("--pretrain-epochs", type=int, default=None, help="default 4")
    ap.add_argument(
        "--finetune-steps",
        type=int,
        default=None,
        help="fine-tune: 1 epoch capped at this many steps (default 40)",
    )
    ap.add_argument(
        "--entropy-batches",
        type=int,
        default=None,
        help="batches (of the fine-tune batch size) per entropy pass (default 8)",
    )
    ap.add_argument("--image-size", type=int, default=None, help="resize the images")
    ap.add_argument(
        "--workdir",
        default=None,
        help="keep pretrained weights and the easier run directories here",
    )
    ap.add_argument(
        "--plot",
        default=None,
        help="PNG path (default docs/reproduction.png; quick: none unless given)",
    )
    ap.add_argument("--json", default=None, help="also write the raw curves here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.seeds = args.seeds or ("0,1" if args.quick else "0,1,2")
    cfg = settings(args)
    ft, pre = cfg["finetune"], cfg["pretrain"]
    head = header(
        [ft.batch_size],
        f"{cfg['model']} width {cfg['width']} on {cfg['data']}"
        f"{' at ' + str(cfg['image_size']) + 'px' if cfg['image_size'] else ''}; "
        f"seeds {args.seeds}; pretrain {pre.epochs} epochs"
        f"{f' (<= {pre.max_steps} steps)' if pre.max_steps else ''} lr {pre.lr}; "
        f"fine-tune per removal {ft.epochs} epoch <= {ft.max_steps} steps lr {ft.lr}; "
        f"entropy on {cfg['entropy_batches']} x {ft.batch_size} training images; "
        f"delta {args.delta}; run_all",
    )
    print(head, flush=True)
    work = Path(args.workdir) if args.workdir else None
    t0 = time.perf_counter()
    res = run(args, cfg, work, log=lambda m: print(m, flush=True))
    wall = time.perf_counter() - t0
    out_tables, verdict = tables(res, cfg, args.delta)
    for t in out_tables:
        print()
        print(t.markdown())
    print(f"\n{verdict}\n\ntotal wall time {wall:.0f}s")
    plot_path = args.plot or (None if args.quick else "docs/reproduction.png")
    extra = verdict
    if plot_path:
        done = plot(
            res,
            args.delta,
            Path(plot_path),
            f"{cfg['model']} w{cfg['width']:g} on {cfg['data']}, seeds {args.seeds}",
        )
        if done is not None:
            print(f"plot: {done}")
            extra += f"\n\n![test top-1 vs removed sites]({Path(plot_path).name})"
    if args.json:
        raw = {f"{s}/{m}": curve(h) for (s, m), h in res["histories"].items()}
        Path(args.json).write_text(json.dumps({"curves": raw, "wall_s": wall}, indent=1))
    write_out(args.out, head, out_tables, extra + f"\n\nTotal wall time: {wall:.0f} s.")
    return out_tables


if __name__ == "__main__":
    main(sys.argv[1:])
