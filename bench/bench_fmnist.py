"""Fashion-MNIST campaign (issue 23): the paper's method comparison at CPU scale, on real data.

    python bench/bench_fmnist.py                       # phase A then B (resumable), all seeds
    python bench/bench_fmnist.py --phase a             # dense checkpoints only
    python bench/bench_fmnist.py --report              # JSONL -> docs/FMNIST.md tables
    python bench/bench_fmnist.py --retime              # re-time every unit, alone
    python bench/bench_fmnist.py --smoke --data idx:DIR --root /tmp/x   # seconds

Phase A trains one dense checkpoint per (model, seed) under ``--root`` (default
/work/campaign/fmnist, outside the repository); a checkpoint whose weights load and whose
sidecar JSON matches the setting is never retrained. Phase B runs every registered method on
every checkpoint through ``easier.reduce`` (the same fine-tune budget per removal for all,
delta 1 point on the val split) and appends one JSON row per (model, seed, method) to
``--rows`` (default bench/results/fmnist.jsonl); units with a row are skipped, a half-done unit
resumes from its run directory. ``--report`` turns the rows into markdown tables (the dense
figures from the checkpoints' sidecars, else from the rows). ``--retime`` times every unit
again on a quiet machine; a unit whose run directory is gone is rebuilt from its architecture
and recorded sites, and counts only if it folds to the structure the unit recorded.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import easier
from easier import data, models
from easier.data.idx import FASHION_DIR
from easier.train.finetune import FineTune, evaluate, fine_tune, seed_everything

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEFAULT_ROOT = Path("/work/campaign/fmnist")
DEFAULT_ROWS = BENCH / "results" / "fmnist.jsonl"
# Published dense test top-1 on Fashion-MNIST in the EASIER paper (full width, GPU budget).
PUBLISHED = {"resnet18": 94.9, "mobilenet_v2": 95.0, "mobilenet_v2-imagenet": 95.0}


@dataclass(frozen=True)
class ModelSetting:
    """One architecture of the campaign: width and its dense training schedule."""

    model: str
    width: float
    pretrain: FineTune
    # score the test split after every iteration (the curves on test). False: the curves on
    # val, the test split once on the kept model (a third less evaluation per iteration)
    test_curve: bool = True


@dataclass(frozen=True)
class Setting:
    """Everything that fixes the campaign's numbers; stored in every row and checkpoint."""

    name: str
    data: str
    seeds: tuple[int, ...]
    models: tuple[ModelSetting, ...]
    finetune: FineTune  # the budget after each removal, the same for every method
    delta: float = 1.0
    entropy_batches: int | None = 40
    max_removals: int | None = None
    batch_sizes: tuple[int, ...] = (1, 64)
    subset: int | None = None  # smoke: first N images of each split
    timing_rounds: int = 9  # paired rounds of the dense-vs-reduced latency comparison
    timing_seconds: float = 0.4  # per model, all rounds together, per batch size
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


# Timed at 1 thread on this 2-core machine (load ~2.7): ResNet-18 w0.25 1.8 min/epoch (55k,
# batch 128), MobileNetV2 CIFAR-stem w0.5 17 min/epoch (too slow), ImageNet-stem w0.5 2.6
# min/epoch. 8 epochs each: ~15 + ~21 min per seed, ~110 min for the six checkpoints.
FULL = Setting(
    name="full",
    data="fashion-mnist",
    seeds=(0, 1, 2),
    models=(
        ModelSetting("resnet18", 0.25, FineTune(epochs=8, lr=0.05, batch_size=128)),
        ModelSetting("mobilenet_v2-imagenet", 0.5, FineTune(epochs=8, lr=0.05, batch_size=128),
                     test_curve=False),
    ),
    # ~1/5 epoch per removal: 86 steps of 128 images, cosine from lr 0.01
    finetune=FineTune(epochs=1, lr=0.01, batch_size=128, max_steps=86),
)
SMOKE = Setting(
    name="smoke",
    data="fashion-mnist",
    seeds=(0,),
    # test_curve=False: the smoke covers the lean path, the full campaign the other
    models=(ModelSetting("resnet18", 0.0625, FineTune(epochs=1, lr=0.05, batch_size=32),
                         test_curve=False),),
    finetune=FineTune(epochs=1, lr=0.01, batch_size=32, max_steps=3),
    delta=100.0,
    entropy_batches=2,
    max_removals=2,
    batch_sizes=(1, 8),
    subset=240,
    timing_rounds=5,
    timing_seconds=0.03,
)


def restrict(s: Setting, models_arg: str | None, seeds_arg: str | None) -> Setting:
    """The setting cut to some models and seeds (same name: rows and checkpoints are shared)."""
    ms, seeds = s.models, s.seeds
    if models_arg:
        want = [x for x in models_arg.split(",") if x]
        unknown = sorted(set(want) - {m.model for m in ms})
        if unknown:
            raise SystemExit(f"bench_fmnist: unknown model(s) {unknown}; the setting has "
                             f"{[m.model for m in ms]}")
        ms = tuple(m for m in ms if m.model in want)
    if seeds_arg:
        want_seeds = [int(x) for x in seeds_arg.split(",") if x]
        unknown_seeds = sorted(set(want_seeds) - set(seeds))
        if unknown_seeds:
            raise SystemExit(f"bench_fmnist: seed(s) {unknown_seeds} not in {list(seeds)}")
        seeds = tuple(x for x in seeds if x in want_seeds)
    return dataclasses.replace(s, models=ms, seeds=seeds)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def commit_hash() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def load_avg() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


