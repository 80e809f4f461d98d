"""probe: measure what each removal costs instead of guessing it from a statistic.

Entropy (EASIER) and the other scores are proxies for "how much would the loss go up if this
site were linear". ``probe`` measures exactly that, before fine-tuning: for every remaining
site it makes the site compute the identity (or the run's affine stand-in), re-estimates the
BatchNorm statistics on a few training batches (stale statistics dominate the damage of an edit
otherwise, see :mod:`easier.edit.recalibrate`) and measures the mean cross-entropy on a
held-out slice of the *training* data. Validation data is never read: the loop decides accept or
reject on val, and a criterion that also chose on val would be selecting on the test of its own
choice.

The slice: the training indices are permuted by ``torch.randperm(n, generator=seed)``; the first
``bn_batches * batch_size`` re-estimate BN, the next ``loss_batches * batch_size`` measure the
loss (a training set smaller than that is split in the same proportion). A ``DataLoader`` given
as training data is read in its own order instead: its first ``bn_batches`` batches, then the
next ``loss_batches``.

Cost per iteration: (remaining sites + 1) x (``bn_batches`` + ``loss_batches``) forward passes
in no-grad mode (no BN: only the loss batches). The batches are loaded and moved to the device
once per iteration; candidates are switched on one working copy of the model by a site rule
(:func:`easier.edit.switches.set_site_rule`) and switched back, and BN buffers restored, instead
of copying the model per candidate. ``price`` divides the measured loss increase by the time (or
FLOPs) the fold would save, as easier-latency prices a site.
"""

from __future__ import annotations

import copy
import functools
import itertools
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from easier.edit.recalibrate import reestimate_bn_on
from easier.edit.switches import set_site_rule
from easier.entropy.estimate import batch_input
from easier.errors import ConfigError
from easier.graph.capture import to_device
from easier.methods._lib.pricing import Pricing
from easier.methods.base import Context, Method, Step, register_method
from easier.parallel.loaders import make_loader, targets

Batch = tuple[Any, torch.Tensor]


def _identity(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return z


def _affine(a: torch.Tensor, b: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return z * a.to(z.dtype) + b.to(z.dtype)


def split_sizes(n: int, bn: int, loss: int, batch_size: int) -> tuple[int, int]:
    """(BN samples, loss samples) of a training set of ``n``: the slice sizes, or a proportional
    split when ``n`` is smaller (at least one loss sample)."""
    want_bn, want_loss = bn * batch_size, loss * batch_size
    if n >= want_bn + want_loss:
        return want_bn, want_loss
    if n < 2 and bn > 0:
        raise ConfigError(f"probe needs at least 2 training samples; got {n}")
    n_bn = min(n - 1, n * bn // (bn + loss)) if bn > 0 else 0
    return n_bn, n - n_bn


@register_method
class Probe(Method):
    """Lowest measured loss after linearizing (BN re-estimated), on held-out training data."""

    name = "probe"
    description = "lowest measured training loss with the site linear (BN re-estimated)"

    def __init__(self, bn_batches: int = 8, loss_batches: int = 4, seed: int = 0,
                 price: str | None = None, lookahead: bool = True,
                 batch_sizes: int | tuple[int, ...] | list[int] = (1,)):
        if int(bn_batches) < 0 or int(loss_batches) < 1:
            raise ConfigError(f"probe: bn_batches={bn_batches!r} must be >= 0 and "
                              f"loss_batches={loss_batches!r} >= 1")
        self.bn_batches, self.loss_batches = int(bn_batches), int(loss_batches)
        self.seed = int(seed)
        if isinstance(batch_sizes, int):  # `--method-option batch_sizes=64`
            batch_sizes = (batch_sizes,)
        self.batch_sizes = tuple(int(b) for b in batch_sizes)
        self.pricing = Pricing(price, lookahead, self.batch_sizes)

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"bn_batches": self.bn_batches, "loss_batches": self.loss_batches,
                                "seed": self.seed, "price": self.pricing.price}
        if self.pricing.price is not None:
            opts.update(lookahead=self.pricing.lookahead, batch_sizes=list(self.batch_sizes))
        return opts

    def batches(self, ctx: Context) -> tuple[list[Any], list[Batch]]:
        """(BN inputs, loss batches) on the device: the slices of the module doc."""
        if ctx.train_eval is None:
            raise ConfigError("probe measures on training data: pass train_eval (or train)")
        data = ctx.train_eval
        if isinstance(data, DataLoader):
            it = iter(data)
            bn = list(itertools.islice(it, self.bn_batches))
            loss = list(itertools.islice(it, self.loss_batches))
        else:
            perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(self.seed))
            n_bn, n_loss = split_sizes(len(data), self.bn_batches, self.loss_batches,
                                       ctx.batch_size)
            idx = perm.tolist()

            def load(part: list[int]) -> list[Any]:
                return list(make_loader(Subset(data, part), ctx.batch_size, shuffle=False))

            bn = load(idx[:n_bn]) if n_bn else []
            loss = load(idx[n_bn: n_bn + n_loss])
        if not loss:
            raise ConfigError("probe: the training data gave no batch to measure the loss on")
        bn_in = [to_device(batch_input(b, ctx.input_key), ctx.device) for b in bn]
        return bn_in, [(to_device(batch_input(b, ctx.input_key), ctx.device),
                        targets(b).to(ctx.device)) for b in loss]

    def measure(self, ctx: Context) -> tuple[dict[str, float], float, dict[str, Any]]:
        """({site: loss with it linear}, the current model's loss, timings) — same protocol."""
        t0 = time.perf_counter()
        bn_in, loss_batches = self.batches(ctx)
        work = copy.deepcopy(ctx.model).to(ctx.device).eval()
        norms = [m for m in work.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
        fits = ctx.affine_fits(ctx.model) if ctx.linearize_mode == "affine" else {}
        t_load = time.perf_counter() - t0

        def loss_of() -> float:
            if bn_in:
                reestimate_bn_on(work, bn_in)
            try:
                return ctx.loss(work, loss_batches)
            finally:
                for m, state in zip(norms, saved, strict=True):
                    m.load_state_dict(state)

        base = loss_of()
        losses: dict[str, float] = {}
        for site in ctx.remaining:
            rule = (functools.partial(_affine, fits[site].a, fits[site].b) if site in fits
                    else _identity)
            set_site_rule(work, site, rule)
            try:
                losses[site] = loss_of()
            finally:
                set_site_rule(work, site, None)
        seconds = time.perf_counter() - t0
        info = {"seconds": seconds, "load_seconds": t_load, "candidates": len(ctx.remaining),
                "forwards": (len(ctx.remaining) + 1) * (len(bn_in) + len(loss_batches))}
        return losses, base, info

    def step(self, ctx: Context) -> Step:
        losses, base, cost = self.measure(ctx)
        example = self.example if self.example is not None else ctx.example
        increase = {n: losses[n] - base for n in ctx.remaining}
        ranked, priced = self.pricing.rank(ctx.model, example, ctx.kinds, ctx.remaining,
                                           increase)
        chosen = ranked[: ctx.k]
        info = {"probe_base_loss": base, "probe_cost": cost, **priced}
        reason = ("lowest measured loss" if self.pricing.price is None
                  else f"lowest measured loss increase per {priced['fold_saving_unit']} saved")
        return Step(ctx.linearize(chosen), chosen, losses, reason, info)
