"""What a run shows while it runs: progress bars (a tqdm bar on a terminal, periodic plain lines
elsewhere) and the one line per iteration.

A bar redrawn into a file (a log, CI output, ``nohup``) writes every update; when stderr is not
a terminal a line is printed every ``interval`` seconds instead (``$EASIER_PROGRESS_SECONDS``,
default 30), plus a closing line for a loop that printed one, so short loops stay silent.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar

__all__ = ["plain_progress", "progress", "status_line", "talker"]

_LOG = logging.getLogger("easier")

T = TypeVar("T")


def progress(iterable: Iterable[T], *, desc: str, unit: str = "batch",
             stream: TextIO | None = None) -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar on a terminal, else in :func:`plain_progress`."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, unit=unit, leave=False, file=stream)
    interval = float(os.environ.get("EASIER_PROGRESS_SECONDS", "30"))
    return plain_progress(iterable, desc=desc, units=f"{unit}es" if unit.endswith("ch") else
                          f"{unit}s", stream=stream, interval=interval)


def plain_progress(iterable: Iterable[T], *, desc: str, units: str = "batches",
                   stream: TextIO | None = None, interval: float = 30.0,
                   clock: Callable[[], float] = time.monotonic) -> Iterator[T]:
    """Yield from ``iterable``, printing ``desc: i/n units, t s`` at most every ``interval`` s."""
    out: Any = sys.stderr if stream is None else stream
    total = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
    of = f"/{total}" if total is not None else ""
    start = last = clock()
    printed = False
    i = 0
    for i, item in enumerate(iterable, 1):
        yield item
        now = clock()
        if now - last >= interval:
            print(f"{desc}: {i}{of} {units}, {now - start:.0f} s", file=out, flush=True)
            last, printed = now, True
    if printed:
        print(f"{desc}: done, {i} {units} in {clock() - start:.0f} s", file=out, flush=True)


def talker(verbose: bool, log: Callable[[str], None] | None, main: bool = True
           ) -> Callable[[str], None]:
    """Where a run's per-iteration lines go: ``log``, the ``easier`` logger, or nowhere (not
    ``verbose``, or not the main rank)."""
    if not verbose or not main:
        return lambda _msg: None
    return log or _log_line


def _log_line(msg: str) -> None:
    # a library adds no logging handler; with none configured the lines still reach the user
    if _LOG.hasHandlers():
        _LOG.info(msg)
    else:
        print(msg, file=sys.stderr, flush=True)


def status_line(rec: dict[str, Any], baseline: dict[str, Any], delta: float) -> str:
    """One history record as the line a run prints: what was removed, val against the floor."""
    what = (", ".join(rec["chosen"]) if rec["chosen"] else
            "dense baseline" if rec["iteration"] == 0 else f"none removed ({rec.get('reason')})")
    ent = rec.get("entropy") or {}
    if rec["chosen"] and ent:
        what += " (H=" + ", ".join(f"{ent[c]:.3f}" for c in rec["chosen"]) + ")"
    mark = "ok" if rec["accepted"] else "REJECTED"
    test = f" | test {rec['test_acc']:.2f}%" if rec.get("test_acc") is not None else ""
    secs = rec["seconds"]["total"]
    return (f"iter {rec['iteration']:>2} | {what} | val {rec['val_acc']:.2f}% "
            f"(floor {baseline['val_acc'] - delta:.2f}) {mark}{test} | {secs:.1f}s")
