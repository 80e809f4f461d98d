"""Linear replacement: identity vs per-channel least-squares affine, before any fine-tuning.

    python bench/bench_linear_replacement.py --threads 1        # mlp6 + cnn5 on mnist5k, 2 seeds
    python bench/bench_linear_replacement.py --quick            # tiny smoke run (seconds)

Per seed one dense model is trained (the MLP6 and CNN5 of bench_entropy_order.py, same
recipes). Then every site is linearized alone, once as the identity and once as the affine map
``a * z + b`` fitted by :func:`easier.edit.affine.fit_affine` on 8 training batches, and the test
top-1
is taken with no fine-tuning: with the dense model's BN statistics ("stale") and with them
re-estimated on 8 training batches (:func:`easier.edit.recalibrate.reestimate_bn`). The drop is
dense minus edited, in points; lower is better.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from typing import Any

import torch
from _common import Table, add_common_args, header, write_out
from bench_entropy_order import settings

import easier
from easier import data
from easier.edit.affine import fit_affine
from easier.edit.recalibrate import reestimate_bn
from easier.train.finetune import evaluate, fine_tune, make_loader, seed_everything

FIT_BATCHES = 8
BN_BATCHES = 8


def _drops(model: torch.nn.Module, splits: Any, dense: float) -> dict[str, dict[str, float]]:
    """{site: {variant: test-accuracy drop}} for every single-site linearization."""
    example = torch.stack([splits.train_eval[i][0] for i in range(2)])
    loader = make_loader(splits.train_eval, 128, shuffle=False)
    fits = fit_affine(model, loader, max_batches=FIT_BATCHES)
    out: dict[str, dict[str, float]] = {}
    for site in fits:
        out[site] = {}
        for mode in ("identity", "affine"):
            lin = easier.linearize(model, [site], example_input=example, mode=mode,
                                   fits=fits if mode == "affine" else None)
            out[site][f"{mode} stale"] = dense - evaluate(lin, splits.test)[1]
            reestimate_bn(lin, splits.train_eval, batches=BN_BATCHES, batch_size=128)
            out[site][f"{mode} BN"] = dense - evaluate(lin, splits.test)[1]
    return out


def main(argv: list[str] | None = None) -> list[Table]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--seeds", default="0,1")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")][: 1 if args.quick else None]
    head = header([128], f"seeds {seeds}; affine fit on {FIT_BATCHES} batches, BN re-estimated "
                         f"on {BN_BATCHES}; no fine-tuning")
    print(head, flush=True)
    variants = ["identity stale", "affine stale", "identity BN", "affine BN"]
    table = Table("Linear replacement: identity vs affine (test top-1 drop, points)",
                  ["model", "seed", "dense", "site", *variants],
                  formats={"dense": ".2f", **{v: ".1f" for v in variants}},
                  note="Each site linearized alone, no fine-tuning; 'stale': the dense model's "
                       "BN statistics, 'BN': re-estimated. Lower is better.")
    summary = Table("Mean single-site drop (points) and sites where affine beats identity",
                    ["model", "sites", *variants, "affine < identity (BN)"],
                    formats={v: ".1f" for v in variants})
    for key, cfg in settings(args.quick).items():
        rows = []
        for seed in seeds:
            splits = data.load(cfg["data"], seed=seed)
            seed_everything(seed)
            model = cfg["build"](splits)
            fine_tune(model, splits.train, cfg["pretrain"], seed=seed, desc="pretrain")
            model.eval()
            dense = evaluate(model, splits.test)[1]
            for site, d in _drops(copy.deepcopy(model), splits, dense).items():
                rows.append(d)
                table.add(key, seed, dense, site, *(d[v] for v in variants))
                print(table.row_line(table.rows[-1]), flush=True)
        wins = sum(r["affine BN"] < r["identity BN"] for r in rows)
        summary.add(key, len(rows), *(statistics.mean(r[v] for r in rows) for v in variants),
                    f"{wins}/{len(rows)}")
    print(table.markdown())
    print(summary.markdown())
    write_out(args.out, head, [table, summary])
    return [table, summary]


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
