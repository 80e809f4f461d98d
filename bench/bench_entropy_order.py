"""Does the entropy order matter where non-linearity matters? Paired orders, >= 5 seeds.

    python bench/bench_entropy_order.py                  # mlp6 + cnn5 on mnist5k, 5 seeds
    python bench/bench_entropy_order.py --quick          # tiny smoke run (seconds)

The reproduction benchmark (bench_reproduction.py) cannot separate the orders: its ResNet-18
loses 16 of 17 ReLUs at < 1 point. Here the settings are chosen so that linearizing *every* site
costs many points after the same fine-tuning (printed as "all-linear cost"): a 6-hidden-layer
MLP and a 5-conv CNN with no pooling but a global average (linear) — both on mnist5k.

Per seed one dense model is trained and shared by every order (paired). Each order runs the same
loop (``easier.reduce`` with ``run_all``: one site per iteration to the last, same fine-tune
budget). At every k (sites removed) we record the test top-1 right after linearizing, before any
fine-tuning but with BN statistics re-estimated on 8 training batches ("pre-FT"), and after
fine-tuning ("post-FT"); and the sites the loop keeps under its delta rule on validation.
``easier-train`` is EASIER with the reference's entropy timing (counted during the last training
epoch, train mode); it also records which site the default eval-mode entropy would have chosen.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import Delegate, Table, add_common_args, header, write_out
from torch import nn

import easier
from easier import data
from easier.edit.recalibrate import reestimate_bn
from easier.methods import Context, Method, Step, create_method
from easier.methods.easier import Easier
from easier.train.finetune import FineTune, evaluate, fine_tune, seed_everything

ORDERS = "easier,easier-train,random,max-entropy"
SIBLINGS = "egp,nepenthe,tlc,layer-folding,lacoot"


class MLP6(nn.Module):
    """Six hidden Linear-BN-ReLU layers: 6 sites; linear when all are removed."""

    def __init__(self, num_classes: int = 10, inp: int = 784, hidden: int = 128, depth: int = 6):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten(1)]
        for i in range(depth):
            layers += [nn.Linear(inp if i == 0 else hidden, hidden), nn.BatchNorm1d(hidden),
                       nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class CNN5(nn.Module):
    """Five conv3x3-BN-ReLU (16, 32s2, 32, 64s2, 64), global average pool, linear: 5 sites."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0):
        super().__init__()
        chans = [max(4, int(c * width)) for c in (16, 32, 32, 64, 64)]
        strides = (1, 2, 1, 2, 1)
        layers: list[nn.Module] = []
        c_in = in_channels
        for c, s in zip(chans, strides, strict=True):
            layers += [nn.Conv2d(c_in, c, 3, stride=s, padding=1, bias=False),
                       nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.body(x)), 1))


class Probe(Delegate):
    """Wraps an order: records pre-fine-tune test top-1 (BN re-estimated) in the history.

    For EASIER with ``entropy_during='train-epoch'`` it also records the site the default
    eval-mode entropy would have chosen on the same model.
    """

    def __init__(self, inner: Method, test: Any):
        super().__init__(inner)
        self.test = test

    def step(self, ctx: Context) -> Step:
        eval_choice = None
        if isinstance(self.inner, Easier) and self.inner.entropy_during != "eval":
            rep = ctx.entropy(ctx.model)  # eval-mode pass on the same model, not cached
            eval_choice = min(ctx.remaining, key=lambda n: (rep[n], ctx.remaining.index(n)))
        step = self.inner.step(ctx)
        probe = copy.deepcopy(step.model)
        reestimate_bn(probe, ctx.train_eval, batches=8, batch_size=ctx.batch_size)
        step.info["pre_ft_test_acc"] = evaluate(probe, self.test, device=ctx.device)[1]
        if eval_choice is not None:
            step.info["eval_choice"] = eval_choice
        return step


def settings(quick: bool) -> dict[str, dict[str, Any]]:
    if quick:
        return {"mlp6": {"build": lambda s: MLP6(s.num_classes, s.in_channels * s.image_size ** 2,
                                                 hidden=16, depth=2),
                         "data": "digits", "pretrain": FineTune(epochs=2, lr=0.05, batch_size=64),
                         "finetune": FineTune(epochs=1, lr=0.01, batch_size=64, max_steps=3)}}
    return {
        "mlp6": {"build": lambda s: MLP6(s.num_classes, s.in_channels * s.image_size ** 2),
                 "data": "mnist5k", "pretrain": FineTune(epochs=15, lr=0.05, batch_size=64),
                 "finetune": FineTune(epochs=1, lr=0.01, batch_size=64)},
        "cnn5": {"build": lambda s: CNN5(s.num_classes, s.in_channels),
                 "data": "mnist5k", "pretrain": FineTune(epochs=8, lr=0.05, batch_size=64),
                 "finetune": FineTune(epochs=1, lr=0.01, batch_size=64)},
    }


