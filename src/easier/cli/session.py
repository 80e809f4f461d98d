"""Arguments turned into what the commands need: device, data, a model factory, settings."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from easier.cli.user import is_callable_spec
from easier.errors import ConfigError

__all__ = ["build_base", "device", "join", "locked", "out_dir", "parse_options",
           "say", "setup"]


def device(name: str) -> str:
    """The torch device for ``--device`` (``auto``: CUDA, else MPS, else CPU)."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if mps and mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; use --device cpu")
    if name == "mps" and not (mps and mps.is_available()):
        raise ConfigError("--device mps: MPS is not available here; use --device cpu")
    return name


def say(msg: str) -> None:
    """Print a line without breaking a progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(msg)


def parse_options(items: list[str]) -> dict[str, Any]:
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


def join(args: argparse.Namespace) -> Any:
    """The device and the process group (a no-op unless launched by torchrun)."""
    from easier.parallel import init_from_env

    return init_from_env(device(args.device), timeout_s=args.dist_timeout)


def locked(path: Path, info: Any) -> contextlib.AbstractContextManager[None]:
    """Hold the writer lock of run directory ``path`` for every rank of the job."""
    from easier.io.rundir import lock_run_dir_ranks

    return lock_run_dir_ranks(path, info)


def build_base(name: str, *, num_classes: int, in_channels: int, image_size: int,
               width: float) -> Any:
    """A fresh model: a registry name or the user's ``module:callable``. A model that needs
    larger images says which ``--image-size`` to pass."""
    from easier import models
    from easier.cli.user import build_model

    if is_callable_spec(name):
        return build_model(name, num_classes=num_classes, in_channels=in_channels,
                           image_size=image_size, width=width)
    try:
        return models.create(name, num_classes=num_classes, in_channels=in_channels,
                             width=width, image_size=image_size)
    except ConfigError as exc:
        need = re.search(r"image_size >= (\d+)", str(exc))
        if need is None:
            raise
        raise ConfigError(f"{str(exc).rstrip('.')}: pass --image-size {need.group(1)} (or "
                          "larger) to resize the dataset's images") from exc


def finetune_overrides(cfg: Any, args: argparse.Namespace) -> Any:
    changes = {f: getattr(args, f) for f in ("epochs", "lr", "batch_size", "optimizer",
                                             "max_steps") if getattr(args, f, None) is not None}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def setup(args: argparse.Namespace, info: Any) -> dict[str, Any]:
    """Data, schedules and a model factory shared by reduce and compare."""
    import torch

    from easier.cli.user import load_checkpoint, load_data, model_file
    from easier.pipeline.settings import EntropyConfig, RunConfig, StopRule
    from easier.train.finetune import seed_everything
    from easier.train.recipes import recipe
    from easier.train.recovery import Recovery

    dev = str(info.device) if info.enabled else device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = load_data(args.data, seed=args.seed, image_size=args.image_size,
                       input_key=args.input_key)
    pre, ft = recipe(args.recipe, args.model, args.data)
    ft = finetune_overrides(ft, args)
    if args.pretrain_epochs is not None:
        pre = dataclasses.replace(pre, epochs=args.pretrain_epochs)
    if args.checkpoint or pre.epochs == 0:
        pre = None
    shape = {"num_classes": splits.num_classes, "in_channels": splits.in_channels,
             "image_size": splits.image_size}

    whole: list[str] = []  # the class of a whole pickled model that replaces --model

    def make_model() -> torch.nn.Module:
        seed_everything(args.seed)
        model = build_base(args.model, width=args.width, **shape)
        if args.checkpoint:
            loaded = load_checkpoint(args.checkpoint, model, allow_pickle=args.allow_pickle)
            if type(loaded) is not type(model):
                whole[:] = [type(loaded).__name__]
            model = loaded
        return model

    make_model()  # a model that cannot be built fails here, before any training
    name = (f"the whole model in {args.checkpoint} ({whole[0]}; --model {args.model} is not "
            "used)" if whole else f"{args.model} (width {args.width})")
    config = {"model": args.model, "width": args.width, "data": args.data,
              "recipe": args.recipe, "checkpoint": args.checkpoint,
              "image_size": args.image_size}
    if is_callable_spec(args.model):  # what `easier fold` needs to rebuild the user's model
        config["model_kwargs"] = shape
        if model_file(args.model):  # found from any directory; may change on resume
            config["model_file"] = model_file(args.model)
    kwargs = {
        "test": splits.test, "train_eval": splits.train_eval, "finetune": ft, "pretrain": pre,
        "stop": StopRule(delta=args.delta, max_removals=args.max_removals,
                         max_iterations=args.max_iterations, run_all=args.all,
                         one_shot=args.one_shot),
        "recovery": Recovery(early_stop_every=args.early_stop_every,
                             early_stop_batches=args.early_stop_batches,
                             early_stop_margin=args.early_stop_margin, distill=args.distill,
                             temperature=args.distill_temperature,
                             finish_on_reject=args.early_stop_finish),
        "entropy": EntropyConfig(batches=args.entropy_batches,
                                 fold_ready=not args.no_fold_ready,
                                 linearize=getattr(args, "linearize", "identity")),
        "run": RunConfig(seed=args.seed, device=dev, amp=args.amp, progress=not args.quiet,
                         log=say, extra=config, input_key=args.input_key),
    }
    ranks = (f", {info.world_size} ranks ({torch.distributed.get_backend()})" if info.enabled
             else "")
    if info.is_main:
        say(f"easier: {name} on {splits.name} {splits.sizes()}, "
            f"delta {args.delta}, recipe {args.recipe}, device {dev}, "
            f"{torch.get_num_threads()} threads{ranks}")
    return {"splits": splits, "make_model": make_model, "kwargs": kwargs}


def out_dir(args: argparse.Namespace, *parts: str) -> Path:
    """``--out``, else ``runs/`` plus the parts joined by '-' (user specs by their short name)."""
    from easier.cli.user import short_name

    if args.out:
        return Path(args.out)
    return Path("runs") / "-".join(short_name(p) for p in parts)

