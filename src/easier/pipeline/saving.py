"""What the loop writes after every iteration: the resumable state, the kept model, the
summary and every report file (rank 0 only under torchrun)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from easier.edit.linearize import linearized_sites
from easier.io.records import model_record, save_iteration, save_model
from easier.io.rundir import RunDir
from easier.methods import Method

__all__ = ["save_progress"]


def save_progress(run: RunDir | None, history: list[dict[str, Any]], baseline: dict[str, Any],
                  current: nn.Module, accepted: nn.Module,
                  stop: tuple[str | None, str | None], rejected: bool, cfg: dict[str, Any],
                  strategy: Method) -> None:
    """Write the run's state and every report file (rank 0 only under torchrun)."""
    from easier.parallel import is_main

    if run is None or not is_main():
        return
    from easier.report.files import write_reports

    if run.keep_iterations and not history[-1].get("failed"):  # a failed one has no model
        save_iteration(run, history[-1], current)
    run.write_state({
        "history": history, "baseline": baseline, "stop_code": stop[0], "stop_reason": stop[1],
        "rejected": rejected, "current": model_record(current),
        "method_state": strategy.state_dict(), "threads": torch.get_num_threads(),
        "accepted": None if accepted is current else model_record(accepted),
    })
    save_model(accepted, run.file("model.pt"))
    summary = {
        "method": cfg["method"], "delta": cfg["delta"], "stop_reason": stop[1],
        "done": stop[1] is not None, "baseline": baseline,
        "removed": next(h for h in reversed(history) if h["accepted"])["removed"],
        "linearized": linearized_sites(accepted), "iterations": len(history) - 1,
        "final": next(h for h in reversed(history) if h["accepted"]),
    }
    run.write_json("summary.json", summary)
    write_reports(run, history, baseline, cfg)