def _order(name: str) -> Method:
    if name == "easier-train":
        return Easier(entropy_during="train-epoch")
    return create_method(name)


def run_setting(key: str, cfg: dict[str, Any], seeds: list[int], orders: list[str],
                delta: float, log: Any) -> dict[str, Any]:
    """Every (seed, order) run of one setting, plus the all-linear cost and entropy range."""
    out: dict[str, Any] = {"runs": {}, "all_linear": {}, "dense": {}, "entropy_range": {},
                           "skipped": {}}
    for seed in seeds:
        splits = data.load(cfg["data"], seed=seed)
        seed_everything(seed)
        model = cfg["build"](splits)
        pre = fine_tune(model, splits.train, cfg["pretrain"], seed=seed, desc="pretrain")
        if pre.failed:
            raise SystemExit(f"{key} seed {seed}: pretraining failed: {pre.failed}")
        state = copy.deepcopy(model.state_dict())
        out["dense"][seed] = evaluate(model, splits.test)[1]
        ent = easier.measure_entropy(model, _batches(splits.train_eval))
        out["entropy_range"][seed] = (min(v for _, v in ent.items()),
                                      max(v for _, v in ent.items()))
        # all-linear cost: every site linearized, then the same fine-tune budget
        example = torch.stack([splits.train_eval[i][0] for i in range(2)])
        flat = easier.linearize(copy.deepcopy(model), ent.names, example_input=example)
        fine_tune(flat, splits.train, cfg["finetune"], seed=seed + 7)
        out["all_linear"][seed] = evaluate(flat, splits.test)[1]
        log(f"{key} seed {seed}: dense test {out['dense'][seed]:.2f}%, all-linear after the "
            f"fine-tune budget {out['all_linear'][seed]:.2f}% | entropies "
            f"{out['entropy_range'][seed][0]:.3f}..{out['entropy_range'][seed][1]:.3f}")
        for name in orders:
            fresh = cfg["build"](splits)
            fresh.load_state_dict(state)
            t0 = time.perf_counter()
            try:
                res = easier.reduce(fresh, splits.train, splits.val, test=splits.test,
                                    train_eval=splits.train_eval,
                                    method=Probe(_order(name), splits.test),
                                    finetune=cfg["finetune"],
                                    stop=easier.StopRule(delta=delta, run_all=True),
                                    entropy=easier.EntropyConfig(batches=16),
                                    run=easier.RunConfig(seed=seed, verbose=False))
            except easier.EasierError as exc:
                out["skipped"][name] = str(exc).splitlines()[0]
                log(f"{key} seed {seed} {name}: skipped ({out['skipped'][name]})")
                continue
            hist = [{k: h.get(k) for k in ("iteration", "removed", "chosen", "test_acc",
                                           "val_acc", "accepted", "pre_ft_test_acc",
                                           "eval_choice", "meets_threshold")}
                    for h in res.history]
            out["runs"][f"{seed}/{name}"] = hist
            log(f"{key} seed {seed} {name:>13}: post-FT test "
                + " ".join(f"{h['test_acc']:.1f}" for h in hist)
                + f" | kept {len(res.linearized)} ({time.perf_counter() - t0:.0f}s)")
    return out


def _batches(ds: Any, n: int = 16, bs: int = 128) -> list[Any]:
    from easier.train.finetune import make_loader

    return [b for _, b in zip(range(n), make_loader(ds, bs, shuffle=False), strict=False)]


def by_k(hist: list[dict[str, Any]], key: str) -> dict[int, float]:
    pts = {len(h["removed"]): h[key] for h in hist if h.get(key) is not None}
    if key == "pre_ft_test_acc":
        pts[0] = hist[0]["test_acc"]
    return pts


def kept(hist: list[dict[str, Any]]) -> int:
    return len(next(h for h in reversed(hist) if h["accepted"])["removed"])


