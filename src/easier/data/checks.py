"""Checks of the datasets given to ``reduce``, run before anything is trained or written.

They turn what would otherwise surface later as an ``IndexError`` in the loss, a
``StopIteration``, or a "lower the learning rate" NaN into one :class:`~easier.DataError` that
names the dataset and the offending sample: an empty split, a label outside
``0..num_classes-1``, a NaN or Inf input, a sample the model cannot take. A training set with a
single class only warns (the accuracy is then trivially 100%).

Labels and inputs are read without the augmentation pipeline where the dataset exposes them
(``TensorDataset`` tensors, a ``targets`` attribute, ``Subset``); otherwise every sample is read
once. Image datasets built by :mod:`easier.data` hold integer pixels and are not scanned for
NaN (their float images are checked when decoded).
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from easier.data.common import ArrayDataset
from easier.data.folders import ImageFileDataset
from easier.errors import DataError

__all__ = ["check_datasets", "num_outputs"]

_INTEGER_PIXELS = (ArrayDataset, ImageFileDataset)  # no NaN possible: nothing to scan


def _name(role: str, ds: Any) -> str:
    return f"dataset {role!r} ({type(ds).__name__})"


def _input(item: Any, input_key: str | None) -> Any:
    if isinstance(item, dict):
        return item.get(input_key or "input", item.get("x"))
    if isinstance(item, (tuple, list)):
        return item[0] if item else None
    return item


def _label(item: Any) -> Any:
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[1]
    if isinstance(item, dict):
        return item.get("label", item.get("labels"))
    return None


def _columns(ds: Any, input_key: str | None) -> tuple[Any, Any, bool]:
    """(labels, inputs, scanned): whole columns where the dataset exposes them, else read every
    sample. ``inputs`` is None when there is nothing to scan for NaN."""
    if isinstance(ds, TensorDataset):
        t = ds.tensors
        return (t[1] if len(t) > 1 else None), t[0], False
    if isinstance(ds, Subset) and isinstance(ds.dataset, (TensorDataset, *_INTEGER_PIXELS)):
        labels, inputs, _ = _columns(ds.dataset, input_key)
        idx = np.asarray(ds.indices, dtype=np.int64)
        return (None if labels is None else labels[torch.as_tensor(idx)]
                if isinstance(labels, torch.Tensor) else np.asarray(labels)[idx],
                None if inputs is None else inputs[torch.as_tensor(idx)], False)
    if isinstance(ds, _INTEGER_PIXELS):
        return np.asarray(ds.targets), None, False
    labels: list[Any] = []
    inputs: list[Any] = []
    for i in range(len(ds)):
        item = ds[i]
        labels.append(_label(item))
        inputs.append(_input(item, input_key))
    return labels, inputs, True


def _check_inputs(name: str, inputs: Any) -> None:
    if isinstance(inputs, torch.Tensor):
        if inputs.is_floating_point() or inputs.is_complex():
            flat = inputs.reshape(len(inputs), -1) if inputs.ndim else inputs.reshape(1, 1)
            bad = (~torch.isfinite(flat)).any(dim=1).nonzero()
            if len(bad):
                _nan(name, int(bad[0]))
        return
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not torch.isfinite(x).all():
            _nan(name, i)
        if isinstance(x, np.ndarray) and x.dtype.kind == "f" and not np.isfinite(x).all():
            _nan(name, i)


def _nan(name: str, i: int) -> None:
    raise DataError(
        f"{name}: sample {i} holds NaN or Inf input values; the loss would be NaN from the first "
        "step. Clean or drop that sample (and check the preprocessing that made it)."
    )


def _check_labels(name: str, labels: Any, num_classes: int | None) -> np.ndarray | None:
    """Check integer class labels; return them as an int64 array (None if not class labels)."""
    if labels is None:
        return None
    if isinstance(labels, torch.Tensor):
        if labels.ndim == 1 and labels.is_floating_point():
            _float_labels(name, labels[0].item())
        if labels.is_floating_point() or labels.ndim != 1:
            return None  # soft or multi-dimensional targets: not class indices
        arr = labels.cpu().numpy()
    else:
        first = labels[0] if len(labels) else None
        if isinstance(first, (float, np.floating)) or (
                isinstance(first, torch.Tensor) and first.ndim == 0 and first.is_floating_point()):
            _float_labels(name, float(first))
        vals = [int(v) if isinstance(v, (int, np.integer)) or (
            isinstance(v, torch.Tensor) and v.ndim == 0 and not v.is_floating_point()) else None
            for v in labels]
        if any(v is None for v in vals):
            return None
        arr = np.asarray(vals, dtype=np.int64)
    arr = arr.astype(np.int64, copy=False)
    bad = np.flatnonzero(arr < 0) if num_classes is None else np.flatnonzero(
        (arr < 0) | (arr >= num_classes))
    if len(bad):
        i = int(bad[0])
        span = "0 or more" if num_classes is None else f"0..{num_classes - 1}"
        model = "" if num_classes is None else f" (the model has {num_classes} outputs)"
        raise DataError(
            f"{name}: sample {i} has label {int(arr[i])}, outside {span}{model}; "
            f"{len(bad)} sample(s) in all. Labels must be class indices 0..num_classes-1: "
            "renumber them, or build the model with more classes."
        )
    return arr


def _float_labels(name: str, first: float) -> None:
    raise DataError(
        f"{name}: the labels are floating-point numbers (sample 0: {first!r}); class labels "
        "must be integers 0..num_classes-1: return them as int or torch.long (y.long())"
    )


def _logit_width(model: nn.Module, run: Any, failure: Any) -> int | None:
    """Run ``run(device)`` on the model in eval mode without grad: the width of (1, C) logits,
    else None. The model's own error, whatever its type, becomes ``DataError(failure(exc))``."""
    params = next(iter(model.parameters()), None)
    dev = params.device if params is not None else torch.device("cpu")
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = run(dev)
    except Exception as exc:  # the model's own error, whatever its type
        raise DataError(failure(exc)) from exc
    finally:
        model.train(was)
    if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == 1:
        return int(out.shape[1])
    return None


