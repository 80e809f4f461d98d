"""EGP's per-round pruning budget: softmax allocation over layers, water-filled to integers.

NEPENTHE reuses :func:`waterfill` with its own logits; provenance in :mod:`easier.methods.egp`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from easier.errors import ConfigError

__all__ = ["egp_logits", "round_half_up", "waterfill"]



def _softmax(logits: Sequence[float]) -> list[float]:
    """Softmax shifted by the max (``-inf`` entries get 0; at least one must be finite)."""
    top = max(logits)
    e = [math.exp(z - top) if z != -math.inf else 0.0 for z in logits]
    total = sum(e)
    return [v / total for v in e]


def egp_logits(scores: Sequence[float], remaining: Sequence[int]) -> list[float]:
    """EGP's softmax logits: irrelevance ``I_l = sum(s) / s_l`` (size-blind).

    A layer with ``s_l = 0`` has infinite irrelevance: such layers share the whole budget.
    """
    del remaining  # EGP's allocation ignores layer sizes
    if any(s == 0 for s in scores):
        return [0.0 if s == 0 else -math.inf for s in scores]
    total = sum(scores)
    return [total / s for s in scores]


def waterfill(
    scores: Sequence[float],
    remaining: Sequence[int],
    budget: int,
    logits: Callable[[Sequence[float], Sequence[int]], Sequence[float]] = egp_logits,
) -> list[int]:
    """Integer amounts to prune per layer: they sum to ``budget`` and never exceed ``remaining``.

    Each pass allocates ``budget * softmax(logits(scores, remaining))`` over the layers still in
    the pool; every layer allocated more than it has is capped at all of it and leaves the pool,
    its weights leave the budget, and the softmax is recomputed over the rest (``logits`` sees
    only the pool, so EGP's ``T`` shrinks too). The real amounts are then rounded by largest
    remainder (ties to the earlier layer).
    """
    if len(scores) != len(remaining):
        raise ConfigError(f"{len(scores)} scores for {len(remaining)} layers")
    if any(r < 0 for r in remaining) or any(s < 0 or math.isnan(s) for s in scores):
        raise ConfigError("scores and remaining weight counts must be >= 0 (and not NaN)")
    if not 0 <= budget <= sum(remaining):
        raise ConfigError(f"budget {budget} is outside [0, {sum(remaining)}] remaining weights")
    n = len(scores)
    alloc = [0.0] * n
    capped = [False] * n
    pool = [i for i in range(n) if remaining[i] > 0]
    left = float(budget)
    while pool and budget > 0:
        share = _softmax(logits([scores[i] for i in pool], [remaining[i] for i in pool]))
        want = {i: left * p for i, p in zip(pool, share, strict=True)}
        over = [i for i in pool if want[i] > remaining[i]]
        if not over:
            for i in pool:
                alloc[i] = want[i]
            break
        for i in over:
            alloc[i], capped[i] = float(remaining[i]), True
            left -= remaining[i]
        pool = [i for i in pool if not capped[i]]
    out = [remaining[i] if capped[i] else min(math.floor(alloc[i]), remaining[i]) for i in range(n)]
    # largest remainder first; float error may leave a unit more or less than that
    order = sorted(
        (i for i in range(n) if not capped[i]),
        key=lambda i: (-(alloc[i] - math.floor(alloc[i])), i),
    )
    missing = budget - sum(out)
    while missing:  # one pass in exact arithmetic; float error may need one more
        before = missing
        for i in order if missing > 0 else reversed(order):
            if missing > 0 and out[i] < remaining[i]:
                out[i], missing = out[i] + 1, missing - 1
            elif missing < 0 and out[i] > 0:
                out[i], missing = out[i] - 1, missing + 1
            if not missing:
                break
        if missing == before:  # unreachable while 0 <= budget <= sum(remaining)
            raise ConfigError(f"waterfill could not place {missing} weight(s)")
    return out


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (EGP's budget: pruning goes on to empty layers)."""
    return math.floor(x + 0.5)
