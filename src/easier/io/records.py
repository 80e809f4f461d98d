"""Model checkpoints: what rebuilds a (linearized) model, saved and loaded safely.

A record holds the architecture spec (models from :mod:`easier.models`), the recorded edits
(linearized sites, relocated padding) and the weights, so it loads with ``weights_only=True``.
Files are written atomically with a recorded sha256 (:mod:`easier.atomic`); run directories
and their lock live in :mod:`easier.rundir`. Both are importable from here too, as before.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from easier.edit.linearize import apply_edits, edits_of
from easier.errors import StateError
from easier.io.atomic import (
    CHECKSUMS,
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    read_verified,
    remove_stale_temporaries,
    verify_file,
)
from easier.io.pickles import load_bytes
from easier.io.rundir import ITERATIONS, LOCK_FILE, STATE_FORMAT, RunDir, lock_run_dir

__all__ = [
    "CHECKSUMS",
    "LOCK_FILE",
    "MODEL_FORMAT",
    "STATE_FORMAT",
    "RunDir",
    "SavedIteration",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_iteration",
    "load_model",
    "load_weights",
    "lock_run_dir",
    "model_record",
    "rebuild",
    "remove_stale_temporaries",
    "save_iteration",
    "save_model",
    "saved_iterations",
    "verify_file",
]

MODEL_FORMAT = "easier.model/2"


def _spec(model: nn.Module) -> dict[str, Any] | None:
    spec = getattr(model, "easier_spec", None)
    return dict(spec) if spec is not None else None


def model_record(model: nn.Module) -> dict[str, Any]:
    """Everything needed to rebuild ``model``: architecture spec, recorded edits, weights."""
    return {
        "format": MODEL_FORMAT,
        "spec": _spec(model),
        "edits": edits_of(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def save_model(model: nn.Module, path: str | Path) -> None:
    """Save a (linearized) model so :func:`load_model` rebuilds it with ``weights_only=True``."""
    atomic_torch_save(model_record(model), path)


def rebuild(record: dict[str, Any], base: nn.Module | None = None) -> nn.Module:
    """A model from a :func:`model_record`: rebuild the architecture, replay edits, load weights."""
    if record.get("format") != MODEL_FORMAT:
        raise StateError(f"not an easier model record (format={record.get('format')!r})")
    if base is None:
        if record.get("spec") is None:
            raise StateError(
                "this checkpoint holds a model that is not from easier.models, so its architecture "
                "is not saved: pass the untrained base model (model=...) to rebuild it"
            )
        from easier.models import create_from_spec

        base = create_from_spec(record["spec"])
    model = apply_edits(base, record.get("edits", []))
    problem = load_weights(model, record["state_dict"])
    if problem:
        raise StateError(f"checkpoint weights do not fit the rebuilt model: {problem}; check "
                         "--model and --width (the architecture it was saved from)")
    return model


def load_weights(model: nn.Module, state: dict[str, Any]) -> str:
    """Load ``state`` into ``model`` strictly; "" when it fits, else one line naming the keys
    of another shape, missing or unexpected (the model is then partly loaded)."""
    own = model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
              for k, v in state.items()
              if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if shapes:
        return (f"{len(shapes)} of another shape ({'; '.join(shapes[:3])}"
                f"{'; ...' if len(shapes) > 3 else ''})")
    result = model.load_state_dict(state, strict=False)
    if not (result.missing_keys or result.unexpected_keys):
        return ""
    return (f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})")


def load_model(path: str | Path, model: nn.Module | None = None, *,
               weights_only: bool = True) -> nn.Module:
    """Load a model saved by :func:`save_model` (or a run directory's ``model.pt``).

    The file is checked against the sha256 recorded when easier wrote it (StateError if it
    changed since).
    ``model`` is the base architecture for models that are not from ``easier.models``.
    ``weights_only=False`` allows full pickles: only for files you trust.
    """
    record = _read_record(Path(path), weights_only)
    if isinstance(record, nn.Module):  # a full pickle, only reachable with weights_only=False
        return record
    if isinstance(record, dict) and record.get("format") != MODEL_FORMAT and model is not None:
        model.load_state_dict(record, strict=True)  # a plain state_dict
        return model
    return rebuild(record, model)


def _read_record(path: Path, weights_only: bool = True) -> Any:
    """What ``path`` holds, checked against its recorded sha256 first."""
    if not path.is_file():
        raise StateError(f"no checkpoint at {path}")
    return load_bytes(
        path, read_verified(path), weights_only=weights_only,
        refused=lambda line: f"{line} (easier's model records hold tensors and plain data "
                             "only; a model you saved yourself loads with weights_only=False, "
                             "only if you trust it)",
        unreadable=lambda why: f"cannot read checkpoint {path}: {why}")


# ---------------------------------------------------------------------------------------------
# the models of every iteration (RunConfig(keep_iterations=True))

_MARKS = ("iteration", "accepted", "meets_threshold")


@dataclass(frozen=True)
class SavedIteration:
    """One iteration's model as the loop evaluated it, with whether the loop kept it."""

    iteration: int
    accepted: bool
    meets_threshold: bool
    removed: tuple[str, ...]
    model: nn.Module


def save_iteration(run: RunDir, record: dict[str, Any], model: nn.Module) -> None:
    """Keep the model of history record ``record`` as ``iterations/iter_KKK.pt``.

    Rejected iterations are kept too, marked ``accepted=False``: a front shows what each
    removal cost, not only what the loop returned. Called under the run's writer lock, before
    the state that records the iteration is written, so a resumed run finds every iteration
    it recorded (a killed iteration runs again and writes its file again).
    """
    path = run.iteration_file(int(record["iteration"]))
    remove_stale_temporaries(path.parent)
    atomic_torch_save({**model_record(model), **{k: record[k] for k in _MARKS},
                       "removed": list(record["removed"])}, path)


def saved_iterations(run_dir: str | Path) -> list[int]:
    """The iterations whose model a run directory keeps, in order."""
    d = Path(run_dir) / ITERATIONS
    found = []
    for p in d.glob("iter_*.pt") if d.is_dir() else ():
        stem = p.stem.removeprefix("iter_")
        if stem.isdigit():
            found.append(int(stem))
    return sorted(found)


def load_iteration(run_dir: str | Path, iteration: int,
                   model: nn.Module | None = None) -> SavedIteration:
    """Iteration ``iteration``'s model of a run that kept them (``weights_only=True``).

    ``model`` is the dense base architecture for models that are not from ``easier.models``
    (left unchanged: a copy is rebuilt). StateError when the file is missing or corrupt.
    """
    path = RunDir(run_dir).iteration_file(iteration)
    if not path.is_file():
        raise StateError(f"{path} does not exist: the run kept no model for iteration "
                         f"{iteration}; run it with RunConfig(keep_iterations=True) "
                         "(easier compare --fronts does)")
    record = _read_record(path)
    if not isinstance(record, dict) or any(k not in record for k in _MARKS):
        raise StateError(f"{path} is not an iteration model written by easier")
    built = rebuild(record, copy.deepcopy(model) if model is not None else None)
    return SavedIteration(int(record["iteration"]), bool(record["accepted"]),
                          bool(record["meets_threshold"]), tuple(record.get("removed", ())),
                          built)
