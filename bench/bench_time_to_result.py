"""Time to result: today's fixed fine-tune budget vs early stop vs early stop + distillation.

    python bench/bench_time_to_result.py                    # both settings, seeds 0,1,2
    python bench/bench_time_to_result.py --settings default --seeds 0
    python bench/bench_time_to_result.py --quick            # convnet on digits, seconds

For every setting and seed the dense model is trained once and its weights are shared by every
variant, which then runs the same loop (``easier.reduce``: remove one activation per
iteration while validation top-1 stays within delta of the dense model). Reported per variant,
mean ± std over seeds: optimizer steps of fine-tuning summed over the run (the rejected last
iteration included), wall time of the loop, sites removed within delta (the kept model),
and the kept model's val/test top-1. Target (issue 14): the same or more sites removed at the
same delta with <= 0.5x the fine-tuning steps of today's loop.

Settings: ``default`` is `easier reduce`'s (ResNet-18 width 0.25 on mnist5k, the fast recipe:
3 pretrain epochs, 1 fine-tune epoch per removal, delta 1); ``mobilenet_v2`` is MobileNetV2
width 0.5 on mnist5k with a budget of several epochs per removal (see ``SETTINGS``; capped
in removals so the whole benchmark finishes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from _common import Table, add_common_args, header, write_out

import easier
from easier import Recovery, data, models
from easier.train.finetune import FineTune, fine_tune, seed_everything

EVERY, BATCHES = 10, 4  # early stop: a check every 10 optimizer steps on 4 val batches

# name -> extra keywords of easier.reduce: a new variant (e.g. another linearization mode) is
# one more line here
ES = {"early_stop_every": EVERY, "early_stop_batches": BATCHES}
KD = {"distill": 0.5, "temperature": 4.0}
# The first five variants ran before Recovery.finish_on_reject existed (a removal rejected
# right after an early stop); they keep that behaviour so their saved rows stay valid.
OLD = {"finish_on_reject": False}
VARIANTS: dict[str, dict[str, Any]] = {
    "today (full budget)": {},
    "early stop": {"recovery": Recovery(**ES, **OLD)},
    "early stop + KD": {"recovery": Recovery(**ES, **KD, **OLD)},
    "early stop + KD + affine": {"recovery": Recovery(**ES, **KD, **OLD), "linearize": "affine"},
    # stop only once the subset is within delta/2 (margin 0.5 pt): more headroom for the next
    # removal than stopping right at the floor
    "early stop (margin 0.5) + KD": {"recovery": Recovery(**ES, **KD, **OLD,
                                                          early_stop_margin=0.5)},
    # today's Recovery defaults: a removal that fails the full validation set after an early
    # stop trains the rest of its budget before it is rejected
    "early stop + finish": {"recovery": Recovery(**ES)},
    "early stop + KD + finish": {"recovery": Recovery(**ES, **KD)},
}
BASELINE = "today (full budget)"


@dataclass(frozen=True)
class Setting:
    """One model/data/budget row of the benchmark."""

    model: str
    width: float
    data: str
    pretrain: FineTune
    finetune: FineTune
    delta: float = 1.0
    max_removals: int | None = None
    entropy_batches: int | None = None
    image_size: int | None = None

    def describe(self) -> str:
        ft = self.finetune
        cap = f", max_removals {self.max_removals}" if self.max_removals is not None else ""
        ent = (f", entropy on {self.entropy_batches} batches" if self.entropy_batches else "")
        return (f"{self.model} width {self.width} on {self.data}; pretrain {self.pretrain.epochs} "
                f"epochs lr {self.pretrain.lr}; fine-tune {ft.epochs} epoch(s) per removal "
                f"(lr {ft.lr}, batch {ft.batch_size}, {ft.schedule}){cap}{ent}; "
                f"delta {self.delta}")


FAST_PRE = FineTune(epochs=3, lr=0.05, batch_size=64)  # easier.recipes "fast"
SETTINGS = {
    "default": Setting("resnet18", 0.25, "mnist5k", FAST_PRE,
                       FineTune(epochs=1, lr=0.01, batch_size=64)),
    "mobilenet_v2": Setting("mobilenet_v2", 0.5, "mnist5k", FAST_PRE,
                            FineTune(epochs=3, lr=0.01, batch_size=64), max_removals=3,
                            entropy_batches=8),
    # the paper's ResNet-18 with a budget of several epochs per removal, uncapped: how far each
    # variant goes within delta, not only how fast it gets to a fixed count
    "resnet18_3ep": Setting("resnet18", 0.25, "mnist5k", FAST_PRE,
                            FineTune(epochs=3, lr=0.01, batch_size=64)),
}
QUICK = {
    "default": Setting("convnet", 1.0, "digits", FineTune(epochs=3, lr=0.05, batch_size=64),
                       FineTune(epochs=1, lr=0.01, batch_size=64, max_steps=6), delta=100.0,
                       max_removals=2, entropy_batches=2),
}


def load_avg() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


def read_rows(path: str | None) -> list[dict[str, Any]]:
    """Rows saved by earlier runs (one JSON object per line); none if there is no file."""
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_row(path: str | None, row: dict[str, Any]) -> None:
    """Append one finished row and flush it, so an interrupted benchmark loses at most one run."""
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_setting(name: str, s: Setting, seeds: list[int], variants: dict[str, dict[str, Any]],
                every: int, log: Any = print, rows_file: str | None = None,
                also: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per (seed, variant): steps, seconds, sites kept, accuracies.

    ``also`` names more rows files, read but never written (e.g. an earlier session's).
    With ``rows_file``, rows already saved there for this setting are reused (the benchmark
    resumes, or is split over processes) and each new row is appended as soon as it finishes.
    """
    rows = [r for r in read_rows(rows_file) if r["setting"] == name]
    have = {(r["variant"], r["seed"]) for r in rows}
    for extra in also or []:  # read-only rows of another session; the rows file wins
        rows += [r for r in read_rows(extra)
                 if r["setting"] == name and (r["variant"], r["seed"]) not in have]
    done = {(r["seed"], r["variant"]) for r in rows}
    for seed in seeds:
        todo = {v: kw for v, kw in variants.items() if (seed, v) not in done}
        if not todo:
            continue
        splits = data.load(s.data, seed=seed, image_size=s.image_size)
        shape = {"num_classes": splits.num_classes, "in_channels": splits.in_channels,
                 "width": s.width, "image_size": splits.image_size}
        seed_everything(seed)
        dense = models.create(s.model, **shape)
        t0 = time.perf_counter()
        seed_everything(seed)
        pre = fine_tune(dense, splits.train, s.pretrain, seed=seed, desc="pretrain")
        log(f"{name} seed {seed}: pretrained in {time.perf_counter() - t0:.0f}s "
            f"(train acc {pre.accuracy:.1f}%), load {load_avg()}")
        for variant, kwargs in todo.items():
            kwargs = dict(kwargs)
            rec = kwargs.get("recovery")
            if rec is not None and rec.early_stop and rec.early_stop_every != every:
                kwargs["recovery"] = Recovery(**{**rec.to_dict(), "early_stop_every": every})
            t0 = time.perf_counter()
            res = easier.reduce(
                copy.deepcopy(dense), splits.train, splits.val, test=splits.test,
                train_eval=splits.train_eval, finetune=s.finetune, pretrain=None,
                stop=easier.StopRule(delta=s.delta, max_removals=s.max_removals),
                entropy=easier.EntropyConfig(batches=s.entropy_batches,
                                             linearize=kwargs.pop("linearize", "identity")),
                run=easier.RunConfig(seed=seed, verbose=False), **kwargs)
            secs = time.perf_counter() - t0
            kept = next(h for h in reversed(res.history) if h["accepted"])
            row = {"setting": name, "variant": variant, "seed": seed,
                   "steps": sum(h.get("finetune_steps") or 0 for h in res.history[1:]),
                   "iterations": len(res.history) - 1, "seconds": secs,
                   "removed": len(kept["removed"]), "val": kept["val_acc"],
                   "test": kept["test_acc"], "dense_val": res.baseline["val_acc"],
                   "dense_test": res.baseline["test_acc"],
                   "per_iter": [h.get("finetune_steps") for h in res.history[1:]],
                   "load": load_avg()}
            rows.append(row)
            append_row(rows_file, row)
            log(f"{name} seed {seed} {variant:>20}: {row['removed']} removed, "
                f"{row['steps']} steps {row['per_iter']}, {secs:.0f}s, val {row['val']:.2f} "
                f"test {row['test']:.2f} (dense {row['dense_val']:.2f}/{row['dense_test']:.2f}), "
                f"load {load_avg()}")
    return rows


