"""Command line: ``easier reduce | entropy | fold | models | datasets | methods``.

A thin layer: arguments are parsed into the library's calls; nothing here is needed from Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from .errors import EasierError


def _device(name: str) -> str:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() \
            else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EasierError("--device cuda: no CUDA device is available here; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()):
        raise EasierError("--device mps: MPS is not available here; use --device cpu")
    return name


def _say(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg)


def _finetune_overrides(cfg: Any, args: argparse.Namespace, prefix: str = "") -> Any:
    changes = {}
    for field in ("epochs", "lr", "batch_size", "optimizer", "max_steps"):
        v = getattr(args, prefix + field, None)
        if v is not None:
            changes[field] = v
    return dataclasses.replace(cfg, **changes) if changes else cfg


def cmd_reduce(args: argparse.Namespace) -> int:
    import torch

    from . import data as datasets
    from . import models
    from .recipes import recipe
    from .reduce import reduce
    from .state import load_model
    from .train import seed_everything

    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = datasets.load(args.data, seed=args.seed, image_size=args.image_size)
    pre, ft = recipe(args.recipe, args.model, args.data)
    ft = _finetune_overrides(ft, args)
    if args.pretrain_epochs is not None:
        pre = dataclasses.replace(pre, epochs=args.pretrain_epochs)
    seed_everything(args.seed)
    model = models.create(args.model, num_classes=splits.num_classes,
                          in_channels=splits.in_channels, width=args.width,
                          image_size=splits.image_size)
    if args.checkpoint:
        model = load_model(args.checkpoint, model)
        pre = None
    elif pre.epochs == 0:
        pre = None
    out = Path(args.out or f"runs/{args.model}-{args.data.split(':')[0]}-{args.method}-s{args.seed}")
    _say(f"easier reduce: {args.model} (width {args.width}) on {splits.name} "
         f"{splits.sizes()}, method {args.method}, delta {args.delta}, device {device}, "
         f"{torch.get_num_threads()} threads -> {out}")
    t0 = time.perf_counter()
    result = reduce(
        model, splits.train, splits.val, test=splits.test, train_eval=splits.train_eval,
        method=args.method, delta=args.delta, max_removals=args.max_removals, finetune=ft,
        pretrain=pre, one_shot=args.one_shot, run_all=args.all, seed=args.seed, device=device,
        entropy_batches=args.entropy_batches, fold_ready=not args.no_fold_ready, out=out,
        resume=args.resume, progress=not args.quiet, log=_say,
        config={"model": args.model, "width": args.width, "data": args.data,
                "recipe": args.recipe, "checkpoint": args.checkpoint,
                "image_size": args.image_size},
    )
    print()
    print(result.table())
    print(f"\nkept {len(result.linearized)} linearized site(s): "
          f"{', '.join(result.linearized) or 'none'}")
    print(f"stopped: {result.stop_reason}; wall time {time.perf_counter() - t0:.1f}s; "
          f"run directory: {out}")
    if not args.no_fold:
        _fold_run(out, plan=args.plan, onnx=False)
    return 0


def cmd_entropy(args: argparse.Namespace) -> int:
    from . import data as datasets
    from .entropy import measure_entropy
    from .state import load_model
    from .train import make_loader

    model = load_model(args.checkpoint)
    splits = datasets.load(args.data, seed=args.seed, image_size=args.image_size)
    report = measure_entropy(model, make_loader(splits.train_eval, args.batch_size,
                                                shuffle=False),
                             estimator=args.estimator, neuron=args.neuron,
                             max_batches=args.max_batches, device=_device(args.device),
                             progress=not args.quiet)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(report)
    return 0


def _fold_run(run_dir: Path, *, plan: str, onnx: bool, batch_sizes: tuple[int, ...] = (1, 64)
              ) -> None:
    import torch

    from .fold import fold
    from .measure import compare_table, measure
    from .state import RunDir, load_model

    run = RunDir(run_dir)
    model = load_model(run.file("model.pt")).eval()
    cfg = run.read_config()
    size = cfg.get("image_size") or model.easier_spec.get("image_size", 32)  # type: ignore[union-attr]
    chans = model.easier_spec.get("in_channels", 3)  # type: ignore[union-attr]
    example = torch.randn(1, chans, size, size)
    folded = fold(model, example, plan=plan)
    before = measure(model, example, batch_sizes=batch_sizes)
    after = measure(folded, example, batch_sizes=batch_sizes)
    traced = torch.jit.trace(folded, example)
    torch.jit.save(traced, str(run.file("folded.pt")))
    run.write_json("fold_plan.json", folded.fold_plan.to_dict())
    table = compare_table(before, after)
    run.write_json("fold_measure.json", {"before": before.to_dict(), "after": after.to_dict()})
    (run.file("fold.md")).write_text(f"# fold ({plan})\n\n{table}\n\n```\n{folded.fold_plan}\n```\n")
    print(f"\nfold (plan={plan}): max |error| {folded.fold_plan.max_abs_error:.2e}")
    print(table)
    if onnx:
        try:
            torch.onnx.export(folded, example, str(run.file("folded.onnx")))
        except Exception as exc:  # onnx is an optional extra
            raise EasierError(f"ONNX export failed ({exc}); install the extra: "
                              "pip install 'easier[onnx]'") from exc
    print(f"wrote {run.file('folded.pt')} (TorchScript), fold_plan.json, fold.md")


def cmd_fold(args: argparse.Namespace) -> int:
    _fold_run(Path(args.run_dir), plan=args.plan, onnx=args.onnx)
    return 0


def cmd_list(what: str) -> int:
    if what == "models":
        from .models import list_models

        names = list_models()
    elif what == "datasets":
        from .data import list_datasets

        names = list_datasets()
    else:
        from .methods import list_methods

        names = list_methods()
    print("\n".join(names))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="easier",
        description="Make trained networks shallower: entropy-guided activation removal and "
                    "exact layer folding.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("reduce", help="run a depth-reduction method end to end",
                       description="Train (or load) a model, then remove activations one at a "
                                   "time, fine-tuning after each, until validation accuracy "
                                   "drops more than --delta points; then fold.")
    r.add_argument("--model", default="resnet18", help="registry name (easier models)")
    r.add_argument("--width", type=float, default=0.25, help="channel width multiplier")
    r.add_argument("--data", default="mnist5k", help="dataset spec: mnist5k, digits, cifar10:PATH…")
    r.add_argument("--image-size", type=int, default=None)
    r.add_argument("--method", default="easier", help="easier, random, max-entropy, …")
    r.add_argument("--delta", type=float, default=1.0,
                   help="allowed val top-1 drop in points (default 1.0)")
    r.add_argument("--max-removals", type=int, default=None)
    r.add_argument("--one-shot", type=int, default=None, metavar="K",
                   help="linearize the K lowest sites from one measurement, fine-tune once")
    r.add_argument("--all", action="store_true",
                   help="keep going to the last site and log everything")
    r.add_argument("--recipe", default="fast", help="fast (CPU minutes) or paper (Table 4)")
    r.add_argument("--epochs", type=int, default=None, help="fine-tune epochs per iteration")
    r.add_argument("--pretrain-epochs", type=int, default=None,
                   help="epochs to train the dense model (0: use it as is)")
    r.add_argument("--lr", type=float, default=None)
    r.add_argument("--batch-size", type=int, default=None)
    r.add_argument("--optimizer", default=None, choices=["sgd", "adam", "adamw"])
    r.add_argument("--max-steps", type=int, default=None, help="cap optimizer steps per fine-tune")
    r.add_argument("--checkpoint", default=None, help="start from this trained model.pt")
    r.add_argument("--entropy-batches", type=int, default=None,
                   help="measure entropy on at most this many batches (default: all)")
    r.add_argument("--no-fold-ready", action="store_true",
                   help="do not move conv padding when linearizing (fold becomes inexact)")
    r.add_argument("--no-fold", action="store_true", help="do not fold at the end")
    r.add_argument("--plan", default="latency", choices=["latency", "flops", "all", "none"])
    r.add_argument("--out", default=None, help="run directory (default runs/MODEL-DATA-METHOD-sSEED)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_reduce)

    e = sub.add_parser("entropy", help="print the site entropy table of a checkpoint")
    e.add_argument("checkpoint", help="a model.pt written by easier")
    e.add_argument("--data", default="mnist5k")
    e.add_argument("--image-size", type=int, default=None)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--max-batches", type=int, default=None)
    e.add_argument("--estimator", default="exact", choices=["exact", "reference"])
    e.add_argument("--neuron", default="channel", choices=["channel", "element"])
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_entropy)

    f = sub.add_parser("fold", help="fold a run's model into fewer layers and measure it")
    f.add_argument("run_dir")
    f.add_argument("--plan", default="latency", choices=["latency", "flops", "all", "none"])
    f.add_argument("--onnx", action="store_true", help="also export folded.onnx (needs onnx)")
    f.set_defaults(func=cmd_fold)

    for what in ("models", "datasets", "methods"):
        s = sub.add_parser(what, help=f"list the available {what}")
        s.set_defaults(func=lambda _a, w=what: cmd_list(w))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EasierError as exc:
        print(f"easier: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("easier: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
