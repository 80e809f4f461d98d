"""Shared helpers of the benchmark scripts: machine header, markdown tables, paired timing.

Every script prints :func:`header` first, returns its results as :class:`Table` objects (the raw
numbers stay in the rows, so tests and ``run_all`` can check them) and appends them as markdown
to ``--out FILE`` when given.
"""

from __future__ import annotations

import math
import os
import platform
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import easier
from easier.methods import Context, Method, Step
from easier.perf.timing import Comparison, compare_samples, paired_samples

__all__ = [
    "Delegate",
    "Table",
    "add_common_args",
    "band",
    "header",
    "paired",
    "ratio_cell",
    "write_out",
]


def header(batch_sizes: Sequence[int] | str, extra: str = "") -> str:
    """One markdown paragraph: machine, CPU count, torch version, threads, batch sizes."""
    sizes = batch_sizes if isinstance(batch_sizes, str) else ", ".join(map(str, batch_sizes))
    cpu = platform.processor() or platform.machine() or "?"
    line = (
        f"machine: {platform.platform()} ({cpu}), {os.cpu_count()} CPUs; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch sizes: {sizes}"
    )
    return f"{line}; {extra}" if extra else line


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return format(value, spec) if spec else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and spec:
        return format(value, spec)
    return str(value)


@dataclass
class Table:
    """A result table: raw cells in ``rows`` (numbers stay numbers), formats per column.

    ``formats`` maps a column name to a format spec (e.g. ``".3f"``, ``".2f"``, ``","``) used when
    rendering; ``note`` is the sentence saying what the table measures and the target.
    """

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)
    note: str = ""
    suffix: dict[str, str] = field(default_factory=dict)  # e.g. {"ratio": "x"}

    def add(self, *cells: Any) -> list[Any]:
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(list(cells))
        return self.rows[-1]

    def column(self, name: str) -> list[Any]:
        """The raw values of one column, top to bottom."""
        i = self.columns.index(name)
        return [r[i] for r in self.rows]

    def _cells(self, row: list[Any]) -> list[str]:
        return [
            _fmt(v, self.formats.get(c, "")) + (self.suffix.get(c, "") if v is not None else "")
            for c, v in zip(self.columns, row, strict=True)
        ]

    def header_lines(self) -> list[str]:
        """Column names and alignment: numbers right, text left."""

        def numeric(i: int) -> bool:
            vals = [r[i] for r in self.rows if r[i] is not None]
            return all(isinstance(v, (int, float)) or re.match(r"[-+]?\d", str(v)) for v in vals)

        align = ["---:" if numeric(i) else "---" for i in range(len(self.columns))]
        return ["| " + " | ".join(self.columns) + " |", "|" + "|".join(align) + "|"]

    def row_line(self, row: list[Any]) -> str:
        return "| " + " | ".join(self._cells(row)) + " |"

    def markdown(self, *, title: bool = True) -> str:
        lines = [f"### {self.title}", ""] if title else []
        if self.note:
            lines += [self.note, ""]
        lines += self.header_lines() + [self.row_line(r) for r in self.rows]
        return "\n".join(lines)


def write_out(path: str | Path | None, head: str, tables: Sequence[Table], extra: str = "") -> None:
    """Append the header and tables (and ``extra`` markdown) to ``path`` if one is given."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join([head, *(t.markdown() for t in tables), *([extra] if extra else [])])
    with path.open("a", encoding="utf-8") as f:
        f.write(text + "\n\n")


def add_common_args(ap: Any) -> None:
    """--quick, --threads and --out, the flags every script takes."""
    ap.add_argument("--quick", action="store_true", help="tiny sizes: seconds (smoke test)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    ap.add_argument("--out", default=None, help="append the header and tables to this markdown")


def paired(
    fns: Sequence[Callable[[], Any]], *, rounds: int = 15, min_sample_s: float = 0.05
) -> list[Comparison]:
    """Each function against the first, timed in paired rounds (``easier.perf.timing``).

    One implementation for the library and the benchmarks: every round times one block of
    each function in an order rotated by one each round, so load changes hit all alike; the
    per-round ratios give each ratio its noise band (:class:`~easier.perf.timing.Comparison`).
    ``result[0]`` compares the first function with itself (ratio 1, its own spread).
    """
    samples = paired_samples(fns, rounds=rounds, min_run_time=min_sample_s * rounds)
    return [compare_samples(samples[0], s) for s in samples]


def band(c: Comparison, *, inverse: bool = False, digits: int = 2) -> str:
    """The noise band of a ratio as ``lo..hi`` (of its inverse, e.g. a speed-up, if asked)."""
    lo, hi = (1 / c.ratio_hi, 1 / c.ratio_lo) if inverse else (c.ratio_lo, c.ratio_hi)
    return f"{lo:.{digits}f}..{hi:.{digits}f}"


def ratio_cell(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing or den is zero."""
    if num is None or den is None or den == 0:
        return None
    return num / den


class Delegate(Method):
    """A method that runs ``inner`` unchanged: subclass it and override :meth:`step` to record
    something per iteration (a benchmark probe) without changing what the method does."""

    def __init__(self, inner: Method):
        self.inner = inner
        self.name, self.unit, self.finetune = inner.name, inner.unit, inner.finetune

    @property  # type: ignore[override]
    def example(self) -> Any:
        return self.inner.example

    @example.setter
    def example(self, value: Any) -> None:
        self.inner.example = value

    def options(self) -> dict[str, Any]:
        return self.inner.options()

    def prepare(self, model: nn.Module) -> nn.Module:
        return self.inner.prepare(model)

    def units(self, model: nn.Module, kinds: Any = easier.KINDS) -> list[str]:
        return self.inner.units(model, kinds)

    def regularizer(self) -> Any:
        return self.inner.regularizer()

    def after_step(self, model: nn.Module) -> None:
        self.inner.after_step(model)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def step(self, ctx: Context) -> Step:
        return self.inner.step(ctx)