def _pm(xs: list[float], spec: str) -> str:
    m = statistics.fmean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:{spec}} ± {s:{spec}}"


def tables(name: str, s: Setting, rows: list[dict[str, Any]]) -> list[Table]:
    """The summary (mean ± std over seeds, steps relative to today's) and the per-seed rows."""
    seen = list(dict.fromkeys(r["variant"] for r in rows))
    variants = [v for v in VARIANTS if v in seen] + [v for v in seen if v not in VARIANTS]
    by = {v: [r for r in rows if r["variant"] == v] for v in variants}
    base = by.get(BASELINE)
    summary = Table(
        f"Time to result: {name}",
        ["variant", "seeds", "fine-tune steps", "steps vs today", "wall s", "sites removed",
         "removed vs today", "val top-1", "test top-1", "target met (mean)",
         "target met (every seed)"],
        note=s.describe() + ". Mean ± std over seeds. 'removed vs today': paired by seed, mean "
             "[min, max] of the difference. 'steps vs today': total steps over the seeds / "
             "today's total. Target (issue 14): as many or more sites removed with <= 0.5x the "
             "fine-tune steps — 'mean': on the mean over seeds; 'every seed': on each seed.")
    for v in variants:
        rs = by[v]
        ratio = paired = met_mean = met_all = None
        if base is not None:
            pairs = [(r, b) for r in rs for b in base if b["seed"] == r["seed"]]
            if pairs:
                ratio = (sum(r["steps"] for r, _ in pairs)
                         / max(1, sum(b["steps"] for _, b in pairs)))
                d = [r["removed"] - b["removed"] for r, b in pairs]
                paired = f"{statistics.fmean(d):+.1f} [{min(d):+d}, {max(d):+d}]"
                met_mean = ("–" if v == BASELINE else
                            "yes" if statistics.fmean(d) >= 0 and ratio <= 0.5 else "no")
                met_all = ("–" if v == BASELINE else
                           "yes" if all(r["removed"] >= b["removed"]
                                        and r["steps"] <= 0.5 * b["steps"]
                                        for r, b in pairs) else "no")
        summary.add(v, len(rs), _pm([r["steps"] for r in rs], ".0f"), ratio,
                    _pm([r["seconds"] for r in rs], ".0f"), _pm([r["removed"] for r in rs], ".1f"),
                    paired, _pm([r["val"] for r in rs], ".2f"), _pm([r["test"] for r in rs], ".2f"),
                    met_mean, met_all)
    summary.formats["steps vs today"] = ".2f"
    summary.suffix["steps vs today"] = "x"
    per_seed = Table(
        f"Time to result: {name}, per seed",
        ["variant", "seed", "removed", "steps", "steps per iteration", "wall s", "val", "test",
         "dense val", "dense test"],
        formats={"wall s": ".0f", "val": ".2f", "test": ".2f", "dense val": ".2f",
                 "dense test": ".2f"})
    for r in sorted(rows, key=lambda r: (r["seed"], variants.index(r["variant"]))):
        per_seed.add(r["variant"], r["seed"], r["removed"], r["steps"],
                     " ".join(map(str, r["per_iter"])), r["seconds"], r["val"], r["test"],
                     r["dense_val"], r["dense_test"])
    return [summary, per_seed]


