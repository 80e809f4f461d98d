"""The state a run carries from one iteration to the next, and what it writes after each.

:class:`RunState` is everything a resumed run needs: the history (iteration 0 is the dense
model), the baseline scores, the current and the last accepted model, why it stopped. After
every iteration :meth:`RunState.save` writes it atomically with the kept model, the summary and
every report file (rank 0 only under torchrun), so a killed run resumes where it stopped.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from easier.edit.linearize import linearized_sites
from easier.io.records import model_record, rebuild, save_iteration, save_model
from easier.io.rundir import RunDir
from easier.methods import Method
from easier.parallel import is_main
from easier.report.files import write_reports

__all__ = ["RunState"]


@dataclass
class RunState:
    """Where a run stands. ``stop_code`` is one of exhausted, limit, one-shot, rejected, failed
    (None while it goes on); ``rejected`` is True once a removal failed the δ check (with
    ``run_all`` the run goes on logging, but nothing after it is accepted)."""

    history: list[dict[str, Any]]
    baseline: dict[str, Any]
    current: nn.Module
    accepted: nn.Module
    stop_code: str | None = None
    stop_reason: str | None = None
    rejected: bool = False
    teacher: nn.Module | None = None
    # which val samples the dense model gets right (StopRule.confidence's paired bootstrap)
    baseline_correct: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @property
    def removed(self) -> list[str]:
        return list(self.history[-1]["removed"])

    @property
    def kept(self) -> list[str]:
        """Units removed in the last accepted iteration (what the returned model lacks)."""
        return list(next(h for h in reversed(self.history) if h["accepted"])["removed"])

    def stop(self, code: str | None, reason: str | None) -> None:
        self.stop_code, self.stop_reason = code, reason

    def record(self, row: dict[str, Any], model: nn.Module) -> None:
        """Append an evaluated iteration; ``model`` becomes current (and kept if accepted)."""
        self.history.append(row)
        self.current = model
        if row["accepted"]:
            self.accepted = model

    @classmethod
    def from_saved(cls, saved: dict[str, Any], base: nn.Module,
                   device: torch.device) -> RunState:
        """The state written by :meth:`save`, its models rebuilt into copies of ``base``."""
        current = rebuild(saved["current"], copy.deepcopy(base)).to(device)
        accepted = (current if saved["accepted"] is None
                    else rebuild(saved["accepted"], copy.deepcopy(base)).to(device))
        return cls(saved["history"], saved["baseline"], current, accepted,
                   saved.get("stop_code"), saved["stop_reason"], bool(saved.get("rejected")),
                   baseline_correct=saved.get("baseline_correct"))

    def save(self, run: RunDir | None, cfg: dict[str, Any], strategy: Method) -> None:
        """Write the state, the kept model, summary.json and the reports (rank 0 only)."""
        if run is None or not is_main():
            return
        if run.keep_iterations and not self.history[-1].get("failed"):  # failed: no model
            save_iteration(run, self.history[-1], self.current)
        run.write_state({
            "history": self.history, "baseline": self.baseline, "stop_code": self.stop_code,
            "stop_reason": self.stop_reason, "rejected": self.rejected,
            "current": model_record(self.current), "method_state": strategy.state_dict(),
            "accepted": None if self.accepted is self.current else model_record(self.accepted),
            "baseline_correct": self.baseline_correct,
        })
        save_model(self.accepted, run.file("model.pt"))
        final = next(h for h in reversed(self.history) if h["accepted"])
        run.write_json("summary.json", {
            "method": cfg["method"], "delta": cfg["stop"]["delta"],
            "stop_reason": self.stop_reason, "done": self.done, "baseline": self.baseline,
            "removed": final["removed"], "linearized": linearized_sites(self.accepted),
            "iterations": len(self.history) - 1, "final": final,
        })
        write_reports(run, self.history, self.baseline, cfg)

