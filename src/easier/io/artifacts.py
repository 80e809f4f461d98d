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

import importlib
import io
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from easier.errors import FoldError
from easier.io.records import (
    RunDir,
    atomic_write,
    atomic_write_text,
    load_model,
    lock_run_dir,
    verify_file,
)
from easier.merge import LatencyConfig, fold
from easier.perf.measure import compare_table, measure_pair

__all__ = ["FoldOptions", "fold_run", "load_folded"]

PROGRAM = "folded.pt2"
TORCHSCRIPT = "folded.pt"
ONNX = "folded.onnx"


@dataclass(frozen=True)
class FoldOptions:
    """How :func:`fold_run` folds and what it writes.

    ``plan_batch``: the batch sizes the "latency" plan must hold for (default: the measured
    ``batch_sizes`` of :func:`fold_run`). ``torchscript`` also writes folded.pt (deprecated
    format), ``onnx`` folded.onnx (needs the onnx extra).
    """

    plan: str = "latency"
    plan_batch: tuple[int, ...] | None = None
    torchscript: bool = False
    onnx: bool = False

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
    batch = torch.export.Dim("batch")  # from a batch of 2: a size-1 dim would be specialised
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


def load_folded(path: str | Path) -> nn.Module:
    """The folded model of a run directory (or a folded.pt2 path), checked against its checksum.

    ``torch.export.load(path).module()`` loads the same file without easier; this also verifies
    the sha256 recorded when the run wrote it (StateError if the file changed on disk).
    """
    p = Path(path)
    p = p / PROGRAM if p.is_dir() else p
    data = p.read_bytes()
    verify_file(p, data)
    return torch.export.load(io.BytesIO(data)).module()


def fold_run(run_dir: str | Path, plan: str | FoldOptions = "latency", *,
             model: nn.Module | None = None, batch_sizes: Sequence[int] = (1, 64),
             onnx: bool = False, torchscript: bool = False) -> dict[str, Any]:
    """Fold the kept model of a run directory and write its fold outputs.

    Writes folded.pt2, fold_plan.json, fold_measure.json and fold.md (and folded.pt /
    folded.onnx on request), atomically and checksummed, under the directory's lock. ``plan``
    is a mode name or :class:`FoldOptions`; the latency plan holds for ``plan_batch`` (default:
    ``batch_sizes``, the sizes measured). ``model`` is the base architecture for runs whose
    model is not from ``easier.models``. Returns the plan and the measurements as plain data.
    """
    opts = plan if isinstance(plan, FoldOptions) else FoldOptions(plan=plan)
    onnx, torchscript = onnx or opts.onnx, torchscript or opts.torchscript
    if onnx:
        _require_onnx()
    run = RunDir(run_dir)
    with lock_run_dir(run.path):
        reduced = load_model(run.file("model.pt"), model).eval()
        shape = run.read_config().get("input_shape")
        if not shape:
            raise FoldError(f"{run.config_path} has no input_shape; rerun `easier reduce` to "
                            "record it")
        example = torch.randn(2, *shape)  # batch 2: a one-sample capture would pin the batch
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