def load_splits(s: Setting, seed: int, spec: str | None = None) -> data.DataSplits:
    splits = data.load(spec or s.data, seed=seed)
    if s.subset is None:
        return splits
    from torch.utils.data import Subset

    def cut(d: Any) -> Any:
        return Subset(d, range(min(s.subset, len(d))))

    return data.DataSplits(
        name=splits.name, train=cut(splits.train), train_eval=cut(splits.train_eval),
        val=cut(splits.val), test=cut(splits.test), num_classes=splits.num_classes,
        in_channels=splits.in_channels, image_size=splits.image_size, mean=splits.mean,
        std=splits.std, classes=splits.classes)


# ---------------------------------------------------------------------------------- phase A


def dense_path(root: Path, s: Setting, m: ModelSetting, seed: int) -> Path:
    return root / s.name / "dense" / f"{m.model}-w{m.width}-s{seed}.pt"


def dense_meta(m: ModelSetting, s: Setting, seed: int) -> dict[str, Any]:
    return {"model": m.model, "width": m.width, "seed": seed, "data": s.data,
            "pretrain": m.pretrain.to_dict()}


def _write_json(path: Path, obj: Any) -> None:
    from easier.io.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def verified_dense(path: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The sidecar record of a finished dense checkpoint, or None if it must be (re)trained."""
    side = path.with_suffix(".json")
    try:
        rec = json.loads(side.read_text())
        if any(rec.get(k) != v for k, v in meta.items()):
            return None
        easier.load_model(path)
        return rec
    except (OSError, ValueError, easier.EasierError, RuntimeError):
        return None


def fresh_model(m: ModelSetting, splits: data.DataSplits) -> torch.nn.Module:
    """The campaign's architecture for ``m`` on this data, freshly initialised."""
    return models.create(m.model, num_classes=splits.num_classes,
                         in_channels=splits.in_channels, width=m.width,
                         image_size=splits.image_size)


def dense(root: Path, s: Setting, m: ModelSetting, seed: int,
          splits: data.DataSplits) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The dense checkpoint of (model, seed): loaded if it verifies, else trained and saved."""
    path = dense_path(root, s, m, seed)
    meta = dense_meta(m, s, seed)
    rec = verified_dense(path, meta)
    if rec is not None:
        return easier.load_model(path), rec
    log(f"phase A: training {m.model} w{m.width} seed {seed} ({m.pretrain.epochs} epochs), "
        f"load {load_avg()}")
    seed_everything(seed)
    model = fresh_model(m, splits)
    t0 = time.perf_counter()
    res = fine_tune(model, splits.train, m.pretrain, seed=seed, desc="pretrain")
    secs = time.perf_counter() - t0
    if res.failed:
        raise RuntimeError(f"dense training of {m.model} seed {seed} failed: {res.failed}")
    _, val = evaluate(model, splits.val)
    _, test = evaluate(model, splits.test)
    rec = {**meta, "val_acc": val, "test_acc": test, "train_acc": res.accuracy,
           "seconds": secs, "epoch_seconds": secs / max(1, res.epochs), "steps": res.steps,
           "published_test": PUBLISHED.get(m.model), "commit": commit_hash(),
           "machine": machine(), "load": load_avg()}
    path.parent.mkdir(parents=True, exist_ok=True)
    easier.save_model(model, path)
    _write_json(path.with_suffix(".json"), rec)  # written last: its presence marks "done"
    log(f"phase A: {m.model} seed {seed}: val {val:.2f} test {test:.2f} "
        f"(published {PUBLISHED.get(m.model)}), {secs / 60:.1f} min "
        f"({secs / 60 / max(1, res.epochs):.2f} min/epoch)")
    return model, rec


def phase_a(root: Path, s: Setting, spec: str | None) -> None:
    for seed in s.seeds:  # seed-major: both models get seed 0 before either gets seed 1
        splits = load_splits(s, seed, spec)
        for m in s.models:
            dense(root, s, m, seed, splits)


# ---------------------------------------------------------------------------------- phase B

# (row label, registry name, options). The same fine-tune budget after each removal for all;
# LaCoOT fine-tunes after its one removal too (its paper default is no fine-tuning) so that
# the comparison is at equal budget. Names not registered are skipped (picked up on a rerun).
METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("easier", "easier", {}),
    ("easier-train-epoch", "easier", {"entropy_during": "train-epoch"}),
    ("random", "random", {}),
    ("max-entropy", "max-entropy", {}),
    ("easier-latency", "easier-latency", {"batch_sizes": (1, 64)}),
    ("tlc", "tlc", {}),
    ("layer-folding", "layer-folding", {}),
    ("egp", "egp", {}),
    ("nepenthe", "nepenthe", {}),
    ("lacoot", "lacoot", {"finetune_after": True}),
    ("probe", "probe", {}),
    ("taylor", "taylor", {}),
    # |ΔL|: the conservative first-order rule (docs/criteria.md: signed picked the worst site)
    ("taylor-abs", "taylor", {"absolute": True}),
)
BASELINE_METHOD = "easier"


def _lib() -> dict[str, Any]:
    """Library pieces outside the top-level API, wherever the layout puts them."""
    from _common import Delegate

    from easier.edit.recalibrate import reestimate_bn
    from easier.methods import create_method, list_methods
    from easier.perf.measure import measure_pair

    return {"measure_pair": measure_pair, "create_method": create_method,
            "list_methods": list_methods, "reestimate_bn": reestimate_bn,
            "Delegate": Delegate}


TIMING_KEYS = ("fold_error", "fold_failed", "dense_ms_b", "reduced_ms_b", "speedup_b",
               "timing_runs_b", "dense_flops", "reduced_flops", "dense_depth", "reduced_depth",
               "dense_params", "reduced_params", "dense_activations", "reduced_activations")


def unit_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r.get("setting"), r.get("model"), r.get("width"), r.get("seed"), r.get("method"))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The unit rows; a later ``retime`` record of a unit replaces its timing fields (and
    sets ``timing_load``, the load it was timed under)."""
    if not path.exists():
        return []
    rows, retimes = [], {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # a line cut by a kill mid-write: ignored, its unit reruns
            continue
        if r.get("kind") == "retime":
            retimes[unit_key(r)] = r
        else:
            rows.append(r)
    for r in rows:
        t = retimes.get(unit_key(r))
        if t is not None and "error" not in r:
            for k in [k for k in r if k.startswith(TIMING_KEYS)]:
                del r[k]
            r.update({k: v for k, v in t.items() if k.startswith(TIMING_KEYS)})
            r["timing_load"] = t["load"]
    return rows


def retime(root: Path, s: Setting, spec: str | None, rows_path: Path) -> None:
    """Fold and time again, side by side, every finished unit not re-timed yet: for a quiet
    machine after a campaign whose timings ran beside other processes. Appends one
    ``retime`` record per unit (the unit rows stay as they were written)."""
    lib = _lib()
    todo = [r for r in read_rows(rows_path) if "error" not in r and "timing_load" not in r]
    for seed in s.seeds:
        splits = None
        for m in s.models:
            units = [r for r in todo if (r["setting"], r["model"], r["width"], r["seed"]) ==
                     (s.name, m.model, m.width, seed)]
            if not units:
                continue
            splits = splits or load_splits(s, seed, spec)
            example = timing_example(splits)
            dense_model, rebuilt = _checkpoint_or_rebuild(dense_path(root, s, m, seed), m, splits)
            for r in units:
                kept, rebuilt_unit = _checkpoint_or_rebuild(
                    run_path(root, s, m, seed, r["method"]) / "model.pt", m, splits, r, example)
                if kept is None:
                    log(f"retime: {m.model} seed {seed} {r['method']}: skipped (no kept model, "
                        f"and a {r['unit']} removal cannot be rebuilt)")
                    continue
                load = load_avg()
                timing = fold_and_time(lib, dense_model, kept, example, s)
                rebuilt_unit = rebuilt or rebuilt_unit
                if rebuilt_unit and (bad := structure_mismatch(r, kept, timing)):
                    # the kept model was more than its architecture with these sites removed
                    # (e.g. Layer Folding's PReLU mixes), or the fold planned differently
                    log(f"retime: {m.model} seed {seed} {r['method']}: skipped, the rebuilt "
                        f"model differs from the unit's ({bad})")
                    continue
                append_row(rows_path, {"kind": "retime", "setting": s.name, "model": m.model,
                                       "width": m.width, "seed": seed, "method": r["method"],
                                       **timing, "load": load, "rebuilt": rebuilt_unit,
                                       "commit": commit_hash(), "machine": machine(),
                                       "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
                log(f"retime: {m.model} seed {seed} {r['method']}"
                    f"{' (rebuilt)' if rebuilt_unit else ''}: speedup b1 "
                    f"{timing.get('speedup_b1', float('nan')):.2f}x (was "
                    f"{r.get('speedup_b1', float('nan')):.2f}x), load {load}")


def _checkpoint_or_rebuild(path: Path, m: ModelSetting, splits: data.DataSplits,
                           row: dict[str, Any] | None = None,
                           example: torch.Tensor | None = None
                           ) -> tuple[torch.nn.Module | None, bool]:
    """The saved model, else (checkpoints gone: they live outside the repository) the same
    architecture with fresh weights and the row's removed sites or blocks made identity.
    Latency and FLOPs depend on the structure, not on the weights; the caller checks that the
    rebuilt structure folds to the FLOPs, parameters and depth the unit recorded."""
    if path.exists():
        return easier.load_model(path), False
    model = fresh_model(m, splits).eval()
    removed = (row or {}).get("removed_units") or []
    if removed and row["unit"] == "site":
        model = easier.linearize(model, removed, example_input=example, fold_ready=True)
    elif removed and row["unit"] == "block":
        model = easier.replace_with_identity(model, removed)
    elif removed:
        return None, True
    return model, True


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def structure_mismatch(row: dict[str, Any], kept: torch.nn.Module,
                       timing: dict[str, Any]) -> str:
    """Which structural figures of a rebuilt unit differ from the recorded ones ('' if none).
    Rows that recorded the kept model's own parameter count are checked on it and on the
    folded activations (independent of the latency plan's timed choices); older rows on the
    folded FLOPs, parameters and depth, which a plan that chose differently also fails."""
    if "kept_params" in row:
        got = {"kept_params": n_params(kept), "reduced_activations":
               timing.get("reduced_activations"), "dense_params": timing.get("dense_params")}
    else:
        got = {f"{t}_{k}": timing.get(f"{t}_{k}") for t in ("dense", "reduced")
               for k in ("flops", "params", "depth")}
    return ", ".join(f"{k} {v} != {row.get(k)}" for k, v in got.items()
                     if row.get(k) is not None and v != row.get(k))


def run_path(root: Path, s: Setting, m: ModelSetting, seed: int, label: str) -> Path:
    """The run directory of one unit."""
    return root / s.name / "runs" / f"{m.model}-w{m.width}-s{seed}" / label


def timing_example(splits: data.DataSplits) -> torch.Tensor:
    """The input both models are folded and timed on: the first 8 val images."""
    return torch.stack([splits.val[i][0] for i in range(8)])


def append_row(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def pre_ft_probe(lib: dict[str, Any], inner: Any, test: Any, bn_batches: int) -> Any:
    """Wrap ``inner`` so each step also scores its candidate before fine-tuning (BN stats
    re-estimated on a copy): the accuracy-at-k curve before recovery. Goes in the record."""

    class PreFT(lib["Delegate"]):
        def step(self, ctx: Any) -> Any:
            st = self.inner.step(ctx)
            m = copy.deepcopy(st.model).to(ctx.device)
            lib["reestimate_bn"](m, ctx.train_eval, batches=bn_batches,
                                 batch_size=ctx.batch_size)
            _, val = evaluate(m, ctx.val)
            _, tst = evaluate(m, test) if test is not None else (None, None)
            st.info = {**st.info, "pre_ft_val_acc": val, "pre_ft_test_acc": tst}
            return st

    return PreFT(inner)


def fold_and_time(lib: dict[str, Any], dense_model: torch.nn.Module, reduced: torch.nn.Module,
                  example: torch.Tensor, s: Setting) -> dict[str, Any]:
    """Both models folded (BN everywhere; linear chains under the latency plan), then timed
    side by side: the ratio reduced/dense per batch size with its noise band."""
    from easier.merge import LatencyConfig

    batch_sizes = s.batch_sizes
    # the plan's own chain timings: the library defaults (7 rounds, 0.1 s), less for smoke
    cfg = LatencyConfig(batch_sizes=batch_sizes, rounds=min(7, s.timing_rounds),
                        min_run_time=min(0.1, s.timing_seconds))
    out: dict[str, Any] = {}
    f_dense = easier.fold(copy.deepcopy(dense_model).eval(), example, plan="latency",
                          latency=cfg)
    try:
        f_red = easier.fold(copy.deepcopy(reduced).eval(), example, plan="latency", latency=cfg)
        out["fold_error"] = f_red.fold_plan.max_abs_error
    except Exception as exc:  # a model fold cannot handle: time it unfolded, say so
        f_red = copy.deepcopy(reduced).eval()
        out["fold_failed"] = f"{type(exc).__name__}: {exc}"[:300]
    before, after, paired = lib["measure_pair"](f_dense, f_red, example,
                                                batch_sizes=batch_sizes, rounds=s.timing_rounds,
                                                min_run_time=s.timing_seconds)
    for tag, m in (("dense", before), ("reduced", after)):
        out[f"{tag}_flops"] = m.flops_per_sample
        out[f"{tag}_depth"] = m.depth
        out[f"{tag}_params"] = m.params
        out[f"{tag}_activations"] = m.activations
        for lat in m.latency:
            out[f"{tag}_ms_b{lat.batch_size}"] = lat.median_ms
    for b, c in paired.items():
        # speedup = dense time / reduced time; the band inverts the ratio's band
        out[f"speedup_b{b}"] = 1 / c.ratio
        out[f"speedup_b{b}_band"] = [1 / c.ratio_hi, 1 / c.ratio_lo]
        out[f"timing_runs_b{b}"] = c.runs
    return out


def run_unit(lib: dict[str, Any], root: Path, s: Setting, m: ModelSetting, seed: int,
             label: str, name: str, options: dict[str, Any], splits: data.DataSplits,
             dense_model: torch.nn.Module, dense_rec: dict[str, Any]) -> dict[str, Any]:
    run_dir = run_path(root, s, m, seed, label)
    inner = lib["create_method"](name, **options)
    test = splits.test if m.test_curve else None
    method = pre_ft_probe(lib, inner, test, bn_batches=8)
    t0 = time.perf_counter()
    res = easier.reduce(
        copy.deepcopy(dense_model), splits.train, splits.val, method=method, test=test,
        train_eval=splits.train_eval, out=run_dir, resume=run_dir.exists(),
        finetune=s.finetune, pretrain=None,
        stop=easier.StopRule(delta=s.delta, max_removals=s.max_removals),
        entropy=easier.EntropyConfig(batches=s.entropy_batches),
        run=easier.RunConfig(seed=seed, verbose=False))
    loop_secs = time.perf_counter() - t0
    hist = res.history
    kept = next(h for h in reversed(hist) if h["accepted"])
    dense_test, kept_test = res.baseline.get("test_acc"), kept.get("test_acc")
    if test is None:  # the test split once, on the kept model
        dense_test = dense_rec["test_acc"]
        kept_test = evaluate(res.model, splits.test)[1]
    example = timing_example(splits)
    t1 = time.perf_counter()
    timing = fold_and_time(lib, dense_model, res.model, example, s)
    return {
        "setting": s.name, "model": m.model, "width": m.width, "seed": seed, "method": label,
        "method_name": name, "method_options": inner.options(), "unit": inner.unit,
        "removed": len(kept["removed"]), "removed_units": kept["removed"],
        # the kept model before folding: what a rebuild for --retime must reproduce
        "kept_params": n_params(res.model),
        "dense_val": res.baseline["val_acc"], "dense_test": dense_test,
        "val": kept["val_acc"], "test": kept_test, "test_curve": m.test_curve,
        "test_drop": (dense_test or 0) - (kept_test or 0),
        "iterations": len(hist) - 1, "stop_reason": res.stop_reason,
        "finetune_steps": sum(h.get("finetune_steps") or 0 for h in hist[1:]),
        # what choosing costs: the method's step (scores, edit) per iteration, no fine-tune
        "step_seconds": [(h.get("seconds") or {}).get("step") for h in hist[1:]],
        # the run's own time (a resumed unit: summed over its sessions)
        "seconds": sum((h.get("seconds") or {}).get("total", 0.0) for h in hist),
        "loop_seconds_this_session": loop_secs, "timing_seconds": time.perf_counter() - t1,
        "curve": [{"k": len(h["removed"]), "iteration": h["iteration"],
                   "accepted": h["accepted"], "val": h.get("val_acc"), "test": h.get("test_acc"),
                   "pre_ft_val": h.get("pre_ft_val_acc"), "pre_ft_test": h.get("pre_ft_test_acc"),
                   "steps": h.get("finetune_steps")}
                  for h in hist if not h.get("failed")],
        **timing,
        "dense_checkpoint": {k: dense_rec.get(k) for k in ("val_acc", "test_acc", "seconds",
                                                           "epoch_seconds", "load")},
        "settings": {"finetune": s.finetune.to_dict(), "delta": s.delta,
                     "entropy_batches": s.entropy_batches, "max_removals": s.max_removals,
                     "batch_sizes": list(s.batch_sizes), "pretrain": m.pretrain.to_dict()},
        "commit": commit_hash(), "machine": machine(), "load": load_avg(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def phase_b(root: Path, s: Setting, spec: str | None, rows_path: Path,
            only: list[str] | None = None, retry_errors: bool = False,
            train: bool = True) -> None:
    """Run the missing units; ``train=False`` skips (model, seed) without a dense checkpoint
    instead of training it (a second process beside a running phase A)."""
    lib = _lib()
    registered = set(lib["list_methods"]())
    todo = [t for t in METHODS if only is None or t[0] in only]
    missing = sorted({n for _, n, _ in todo if n not in registered})
    if missing:
        log(f"phase B: not registered, skipped (rerun picks them up): {', '.join(missing)}")
    todo = [t for t in todo if t[1] in registered]
    for seed in s.seeds:
        splits = None
        for m in s.models:
            rows = read_rows(rows_path)
            done = {r["method"] for r in rows
                    if (r["setting"], r["model"], r["width"], r["seed"]) ==
                    (s.name, m.model, m.width, seed) and (not retry_errors or "error" not in r)}
            units = [t for t in todo if t[0] not in done]
            if not units:
                continue
            if not train and verified_dense(dense_path(root, s, m, seed),
                                            dense_meta(m, s, seed)) is None:
                log(f"phase B: no dense {m.model} seed {seed} yet (--phase b trains none)")
                continue
            splits = splits or load_splits(s, seed, spec)
            dense_model, dense_rec = dense(root, s, m, seed, splits)
            for label, name, options in units:
                log(f"phase B: {m.model} seed {seed} {label}: start, load {load_avg()}")
                try:
                    row = run_unit(lib, root, s, m, seed, label, name, options, splits,
                                   dense_model, dense_rec)
                except (easier.EasierError, RuntimeError, ValueError, TypeError) as exc:
                    row = {"setting": s.name, "model": m.model, "width": m.width, "seed": seed,
                           "method": label, "method_name": name,
                           "error": f"{type(exc).__name__}: {exc}"[:500],
                           "commit": commit_hash(), "machine": machine()}
                    log(f"phase B: {m.model} seed {seed} {label}: FAILED {row['error']}")
                else:
                    log(f"phase B: {m.model} seed {seed} {label}: {row['removed']} removed, "
                        f"test {row['dense_test']:.2f} -> {row['test']:.2f}, speedup b1 "
                        f"{row.get('speedup_b1', float('nan')):.2f}x, {row['seconds']:.0f}s")
                append_row(rows_path, row)


# ---------------------------------------------------------------------------------- report

# two-sided 95 % Student t quantiles, by degrees of freedom (no scipy needed)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    return _T975.get(df) or _T975[max(k for k in _T975 if k <= df)]


def answer(mrows: list[dict[str, Any]], methods: list[str], s: Setting) -> list[str]:
    """The two questions of issue 23 for one model, answered from the rows: which method
    removes the most within delta, and which lie on the accuracy-vs-latency front (no other
    method has both a higher mean test top-1 and a higher mean batch-1 speedup)."""
    stats = {}
    for lab in methods:
        rs = [r for r in mrows if r["method"] == lab]
        sp = [measured_speedup(r) for r in rs if r.get("speedup_b1") is not None]
        stats[lab] = (sum(r["removed"] for r in rs) / len(rs),
                      sum(r["test"] for r in rs) / len(rs),
                      sum(sp) / len(sp) if sp else math.nan, len(rs))
    if not stats:
        return []
    most = max(v[0] for v in stats.values())
    top = [lab for lab, v in stats.items() if v[0] == most]
    front = [lab for lab, (_, acc, sp, _) in stats.items()
             if not any(o_acc >= acc and o_sp >= sp and (o_acc, o_sp) != (acc, sp)
                        for o, (_, o_acc, o_sp, _) in stats.items() if o != lab)]
    seeds = sorted({n for *_, n in stats.values()})
    return ["### Answer", "",
            f"- Most activations removed within delta {s.delta} (mean over "
            f"{'/'.join(map(str, seeds))} seeds): {', '.join(top)} ({most:.1f}).",
            "- Accuracy-vs-latency front (mean test top-1 after, mean batch-1 speedup of the "
            "folded model; a speedup whose paired noise band includes 1 counts as 1.00x): "
            + ", ".join(
                f"{lab} ({stats[lab][1]:.2f} %, {stats[lab][2]:.2f}x)"
                for lab in sorted(front, key=lambda x: -stats[x][1])) + ".", ""]


def measured_speedup(row: dict[str, Any]) -> float:
    """The batch-1 speedup, or 1.0 when its paired noise band includes 1 (no measured change)."""
    lo, hi = row.get("speedup_b1_band") or (math.nan, math.nan)
    return 1.0 if lo <= 1.0 <= hi else row["speedup_b1"]


def mean_step(row: dict[str, Any]) -> float | None:
    """Mean seconds of the method's step (choosing and editing) per iteration of a unit."""
    xs = [x for x in row.get("step_seconds") or [] if x is not None]
    return sum(xs) / len(xs) if xs else None


def mean_ci(xs: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of the 95 % t-interval; None for one value)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, t975(len(xs) - 1) * sd / math.sqrt(len(xs))


def fmt_ci(xs: list[float], spec: str = ".2f", suffix: str = "") -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "–"
    m, h = mean_ci(xs)
    return f"{m:{spec}}{suffix}" + ("" if h is None else f" ± {h:{spec}}")


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|",
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def dense_records(root: Path, s: Setting, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, seed): the checkpoint's sidecar if it verifies, else what the unit rows
    recorded of it, so the report rebuilds from the committed rows alone (the checkpoints
    live outside the repository and may be gone)."""
    out = []
    for seed in s.seeds:
        for m in s.models:
            rec = verified_dense(dense_path(root, s, m, seed), dense_meta(m, s, seed))
            if rec is None:
                rec = dense_from_rows(rows, s, m, seed)
            if rec is not None:
                out.append(rec)
    return out


def dense_from_rows(rows: list[dict[str, Any]], s: Setting, m: ModelSetting,
                    seed: int) -> dict[str, Any] | None:
    for r in rows:
        d = r.get("dense_checkpoint")
        if (not d or "error" in r or r.get("setting") != s.name or r["model"] != m.model
                or r["seed"] != seed or r["width"] != m.width):
            continue
        pre = r["settings"]["pretrain"]
        return {"model": m.model, "width": m.width, "seed": seed, "pretrain": pre,
                "val_acc": d["val_acc"], "test_acc": d["test_acc"], "seconds": d["seconds"],
                "epoch_seconds": d.get("epoch_seconds") or d["seconds"] / pre["epochs"],
                "published_test": PUBLISHED.get(m.model), "load": d.get("load") or "?"}
    return None


def report(rows: list[dict[str, Any]], dense_recs: list[dict[str, Any]], s: Setting,
           nested: bool = False) -> str:
    """Markdown: dense checkpoints, per-method summary, paired differences to easier, curves."""
    ok = [r for r in rows if "error" not in r and r.get("setting") == s.name]
    failed = [r for r in rows if "error" in r and r.get("setting") == s.name]
    ft = s.finetune
    lines = [
        "# Fashion-MNIST: the method comparison on real data (issue 23)", "",
        "Generated by `python bench/bench_fmnist.py --report` from "
        "`bench/results/fmnist.jsonl`; rerun the campaign with `python bench/bench_fmnist.py` "
        "(resumable: finished units are skipped).", "",
        f"Setting `{s.name}`: data `{s.data}` (train 55k / val 5k by seed / official test 10k), "
        f"seeds {', '.join(map(str, s.seeds))}; every method starts from the same dense "
        f"checkpoint per (model, seed) and gets the same fine-tune budget after each removal "
        f"({ft.max_steps or 'all'} steps of batch {ft.batch_size}, lr {ft.lr}, {ft.schedule}); "
        f"stop when val top-1 drops more than delta = {s.delta} point below the dense model "
        f"(the kept model is the last within delta). Latency: both models folded (BN, and linear "
        f"chains under the 'latency' plan for batch {', '.join(map(str, s.batch_sizes))}), timed "
        f"side by side in {s.timing_rounds} paired rounds at 1 thread; speedup = dense / reduced "
        f"(> 1 is faster); FLOPs ratio = reduced / dense per image (> 1: the fold's merges and "
        f"relocated padding cost FLOPs). ± is the half-width of the 95 % t-interval over "
        f"seeds.", "",
        "## Dense checkpoints", "",
    ]
    drows = []
    for r in sorted(dense_recs, key=lambda r: (r["model"], r["seed"])):
        drows.append([r["model"], f"{r['width']}", str(r["seed"]),
                      str(r["pretrain"]["epochs"]), f"{r['val_acc']:.2f}",
                      f"{r['test_acc']:.2f}", f"{r.get('published_test') or '–'}",
                      f"{r['epoch_seconds'] / 60:.1f}", r.get("load", "?")])
    lines += _table(["model", "width", "seed", "epochs", "val top-1", "test top-1",
                     "published (paper, full width)", "min/epoch (1 thread)", "load"], drows)
    for model in sorted({r["model"] for r in ok}):
        mrows = [r for r in ok if r["model"] == model]
        width = mrows[0]["width"]
        methods = [lab for lab, _, _ in METHODS if any(r["method"] == lab for r in mrows)]
        lines += [f"## {model} (width {width})", ""]
        if not nested:  # the figure bench_fmnist --report draws beside this file
            lines += [f"![{model}: top-1 vs activations removed, and vs batch-1 speedup]"
                      f"(fmnist_{model}.png)", ""]
        n_units = len(METHODS) * len(s.seeds)
        ckpt = [d for d in dense_recs if d["model"] == model]
        lines += [f"Campaign: {len(mrows)} of {n_units} units finished ({len(METHODS)} methods "
                  f"x {len(s.seeds)} seeds); their run time adds up to "
                  f"{sum(r['seconds'] for r in mrows) / 3600:.1f} h on one thread, the "
                  f"{len(ckpt)} dense checkpoint(s) took "
                  f"{sum(d['seconds'] for d in ckpt) / 3600:.1f} h. Latency of "
                  f"{sum('timing_load' in r for r in mrows)} of {len(mrows)} units re-timed "
                  "alone (`--retime`); the others were timed beside the campaign's other "
                  "processes (their noise bands say so).", ""]
        lines += ["### Per method", ""]
        tab = []
        for lab in methods:
            rs = sorted((r for r in mrows if r["method"] == lab), key=lambda r: r["seed"])
            tab.append([
                lab, str(len(rs)), fmt_ci([r["removed"] for r in rs], ".1f"),
                fmt_ci([r["dense_test"] for r in rs]), fmt_ci([r["test"] for r in rs]),
                fmt_ci([r["test_drop"] for r in rs]),
                fmt_ci([r.get("speedup_b1") for r in rs], ".2f", "x"),
                fmt_ci([r.get(f"speedup_b{s.batch_sizes[-1]}") for r in rs], ".2f", "x"),
                fmt_ci([r["reduced_flops"] / r["dense_flops"] for r in rs], ".2f", "x"),
                fmt_ci([r["reduced_depth"] for r in rs], ".1f") + f" / {rs[0]['dense_depth']}",
                fmt_ci([r["finetune_steps"] for r in rs], ".0f"),
                fmt_ci([r["seconds"] / 60 for r in rs], ".1f"),
                fmt_ci([mean_step(r) for r in rs if mean_step(r) is not None], ".1f"),
            ])
        lines += _table(["method", "seeds", "removed", "dense test", "test after", "test drop",
                         "speedup b1", f"speedup b{s.batch_sizes[-1]}", "FLOPs ratio",
                         "depth (dense)", "fine-tune steps", "wall min", "choose s/iter"], tab)
        lines += answer(mrows, methods, s)
        base = {r["seed"]: r for r in mrows if r["method"] == BASELINE_METHOD}
        if base:
            lines += ["### Paired by seed: each method minus easier", "",
                      "Difference per seed (method − easier), mean ± 95 % t-interval; "
                      "W/T/L: seeds where the method removed more / as many / fewer "
                      "activations than easier within delta.", ""]
            tab = []
            for lab in methods:
                if lab == BASELINE_METHOD:
                    continue
                pairs = [(r, base[r["seed"]]) for r in mrows
                         if r["method"] == lab and r["seed"] in base]
                if not pairs:
                    continue
                d_rem = [a["removed"] - b["removed"] for a, b in pairs]
                w = sum(d > 0 for d in d_rem)
                t = sum(d == 0 for d in d_rem)
                tab.append([
                    lab, str(len(pairs)), fmt_ci(d_rem, "+.1f"), f"{w}/{t}/{len(pairs) - w - t}",
                    fmt_ci([a["test"] - b["test"] for a, b in pairs], "+.2f"),
                    fmt_ci([(a.get("speedup_b1") or math.nan) - (b.get("speedup_b1") or math.nan)
                            for a, b in pairs], "+.2f", "x"),
                    fmt_ci([a["finetune_steps"] - b["finetune_steps"] for a, b in pairs], "+.0f"),
                ])
            lines += _table(["method", "seeds", "Δ removed", "W/T/L (removed)", "Δ test top-1",
                             "Δ speedup b1", "Δ fine-tune steps"], tab)
        kmax = max(c["k"] for r in mrows for c in r["curve"])
        split = "test" if all(r.get("test_curve", True) for r in mrows) else "val"
        for phase, key in (("before fine-tuning (BN re-estimated)", f"pre_ft_{split}"),
                           ("after fine-tuning", split)):
            lines += [f"### {split.capitalize()} top-1 after k removals, {phase} (mean over "
                      "seeds)", "",
                      "Every evaluated iteration, the rejected last one included; '–' where no "
                      "seed reached k.", ""]
            tab = []
            for lab in methods:
                cells = []
                # per run, the last iteration at k (pruning rounds can leave k unchanged)
                at = [{c["k"]: c for c in r["curve"]} for r in mrows if r["method"] == lab]
                for k in range(kmax + 1):
                    vals = [a[k][key if k else split] for a in at
                            if k in a and a[k].get(key if k else split) is not None]
                    cells.append(f"{sum(vals) / len(vals):.1f}" if vals else "–")
                tab.append([lab, *cells])
            lines += _table(["method", *(f"k={k}" for k in range(kmax + 1))], tab)
    if failed:
        lines += ["## Units that failed", "", *(f"- {r['model']} seed {r['seed']} "
                                              f"{r['method']}: {r['error']}" for r in failed), ""]
    if nested:
        lines = [("#" + ln if ln.startswith("##") else ln) for ln in lines[2:]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=["a", "b", "ab"], default="ab",
                    help="a: dense checkpoints; b: methods on existing checkpoints only; "
                    "ab (default): both, training any missing checkpoint first")
    ap.add_argument("--smoke", action="store_true", help="tiny setting: seconds")
    ap.add_argument("--quick", action="store_true", help="same as --smoke (run_all passes it)")
    ap.add_argument("--data", default=None, help="dataset spec (default: the setting's)")
    ap.add_argument("--root", default=None, help=f"checkpoints/run dirs (default {DEFAULT_ROOT})")
    ap.add_argument("--rows", default=None, help=f"JSONL rows (default {DEFAULT_ROWS})")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="append the report's markdown to this file")
    ap.add_argument("--methods", default=None, help="comma-separated row labels (default all)")
    ap.add_argument("--report", action="store_true",
                    help="write the markdown report of the rows (to --out, default docs/FMNIST.md)")
    ap.add_argument("--retry-errors", action="store_true", help="rerun units whose row failed")
    ap.add_argument("--models", default=None,
                    help="comma-separated model names of the setting (default all); with "
                         "--seeds, splits the campaign between processes that never share a "
                         "checkpoint or a run directory")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default all)")
    ap.add_argument("--retime", action="store_true",
                    help="fold and time every finished unit again (on a quiet machine: the "
                         "campaign's own timings ran beside other processes); appends records")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    smoke = args.smoke or args.quick
    s = restrict(SMOKE if smoke else FULL, args.models, args.seeds)
    with tempfile.TemporaryDirectory(prefix="fmnist-smoke-") as tmp:
        # smoke: checkpoints and rows in a temporary directory unless named; the data is the
        # installed Fashion-MNIST, else a synthetic IDX set (the pipeline runs, numbers mean
        # nothing either way)
        root = Path(args.root) if args.root else (Path(tmp) if smoke else DEFAULT_ROOT)
        rows = Path(args.rows) if args.rows else (root / "rows.jsonl" if smoke else DEFAULT_ROWS)
        spec = args.data
        if smoke and spec is None and not Path(FASHION_DIR).is_dir():
            spec = f"idx:{write_synthetic_idx(Path(tmp) / 'idx')}"
        if args.retime:
            retime(root, s, spec, rows)
        elif not args.report:
            if "a" in args.phase:
                phase_a(root, s, spec)
            if "b" in args.phase:
                only = (args.methods or ("easier,random" if smoke else "")).split(",")
                phase_b(root, s, spec, rows, [m for m in only if m] or None,
                        args.retry_errors, train="a" in args.phase)
        if args.report or args.out:
            # to --out (run_all's section): headings one level down, no title
            got = read_rows(rows)
            text = report(got, dense_records(root, s, got), s, nested=bool(args.out))
            out = Path(args.out) if args.out else ROOT / "docs" / "FMNIST.md"
            if args.out:
                with out.open("a", encoding="utf-8") as f:
                    f.write(text + "\n")
            else:
                out.write_text(text + "\n", encoding="utf-8")
                for png in plot(got, s, ROOT / "docs"):
                    log(f"wrote {png}")
            log(f"wrote {out}")
    return 0


def plot(rows: list[dict[str, Any]], s: Setting, folder: Path) -> list[Path]:
    """docs/fmnist_MODEL.png per model: top-1 vs k before and after fine-tuning (mean over
    seeds), and test top-1 vs batch-1 speedup per unit (one point per seed, mean marked)."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r and r.get("setting") == s.name]
    written = []
    for model in sorted({r["model"] for r in ok}):
        mrows = [r for r in ok if r["model"] == model]
        split = "test" if all(r.get("test_curve", True) for r in mrows) else "val"
        methods = [lab for lab, _, _ in METHODS if any(r["method"] == lab for r in mrows)]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for i, (key, title) in enumerate(((f"pre_ft_{split}", "before fine-tuning (BN re-est.)"),
                                          (split, "after fine-tuning"))):
            ax = axes[i]
            for lab in methods:
                at = [{c["k"]: c for c in r["curve"]} for r in mrows if r["method"] == lab]
                ks = sorted({k for a in at for k in a})
                pts = []
                for k in ks:
                    vals = [a[k].get(key if k else split) for a in at if k in a]
                    vals = [v for v in vals if v is not None]
                    if vals:
                        pts.append((k, sum(vals) / len(vals)))
                if len(pts) > 1:
                    ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=lab)
            ax.set_title(f"{model}: {split} top-1 {title}", fontsize=9)
            ax.set_xlabel("activations removed (k)")
            ax.set_ylabel(f"{split} top-1 (%)")
            ax.legend(fontsize=6)
        ax = axes[2]
        for lab in methods:
            rs = [r for r in mrows if r["method"] == lab and r.get("speedup_b1")]
            if not rs:
                continue
            xs, ys = [r["speedup_b1"] for r in rs], [r["test"] for r in rs]
            line = ax.scatter(xs, ys, s=10, alpha=0.5)
            ax.scatter([sum(xs) / len(xs)], [sum(ys) / len(ys)], s=45, marker="D",
                       color=line.get_facecolor()[0], label=lab)
        ax.axvline(1.0, color="grey", lw=0.6)
        ax.set_title(f"{model}: kept model, test top-1 vs batch-1 speedup (folded)", fontsize=9)
        ax.set_xlabel("speedup at batch 1 (dense / reduced, > 1 faster)")
        ax.set_ylabel("test top-1 (%)")
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = folder / f"fmnist_{model}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_synthetic_idx(d: Path, n_train: int = 300, n_test: int = 100) -> Path:
    """A learnable stand-in IDX set (class = which 7x7 tile is bright), for smoke runs."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        x = rng.randint(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):
            r, q = divmod(int(c), 4)
            x[i, 7 * r:7 * r + 7, 7 * q:7 * q + 7] += 150
        (d / f"{split}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x803, n, 28, 28) + x.tobytes())
        (d / f"{split}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x801, n) + y.astype(np.uint8).tobytes())
    return d


if __name__ == "__main__":
    sys.exit(main())
