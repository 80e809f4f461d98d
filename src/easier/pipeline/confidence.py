"""How much of an accuracy drop is noise: the statistics behind an honest δ.

The loop accepts a removal when val top-1 stays within δ points of the dense model's. On a val
split of n samples top-1 itself has a binomial standard error of ``sqrt(p(1−p)/n)`` (times 100,
in points): 0.9-1.3 points on 500 images at 90-95 %. A δ below about two of those turns each
accept/reject into a coin toss (:func:`delta_warning` says so). The drop between two models
scored on the *same* samples is less noisy than two independent accuracies, because most
samples are right (or wrong) for both; :func:`paired_bootstrap` measures its spread from the
per-sample correctness of the two models (:func:`easier.train.correct.per_sample_correct`).

Pure functions: the loop (and its StopRule) decides how to use them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from easier.errors import ConfigError

__all__ = ["Bootstrap", "delta_warning", "paired_bootstrap", "standard_error"]

_CELLS = 1 << 22  # resampled indices drawn per chunk (32 MiB of int64)


def standard_error(acc_percent: float, n: int) -> float:
    """Binomial standard error of a top-1 accuracy, in points: ``sqrt(p(1−p)/n) · 100``."""
    if not 0.0 <= float(acc_percent) <= 100.0:
        raise ConfigError(f"accuracy {acc_percent!r} must be a percentage in [0, 100]")
    if int(n) < 1:
        raise ConfigError(f"val size {n!r} must be a positive number of samples")
    p = float(acc_percent) / 100.0
    return math.sqrt(p * (1.0 - p) / int(n)) * 100.0


def delta_warning(delta: float, acc: float, n: int, unit: str = "samples") -> str | None:
    """A warning when δ is below two standard errors of val top-1, else None.

    ``acc`` is val top-1 in percent (the dense model's), ``n`` the number of val samples (or
    tokens: pass ``unit``).
    """
    se = standard_error(acc, n)
    if float(delta) >= 2.0 * se:
        return None
    return (f"δ={float(delta):g} is below two standard errors of val top-1 (±{se:.2f} points "
            f"on {int(n)} {unit}): accept/reject decisions are mostly noise; use a larger val "
            "split or a larger δ")


class Bootstrap(NamedTuple):
    """A paired bootstrap of the drop ``base − new`` in points.

    ``p_within``: fraction of resamples whose drop is <= δ. ``lower``/``upper``: the
    ``1 − confidence`` and ``confidence`` quantiles of the drop (together a ``2·confidence − 1``
    central interval). Accept the new model when ``upper <= δ``: with probability about
    ``confidence`` its true drop is within δ.
    """

    p_within: float
    lower: float
    upper: float


def _vector(name: str, v: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v)
    if v.ndim != 1 or v.numel() == 0:
        raise ConfigError(f"{name}: one correctness flag per val sample (a non-empty 1-D tensor); "
                          f"got shape {tuple(v.shape)}")
    if v.dtype != torch.bool and not bool(((v == 0) | (v == 1)).all()):
        raise ConfigError(f"{name}: correctness flags must be bool (or 0/1)")
    return v.to(torch.int8).cpu()


def paired_bootstrap(correct_base: torch.Tensor, correct_new: torch.Tensor, delta: float,
                     confidence: float = 0.95, rounds: int = 2000, seed: int = 0) -> Bootstrap:
    """Resample the val samples with replacement (the same indices for both models) ``rounds``
    times and return how the accuracy drop ``base − new`` (points) is spread.

    ``correct_base[i]``/``correct_new[i]``: whether each model got val sample ``i`` right. A
    drop <= δ counts as within, as the loop accepts ``val_acc >= baseline − δ``. Deterministic
    for a given ``seed`` (indices from a ``torch.Generator`` seeded with it, drawn in chunks of
    rows whose size depends only on n).
    """
    base, new = _vector("correct_base", correct_base), _vector("correct_new", correct_new)
    if base.shape != new.shape:
        raise ConfigError(f"correct_base has {base.numel()} samples, correct_new "
                          f"{new.numel()}: score both models on the same val samples")
    if not 0.0 < float(confidence) < 1.0:
        raise ConfigError(f"confidence={confidence!r} must be in (0, 1)")
    if int(rounds) < 1:
        raise ConfigError(f"rounds={rounds!r} must be >= 1")
    n = base.numel()
    diff = base.to(torch.int64) - new.to(torch.int64)  # +1: only base right, -1: only new right
    gen = torch.Generator().manual_seed(int(seed))
    rows = max(1, _CELLS // n)
    sums = []
    for start in range(0, int(rounds), rows):
        idx = torch.randint(n, (min(rows, int(rounds) - start), n), generator=gen)
        sums.append(diff[idx].sum(1))
    total = torch.cat(sums)  # samples lost per resample (an integer)
    within = float((total.double() * 100.0 <= float(delta) * n).double().mean())
    drops = total.double() * 100.0 / n
    q = torch.tensor([1.0 - float(confidence), float(confidence)], dtype=torch.float64)
    lower, upper = torch.quantile(drops, q).tolist()
    return Bootstrap(within, lower, upper)
