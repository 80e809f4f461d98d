"""The least-squares affine stand-in for an activation: ``a * z + b`` per channel.

Replacing ``act(z)`` by the identity (the paper) throws away the activation's mean and slope;
the per-channel least-squares fit of ``act(z)`` by ``a * z + b`` over the training data is just
as linear, folds as exactly (a per-channel scale and bias on the layer before), and does less
damage before fine-tuning. :func:`fit_affine` computes the fits in one pass: an observer node
after each site of a torch.export capture reads the pre-activation ``z`` (a clone taken before
the site, so in-place activations do not change it) and the site's own output ``act(z)``, and
accumulates per channel, in float64, the sums of ``z``, ``z²``, ``act(z)`` and ``z·act(z)``.

Per channel, with ``n`` values: ``a = cov(z, act) / var(z)``, ``b = mean(act) - a·mean(z)``.
A channel whose ``z`` is constant over the data (``var(z)`` within rounding of 0, e.g. a dead
unit) gets ``a = 0, b = mean(act)``: any line through the one point fits, and a flat one keeps a
constant channel constant, as it was. A channel never seen gets the identity (``a = 1, b = 0``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from easier.entropy.estimate import batch_input, model_device
from easier.errors import DataError, SiteError, TraceError
from easier.graph.capture import call_model, capture, eval_mode, to_device
from easier.graph.sites import KINDS, graph_sites

__all__ = ["AffineFit", "fit_affine"]

_FLAT = 1e-12  # var(z) <= _FLAT * mean(z²): z is constant up to float64 rounding


@dataclass(frozen=True)
class AffineFit:
    """One site's fit: ``a``, ``b`` (float64, shaped to broadcast on the pre-activation)."""

    a: torch.Tensor
    b: torch.Tensor
    samples: int  # values per channel the fit saw


class _Moments(nn.Module):
    """Observer: per-channel float64 sums of z, z², y, z·y (``y = act(z)``)."""

    def __init__(self, axis: int | None):
        super().__init__()
        self.axis = axis
        self.sums: torch.Tensor | None = None  # (5, C): n, Σz, Σz², Σy, Σzy
        self.shape: tuple[int, ...] = ()

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> None:
        z, y = z.detach(), y.detach()
        if z.ndim < 2:
            z, y = z.reshape(-1, 1), y.reshape(-1, 1)
        axis = (1 if self.axis is None else self.axis) % z.ndim
        if axis == 0:
            raise SiteError(f"channel axis 0 is the batch axis of a {tuple(z.shape)} tensor")
        c = z.shape[axis]
        shape = (c, *([1] * (z.ndim - 1 - axis)))  # broadcasts along the channel axis
        z = z.movedim(axis, -1).reshape(-1, c).double()
        y = y.movedim(axis, -1).reshape(-1, c).double()
        s = torch.stack([torch.full((c,), float(z.shape[0]), dtype=torch.float64,
                                    device=z.device),
                         z.sum(0), (z * z).sum(0), y.sum(0), (z * y).sum(0)])
        if self.sums is None:
            self.sums, self.shape = s, shape
        elif self.sums.shape != s.shape:
            raise DataError(f"the number of channels changed from {self.sums.shape[1]} to {c}")
        else:
            self.sums += s

    def fit(self) -> AffineFit:
        if self.sums is None:
            raise DataError("fit_affine saw no batch")
        n, sz, szz, sy, szy = self.sums.cpu()
        safe = n.clamp(min=1)
        mz, my = sz / safe, sy / safe
        var = szz / safe - mz * mz
        cov = szy / safe - mz * my
        flat = var <= _FLAT * (szz / safe)
        a = torch.where(flat, torch.zeros_like(var), cov / torch.where(flat, 1.0, var))
        b = my - a * mz
        a = torch.where(n > 0, a, torch.ones_like(a))
        b = torch.where(n > 0, b, torch.zeros_like(b))
        return AffineFit(a.reshape(self.shape), b.reshape(self.shape), int(n.min()))


def fit_affine(model: nn.Module, batches: Iterable[Any], sites: Sequence[str] | None = None, *,
               max_batches: int | None = 8, input_key: str | Sequence[str] | None = None,
               kinds: Sequence[str] = KINDS) -> dict[str, AffineFit]:
    """``{site: AffineFit}``: the least-squares ``a * z + b`` per channel of each site.

    Runs ``model`` (eval mode, no grad, modes restored; not modified) on up to ``max_batches``
    of ``batches`` (tensors, ``(input, target)`` pairs or dicts with ``input_key``). The channel
    of a site is its neuron axis as the entropy pass infers it. Needs a torch.export capture.
    """
    stream = iter(batches) if max_batches is None else itertools.islice(batches, max_batches)
    first = next(stream, None)
    if first is None:
        raise DataError("fit_affine got no batch")
    device = model_device(model)
    x0 = to_device(batch_input(first, input_key), device)
    runners: dict[Any, tuple[nn.Module, dict[str, _Moments]]] = {}
    moments: dict[str, _Moments] = {}

    def runner(x: Any) -> nn.Module:
        key = tuple(x.shape) if isinstance(x, torch.Tensor) else None
        if key not in runners:
            runners[key] = _instrument(model, x, sites, kinds, moments)
        return runners[key][0]

    with eval_mode(model), torch.no_grad():
        for batch in itertools.chain([first], stream):
            x = x0 if batch is first else to_device(batch_input(batch, input_key), device)
            call_model(runner(x), x)
    return {name: m.fit() for name, m in moments.items()}


def _instrument(model: nn.Module, x: Any, sites: Sequence[str] | None, kinds: Sequence[str],
                moments: dict[str, _Moments]) -> tuple[nn.Module, dict[str, _Moments]]:
    """A capture of ``model`` on ``x`` with a :class:`_Moments` observer after each site."""
    try:
        cap = capture(model, x, dynamic_batch=False)
    except TraceError as exc:
        raise SiteError(f"affine linearization fits on a captured graph: {exc}") from exc
    located = {g.site.name: g for g in graph_sites(model, cap, kinds)}
    names = list(located) if sites is None else list(sites)
    unknown = [n for n in names if n not in located]
    if unknown:
        raise SiteError(f"unknown site(s) {unknown}; valid sites: {list(located)}")
    gm = cap.gm
    for i, name in enumerate(names):
        g = located[name]
        obs = moments.setdefault(name, _Moments(g.site.channel_axis))
        path = f"_easier_moments_{i}"
        gm.add_submodule(path, obs)
        group = set(g.nodes)
        first = next(n for n in gm.graph.nodes if n in group and g.input in n.all_input_nodes)
        with gm.graph.inserting_before(first):
            z = gm.graph.call_function(torch.clone, (g.input,))
        with gm.graph.inserting_after(g.output):
            gm.graph.call_module(path, (z, g.output))
    gm.recompile()
    return gm, moments
