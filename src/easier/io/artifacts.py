"""Fold outputs of a run directory: folded.pt2, fold_plan.json, fold_measure.json, fold.md.

``folded.pt2`` (a ``torch.export`` program with a dynamic batch dimension) is the artifact: load
it with ``torch.export.load(path).module()``, no easier code needed. TorchScript is deprecated
upstream (torch 2.13), so ``folded.pt`` is written only on request (``torchscript=True``, CLI
``--torchscript``). Everything is computed first and written after, under the run directory's
writer lock, each file atomically with its sha256 recorded in checksums.json (see
:mod:`easier.state`); a failure before the writes (e.g. ``onnx=True`` without the onnx extra)
leaves every existing file as it was.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pickle
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from easier.config import Config, positive_int, setting
from easier.errors import ConfigError, FoldError, StateError
from easier.graph.capture import captured, eval_mode
from easier.io.atomic import read_verified
from easier.io.records import (
    RunDir,
    atomic_write,
    atomic_write_text,
    load_model,
    lock_run_dir,
)
from easier.merge import MODES, LatencyConfig, fold
from easier.perf.measure import compare_table, measure_pair

__all__ = ["FoldOptions", "fold_run", "load_folded", "load_program"]

PROGRAM = "folded.pt2"
TORCHSCRIPT = "folded.pt"
ONNX = "folded.onnx"


@dataclass(frozen=True)
class FoldOptions(Config):
    """How :func:`fold_run` folds and what it writes.

    ``plan_batch``: the batch sizes the "latency" plan must hold for (default: the measured
    ``batch_sizes`` of :func:`fold_run`). ``torchscript`` also writes folded.pt (deprecated
    format), ``onnx`` folded.onnx (needs the onnx extra).
    """

    plan: str = setting("latency", kind="text")
    plan_batch: tuple[int, ...] | None = setting(None, kind="tuple", item=positive_int,
                                                 optional=True)
    torchscript: bool = setting(False, kind="flag")
    onnx: bool = setting(False, kind="flag")

    def check(self) -> None:
        if self.plan not in MODES:
            raise ConfigError(f"FoldOptions.plan={self.plan!r}: valid plans are {sorted(MODES)}")

    def __str__(self) -> str:
        sizes = f" for batch {','.join(map(str, self.plan_batch))}" if self.plan_batch else ""
        return f"{self.plan}{sizes}"


def _require_onnx() -> None:
    """Fail before anything is written when the onnx extra is missing."""
    for name in ("onnx", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise FoldError(
                f"--onnx needs the '{name}' package, which is not installed; install the extra "
                "with: pip install 'easier[onnx]' (nothing was written)"
            ) from exc


def _export_program(folded: nn.Module, example: torch.Tensor) -> bytes:
    """folded.pt2: the folded model's own capture (made when it was measured), saved."""
    program = captured(folded, example).program
    if program is None or len(program.range_constraints) == 0:  # pinned batch: say it is free
        batch = torch.export.Dim("batch")  # from a batch of 2: size 1 would be specialised
        program = torch.export.export(folded, (example,), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def _torchscript(folded: nn.Module, example: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # deprecated upstream; the user asked for it explicitly
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(folded, example), buf)
    return buf.getvalue()


def _onnx(folded: nn.Module, example: torch.Tensor) -> dict[str, bytes]:
    """The ONNX file and its external-data file(s), exported in a scratch directory."""
    with tempfile.TemporaryDirectory(prefix="easier-onnx-") as tmp:
        try:
            torch.onnx.export(folded, (example,), str(Path(tmp) / ONNX))
        except Exception as exc:
            raise FoldError(f"ONNX export failed ({type(exc).__name__}: {exc}); nothing was "
                            "written") from exc
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


_FORCE, _NO_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _weights_only_everywhere() -> Iterator[None]:
    """Every ``torch.load`` in the block reads with ``weights_only=True``, including the ones
    torch's pt2 reader makes with ``weights_only=False`` (its sample inputs fall back to a full
    unpickle, its pickled weights and constants use one): torch's documented switch,
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, is set for the block (process-wide, so serialised)."""
    with _ENV_LOCK:
        saved = {k: os.environ.pop(k, None) for k in (_FORCE, _NO_FORCE)}
        os.environ[_FORCE] = "1"
        try:
            yield
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None)
                if v is not None:
                    os.environ[k] = v


