"""The argument parser: one-line errors, no abbreviations, defaults shown in --help."""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from easier.cli import commands

__all__ = ["NONNEG_FLOAT", "NONNEG_INT", "POS_FLOAT", "POS_INT", "build_parser"]

DEVICE = re.compile(r"^(cpu|auto|mps|cuda(:\d+)?)$")
PLANS = ["latency", "flops", "all", "none"]


def number(kind: type, *, low: float, strict: bool = False) -> Callable[[str], Any]:
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


def device_name(text: str) -> str:
    """An argparse type: a device name torch understands (checked for availability later)."""
    if not DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r}: valid devices are cpu, cuda, cuda:N, mps "
                                         "and auto")
    return text


POS_INT = number(int, low=1)
NONNEG_INT = number(int, low=0)


def batch_sizes(text: str) -> tuple[int, ...]:
    """``1,64`` -> (1, 64): the batch sizes a latency plan must not slow down."""
    return tuple(POS_INT(s) for s in text.split(","))

POS_FLOAT = number(float, low=0, strict=True)
NONNEG_FLOAT = number(float, low=0)

MODEL_HELP = ("a registry name (easier models), or your own: module.path:callable or "
              "path/to/file.py:callable, called with those of num_classes, in_channels, "
              "image_size, width it accepts")
CHECKPOINT_HELP = ("an easier model.pt, a plain state_dict of --model, or (with --allow-pickle) "
                   "a whole pickled model")


def model_args(p: argparse.ArgumentParser, *, model_default: str | None) -> None:
    """--model, --width, --checkpoint forms shared by reduce, compare and entropy."""
    p.add_argument("--model", default=model_default, help=MODEL_HELP)
    p.add_argument("--width", type=POS_FLOAT, default=None,
                   help="channel width multiplier (default: 0.25 for easier's own models; "
                        "your module:callable gets it only when given; torchvision:/timm: "
                        "models have none)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="let a checkpoint be a whole pickled model (runs code from the file: "
                        "only for files you trust)")


def existing_path(text: str) -> str:
    """An argparse type: a file or directory that exists."""
    if not Path(text).expanduser().exists():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    return text


def input_keys(text: str) -> str | list[str]:
    """``pixel_values`` -> that key; ``input_ids,attention_mask`` -> a list of keys."""
    keys = [k.strip() for k in text.split(",")]
    if not all(keys):
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY or KEY,KEY,...")
    return keys[0] if len(keys) == 1 else keys


def data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="mnist5k",
                   help="dataset: mnist5k, digits, fashion-mnist[:DIR], idx:DIR, cifar10:PATH, "
                        "tiny-imagenet:PATH, imagefolder:PATH (easier datasets), or "
                        "module:callable returning "
                        "(train, val[, test])")
    p.add_argument("--image-size", type=POS_INT, default=None,
                   help="resize images to this side (default: the dataset's own)")
    p.add_argument("--input-key", type=input_keys, default=None, metavar="KEY[,KEY…]",
                   help="for datasets of dict items: the key of the model input (passed "
                        "positionally), or several keys passed as keyword arguments (default: "
                        "every key but label/labels, as keyword arguments)")


