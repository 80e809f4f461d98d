"""Whole paper models, linearized then folded: latency, FLOPs, params and depth before and after.

    python bench/bench_fold_models.py                      # 4 models at width 1.0, batch 1 and 64
    python bench/bench_fold_models.py --quick              # width 0.125, batch 1 and 8, seconds
    python bench/bench_fold_models.py --run runs/resnet18-mnist5k-easier-s0   # + a reduce run's set

Each model (32x32 input, random weights, every BatchNorm's running statistics and affine
parameters randomised so that BN folding is not the identity) gets a realistic set of sites
linearized with ``linearize(..., fold_ready=True)``:

* resnet18: the inner relu1 of every BasicBlock (8 of 17);
* mobilenet_v2: both ReLU6 of every inverted residual (33 of 35);
* vgg16_bn: every other conv ReLU (7 of 15);
* swin_t: every MLP GELU (12 of 12);
* --run DIR: the ``linearized`` list of DIR/summary.json on the model of DIR/config.json: the
  set the reduce loop actually kept (``--run-width`` rebuilds it at another width).

The linearized, unfolded model is then folded under each planner mode: "none" (BN folding only),
"flops" (merge where FLOPs do not grow), "latency" (merge where the merged layer is measured to be
faster; the plan is made at batch 1 as ``easier.fold`` does with a one-sample example, again at
the largest batch size as "latency@B", and once for both sizes together as "latency@1+B" with
``batch_sizes=(1, B)``: a merge only if neither size gets slower) and "all" (every exact merge).
The unfolded model and every distinct folded model are timed side by side in one process,
in paired rounds (rotated order, ``easier.perf.timing``), at each batch size (median ms per
batch). Speed-up = median per-round unfolded ms / folded ms, with its noise band.
Targets: >= 1.5x where the FLOPs allow it, and never slower (speed-up >= 1) under "latency".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _common import Table, add_common_args, band, header, paired, ratio_cell, write_out
from torch import nn

import easier
from easier import models

SITE_SETS: dict[str, tuple[str, Callable[[list[str]], list[str]]]] = {
    "resnet18": (
        "inner relu1 of every BasicBlock",
        lambda names: [n for n in names if n.endswith(".relu1")],
    ),
    "mobilenet_v2": (
        "both ReLU6 of every inverted residual",
        lambda names: [n for n in names if ".conv." in n],
    ),
    "vgg16_bn": (
        "every other conv ReLU",
        lambda names: [n for n in names if n.startswith("features.")][::2],
    ),
    "swin_t": ("every MLP GELU", lambda names: [n for n in names if ".mlp." in n]),
}


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
                    m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                    m.bias.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)


def paper_case(name: str, width: float) -> tuple[str, nn.Module, torch.Tensor, str, list[str]]:
    """(label, linearized model, one-sample input, set description, sites) for a zoo model."""
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, width=width, image_size=32).eval()
    randomize_bn(model)
    x = torch.randn(1, 3, 32, 32)
    names = [s.name for s in easier.find_sites(model, x)]
    what, pick = SITE_SETS[name]
    chosen = pick(names)
    lin = easier.linearize(model, chosen, fold_ready=True).eval()
    return name, lin, x, f"{what} ({len(chosen)}/{len(names)})", chosen


def run_case(
    run_dir: str, width: float | None
) -> tuple[str, nn.Module, torch.Tensor, str, list[str]]:
    """The same, for the set a reduce run kept (model from its config.json, random weights)."""
    path = Path(run_dir)
    try:
        cfg = json.loads((path / "config.json").read_text())
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(
            f"--run {run_dir}: cannot read config.json/summary.json ({exc}); "
            "pass a run directory written by `easier reduce` or reduce(out=...)"
        ) from exc
    spec = dict(cfg.get("model_spec") or {})
    if not spec:
        raise SystemExit(
            f"--run {run_dir}: config.json has no model_spec (the model was not "
            "built by easier.models), so it cannot be rebuilt here"
        )
    if width is not None:
        spec["width"] = width
    torch.manual_seed(0)
    model = models.create_from_spec(spec).eval()
    randomize_bn(model)
    x = torch.randn(1, *cfg["input_shape"])
    names = [s.name for s in easier.find_sites(model, x)]
    chosen = list(summary.get("linearized") or [])
    lin = easier.linearize(model, chosen, fold_ready=True).eval()
    shape = "x".join(map(str, cfg["input_shape"]))
    label = (
        f"{spec['name']} w{spec.get('width', 1.0):g} {shape} (run {path.parent.name}/{path.name})"
    )
    return label, lin, x, f"kept by the reduce run ({len(chosen)}/{len(names)})", chosen


def _latency_label(batch: int) -> str:
    return "latency" if batch == 1 else f"latency@{batch}"


def held_label(latency_at: list[int]) -> str:
    return "latency@" + "+".join(map(str, latency_at))


def fold_variants(
    lin: nn.Module, x1: torch.Tensor, plans: list[str], latency_at: list[int], plan_time: float
) -> dict[str, nn.Module]:
    """Folded model per plan label; "latency" is planned at batch 1, "latency@B" at batch B,
    and "latency@1+B" must hold for every one of those sizes (``batch_sizes=``)."""
    out: dict[str, nn.Module] = {}
    for plan in plans:
        if plan != "latency":
            out[plan] = easier.fold(lin, x1, plan=plan)
            continue
        for b in latency_at:
            xb = x1.expand(b, *x1.shape[1:]).contiguous()
            fp = easier.plan_fold(lin, xb, "latency", min_run_time=plan_time)
            out[_latency_label(b)] = easier.fold(lin, x1, plan=fp)
        if len(latency_at) > 1:
            fp = easier.plan_fold(lin, x1, "latency", min_run_time=plan_time,
                                  batch_sizes=tuple(latency_at))
            out[held_label(latency_at)] = easier.fold(lin, x1, plan=fp)
    return out


def _merged_ids(model: nn.Module) -> tuple[int, ...]:
    return tuple(c.chain_id for c in model.fold_plan.merged)  # type: ignore[attr-defined]


def bench_case(
    label: str,
    lin: nn.Module,
    x1: torch.Tensor,
    plans: list[str],
    batches: list[int],
    latency_at: list[int],
    rounds: int,
    sample_s: float,
    plan_time: float,
) -> list[dict]:
    """One result dict per variant (unfolded first)."""
    folded = fold_variants(lin, x1, plans, latency_at, plan_time)
    # identical merge sets give identical graphs: time each distinct one once
    distinct: dict[tuple[int, ...], nn.Module] = {}
    for m in folded.values():
        distinct.setdefault(_merged_ids(m), m)
    timed = [lin, *distinct.values()]
    ms: dict[int, list[float]] = {}
    speed: dict[int, list[float]] = {}
    bands: dict[int, list[str]] = {}
    for b in batches:
        xb = torch.randn(b, *x1.shape[1:])
        with torch.no_grad():
            comps = paired([lambda m=m, xb=xb: m(xb) for m in timed], rounds=rounds,
                           min_sample_s=sample_s)
        ms[b] = [c.after_ms for c in comps]
        speed[b] = [1 / c.ratio for c in comps]  # median per-round unfolded / folded
        bands[b] = [band(c, inverse=True) for c in comps]
    with torch.no_grad():
        scale = float(lin(x1).abs().max())
    base = easier.measure(lin, x1, latency=False)
    rows = [
        {
            "model": label,
            "plan": "unfolded",
            "merged": None,
            "chains": None,
            "flops": base.flops_per_sample,
            "params": base.params,
            "depth": base.depth,
            "err": None,
            "rel_err": None,
            "ms": {b: ms[b][0] for b in batches},
            "speedup": {b: 1.0 for b in batches},
            "band": {b: "1.00..1.00" for b in batches},
        }
    ]
    keys = list(distinct)
    for plan, m in folded.items():
        idx = 1 + keys.index(_merged_ids(m))
        meas = easier.measure(m, x1, latency=False)
        fp = m.fold_plan  # type: ignore[attr-defined]
        err = fp.max_abs_error
        rows.append(
            {
                "model": label,
                "plan": plan,
                "merged": len(fp.merged),
                "chains": len(fp.chains),
                "flops": meas.flops_per_sample,
                "params": meas.params,
                "depth": meas.depth,
                "err": err,
                "rel_err": err / scale if err is not None and scale > 0 else None,
                "ms": {b: ms[b][idx] for b in batches},
                "speedup": {b: speed[b][idx] for b in batches},
                "band": {b: bands[b][idx] for b in batches},
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[Table]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument(
        "--models",
        default=None,
        help="comma-separated zoo models, '' for --run sets only (default "
        "resnet18,mobilenet_v2,vgg16_bn,swin_t; quick: resnet18,mobilenet_v2)",
    )
    ap.add_argument("--width", type=float, default=None, help="default 1.0 (quick: 0.125)")
    ap.add_argument("--batch-sizes", default=None, help="default 1,64 (quick: 1,8)")
    ap.add_argument("--plans", default="none,flops,latency,all")
    ap.add_argument(
        "--latency-at",
        default=None,
        help="batch sizes to make 'latency' plans at (default 1 and the largest; quick: 1)",
    )
    ap.add_argument("--rounds", type=int, default=None, help="paired rounds (default 15)")
    ap.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="DIR",
        help="also bench the set a reduce run kept (repeatable)",
    )
    ap.add_argument(
        "--run-width",
        type=float,
        default=None,
        help="rebuild --run models at this width instead of the recorded one",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    width = args.width or (0.125 if args.quick else 1.0)
    batches = [int(b) for b in (args.batch_sizes or ("1,8" if args.quick else "1,64")).split(",")]
    rounds = args.rounds or (3 if args.quick else 15)
    sample_s = 0.01 if args.quick else 0.1
    plan_time = 0.01 if args.quick else 0.1
    plans = [p for p in args.plans.split(",") if p]
    names = (
        args.models
        if args.models is not None
        else ("resnet18,mobilenet_v2" if args.quick else "resnet18,mobilenet_v2,vgg16_bn,swin_t")
    )
    latency_at = sorted(
        {
            int(b)
            for b in (args.latency_at or ("1" if args.quick else f"1,{max(batches)}")).split(",")
        }
    )
    head = header(
        batches,
        f"32x32 input, random weights with randomised BN; width {width} "
        f"(--run sets as recorded unless --run-width); {rounds} paired "
        f"rounds (rotated order) of >= {sample_s:g} s per variant; latency plans timed "
        f"{plan_time:g} s per layer",
    )
    print(head, flush=True)

    cases = [paper_case(n, width) for n in names.split(",") if n]
    cases += [run_case(d, args.run_width) for d in args.run]
    cols = [
        "model",
        "plan",
        "merged chains",
        "FLOPs/sample",
        "FLOPs ratio",
        "params",
        "depth",
        "max |err|",
        "rel err",
    ]
    for b in batches:
        cols += [f"b{b} ms", f"b{b} speed-up", f"b{b} band"]
    main_table = Table(
        "Folding whole models: folded vs linearized-unfolded",
        cols,
        formats={
            "FLOPs/sample": ".3g",
            "FLOPs ratio": ".2f",
            "params": ",",
            "max |err|": ".1e",
            "rel err": ".1e",
        }
        | {f"b{b} ms": ".3g" for b in batches}
        | {f"b{b} speed-up": ".2f" for b in batches},
        suffix={"FLOPs ratio": "x"} | {f"b{b} speed-up": "x" for b in batches},
        note="Each model with a realistic set of activations linearized (fold_ready), then "
        "folded under each planner mode; the unfolded and the folded models are timed "
        "side by side in paired rounds, order rotated (median ms per batch). FLOPs ratio is "
        "unfolded / folded; speed-up the median per-round unfolded / folded ms (> 1: the "
        "folded model is cheaper), band its noise band (sign-test interval). Targets: "
        "speed-up >= 1.5x where the FLOPs allow it, never < 1 under 'latency'.",
    )
    sets = Table(
        "Linearized site sets",
        ["model", "set", "sites"],
        note="Which activations were linearized before folding.",
    )
    verdict = Table(
        "Folding targets",
        [
            "model",
            "best plan",
            "best FLOPs ratio",
            *[f"best b{b} speed-up" for b in batches],
            *[f"latency b{b} speed-up" for b in batches],
            "latency never slower",
            *[f"held b{b} speed-up" for b in batches],
        ],
        formats={"best FLOPs ratio": ".2f"}
        | {
            c: ".2f"
            for c in [f"best b{b} speed-up" for b in batches]
            + [f"latency b{b} speed-up" for b in batches]
            + [f"held b{b} speed-up" for b in batches]
        },
        suffix={"best FLOPs ratio": "x"}
        | {
            c: "x"
            for c in [f"best b{b} speed-up" for b in batches]
            + [f"latency b{b} speed-up" for b in batches]
            + [f"held b{b} speed-up" for b in batches]
        },
        note="Per model: the fastest plan at the largest batch, and the 'latency' plan planned "
        "at the batch it is timed at (latency at batch 1, latency@B at batch B). 'never "
        "slower' allows 3% timing noise. 'held': the one plan made with batch_sizes=(1, B) "
        "(latency@1+B), timed at each size.",
    )
    print("\n".join(main_table.header_lines()), flush=True)
    for label, lin, x1, what, chosen in cases:
        sets.add(
            label,
            what,
            ", ".join(chosen)
            if len(chosen) <= 12
            else ", ".join(chosen[:6]) + f", … ({len(chosen) - 6} more)",
        )
        rows = bench_case(label, lin, x1, plans, batches, latency_at, rounds, sample_s, plan_time)
        base_flops = rows[0]["flops"]
        for r in rows:
            cells = [
                r["model"],
                r["plan"],
                None if r["merged"] is None else f"{r['merged']}/{r['chains']}",
                r["flops"],
                ratio_cell(base_flops, r["flops"]),
                r["params"],
                r["depth"],
                r["err"],
                r["rel_err"],
            ]
            for b in batches:
                cells += [r["ms"][b], r["speedup"][b], r["band"][b]]
            print(main_table.row_line(main_table.add(*cells)), flush=True)
        folded = [r for r in rows if r["plan"] != "unfolded"]
        if folded:
            big = max(batches)
            best = max(folded, key=lambda r: r["speedup"][big])
            lat = {
                b: next((r["speedup"][b] for r in folded if r["plan"] == _latency_label(b)), None)
                for b in batches
            }
            known = [v for v in lat.values() if v is not None]
            held = next((r for r in folded if r["plan"] == held_label(latency_at)), None)
            verdict.add(
                label,
                best["plan"],
                ratio_cell(base_flops, best["flops"]),
                *[best["speedup"][b] for b in batches],
                *lat.values(),
                ("yes" if min(known) >= 0.97 else "no") if known else "–",
                *[held["speedup"][b] if held else None for b in batches],
            )
    tables = [main_table, sets, verdict]
    print()
    for t in tables[1:]:
        print(t.markdown(), end="\n\n", flush=True)
    write_out(args.out, head, tables)
    return tables


if __name__ == "__main__":
    main(sys.argv[1:])
