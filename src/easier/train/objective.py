"""The training objective: cross-entropy and top-1 hits for class and per-token targets.

Class targets are ``(N,)`` indices for ``(N, C)`` logits. Per-token targets (a Hugging Face
language-model or token-classification batch) are ``(N, T)`` indices for ``(N, T, C)`` logits;
positions labelled -100 are ignored, as in Hugging Face, and loss and accuracy are per token.
When the labels are the input ids themselves (``labels = input_ids``, the Hugging Face convention
for causal language models, whose own loss shifts them), the target of position t is token
t + 1: logits ``[:, :-1]`` are scored against labels ``[:, 1:]``. Otherwise labels are taken as
aligned with the logits (pass them already shifted if you shift them yourself).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from easier.errors import ConfigError

__all__ = ["IGNORE_INDEX", "align", "cross_entropy", "hits"]

IGNORE_INDEX = -100


def _next_token(y: torch.Tensor, x: Any) -> bool:
    """Whether ``y`` is the batch's input ids (up to ignored positions): next-token targets."""
    ids = x.get("input_ids") if isinstance(x, dict) else None
    if not isinstance(ids, torch.Tensor) or ids.shape != y.shape or y.ndim != 2 or y.shape[1] < 2:
        return False
    keep = y != IGNORE_INDEX
    return bool(keep.any()) and bool(((y == ids.to(y.device)) | ~keep).all())


def align(logits: torch.Tensor, y: torch.Tensor, x: Any = None,
          *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(logits, targets, *others) as ``(M, C)`` and ``(M,)``: class targets are returned as they
    are; per-token ones are flattened (and shifted for next-token labels, see the module doc).
    ``others`` (e.g. a teacher's logits) are cut and flattened like ``logits``."""
    if y.is_floating_point() or y.ndim < 2 or logits.ndim != y.ndim + 1:
        return (logits, y, *others)
    if tuple(logits.shape[:-1]) != tuple(y.shape):
        raise ConfigError(
            f"per-token labels of shape {tuple(y.shape)} do not match logits of shape "
            f"{tuple(logits.shape)}: labels must hold one class index (or -100) per position")
    if _next_token(y, x):
        logits, y = logits[:, :-1], y[:, 1:]
        others = tuple(o[:, :-1] for o in others)
    c = logits.shape[-1]
    return (logits.reshape(-1, c), y.reshape(-1), *(o.reshape(-1, c) for o in others))


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, x: Any = None, *,
                  reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of class or per-token targets (-100 ignored); see :func:`align`."""
    lg, t = align(logits, y, x)
    return F.cross_entropy(lg, t, ignore_index=IGNORE_INDEX, reduction=reduction)


def hits(logits: torch.Tensor, y: torch.Tensor, x: Any = None) -> tuple[int, int]:
    """(top-1 hits, targets counted): samples for class targets, non-ignored tokens for
    per-token ones."""
    lg, t = align(logits, y, x)
    if t.is_floating_point():
        return int((lg.argmax(-1) == t).sum()), len(t)
    keep = t != IGNORE_INDEX
    return int(((lg.argmax(-1) == t) & keep).sum()), int(keep.sum())
