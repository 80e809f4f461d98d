"""Fold outputs of a run directory: folded.pt2, fold_plan.json, fold_measure.json, fold.md."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import FoldError
from .fold import fold
from .measurement import compare_table, measure
from .state import RunDir, atomic_write_text, load_model

__all__ = ["fold_run"]


def fold_run(run_dir: str | Path, *, plan: str = "latency", model: nn.Module | None = None,
             batch_sizes: Sequence[int] = (1, 64), onnx: bool = False) -> dict[str, Any]:
    """Fold the kept model of a run directory; write folded.pt(2), fold_plan.json and fold.md.

    ``folded.pt`` is TorchScript (``torch.jit.load`` needs no easier code) and ``folded.pt2`` a
    ``torch.export`` program (``torch.export.load(path).module()``), the format PyTorch now
    recommends; it is skipped with a note if export fails. ``model`` is the base
    architecture for runs whose model is not from ``easier.models``. Returns the plan and the
    before/after measurements as plain data.
    """
    run = RunDir(run_dir)
    reduced = load_model(run.file("model.pt"), model).eval()
    shape = run.read_config().get("input_shape")
    if not shape:
        raise FoldError(f"{run.config_path} has no input_shape; rerun `easier reduce` to record it")
    example = torch.randn(1, *shape)
    folded = fold(reduced, example, plan=plan)
    before = measure(reduced, example, batch_sizes=batch_sizes)
    after = measure(folded, example, batch_sizes=batch_sizes)
    import warnings

    with warnings.catch_warnings():  # torch.jit is deprecated upstream but still the portable file
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(folded, example), str(run.file("folded.pt")))
    fold_plan = folded.fold_plan  # type: ignore[attr-defined]
    try:
        batch = torch.export.Dim("batch")  # from a batch of 2: a size-1 dim would be specialised
        program = torch.export.export(folded, (example.expand(2, *shape).clone(),),
                                      dynamic_shapes=({0: batch},))
        torch.export.save(program, str(run.file("folded.pt2")))
    except Exception as exc:  # export covers fewer graphs than tracing; the .pt still exists
        fold_plan.notes.append(f"torch.export failed ({type(exc).__name__}: {exc}); "
                               "folded.pt2 not written")
    run.write_json("fold_plan.json", fold_plan.to_dict())
    run.write_json("fold_measure.json", {"before": before.to_dict(), "after": after.to_dict()})
    table = compare_table(before, after)
    atomic_write_text(run.file("fold.md"), f"# fold (plan={plan})\n\n{table}\n\n"
                      f"max |error| of the folded model: {fold_plan.max_abs_error:.3g}\n\n"
                      f"```\n{fold_plan}\n```\n")
    if onnx:
        try:
            torch.onnx.export(folded, (example,), str(run.file("folded.onnx")))
        except Exception as exc:  # the onnx package is an optional extra
            raise FoldError(f"ONNX export failed ({type(exc).__name__}: {exc}); install the "
                            "extra (onnx, onnxscript) with: pip install 'easier[onnx]'") from exc
    return {"plan": fold_plan.to_dict(), "before": before.to_dict(), "after": after.to_dict(),
            "table": table}
