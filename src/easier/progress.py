"""Progress of a loop over batches: a tqdm bar on a terminal, periodic plain lines elsewhere.

A bar redrawn into a file (a log, CI output, ``nohup``) writes every update; when stderr is not
a terminal a line is printed every ``interval`` seconds instead (``$EASIER_PROGRESS_SECONDS``,
default 30), plus a closing line for a loop that printed one, so short loops stay silent.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar

__all__ = ["plain_progress", "progress"]

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
