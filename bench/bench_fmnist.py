"""Fashion-MNIST campaign (issue 23): the paper's method comparison at CPU scale, on real data.

    python bench/bench_fmnist.py                       # phase A then B (resumable), all seeds
    python bench/bench_fmnist.py --phase a             # dense checkpoints only
    python bench/bench_fmnist.py --report              # JSONL -> docs/FMNIST.md tables
    python bench/bench_fmnist.py --smoke --data idx:DIR --root /tmp/x   # seconds

Phase A trains one dense checkpoint per (model, seed) under ``--root`` (default
/work/campaign/fmnist, outside the repository); a checkpoint whose weights load and whose
sidecar JSON matches the setting is never retrained. Phase B runs every registered method on
every checkpoint through ``easier.reduce`` (the same fine-tune budget per removal for all,
delta 1 point on the val split) and appends one JSON row per (model, seed, method) to
``--rows`` (default bench/results/fmnist.jsonl); units with a row are skipped, a half-done unit
resumes from its run directory. ``--report`` turns the rows into markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import easier
from easier import data, models
from easier.train import FineTune, evaluate, fine_tune, seed_everything

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
        ModelSetting("mobilenet_v2-imagenet", 0.5, FineTune(epochs=8, lr=0.05, batch_size=128)),
    ),
    # ~1/5 epoch per removal: 86 steps of 128 images, cosine from lr 0.01
    finetune=FineTune(epochs=1, lr=0.01, batch_size=128, max_steps=86),
)
SMOKE = Setting(
    name="smoke",
    data="fashion-mnist",
    seeds=(0,),
    models=(ModelSetting("resnet18", 0.0625, FineTune(epochs=1, lr=0.05, batch_size=32)),),
    finetune=FineTune(epochs=1, lr=0.01, batch_size=32, max_steps=3),
    delta=100.0,
    entropy_batches=2,
    max_removals=2,
    batch_sizes=(1, 8),
    subset=240,
)


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
    from easier.atomic import atomic_write_text

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
    model = models.create(m.model, num_classes=splits.num_classes,
                          in_channels=splits.in_channels, width=m.width,
                          image_size=splits.image_size)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=["a", "b", "ab"], default="ab")
    ap.add_argument("--smoke", action="store_true", help="tiny setting: seconds")
    ap.add_argument("--quick", action="store_true", help="same as --smoke (run_all passes it)")
    ap.add_argument("--data", default=None, help="dataset spec (default: the setting's)")
    ap.add_argument("--root", default=None, help=f"checkpoints/run dirs (default {DEFAULT_ROOT})")
    ap.add_argument("--rows", default=None, help=f"JSONL rows (default {DEFAULT_ROWS})")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="append the report's markdown to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = SMOKE if (args.smoke or args.quick) else FULL
    root = Path(args.root) if args.root else DEFAULT_ROOT
    if "a" in args.phase:
        phase_a(root, s, args.data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
