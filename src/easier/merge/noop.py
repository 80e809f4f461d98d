"""Copies the fold may drop: ``x.contiguous()`` and ``x.clone()`` that change nothing.

A copy of a permuted tensor is not an identity: the ``view`` after ``.permute(...).contiguous()``
(DeBERTa's attention) needs its strides. A clone of a tensor that is later written in place keeps
the old values. Such copies stay in the graph; the others are dropped so chains can pass them.
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["noop_copy"]

_VIEWS = {"view", "reshape", "permute", "transpose", "unsqueeze", "squeeze", "expand", "slice",
          "select", "t", "alias", "_unsafe_view"}


def _op(node: fx.Node) -> str:
    if node.op != "call_function":
        return ""
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _writes(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def _mutated(node: fx.Node) -> bool:
    """Whether an in-place op writes to ``node`` or to a view of it (one view deep)."""
    return any(_writes(u) or (_op(u) in _VIEWS and any(_writes(v) for v in u.users))
               for u in node.users)


def noop_copy(node: fx.Node) -> bool:
    """``x.contiguous()``/``x.clone()`` that is an identity here: x is already contiguous (so
    a later ``view`` still works without it) and neither copy nor source is written in place."""
    src = node.args[0] if node.args else None
    fmt = node.kwargs.get("memory_format", None)
    if not isinstance(src, fx.Node) or len(node.args) != 1 or set(node.kwargs) - {"memory_format"} \
            or fmt not in (None, torch.contiguous_format, torch.preserve_format):
        return False
    val = src.meta.get("val")
    try:
        contiguous = isinstance(val, torch.Tensor) and bool(val.is_contiguous())
    except Exception:  # a symbolic stride that cannot be decided: keep the copy
        return False
    return contiguous and not _mutated(node) and not _mutated(src)