def num_outputs(model: nn.Module, example: torch.Tensor, name: str) -> int | None:
    """The number of classes the model predicts for one sample (None if not (1, C) logits).

    DataError if the model cannot run on the sample (a wrong input shape)."""
    return _logit_width(
        model, lambda dev: model(example.unsqueeze(0).to(dev)),
        lambda exc: (f"the model cannot run on sample 0 of {name} (input shape "
                     f"{tuple(example.shape)}): {type(exc).__name__}: {exc}. Check the input "
                     "shape the model expects (channels, image size) against the data."))


def _dict_outputs(model: nn.Module, item: dict[str, Any], input_key: Any, name: str) -> int | None:
    """:func:`num_outputs` for a dict item, passed as the loop passes a dict batch."""
    from torch.utils.data import default_collate

    from easier.entropy.estimate import batch_input
    from easier.graph.capture import call_model, to_device

    batch = batch_input(default_collate([item]), input_key)
    how = ("positionally" if not isinstance(batch, dict)
           else f"as keyword arguments {', '.join(map(str, batch))}")
    return _logit_width(
        model, lambda dev: call_model(model, to_device(batch, dev)),
        lambda exc: (f"the model cannot run on sample 0 of {name} (a dict with keys "
                     f"{sorted(item)}, passed {how}): {type(exc).__name__}: {exc}. Name the key "
                     "of the model input with --input-key KEY (input_key=...), or check its "
                     "shape against the model"))


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py)
    np.random.set_state(npy)


def check_datasets(train: Dataset | DataLoader, val: Dataset | DataLoader, *,
                   test: Dataset | DataLoader | None = None,
                   train_eval: Dataset | DataLoader | None = None,
                   model: nn.Module | None = None, input_key: str | None = None) -> None:
    """Raise DataError for an empty split, a bad label or a non-finite input; warn when the
    training set has a single class. ``model`` (optional) gives the number of classes and is
    run on one validation sample to catch a wrong input shape."""
    splits = {"train": train, "val": val, "test": test, "train_eval": train_eval}
    plain: dict[str, Any] = {}
    for role, d in splits.items():
        if d is None or (role == "train_eval" and d is train):
            continue
        ds = d.dataset if isinstance(d, DataLoader) else d
        try:
            n = len(ds)  # type: ignore[arg-type]
        except TypeError:
            continue  # an iterable-style dataset: its length is unknown until read
        if n == 0:
            raise DataError(
                f"{_name(role, ds)} is empty (0 samples); reduce needs samples in train and val "
                "(val measures the accuracy to keep): pass a non-empty dataset"
            )
        if hasattr(ds, "__getitem__"):
            plain[role] = ds
    with _rng_preserved():  # reading samples may draw augmentation randomness: give it back
        num_classes = None
        if model is not None and "val" in plain:
            item = plain["val"][0]
            example = _input(item, input_key)
            if isinstance(item, dict):
                num_classes = _dict_outputs(model, item, input_key, _name("val", plain["val"]))
            elif isinstance(example, torch.Tensor):
                num_classes = num_outputs(model, example, _name("val", plain["val"]))
        columns = {role: _columns(ds, input_key) for role, ds in plain.items()}
    for role, ds in plain.items():
        name = _name(role, ds)
        labels, inputs, _ = columns[role]
        if inputs is not None:
            _check_inputs(name, inputs)
        arr = _check_labels(name, labels, num_classes)
        if role == "train" and arr is not None and len(np.unique(arr)) == 1:
            warnings.warn(
                f"{name} holds a single class (label {int(arr[0])}): the accuracy is trivially "
                "100% and the entropy says nothing about the task; add samples of the other "
                "classes", UserWarning, stacklevel=3)