def run_args(r: argparse.ArgumentParser) -> None:
    """The options of reduce and compare."""
    model_args(r, model_default="resnet18")
    data_args(r)
    r.add_argument("--delta", type=NONNEG_FLOAT, default=1.0,
                   help="allowed val top-1 drop in points")
    r.add_argument("--max-removals", type=NONNEG_INT, default=None,
                   help="stop after removing this many units (default: no limit)")
    r.add_argument("--max-iterations", type=NONNEG_INT, default=None,
                   help="stop after this many iterations (default: no limit)")
    r.add_argument("--one-shot", type=POS_INT, default=None, metavar="K",
                   help="remove the K lowest-scored units from one measurement, fine-tune once")
    r.add_argument("--all", action="store_true",
                   help="keep going to the last unit and log everything")
    r.add_argument("--confidence", type=fraction(closed=False), default=None, metavar="C",
                   help="accept a removal only when a paired bootstrap of the val samples "
                        "puts its drop within --delta with probability C, e.g. 0.9 (default: "
                        "off, val top-1 within --delta suffices)")
    r.add_argument("--recipe", default="fast", help="fast (CPU minutes) or paper (Table 4)")
    r.add_argument("--epochs", type=NONNEG_INT, default=None,
                   help="fine-tune epochs per iteration (default: the recipe's)")
    r.add_argument("--pretrain-epochs", type=NONNEG_INT, default=None,
                   help="epochs to train the dense model (default: the recipe's, 3 for fast; 0 or "
                        "--checkpoint: none, the model is used as is)")
    r.add_argument("--lr", type=POS_FLOAT, default=None,
                   help="fine-tune learning rate (default: the recipe's)")
    r.add_argument("--batch-size", type=POS_INT, default=None,
                   help="fine-tune batch size (default: the recipe's)")
    r.add_argument("--optimizer", default=None, choices=["sgd", "adam", "adamw"],
                   help="fine-tune optimizer (default: the recipe's)")
    r.add_argument("--max-steps", type=POS_INT, default=None,
                   help="cap optimizer steps per fine-tune (default: no cap)")
    recovery_args(r)
    r.add_argument("--checkpoint", type=existing_path, default=None,
                   help=f"start from these trained weights: {CHECKPOINT_HELP}")
    r.add_argument("--entropy-batches", type=POS_INT, default=None,
                   help="measure entropy on at most this many batches (default: all)")
    r.add_argument("--no-fold-ready", action="store_true",
                   help="keep each conv's own padding when linearizing: the original borders, "
                        "but a conv chain whose later convs pad is then never merged")
    r.add_argument("--linearize", default="identity", choices=["identity", "affine"],
                   help="what a removed activation becomes: the identity (the paper) or the "
                        "per-channel least-squares a*z+b fitted on training batches (both fold "
                        "exactly)")
    r.add_argument("--no-fold", action="store_true", help="do not fold at the end")
    r.add_argument("--plan", default="latency", choices=PLANS, help="what folding optimises")
    r.add_argument("--resume", action="store_true", help="continue the run in --out")
    r.add_argument("--seed", type=NONNEG_INT, default=0,
                   help="seed of data splits and training (default: 0)")
    r.add_argument("--device", type=device_name, default="auto",
                   help="cpu, cuda, cuda:N, mps or auto (a GPU when there is one)")
    r.add_argument("--threads", type=POS_INT, default=None,
                   help="torch CPU threads (default: torch's choice)")
    r.add_argument("--amp", action="store_true",
                   help="mixed precision for training on CUDA (bfloat16 autocast)")
    r.add_argument("--dist-timeout", type=POS_FLOAT, default=None, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others before every rank "
                        "stops with an error (default: 900; the run stays resumable)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")


def fraction(*, closed: bool) -> Callable[[str], float]:
    """An argparse type: a number in [0, 1] (``closed``), else strictly between 0 and 1."""
    where = "in [0, 1]" if closed else "strictly between 0 and 1"

    def parse(text: str) -> float:
        v = NONNEG_FLOAT(text)
        if v > 1 or (not closed and not 0 < v < 1):
            raise argparse.ArgumentTypeError(f"{text!r}: must be a number {where}")
        return v

    parse.__name__ = "float"
    return parse


def recovery_args(r: argparse.ArgumentParser) -> None:
    """Early stop and distillation of each fine-tune (easier.Recovery); defaults are its own."""
    r.add_argument("--early-stop-every", type=POS_INT, default=None, metavar="N",
                   help="stop each fine-tune once a validation subset is back within --delta "
                        "of the dense model, checked every N optimizer steps (default: off, "
                        "the full budget)")
    r.add_argument("--early-stop-batches", type=POS_INT, default=4, metavar="B",
                   help="the early-stop subset: the first B validation batches")
    r.add_argument("--early-stop-margin", type=NONNEG_FLOAT, default=0.0, metavar="POINTS",
                   help="ask the subset for this many points more than baseline - delta "
                        "(default: 0)")
    r.add_argument("--early-stop-finish", action=argparse.BooleanOptionalAction, default=True,
                   help="when a fine-tune stopped early but the full validation set rejects "
                        "its model, train the rest of the budget and check again before "
                        "rejecting")
    r.add_argument("--distill", type=fraction(closed=True), default=0.0, metavar="W",
                   help="weight of distillation from the dense model in the fine-tune loss, "
                        "0..1 (default: 0, plain cross-entropy)")
    r.add_argument("--distill-temperature", type=POS_FLOAT, default=4.0, metavar="T",
                   help="softmax temperature of the distillation term")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" where there is a default worth showing and the help names none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action) or text


