"""Your own model, checkpoint and data from the command line.

``--model module.path:callable`` or ``--model path/to/file.py:callable`` builds a model by
calling ``callable`` with whichever of ``num_classes``, ``in_channels``, ``image_size`` and
``width`` it accepts (none at all is fine). ``--data module:callable`` (or ``file.py:callable``)
returns the splits: ``(train, val)``, ``(train, val, test)``, a dict with those keys (plus
optionally ``train_eval`` and ``num_classes``) or a :class:`~easier.data.DataSplits`; the callable
may take ``seed`` and ``image_size``. A callable with ``**kwargs`` gets every offered argument
except those it (or what it forwards them to) rejects as unexpected. A ``file.py`` is imported
with its directory on ``sys.path``, so it may import its sibling files. Checkpoints:
:mod:`easier.checkpoints`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from easier.errors import ConfigError, DataError, UserCodeError
from easier.io.checkpoints import load_checkpoint

__all__ = ["build_model", "is_callable_spec", "load_callable", "load_checkpoint", "load_data",
           "model_file", "short_name"]

THIRD_PARTY = ("torchvision", "timm")  # 'timm:NAME' is a registry form, not a module:callable
MODEL_KWARGS = ("num_classes", "in_channels", "image_size", "width")
LABEL_KEYS = ("label", "labels")
_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


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
            raise ConfigError(f"{option} {spec}: no file {path.resolve()}")
        module = _import_file(path.resolve(), option, spec)
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


def _import_file(path: Path, option: str, spec: str) -> Any:
    """Import ``path`` once per process, with its directory first on ``sys.path`` (as ``python
    path`` does), so ``from blocks import Block`` finds a sibling ``blocks.py``."""
    module_name = "easier_user." + re.sub(r"\W", "_", path.stem)
    known = sys.modules.get(module_name)
    if known is not None and getattr(known, "__file__", None) == str(path):
        return known  # the same classes for every model built from this file
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigError(f"{option} {spec}: {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigError(f"{option} {spec}: importing {path} failed: "
                          f"{type(exc).__name__}: {exc}") from exc
    return module


def _call(fn: Callable[..., Any], offered: dict[str, Any], option: str, spec: str) -> Any:
    """Call ``fn`` with the offered keyword arguments it accepts. Those that only ``**kwargs``
    takes are dropped one by one when the call rejects them as unexpected (a torchvision- or
    timm-style builder forwards ``**kwargs`` to a class that may not take them all)."""
    params = inspect.signature(fn).parameters.values()
    named = {p.name: offered[p.name] for p in params if p.name in offered}
    extra = ({k: v for k, v in offered.items() if k not in named}
             if any(p.kind is p.VAR_KEYWORD for p in params) else {})
    missing = [p.name for p in params if p.default is p.empty and p.name not in named
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if missing:
        raise ConfigError(f"{option} {spec}: the callable needs {', '.join(missing)}, but only "
                          f"these are passed (as keywords): {', '.join(offered)}; give "
                          f"{'them' if len(missing) > 1 else 'it'} a default, or wrap the "
                          "callable in a function taking those")
    while True:
        try:
            return fn(**named, **extra)
        except TypeError as exc:
            found = _UNEXPECTED.search(str(exc))
            if found is None or found.group(1) not in extra:
                raise _failed(option, spec, exc) from exc
            del extra[found.group(1)]
        except Exception as exc:  # the user's own code failed: say so, not "please report"
            raise _failed(option, spec, exc) from exc


def _failed(option: str, spec: str, exc: BaseException) -> UserCodeError:
    text = str(exc).strip().splitlines()
    return UserCodeError(f"{option} {spec}: the callable raised {type(exc).__name__}: "
                         f"{text[0] if text else ''} (your code; rerun with --debug for the "
                         "traceback)")


def model_file(spec: str) -> str | None:
    """The absolute path of the file of a ``path/to/file.py:callable`` spec (else None)."""
    if not is_callable_spec(spec):
        return None
    head, _, name = spec.rpartition(":")
    return f"{Path(head).expanduser().resolve()}:{name}" if head.endswith(".py") else None


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


def _label(item: Any) -> Any:
    if isinstance(item, dict):
        return next((item[k] for k in LABEL_KEYS if k in item), None)
    return item[1] if isinstance(item, (tuple, list)) and len(item) > 1 else None


def _num_classes(train: Any, spec: str) -> int:
    classes = getattr(train, "classes", None)
    if classes:
        return len(classes)
    targets = getattr(train, "targets", None)
    if targets is None and isinstance(train, torch.utils.data.TensorDataset):
        targets = train.tensors[1] if len(train.tensors) > 1 else None
    labels = list(targets) if targets is not None else [_label(train[i])
                                                        for i in range(len(train))]
    if not labels or any(y is None for y in labels):
        raise DataError(f"--data {spec}: cannot find the labels of the training items: items "
                        "must be (input, label) or dicts with 'label'/'labels'; or return "
                        "num_classes in the dict")
    try:
        return int(max(int(y) for y in labels)) + 1
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"--data {spec}: labels must be integer class indices (one per item), "
                        f"got e.g. {labels[0]!r}; or return num_classes in the dict") from exc


def _input_of(item: Any, input_key: Any) -> Any:
    """The model input of one dataset item (see :func:`easier.entropy.estimate.batch_input`)."""
    if isinstance(item, dict):
        if isinstance(input_key, str):
            return item.get(input_key)
        keys = list(input_key) if input_key else [k for k in item if k not in LABEL_KEYS]
        return item.get(keys[0]) if keys else None
    return item[0] if isinstance(item, (tuple, list)) and item else item


def load_data(spec: str, *, seed: int, image_size: int | None, input_key: Any = None) -> Any:
    """The :class:`~easier.data.DataSplits` of a registry spec or of ``module:callable``."""
    from easier import data

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
    if (not isinstance(out, dict) or out.get("train") is None or out.get("val") is None):
        got = (f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list))
               else f"a dict with keys {sorted(map(str, out))}" if isinstance(out, dict)
               else f"a {type(out).__name__}")
        raise ConfigError(f"--data {spec}: expected (train, val), (train, val, test) or a dict "
                          f"with train and val datasets, got {got}")
    train = out["train"]
    try:
        n = len(train)
    except TypeError:
        raise ConfigError(f"--data {spec}: train is a {type(train).__name__}, not a dataset "
                          "(an object with __len__ and __getitem__)") from None
    if n == 0:
        raise DataError(f"--data {spec}: the training set is empty (0 samples)")
    x = _input_of(train[0], input_key)
    if not hasattr(x, "shape"):
        keys = f" (keys {sorted(train[0])}: pass --input-key)" if isinstance(train[0], dict) else ""
        raise DataError(f"--data {spec}: the input of a training item is a {type(x).__name__}"
                        f"{keys}; items must be (C×H×W tensor, label) or dicts of tensors: "
                        "turn images into tensors in the dataset")
    shape = tuple(x.shape)
    channels, side = (shape[0], shape[-1]) if len(shape) == 3 else (1, shape[-1] if shape else 1)
    return data.DataSplits(
        name=short_name(spec), train=train, train_eval=out.get("train_eval", train),
        val=out["val"], test=out.get("test"),
        num_classes=int(out.get("num_classes") or _num_classes(train, spec)),
        in_channels=channels, image_size=side, mean=(), std=())