def main(argv: list[str] | None = None) -> list[Table]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--settings", default=None,
                    help=f"comma-separated subset of {','.join(SETTINGS)} (default: all)")
    ap.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; quick: 0)")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated subset of {list(VARIANTS)} (default: all)")
    ap.add_argument("--every", type=int, default=None,
                    help=f"early-stop check interval in steps (default {EVERY}; quick: 2)")
    ap.add_argument("--rows", default=None,
                    help="JSON-lines file of finished runs: appended as each run ends, and runs "
                         "already in it are not run again (resume, or split the benchmark over "
                         "processes and build the tables from all of them)")
    ap.add_argument("--also", action="append", default=[], metavar="FILE",
                    help="another rows file to read (never written; the --rows file wins)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    table = QUICK if args.quick else SETTINGS
    names = args.settings.split(",") if args.settings else list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; choose from {list(table)}")
    chosen = args.variants.split(",") if args.variants else list(VARIANTS)
    variants = {v: VARIANTS[v] for v in chosen}
    seeds = [int(x) for x in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    every = args.every or (2 if args.quick else EVERY)
    t0 = time.perf_counter()
    start_load = load_avg()
    out: list[Table] = []
    for name in names:
        s = table[name]
        rows = run_setting(name, s, seeds, variants, every, rows_file=args.rows,
                           also=args.also)
        if rows:
            out += tables(name, s, rows)
    head = header(
        sorted({table[n].finetune.batch_size for n in names}),
        f"settings {', '.join(names)}; seeds {', '.join(map(str, seeds))}; early stop every "
        f"{every} steps on {BATCHES} val batches; KD w=0.5, T=4; {time.perf_counter() - t0:.0f}s; "
        f"load average (1/5/15 min) {start_load} before, {load_avg()} after")
    print(head)
    for t in out:
        print()
        print(t.markdown())
    write_out(args.out, head, out)
    return out


if __name__ == "__main__":
    main()
