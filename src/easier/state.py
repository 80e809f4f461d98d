"""Run state on disk: atomic writes, model checkpoints, and a resumable run directory.

Every file is written to a temporary name in the same directory and renamed into place, so a
process killed at any moment (SIGKILL included) leaves either the old or the new file, never a
torn one. Checkpoints hold tensors and plain data only and load with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, StateError
from .linearize import apply_edits, edits_of

__all__ = ["RunDir", "atomic_write_bytes", "atomic_write_text", "load_model", "save_model"]

MODEL_FORMAT = "easier.model/2"
STATE_FORMAT = "easier.state/1"


def _atomic(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    _atomic(Path(path), lambda f: torch.save(obj, f))


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
        from .models import create_from_spec

        base = create_from_spec(record["spec"])
    model = apply_edits(base, record.get("edits", []))
    try:
        model.load_state_dict(record["state_dict"], strict=True)
    except RuntimeError as exc:
        raise StateError(f"checkpoint weights do not fit the rebuilt model: {exc}") from exc
    return model


def load_model(path: str | Path, model: nn.Module | None = None, *,
               weights_only: bool = True) -> nn.Module:
    """Load a model saved by :func:`save_model` (or a run directory's ``model.pt``).

    ``model`` is the base architecture for models that are not from ``easier.models``.
    ``weights_only=False`` allows full pickles: only for files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise StateError(f"no checkpoint at {path}")
    try:
        record = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:
        raise StateError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(record, nn.Module):  # a full pickle, only reachable with weights_only=False
        return record
    if isinstance(record, dict) and record.get("format") != MODEL_FORMAT and model is not None:
        model.load_state_dict(record, strict=True)  # a plain state_dict
        return model
    return rebuild(record, model)


class RunDir:
    """A run directory: config.json, history.jsonl, state.pt (+ state.prev.pt), summary, model.

    ``open`` refuses to reuse a directory that holds another run, and ``resume`` refuses a
    directory whose config differs from the current one, naming the keys that differ.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def state_path(self) -> Path:
        return self.path / "state.pt"

    @property
    def prev_state_path(self) -> Path:
        return self.path / "state.prev.pt"

    def file(self, name: str) -> Path:
        return self.path / name

    def exists(self) -> bool:
        return self.config_path.exists() or self.state_path.exists()

    def start(self, config: dict[str, Any], *, resume: bool,
              mutable: tuple[str, ...] = (), write: bool = True) -> dict[str, Any] | None:
        """Prepare the directory; return the saved state when resuming (None for a new run).

        Keys in ``mutable`` (budgets such as max_removals) may change on resume; the new values
        are written to config.json. ``write=False`` only checks and reads (distributed ranks
        other than 0 do that, before rank 0 writes).
        """
        if self.exists():
            if not resume:
                raise StateError(
                    f"{self.path} already holds a run; pass resume=True (--resume) to continue it, "
                    "or choose another output directory (nothing was overwritten)"
                )
            saved = self.read_config()
            diff = [k for k in _diff_keys(saved, config) if k not in mutable]
            if diff:
                lines = "; ".join(f"{k}: saved {saved.get(k)!r} != now {config.get(k)!r}"
                                  for k in diff)
                raise ConfigError(
                    f"cannot resume {self.path}: its config differs in {diff} ({lines}). Run with "
                    "the original settings, or start a new run in another directory."
                )
            state = self.read_state()
            if write and _diff_keys(saved, config):
                atomic_write_text(self.config_path,
                                  json.dumps(config, indent=2, sort_keys=True) + "\n")
            return state
        if not write:
            return None
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
        return None

    def read_config(self) -> dict[str, Any]:
        try:
            return json.loads(self.config_path.read_text())
        except FileNotFoundError:
            raise StateError(f"{self.path} has a state but no config.json") from None
        except json.JSONDecodeError as exc:
            raise StateError(f"{self.config_path} is corrupt: {exc}") from exc

    def read_state(self) -> dict[str, Any] | None:
        if not self.state_path.exists():
            return None  # killed before the first iteration finished: start over cleanly
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
                got = state.get("format") if isinstance(state, dict) else type(state).__name__
                raise ValueError(f"format is {got!r}")
        except Exception as exc:
            backup = (f" The previous iteration's state is intact in {self.prev_state_path}: "
                      f"move it to {self.state_path.name} to resume from there."
                      if self.prev_state_path.exists() else "")
            raise StateError(
                f"{self.state_path} is corrupt or truncated ({type(exc).__name__}: {exc}); it was "
                f"left untouched.{backup}"
            ) from exc
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        """Replace state.pt atomically, keeping the one before as state.prev.pt.

        The backup is a hard link made before the rename, so at every instant state.pt exists
        and is complete.
        """
        state = {"format": STATE_FORMAT, **state}

        def write(f: Any) -> None:
            torch.save(state, f)
            if self.state_path.exists():
                self.prev_state_path.unlink(missing_ok=True)
                os.link(self.state_path, self.prev_state_path)

        _atomic(self.state_path, write)

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.file(name), json.dumps(obj, indent=2, default=_json_default) + "\n")

    def write_jsonl(self, name: str, rows: Iterable[dict[str, Any]]) -> None:
        atomic_write_text(self.file(name),
                          "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def _diff_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ, compared through JSON (tuples == lists)."""
    norm = json.loads(json.dumps(b, default=_json_default))
    return sorted(k for k in set(a) | set(norm) if a.get(k) != norm.get(k))