def bootstrap_ci(diffs: list[float], reps: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of paired differences."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(reps))
    return means[int(0.025 * reps)], means[int(0.975 * reps) - 1]


def _cell(xs: list[float | None]) -> str:
    """mean ± std over the seeds that reached this k ("(n)" when not all did)."""
    got = [x for x in xs if x is not None]
    if not got:
        return "–"
    return _pm(got) + ("" if len(got) == len(xs) else f" ({len(got)})")


def _pm(xs: list[float], spec: str = ".1f") -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):{spec}} ± {sd:{spec}}"


def one_per_step(res: dict[str, Any], order: str) -> bool:
    """True when every iteration of every run removed exactly one site (k is comparable)."""
    return all([len(h["removed"]) for h in hist] == list(range(len(hist)))
               for key, hist in res["runs"].items() if key.split("/", 1)[1] == order)


def _seeds(res: dict[str, Any], order: str) -> list[int]:
    return sorted(int(k.split("/")[0]) for k in res["runs"] if k.split("/", 1)[1] == order)


def tables(key: str, res: dict[str, Any], orders: list[str], delta: float) -> list[Table]:
    """Accuracy by k (pre- and post-FT), the paired comparison with easier, the timing table."""
    runs = res["runs"]
    orders = [o for o in orders if _seeds(res, o)]
    if "easier" not in orders:
        return []
    dense, lin = list(res["dense"].values()), list(res["all_linear"].values())
    cost = [d - a for d, a in zip(dense, lin, strict=True)]
    lo = min(r[0] for r in res["entropy_range"].values())
    hi = max(r[1] for r in res["entropy_range"].values())
    n_sites = len(runs[f"{_seeds(res, 'easier')[0]}/easier"]) - 1
    out = []
    for key_acc, label in (("pre_ft_test_acc", "pre-FT (BN re-estimated)"),
                           ("test_acc", "post-FT")):
        by_site = [o for o in orders if one_per_step(res, o)]
        t = Table(f"{key}: test top-1 by sites removed, {label} (mean ± std over seeds)",
                  ["k", *[f"{o} ({len(_seeds(res, o))})" for o in by_site]])
        for k in range(1, n_sites + 1):
            t.add(k, *[_cell([by_k(runs[f"{s}/{o}"], key_acc).get(k) for s in _seeds(res, o)])
                       for o in by_site])
        out.append(t)
    paired = Table(
        f"{key}: easier minus each order, paired by seed (mean [95 % bootstrap CI] "
        "wins/ties/losses)",
        ["order", "seeds", "metric", *[f"k={k}" for k in range(1, n_sites + 1)],
         "sites kept (δ rule)"],
        note=f"dense test {_pm(dense)} %; all sites linearized then the same fine-tune: "
        f"{_pm(lin)} % (all-linear cost {_pm(cost)} points); dense site entropies "
        f"{lo:.3f}..{hi:.3f} bits; delta {delta}.")
    for o in (o for o in orders if o != "easier"):
        both = sorted(set(_seeds(res, "easier")) & set(_seeds(res, o)))
        for metric in ("pre_ft_test_acc", "test_acc"):
            cells = []
            for k in range(1, n_sites + 1):
                if not one_per_step(res, o):  # pruning rounds: k is not comparable
                    cells.append("–")
                    continue
                pairs = [(by_k(runs[f"{s}/easier"], metric).get(k),
                          by_k(runs[f"{s}/{o}"], metric).get(k)) for s in both]
                d = [e - x for e, x in pairs if e is not None and x is not None]
                if not d:  # e.g. a pruning method that jumps over this k in every seed
                    cells.append("–")
                    continue
                a, b = bootstrap_ci(d)
                w, ls = sum(x > 0 for x in d), sum(x < 0 for x in d)
                cells.append(f"{statistics.fmean(d):+.1f} [{a:+.1f}, {b:+.1f}] "
                             f"{w}/{len(d) - w - ls}/{ls}")
            dk = [kept(runs[f"{s}/easier"]) - kept(runs[f"{s}/{o}"]) for s in both]
            paired.add(o, len(both), "pre-FT" if metric == "pre_ft_test_acc" else "post-FT",
                       *cells, f"{statistics.fmean(dk):+.1f} ({sum(x > 0 for x in dk)}/"
                       f"{sum(x == 0 for x in dk)}/{sum(x < 0 for x in dk)})")
    out.append(paired)
    if "easier-train" in orders:
        both = sorted(set(_seeds(res, "easier")) & set(_seeds(res, "easier-train")))
        steps = [h for s in both for h in runs[f"{s}/easier-train"][1:] if h.get("eval_choice")]
        differ = sum(h["chosen"] != [h["eval_choice"]] for h in steps)
        first = sum(runs[f"{s}/easier-train"][1]["chosen"] != runs[f"{s}/easier"][1]["chosen"]
                    for s in both)
        t = Table(f"{key}: entropy counted in eval mode (easier) vs during training "
                  "(easier-train, the reference's timing)",
                  ["iterations compared", "different site chosen",
                   "first choice differs (seeds)", "sites kept: easier",
                   "sites kept: easier-train"])
        t.add(len(steps), differ, f"{first}/{len(both)}",
              _pm([kept(runs[f"{s}/easier"]) for s in both]),
              _pm([kept(runs[f"{s}/easier-train"]) for s in both]))
        out.append(t)
    return out