def load_program(path: str | Path) -> Any:
    """The ``torch.export`` program in ``path`` (a folded.pt2), loaded without running code.

    A pt2 archive holds pickles (sample inputs, some weights and constants) that torch itself
    would unpickle in full; here each is read with ``weights_only=True``, so one that names a
    function or class is refused (StateError) instead of run. Verified against its checksum.
    """
    p = Path(path)
    data = read_verified(p)
    try:
        with _weights_only_everywhere(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(io.BytesIO(data))
    except pickle.UnpicklingError as exc:
        raise StateError(
            f"{p} holds a pickle that names Python functions or classes (an exported program "
            "written by easier holds only tensors): loading it would run code from the file, so "
            "it was not loaded. Fold the run again (easier fold RUN) or use a file you trust"
        ) from exc
    except Exception as exc:
        raise StateError(f"cannot read {p}: not a torch.export program, or a damaged one "
                         f"({type(exc).__name__}); fold the run again (easier fold RUN)") from exc


def load_folded(path: str | Path) -> nn.Module:
    """The folded model of a run directory (or a folded.pt2 path), checked against its checksum.

    ``torch.export.load(path).module()`` loads the same file without easier; this also verifies
    the sha256 recorded when the run wrote it (StateError if the file changed on disk) and reads
    every pickle inside with ``weights_only=True`` (see :func:`load_program`).
    """
    p = Path(path)
    return load_program(p / PROGRAM if p.is_dir() else p).module()


def fold_run(run_dir: str | Path, plan: str | FoldOptions = "latency", *,
             model: nn.Module | None = None, batch_sizes: Sequence[int] = (1, 64),
             onnx: bool = False, torchscript: bool = False,
             kept: nn.Module | None = None) -> dict[str, Any]:
    """Fold the kept model of a run directory and write its fold outputs.

    Writes folded.pt2, fold_plan.json, fold_measure.json and fold.md (and folded.pt /
    folded.onnx on request), atomically and checksummed, under the directory's lock. ``plan``
    is a mode name or :class:`FoldOptions`; the latency plan holds for ``plan_batch`` (default:
    ``batch_sizes``, the sizes measured). ``model`` is the base architecture for runs whose
    model is not from ``easier.models``. ``kept`` is the run's kept model when the caller holds
    it in memory (:func:`easier.reduce` does): its capture is reused instead of reloading
    model.pt. Returns the plan and the measurements as plain data.
    """
    opts = plan if isinstance(plan, FoldOptions) else FoldOptions(plan=plan)
    onnx, torchscript = onnx or opts.onnx, torchscript or opts.torchscript
    if onnx:
        _require_onnx()
    run = RunDir(run_dir)
    with lock_run_dir(run.path):
        reduced = kept if kept is not None else load_model(run.file("model.pt"), model)
        with eval_mode(reduced):  # the caller's model gets its modes back
            return _fold_and_write(run, reduced, opts, batch_sizes, onnx=onnx,
                                   torchscript=torchscript)


def _example(run: RunDir) -> Any:
    """What the fold captures on: a random batch of config.json's input_shape (image models),
    else the run's own example input (example.pt: token ids must be real ids)."""
    shape = run.read_config().get("input_shape")
    if shape:
        return torch.randn(2, *shape)  # batch 2: a one-sample capture would pin the batch
    example = run.read_example()
    if example is None:
        raise FoldError(f"{run.config_path} has no input_shape and the run has no "
                        f"{run.file('example.pt').name} (runs made before easier kept it): "
                        "rerun `easier reduce`, or fold in Python with "
                        "easier.fold(model, example_input)")
    return example


def _fold_and_write(run: RunDir, reduced: nn.Module, opts: FoldOptions,
                    batch_sizes: Sequence[int], *, onnx: bool,
                    torchscript: bool) -> dict[str, Any]:
    """Fold ``reduced`` (in eval mode), measure it against the folded model, write."""
    example = _example(run)
    sizes = tuple(opts.plan_batch or batch_sizes)
    folded = fold(reduced, example, plan=opts.plan, latency=LatencyConfig(batch_sizes=sizes))
    fold_plan = folded.fold_plan  # type: ignore[attr-defined]
    # timed side by side: the ratio is what the fold bought, not a change in machine load
    before, after, paired = measure_pair(reduced, folded, example, batch_sizes=batch_sizes)
    files: dict[str, bytes] = {}
    try:
        files[PROGRAM] = _export_program(folded, example)
    except Exception as exc:  # export covers fewer graphs than fold's capture
        fold_plan.notes.append(f"torch.export of the folded model failed "
                               f"({type(exc).__name__}: {exc}); {PROGRAM} not written")
    if torchscript:
        files[TORCHSCRIPT] = _torchscript(folded, example)
    if onnx:
        files.update(_onnx(folded, example))
    stale = [n for n in (PROGRAM, TORCHSCRIPT, ONNX, f"{ONNX}.data")
             if n not in files and run.file(n).exists()]
    for name in stale:  # an artifact of an earlier fold would contradict this plan
        run.file(name).unlink()
        fold_plan.notes.append(f"removed {name} left by an earlier fold")
    for name, data in files.items():
        atomic_write(run.file(name), lambda f, data=data: f.write(data))
    table = compare_table(before, after)
    run.write_json("fold_plan.json", fold_plan.to_dict())
    pairs = [{"batch_size": b, **c.to_dict()} for b, c in paired.items()]
    run.write_json("fold_measure.json", {"before": before.to_dict(),
                                         "after": after.to_dict(), "paired": pairs})
    title = FoldOptions(opts.plan, sizes) if fold_plan.batch_sizes else opts
    atomic_write_text(run.file("fold.md"), f"# fold (plan={title})\n\n{table}\n\n"
                      f"max |error| of the folded model: {fold_plan.max_abs_error:.3g}\n\n"
                      f"```\n{fold_plan}\n```\n")
    return {"plan": fold_plan.to_dict(), "before": before.to_dict(), "after": after.to_dict(),
            "paired": pairs, "table": table, "files": sorted(files), "removed": stale}

