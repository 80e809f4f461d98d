"""Naming a pickle that ``torch.load(weights_only=True)`` refused, in one line.

Every loader of easier reads with ``weights_only=True``; torch's own message for a refused
pickle is several lines that suggest retrying with ``weights_only=False`` (which runs code from
the file). Loaders raise this one line instead.
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from easier.errors import StateError

__all__ = ["load_bytes", "pickle_refusal", "why_unreadable"]

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_WHY = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")
_OPERAND = re.compile(r"(Unsupported operand \d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def pickle_refusal(path: Path, exc: BaseException) -> StateError | None:
    """One line for a ``torch.load(weights_only=True)`` that refused a pickle of Python objects
    (None for any other failure): what the file holds and that it was not loaded. Never torch's
    own advice to retry with ``weights_only=False``, which would run code from the file."""
    text = _ANSI.sub("", str(exc))
    found = _GLOBAL.search(text) if isinstance(exc, pickle.UnpicklingError) else None
    if found is None:  # "Unsupported operand" alone is as likely random bytes: not named here
        return None
    return StateError(f"{path} holds pickled Python objects such as {found.group(1)}, not only "
                      "tensors: loading it would run code from the file, so it was not loaded")


def why_unreadable(exc: BaseException) -> str:
    """``Type: reason`` of a failed ``torch.load`` in one line, without torch's advice to
    retry with ``weights_only=False``."""
    text = _ANSI.sub("", str(exc))
    found = _WHY.search(text) or _OPERAND.search(text)
    if found:
        return f"{type(exc).__name__}: {found.group(1)}"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if "weights_only" in first:
        first = first.split(".")[0]  # "Weights only load failed", not the advice after it
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_bytes(path: Path, data: bytes, *, refused: Callable[[str], str],
               unreadable: Callable[[str], str], weights_only: bool = True,
               check: Callable[[Any], None] | None = None) -> Any:
    """``torch.load`` of ``data`` (the verified bytes of ``path``), every failure one StateError.

    ``refused(line)`` words a pickle of Python objects (``line`` from :func:`pickle_refusal`),
    ``unreadable(why)`` anything else (``why`` from :func:`why_unreadable`); ``check`` raises
    on a file that loads but is not what the caller reads (worded by ``unreadable`` too).
    One place, so that every loader of easier refuses the same things the same way.
    """
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)
        if check is not None:
            check(obj)
    except Exception as exc:
        line = pickle_refusal(path, exc)
        raise StateError(refused(str(line)) if line is not None
                         else unreadable(why_unreadable(exc))) from exc
    return obj