def merge(paths: list[str]) -> dict[str, Any]:
    """Results of several runs (JSON from --json), merged per setting."""
    merged: dict[str, Any] = {}
    for p in paths:
        for key, res in json.loads(Path(p).read_text()).items():
            m = merged.setdefault(key, {"runs": {}, "all_linear": {}, "dense": {},
                                        "entropy_range": {}, "skipped": {}})
            for field in m:
                m[field].update(res.get(field, {}))
    return merged


def plot(all_res: dict[str, Any], orders: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(all_res), figsize=(5.2 * len(all_res), 7), squeeze=False)
    for j, (key, res) in enumerate(all_res.items()):
        for i, (metric, label) in enumerate((("pre_ft_test_acc", "pre-FT, BN re-estimated"),
                                             ("test_acc", "after fine-tuning"))):
            ax = axes[i][j]
            for o in orders:
                if not _seeds(res, o) or not one_per_step(res, o):
                    continue
                cs = [by_k(res["runs"][f"{s}/{o}"], metric) for s in _seeds(res, o)]
                ks = sorted(set.intersection(*(set(c) for c in cs)))
                m = [statistics.fmean(c[k] for c in cs) for k in ks]
                sd = [statistics.stdev([c[k] for c in cs]) if len(cs) > 1 else 0 for k in ks]
                ax.errorbar(ks, m, yerr=sd, marker="o", ms=3, capsize=2, label=o)
            ax.set_title(f"{key}: {label}", fontsize=9)
            ax.set_xlabel("sites linearized (k)")
            ax.set_ylabel("test top-1 (%)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Table]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--seeds", default=None, help="comma-separated (default 0..4; quick 0)")
    ap.add_argument("--orders", default=None, help=f"default {ORDERS},{SIBLINGS}")
    ap.add_argument("--settings", default=None, help="comma-separated subset of mlp6,cnn5")
    ap.add_argument("--delta", type=float, default=1.0)
    ap.add_argument("--plot", default=None, help="PNG path (default docs/entropy_order.png)")
    ap.add_argument("--json", default=None, help="raw histories here")
    ap.add_argument("--load", default=None,
                    help="comma-separated JSON files of earlier runs: merge and report, no run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or 1)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2,3,4")).split(",")]
    orders = (args.orders or (ORDERS if args.quick else f"{ORDERS},{SIBLINGS}")).split(",")
    cfgs = settings(args.quick)
    if args.settings:
        cfgs = {k: cfgs[k] for k in args.settings.split(",")}
    head = header([64], f"settings {list(cfgs)}; seeds {seeds}; orders {orders}; delta "
                  f"{args.delta}; fine-tune per removal: 1 epoch, lr 0.01")
    print(head, flush=True)
    t0 = time.perf_counter()
    if args.load:
        all_res = merge(args.load.split(","))
        orders = list(dict.fromkeys(k.split("/", 1)[1] for r in all_res.values()
                                    for k in r["runs"]))
    else:
        all_res = {k: run_setting(k, c, seeds, orders, args.delta,
                                  lambda m: print(m, flush=True)) for k, c in cfgs.items()}
    out: list[Table] = []
    for k, res in all_res.items():
        out += tables(k, res, orders, args.delta)
        for name, why in res["skipped"].items():
            print(f"{k}: {name} skipped: {why}")
    for t in out:
        print()
        print(t.markdown())
    print(f"\nwall {time.perf_counter() - t0:.0f}s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(all_res, default=str, indent=1))
    if not args.quick or args.plot:
        plot(all_res, orders, Path(args.plot or "docs/entropy_order.png"))
    write_out(args.out, head, out)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
