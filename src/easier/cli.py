"""Command line: ``easier reduce | compare | entropy | fold | models | datasets | methods``.

A thin layer: arguments are parsed into the library's calls; nothing here is needed from Python.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError, EasierError, StateError

_DEVICE = re.compile(r"^(cpu|auto|mps|cuda(:\d+)?)$")


def _number(kind: type, *, low: float, strict: bool = False) -> Callable[[str], Any]:
    """An argparse type: a finite ``kind`` >= ``low`` (> ``low`` when ``strict``)."""
    bound = f"> {low:g}" if strict else f">= {low:g}"

    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(v) or v < low or (strict and v == low):
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what} {bound}")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages
    return parse


def _device_name(text: str) -> str:
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r}: valid devices are cpu, cuda, cuda:N, mps "
                                         "and auto")
    return text


POS_INT = _number(int, low=1)
NONNEG_INT = _number(int, low=0)


def _batch_sizes(text: str) -> tuple[int, ...]:
    return tuple(POS_INT(s) for s in text.split(","))
POS_FLOAT = _number(float, low=0, strict=True)
NONNEG_FLOAT = _number(float, low=0)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() \
            else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: MPS is not available here; use --device cpu")
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


def _parse_options(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings -> dict; values are JSON when they parse (numbers, true, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--method-option {item!r}: expected KEY=VALUE, e.g. lam=5")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _join(args: argparse.Namespace) -> Any:
    """The device and the process group (a no-op unless launched by torchrun)."""
    from .distributed import init_from_env

    return init_from_env(_device(args.device), timeout_s=args.dist_timeout)


@contextlib.contextmanager
def _locked(path: Path, info: Any) -> Iterator[None]:
    """Hold the writer lock of run directory ``path`` (rank 0 takes it; every rank learns
    whether it got it, so a refusal stops the whole job at once)."""
    from .distributed import any_failed
    from .state import lock_run_dir

    with contextlib.ExitStack() as stack:
        failure: EasierError | None = None
        if info.is_main:
            try:
                stack.enter_context(lock_run_dir(path))
            except EasierError as exc:
                failure = exc
        if info.enabled and any_failed(failure is not None, info) and failure is None:
            raise StateError(f"rank 0 could not lock {path} (its log says why); stopping too")
        if failure is not None:
            raise failure
        yield


def _setup(args: argparse.Namespace, info: Any) -> dict[str, Any]:
    """Data, schedules and a model factory shared by reduce and compare."""
    import torch

    from . import data as datasets
    from . import models
    from .recipes import recipe
    from .state import load_model
    from .train import seed_everything

    device = str(info.device) if info.enabled else _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = datasets.load(args.data, seed=args.seed, image_size=args.image_size)
    pre, ft = recipe(args.recipe, args.model, args.data)
    ft = _finetune_overrides(ft, args)
    if args.pretrain_epochs is not None:
        pre = dataclasses.replace(pre, epochs=args.pretrain_epochs)
    if args.checkpoint or pre.epochs == 0:
        pre = None

    def make_model() -> torch.nn.Module:
        seed_everything(args.seed)
        model = models.create(args.model, num_classes=splits.num_classes,
                              in_channels=splits.in_channels, width=args.width,
                              image_size=splits.image_size)
        return load_model(args.checkpoint, model) if args.checkpoint else model

    kwargs = {
        "test": splits.test, "train_eval": splits.train_eval, "delta": args.delta,
        "max_removals": args.max_removals, "finetune": ft, "pretrain": pre,
        "one_shot": args.one_shot, "run_all": args.all, "max_iterations": args.max_iterations,
        "seed": args.seed, "device": device, "entropy_batches": args.entropy_batches,
        "amp": args.amp,
        "fold_ready": not args.no_fold_ready, "progress": not args.quiet, "log": _say,
        "config": {"model": args.model, "width": args.width, "data": args.data,
                   "recipe": args.recipe, "checkpoint": args.checkpoint,
                   "image_size": args.image_size},
    }
    ranks = (f", {info.world_size} ranks ({torch.distributed.get_backend()})" if info.enabled
             else "")
    if info.is_main:
        _say(f"easier: {args.model} (width {args.width}) on {splits.name} {splits.sizes()}, "
             f"delta {args.delta}, recipe {args.recipe}, device {device}, "
             f"{torch.get_num_threads()} threads{ranks}")
    return {"splits": splits, "make_model": make_model, "kwargs": kwargs}


def cmd_reduce(args: argparse.Namespace) -> int:
    from .loop import reduce
    from .methods import create_method
    from .run_outputs import FoldOptions

    method = create_method(args.method, **_parse_options(args.method_option))
    data_name = args.data.split(":")[0]
    out = Path(args.out or f"runs/{args.model}-{data_name}-{args.method}-s{args.seed}")
    info = _join(args)
    with _locked(out, info):
        env = _setup(args, info)
        _say(f"method {args.method} {method.options() or ''} -> {out}")
        t0 = time.perf_counter()
        result = reduce(env["make_model"](), env["splits"].train, env["splits"].val,
                        method=method, out=out, resume=args.resume,
                        fold=None if args.no_fold else FoldOptions(args.plan, args.plan_batch),
                        **env["kwargs"])
    from .distributed import is_main

    if is_main():
        print()
        print(result.table())
        print(f"\nkept {len(result.linearized)} removed unit(s): "
              f"{', '.join(result.linearized) or 'none'}")
        print(f"stopped: {result.stop_reason}; wall time {time.perf_counter() - t0:.1f}s; "
              f"run directory: {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare, comparison_table

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    opts: dict[str, dict[str, Any]] = {}
    for item in args.method_option:
        name, sep, rest = item.partition(":")
        if not sep or name not in methods:
            raise ConfigError(f"--method-option {item!r}: expected METHOD:KEY=VALUE with METHOD "
                              f"one of {methods}")
        opts.setdefault(name, {}).update(_parse_options([rest]))
    out = Path(args.out or f"runs/compare-{args.model}-{args.data.split(':')[0]}-s{args.seed}")
    info = _join(args)
    with _locked(out, info):
        env = _setup(args, info)
        t0 = time.perf_counter()
        rows = compare(env["make_model"], env["splits"].train, env["splits"].val,
                       methods=methods, out=out, method_options=opts, plan=args.plan,
                       resume=args.resume, **env["kwargs"])
    print()
    print(comparison_table(rows))
    print(f"\nwall time {time.perf_counter() - t0:.1f}s; wrote {out}/comparison.md, "
          "comparison.csv, comparison.png")
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


def cmd_fold(args: argparse.Namespace) -> int:
    from .run_outputs import FoldOptions, fold_run
    from .state import RunDir, lock_run_dir

    run = RunDir(args.run_dir)
    if not run.config_path.is_file():
        raise StateError(f"{run.path} is not a run directory (no config.json); pass the --out "
                         "directory of an `easier reduce` run")
    with lock_run_dir(run.path):
        out = fold_run(args.run_dir, FoldOptions(args.plan, args.plan_batch, args.torchscript,
                                                 args.onnx))
    print(f"fold (plan={args.plan}): max |error| {out['plan']['max_abs_error']:.2g}")
    print(out["table"])
    print(f"wrote {', '.join(out['files'])}, fold_plan.json, fold_measure.json, fold.md to "
          f"{args.run_dir} (load: torch.export.load(path).module())")
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


def _run_args(r: argparse.ArgumentParser) -> None:
    r.add_argument("--model", default="resnet18", help="registry name (easier models)")
    r.add_argument("--width", type=POS_FLOAT, default=0.25, help="channel width multiplier")
    r.add_argument("--data", default="mnist5k", help="dataset spec: mnist5k, digits, cifar10:PATH…")
    r.add_argument("--image-size", type=POS_INT, default=None,
                   help="resize images to this side (default: the dataset's own)")
    r.add_argument("--delta", type=NONNEG_FLOAT, default=1.0,
                   help="allowed val top-1 drop in points")
    r.add_argument("--max-removals", type=NONNEG_INT, default=None,
                   help="stop after removing this many units")
    r.add_argument("--max-iterations", type=NONNEG_INT, default=None,
                   help="stop after this many iterations")
    r.add_argument("--one-shot", type=POS_INT, default=None, metavar="K",
                   help="remove the K lowest-scored units from one measurement, fine-tune once")
    r.add_argument("--all", action="store_true",
                   help="keep going to the last unit and log everything")
    r.add_argument("--recipe", default="fast", help="fast (CPU minutes) or paper (Table 4)")
    r.add_argument("--epochs", type=NONNEG_INT, default=None,
                   help="fine-tune epochs per iteration (default: the recipe's)")
    r.add_argument("--pretrain-epochs", type=NONNEG_INT, default=None,
                   help="epochs to train the dense model (0: use it as is)")
    r.add_argument("--lr", type=POS_FLOAT, default=None,
                   help="fine-tune learning rate (default: the recipe's)")
    r.add_argument("--batch-size", type=POS_INT, default=None,
                   help="fine-tune batch size (default: the recipe's)")
    r.add_argument("--optimizer", default=None, choices=["sgd", "adam", "adamw"],
                   help="fine-tune optimizer (default: the recipe's)")
    r.add_argument("--max-steps", type=POS_INT, default=None,
                   help="cap optimizer steps per fine-tune")
    r.add_argument("--checkpoint", default=None, help="start from this trained model.pt")
    r.add_argument("--entropy-batches", type=POS_INT, default=None,
                   help="measure entropy on at most this many batches (default: all)")
    r.add_argument("--no-fold-ready", action="store_true",
                   help="do not move conv padding when linearizing (fold becomes inexact)")
    r.add_argument("--no-fold", action="store_true", help="do not fold at the end")
    r.add_argument("--plan", default="latency", choices=["latency", "flops", "all", "none"],
                   help="what folding optimises")
    r.add_argument("--resume", action="store_true", help="continue the run in --out")
    r.add_argument("--seed", type=NONNEG_INT, default=0, help="seed of data splits and training")
    r.add_argument("--device", type=_device_name, default="cpu",
                   help="cpu, cuda, cuda:N, mps or auto")
    r.add_argument("--threads", type=POS_INT, default=None,
                   help="torch CPU threads (default: torch's choice)")
    r.add_argument("--amp", action="store_true",
                   help="mixed precision for training on CUDA (bfloat16 autocast)")
    r.add_argument("--dist-timeout", type=POS_FLOAT, default=None, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others before every rank "
                        "stops with an error (default: 900; the run stays resumable)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" where there is a default worth showing and the help names none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action) or text


class _Parser(argparse.ArgumentParser):
    """One-line errors (``easier: error: ...``, exit 2), no abbreviations, defaults in --help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:  # type: ignore[override]
        print(f"easier: error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _debug_flag(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument("--debug", action="store_true", default=default,
                   help="print the full traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="easier",
        description="Make trained networks shallower: entropy-guided activation removal and "
                    "exact layer folding.")
    _debug_flag(p, False)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        s = sub.add_parser(name, **kwargs)
        _debug_flag(s, argparse.SUPPRESS)  # `easier --debug CMD` and `easier CMD --debug`
        return s

    r = add("reduce", help="run a depth-reduction method end to end",
            description="Train (or load) a model, then remove activations one at a time, "
                        "fine-tuning after each, until validation accuracy drops more than "
                        "--delta points; then fold.")
    _run_args(r)
    r.add_argument("--method", default="easier", help="easier, egp, lacoot, tlc, random, …")
    r.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. lam=5 (repeatable)")
    r.add_argument("--out", default=None,
                   help="run directory (default runs/MODEL-DATA-METHOD-sSEED)")
    r.add_argument("--plan-batch", type=_batch_sizes, default=None, metavar="B[,B…]",
                   help="batch sizes the latency plan must not slow down (default: 1,64)")
    r.set_defaults(func=cmd_reduce)

    c = add("compare", help="run several methods with the same seed and budget",
            description="Run each method's loop on the same model, data, seed and budget, fold "
                        "and measure each result, and write one table (markdown + CSV) and one "
                        "plot.")
    _run_args(c)
    c.add_argument("--methods", default="easier,egp,lacoot,tlc,layer-folding,random",
                   help="comma-separated method names")
    c.add_argument("--method-option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="an option of one method, e.g. lacoot:lam=5 (repeatable)")
    c.add_argument("--out", default=None, help="output directory (one run directory per method)")
    c.set_defaults(func=cmd_compare)

    e = add("entropy", help="print the site entropy table of a checkpoint")
    e.add_argument("checkpoint", help="a model.pt written by easier")
    e.add_argument("--data", default="mnist5k", help="dataset spec")
    e.add_argument("--image-size", type=POS_INT, default=None,
                   help="resize images to this side (default: the dataset's own)")
    e.add_argument("--seed", type=NONNEG_INT, default=0, help="seed of the data split")
    e.add_argument("--batch-size", type=POS_INT, default=256, help="batch size")
    e.add_argument("--max-batches", type=POS_INT, default=None,
                   help="measure at most this many batches (default: all)")
    e.add_argument("--estimator", default="exact", choices=["exact", "reference"],
                   help="entropy estimator")
    e.add_argument("--neuron", default="channel", choices=["channel", "element"],
                   help="what counts as one neuron")
    e.add_argument("--device", type=_device_name, default="cpu",
                   help="cpu, cuda, cuda:N, mps or auto")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_entropy)

    f = add("fold", help="fold a run's model into fewer layers and measure it")
    f.add_argument("run_dir", help="the --out directory of an `easier reduce` run")
    f.add_argument("--plan", default="latency", choices=["latency", "flops", "all", "none"],
                   help="what folding optimises")
    f.add_argument("--onnx", action="store_true", help="also export folded.onnx (needs onnx)")
    f.add_argument("--plan-batch", type=_batch_sizes, default=None, metavar="B[,B…]",
                   help="batch sizes the latency plan must not slow down (default: 1,64)")
    f.add_argument("--torchscript", action="store_true",
                   help="also write folded.pt (TorchScript, deprecated in torch 2.13)")
    f.set_defaults(func=cmd_fold)

    for what in ("models", "datasets", "methods"):
        s = add(what, help=f"list the available {what}")
        s.set_defaults(func=lambda _a, w=what: cmd_list(w))
    return p


