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

__all__ = ["OWN_WIDTH", "build_base", "built_name", "device", "effective_width",
           "existing_run", "join", "locked", "method_with_options", "out_dir", "parse_options",
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


OWN_WIDTH = 0.25  # --width of easier's own models when none is given


def effective_width(name: str, width: float | None) -> float | None:
    """The width a model is built at: ``--width`` when given; else 0.25 for easier's own
    models, 1.0 for torchvision:/timm: (they have no width) and nothing for the user's own
    ``module:callable`` (its own default)."""
    if width is not None or is_callable_spec(name):
        return width
    return 1.0 if ":" in name else OWN_WIDTH


def build_base(name: str, *, num_classes: int, in_channels: int, image_size: int,
               width: float | None) -> Any:
    """A fresh model: a registry name or the user's ``module:callable``. A model that needs
    larger images says which ``--image-size`` to pass. ``width`` None: see
    :func:`effective_width`."""
    from easier import models
    from easier.cli.user import build_model

    width = effective_width(name, width)
    if is_callable_spec(name):
        return build_model(name, num_classes=num_classes, in_channels=in_channels,
                           image_size=image_size, width=width)
    try:
        return models.create(name, num_classes=num_classes, in_channels=in_channels,
                             width=1.0 if width is None else width, image_size=image_size)
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
    from easier.pipeline.settings import EditConfig, EntropyConfig, RunConfig, StopRule
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

    built = make_model()  # a model that cannot be built fails here, before any training
    width = effective_width(args.model, args.width)
    name = (f"the whole model in {args.checkpoint} ({whole[0]}; --model {args.model} is not "
            "used)" if whole else built_name(args.model, built, width))
    config = {"model": args.model, "width": width, "data": args.data,
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
                         one_shot=args.one_shot, confidence=args.confidence),
        "recovery": Recovery(early_stop_every=args.early_stop_every,
                             early_stop_batches=args.early_stop_batches,
                             early_stop_margin=args.early_stop_margin, distill=args.distill,
                             temperature=args.distill_temperature,
                             finish_on_reject=args.early_stop_finish),
        "entropy": EntropyConfig(batches=args.entropy_batches),
        "edit": EditConfig(fold_ready=not args.no_fold_ready,
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


def built_name(spec: str, model: Any, width: float | None) -> str:
    """What the banner says was built: the spec, the class when it is not obvious from the spec,
    the width only where it applied, and the parameter count."""
    params = sum(p.numel() for p in model.parameters())
    own = not is_callable_spec(spec) and ":" not in spec
    parts = [f"width {width:g}"] if width is not None and (own or is_callable_spec(spec)) else []
    if not own:
        parts.insert(0, type(model).__name__)
    parts.append(f"{params / 1e6:.3g}M params" if params >= 1e5 else f"{params} params")
    return f"{spec} ({', '.join(parts)})"


def method_with_options(name: str, items: list[str]) -> Any:
    """The method ``name`` with ``--method-option`` KEY=VALUE items, every key checked against
    the method's own options (the error lists them, with a suggestion for a near miss)."""
    import difflib
    import inspect

    from easier.methods import create_method

    opts = parse_options(items)
    plain = create_method(name)  # an unknown method name fails here, listing the valid ones
    params = {n: p for n, p in inspect.signature(type(plain).__init__).parameters.items()
              if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = [k for k in opts if k not in params]
    if unknown:
        if not params:
            raise ConfigError(f"--method-option {unknown[0]}: method {name!r} takes no options")
        near = difflib.get_close_matches(unknown[0], list(params), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        valid = ", ".join(f"{n}={p.default!r}" if p.default is not p.empty else n
                          for n, p in params.items())
        raise ConfigError(f"--method-option {unknown[0]}: method {name!r} has no option "
                          f"{unknown[0]!r}{hint}; its options (with defaults): {valid}")
    return create_method(name, **opts)


def existing_run(out: Path, resume: bool, fold: bool = True,
                 budget: dict[str, Any] | None = None) -> str | None:
    """Check run directory ``out`` before anything is loaded.

    Raises StateError when it holds a run and ``resume`` is off; returns a message when
    ``resume`` is on and the run is finished (summary.json says done, with ``fold`` folded.pt2
    is there, and ``budget`` — max_removals, max_iterations, run_all — equals the saved one):
    there is nothing to continue. None: go on (a larger budget continues a run stopped by its
    limit; a run killed while folding resumes to fold).
    """
    from easier.errors import StateError
    from easier.io.atomic import read_verified
    from easier.io.rundir import RunDir

    run = RunDir(out)
    if not run.exists():
        return None
    summary: dict[str, Any] = {}
    with contextlib.suppress(Exception):  # unreadable: the library's own checks decide
        summary = json.loads(read_verified(run.file("summary.json")).decode())
    done = bool(summary.get("done"))
    if not resume:
        what = (f"a finished run (stopped: {summary.get('stop_reason')})" if done else
                f"an unfinished run ({summary.get('iterations', 0)} iteration(s) saved)")
        raise StateError(f"{out} already holds {what}; nothing was loaded or changed. Add "
                         "--resume to continue it, or pass --out NEW_DIR (or delete "
                         f"{out}) to start over")
    saved: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        saved = run.read_config()
    stop = saved.get("stop") if isinstance(saved.get("stop"), dict) else {}
    same = all(stop.get(k) == v for k, v in (budget or {}).items())
    if done and same and run.file("model.pt").is_file() and (
            not fold or run.file("folded.pt2").is_file()):
        return (f"{out} holds a finished run (stopped: {summary.get('stop_reason')}; "
                f"{summary.get('iterations')} iteration(s), {len(summary.get('removed') or [])} "
                f"unit(s) removed): nothing to resume, nothing was changed. Its results are in "
                f"{out}/report.md; to fold it again with another plan: easier fold {out} "
                "--plan PLAN")
    return None


def out_dir(args: argparse.Namespace, *parts: str) -> Path:
    """``--out``, else ``runs/`` plus the parts joined by '-' (user specs by their short name)."""
    from easier.cli.user import short_name

    if args.out:
        return Path(args.out)
    return Path("runs") / "-".join(short_name(p) for p in parts)

