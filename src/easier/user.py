"""Your own model, checkpoint and data from the command line.

``--model module.path:callable`` or ``--model path/to/file.py:callable`` builds a model by
calling ``callable`` with whichever of ``num_classes``, ``in_channels``, ``image_size`` and
``width`` it accepts (none at all is fine). ``--data module:callable`` (or ``file.py:callable``)
returns the splits: ``(train, val)``, ``(train, val, test)``, a dict with those keys (plus
optionally ``train_eval`` and ``num_classes``) or a :class:`~easier.data.DataSplits`; the callable
may take ``seed`` and ``image_size``. A checkpoint is an easier model record, a plain
``state_dict`` (also wrapped as ``{"state_dict": ...}``), or a whole pickled model, which is
loaded only when the user allows pickles (loading one runs code from the file).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, StateError
from .state import MODEL_FORMAT, rebuild, verify_file

__all__ = ["build_model", "is_callable_spec", "load_callable", "load_checkpoint", "load_data",
           "short_name"]

THIRD_PARTY = ("torchvision", "timm")  # 'timm:NAME' is a registry form, not a module:callable
MODEL_KWARGS = ("num_classes", "in_channels", "image_size", "width")
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")  # common training-script wrappers


def is_callable_spec(text: str) -> bool:
    """True for ``a.b:fn`` and ``path/x.py:fn`` (not ``timm:NAME`` nor ``cifar10:PATH``)."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head or not tail.isidentifier() or head.lower() in THIRD_PARTY:
        return False
    return head.endswith(".py") or all(part.isidentifier() for part in head.split("."))


def short_name(spec: str) -> str:
    """A name for run directories: ``pkg.nets:build`` and ``nets.py:build`` give ``nets``."""
    if not is_callable_spec(spec):
        return spec.split(":")[0]
    head = spec.rpartition(":")[0]
    return Path(head).stem if head.endswith(".py") else head.rsplit(".", 1)[-1]


def load_callable(spec: str, option: str) -> Callable[..., Any]:
    """The callable named by ``module.path:name`` or ``path/to/file.py:name``."""
    head, _, name = spec.rpartition(":")
    if head.endswith(".py"):
        path = Path(head).expanduser()
        if not path.is_file():
            raise ConfigError(f"{option} {spec}: no file {path}")
        module_name = f"easier_user.{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ConfigError(f"{option} {spec}: {path} cannot be imported as Python")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look the module up
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            raise ConfigError(f"{option} {spec}: importing {path} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(head)
        except ImportError as exc:
            raise ConfigError(f"{option} {spec}: cannot import {head!r} ({exc}); put it on "
                              f"PYTHONPATH or give a file: path/to/file.py:{name}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items()
                       if callable(v) and not n.startswith("_"))[:12]
        raise ConfigError(f"{option} {spec}: {head} has no callable {name!r}; it has: "
                          f"{', '.join(names) or 'none'}")
    return fn  # type: ignore[no-any-return]


def _call(fn: Callable[..., Any], offered: dict[str, Any], option: str, spec: str) -> Any:
    """Call ``fn`` with the offered keyword arguments it accepts."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        kwargs = dict(offered)
    else:
        kwargs = {p.name: offered[p.name] for p in params if p.name in offered}
    missing = [p.name for p in params if p.default is p.empty and p.name not in kwargs
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if missing:
        raise ConfigError(f"{option} {spec}: the callable needs {', '.join(missing)}, but only "
                          f"these are passed (as keywords): {', '.join(offered)}")
    return fn(**kwargs)


def build_model(spec: str, *, num_classes: int, in_channels: int, image_size: int,
                width: float) -> nn.Module:
    """The user's model from ``module:callable`` (see the module docstring)."""
    offered = {"num_classes": num_classes, "in_channels": in_channels,
               "image_size": image_size, "width": width}
    model = _call(load_callable(spec, "--model"), offered, "--model", spec)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {spec}: the callable returned a {type(model).__name__}, "
                          "not a torch.nn.Module")
    return model


def _plain_state_dict(obj: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    for key in STATE_DICT_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return None
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_checkpoint(path: str | Path, base: nn.Module | None, *,
                    allow_pickle: bool = False) -> nn.Module:
    """A model from ``path``: an easier record, a plain state_dict loaded into ``base``, or
    (only with ``allow_pickle``) a whole pickled model. Loads with ``weights_only=True``
    unless pickles are allowed."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"no checkpoint at {path}")
    data = path.read_bytes()
    verify_file(path, data)  # raises when easier wrote it and it changed since
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=not allow_pickle)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not allow_pickle:
            raise StateError(f"{path} is not a weights-only checkpoint (it holds pickled Python "
                             f"objects, e.g. a whole model: {first}). Loading it runs code from "
                             "the file: if you trust it, pass --allow-pickle") from exc
        raise StateError(f"cannot read checkpoint {path}: {type(exc).__name__}: {first}") from exc
    if isinstance(obj, nn.Module):  # reachable only with allow_pickle
        return obj
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        return rebuild(obj, base)
    state = _plain_state_dict(obj) if isinstance(obj, dict) else None
    if state is None:
        keys = sorted(obj)[:6] if isinstance(obj, dict) else []
        raise StateError(f"{path} is neither an easier model record nor a state_dict (a "
                         f"{type(obj).__name__}{f' with keys {keys}' if keys else ''})")
    if base is None:
        raise ConfigError(f"{path} is a plain state_dict (weights without the architecture): "
                          "name the architecture with --model NAME (see `easier models`) or "
                          "--model module:callable, with the --width it was trained at")
    result = base.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise StateError(
            f"{path}: the weights do not fit the model: {len(result.missing_keys)} missing "
            f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected (e.g. "
            f"{result.unexpected_keys[:3]}); check --model, --width and the data's classes")
    return base


def _num_classes(train: Any) -> int:
    classes = getattr(train, "classes", None)
    if classes:
        return len(classes)
    targets = getattr(train, "targets", None)
    labels = (list(targets) if targets is not None else [train[i][1] for i in range(len(train))])
    return int(max(int(y) for y in labels)) + 1


def load_data(spec: str, *, seed: int, image_size: int | None) -> Any:
    """The :class:`~easier.data.DataSplits` of a registry spec or of ``module:callable``."""
    from . import data

    try:
        data.parse_spec(spec)
    except ConfigError:
        if not is_callable_spec(spec):
            raise
    else:
        return data.load(spec, seed=seed, image_size=image_size)
    fn = load_callable(spec, "--data")
    if image_size is not None and "image_size" not in inspect.signature(fn).parameters:
        raise ConfigError(f"--image-size: {spec} takes no image_size argument; resize in it")
    out = _call(fn, {"seed": seed, "image_size": image_size}, "--data", spec)
    if isinstance(out, data.DataSplits):
        return out
    if isinstance(out, (tuple, list)) and len(out) in (2, 3):
        out = dict(zip(("train", "val", "test"), out, strict=False))
    if not isinstance(out, dict) or "train" not in out or "val" not in out:
        raise ConfigError(f"--data {spec}: expected (train, val), (train, val, test) or a dict "
                          f"with train and val, got a {type(out).__name__}")
    train = out["train"]
    x = train[0][0]
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else ()
    channels, side = (shape[0], shape[-1]) if len(shape) == 3 else (1, shape[-1] if shape else 1)
    return data.DataSplits(
        name=short_name(spec), train=train, train_eval=out.get("train_eval", train),
        val=out["val"], test=out.get("test"),
        num_classes=int(out.get("num_classes") or _num_classes(train)), in_channels=channels,
        image_size=side, mean=(), std=())
