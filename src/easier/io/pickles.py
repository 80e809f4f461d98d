"""Naming a pickle that ``torch.load(weights_only=True)`` refused, in one line.

Every loader of easier reads with ``weights_only=True``; torch's own message for a refused
pickle is several lines that suggest retrying with ``weights_only=False`` (which runs code from
the file). Loaders raise this one line instead.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

from easier.errors import StateError

__all__ = ["pickle_refusal"]

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def pickle_refusal(path: Path, exc: BaseException) -> StateError | None:
    """One line for a ``torch.load(weights_only=True)`` that refused a pickle of Python objects
    (None for any other failure): what the file holds and that it was not loaded. Never torch's
    own advice to retry with ``weights_only=False``, which would run code from the file."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if not isinstance(exc, pickle.UnpicklingError) or not (
            "Weights only load failed" in text or "Unsupported operand" in text):
        return None
    found = _GLOBAL.search(text)
    what = f" such as {found.group(1)}" if found else ""
    return StateError(f"{path} holds pickled Python objects{what}, not only tensors: loading it "
                      "would run code from the file, so it was not loaded")