def describe_failure(exc: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) of an error: 2 for a bad option, 1 for a runtime failure."""
    from .distributed import get_info, timed_out

    if isinstance(exc, ConfigError):
        return str(exc), 2
    if isinstance(exc, EasierError):
        return str(exc), 1
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS,
                                                  errno.EACCES, errno.EIO):
        where = f" {exc.filename}" if exc.filename else ""
        return (f"cannot write{where}: {os.strerror(exc.errno or 0)}. Nothing already saved was "
                "damaged (files are replaced atomically): fix that, then rerun the same command "
                "with --resume to continue from the last saved iteration"), 1
    info = get_info()
    if info.enabled and timed_out(exc):
        return (f"rank {info.rank}: no answer from the other ranks within the process-group "
                "timeout (--dist-timeout): a rank froze or died. The run directory holds the "
                "last completed iteration: rerun with --resume", 1)
    return (f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback; "
            "please report it)"), 1


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("easier: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, the traceback only under --debug
        message, code = describe_failure(exc)
        if args.debug:
            traceback.print_exc()
        print(f"easier: error: {message}", file=sys.stderr)
        return code
    finally:
        from .distributed import cleanup

        with contextlib.suppress(Exception):  # a group broken by a dead rank may not close
            cleanup()


if __name__ == "__main__":
    sys.exit(main())