class Parser(argparse.ArgumentParser):
    """One-line errors (``easier: error: ...``, exit 2), no abbreviations, defaults in --help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", Help)
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        """As argparse, but an unknown option is reported by the subcommand it was given to."""
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            owner = self.commands.get(getattr(ns, "command", None) or "", self)
            owner.error(f"unrecognized arguments: {' '.join(extra)}{suggest(owner, extra)}")
        return ns

    def error(self, message: str) -> Any:  # type: ignore[override]
        where = "" if self.prog == "easier" else f"{self.prog}: "
        print(f"easier: error: {where}{message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def suggest(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """``; did you mean --delta?`` for the first unknown option that is close to a real one."""
    flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    for word in extra:
        if word.startswith("--"):
            near = difflib.get_close_matches(word.partition("=")[0], flags, n=1, cutoff=0.6)
            if near:
                return f"; did you mean {near[0]}?"
    return ""


def debug_flag(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument("--debug", action="store_true", default=default,
                   help="print the full traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    """The ``easier`` parser; each subcommand sets ``func`` to its command."""
    p = Parser(
        prog="easier",
        description="Make trained networks shallower: entropy-guided activation removal and "
                    "exact layer folding.")
    debug_flag(p, False)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def add(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        s = sub.add_parser(name, **kwargs)
        p.commands[name] = s
        debug_flag(s, argparse.SUPPRESS)  # `easier --debug CMD` and `easier CMD --debug`
        return s

    r = add("reduce", help="run a depth-reduction method end to end",
            description="Train (or load) a model, then remove activations one at a time, "
                        "fine-tuning after each, until validation accuracy drops more than "
                        "--delta points; then fold.")
    run_args(r)
    r.add_argument("--method", default=commands.DEFAULT_METHOD,
                   help=f"a method of `easier methods`; {commands.RECOMMENDED_METHOD} removed "
                        f"the most on real data (docs/FMNIST.md)")
    r.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. lam=5 (repeatable)")
    r.add_argument("--out", default=None,
                   help="run directory (default runs/MODEL-DATA-METHOD-sSEED)")
    r.add_argument("--plan-batch", type=batch_sizes, default=None, metavar="B[,B…]",
                   help="batch sizes the latency plan must not slow down (default: 1,64)")
    r.set_defaults(func=commands.cmd_reduce)

    c = add("compare", help="run several methods with the same seed and budget",
            description="Run each method's loop on the same model, data, seed and budget, fold "
                        "and measure each result, and write one table (markdown + CSV) and one "
                        "plot.")
    run_args(c)
    c.add_argument("--methods", default=commands.COMPARE_METHODS,
                   help="comma-separated method names")
    c.add_argument("--method-option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="an option of one method, e.g. lacoot:lam=5 (repeatable)")
    c.add_argument("--out", default=None, help="output directory (one run directory per method)")
    c.add_argument("--fronts", action="store_true",
                   help="keep every iteration's model, fold each with --plan and time it against "
                        "the dense one: METHOD/front.csv and fronts.png (accuracy vs latency "
                        "and FLOPs)")
    c.add_argument("--front-batch", type=batch_sizes, default=None, metavar="B[,B…]",
                   help="batch sizes the fronts are timed at (default: 1)")
    c.set_defaults(func=commands.cmd_compare)

    e = add("entropy", help="print the site entropy table of a checkpoint")
    e.add_argument("checkpoint", type=existing_path,
                   help=CHECKPOINT_HELP + " (a plain state_dict needs --model)")
    model_args(e, model_default=None)
    data_args(e)
    e.add_argument("--seed", type=NONNEG_INT, default=0, help="seed of the data split (default: 0)")
    e.add_argument("--batch-size", type=POS_INT, default=256, help="batch size")
    e.add_argument("--max-batches", type=POS_INT, default=None,
                   help="measure at most this many batches (default: all)")
    e.add_argument("--estimator", default="exact", choices=["exact", "reference"],
                   help="entropy estimator")
    e.add_argument("--neuron", default="channel", choices=["channel", "element"],
                   help="what counts as one neuron")
    e.add_argument("--device", type=device_name, default="auto",
                   help="cpu, cuda, cuda:N, mps or auto (a GPU when there is one)")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=commands.cmd_entropy)

    f = add("fold", help="fold a run's model into fewer layers and measure it")
    f.add_argument("run_dir", type=existing_path,
                   help="the --out directory of an `easier reduce` run")
    f.add_argument("--plan", default="latency", choices=PLANS, help="what folding optimises")
    f.add_argument("--onnx", action="store_true", help="also export folded.onnx (needs onnx)")
    f.add_argument("--plan-batch", type=batch_sizes, default=None, metavar="B[,B…]",
                   help="batch sizes the latency plan must not slow down (default: 1,64)")
    f.add_argument("--torchscript", action="store_true",
                   help="also write folded.pt (TorchScript, deprecated in torch 2.13)")
    f.add_argument("--model", default=None, metavar="SPEC",
                   help="for a run of your own module:callable (or file.py:callable) model: the "
                        "same --model again, which allows fold to import that code (a run "
                        "directory's config.json alone never makes fold import code)")
    f.set_defaults(func=commands.cmd_fold)

    for what in ("models", "datasets", "methods"):
        s = add(what, help=f"list the available {what}")
        s.set_defaults(func=lambda _a, w=what: commands.cmd_list(w))
    return p
