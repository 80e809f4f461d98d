"""taylor: a first-order estimate of every site's linearization cost from one backward pass.

Linearizing site ``y = σ(z)`` replaces it by ``z`` (or by the run's affine stand-in
``a·z + b``): the site's output changes by ``d = z − σ(z)``. To first order the loss changes by

    ΔL ≈ E[⟨∂L/∂y, d⟩]

(the expectation over training samples, the inner product over the site's elements). All sites
are estimated at once: each remaining site gets the rule ``y + t·d`` with its own scalar
``t = 0`` (:func:`easier.edit.switches.set_site_rule`, on a copy of the model), so the forward
pass is unchanged and ``∂L/∂t`` is exactly the estimate; one forward and backward pass per batch
over ``batches`` unshuffled training batches (``ctx.train_eval``, never val), eval mode
(running BN statistics, no dropout), no weight gradients.

Signed or absolute? The score is the signed estimate (lower = removed first): ΔL is what the
loop pays, and a site whose linearization is predicted to *lower* the loss should go first. Its
weakness is that first order is exact only for small changes, and removing a site is not a small
change: a sizeable negative estimate may be an artefact of the curvature it ignores.
``absolute=True`` ranks by ``|ΔL|`` instead — any predicted change counts as a cost, the
conservative choice of first-order pruning criteria (Molchanov et al., ICLR 2017) — at the price
of postponing sites predicted to help. A site whose pre-activations are all in the linear
region (``σ(z) = z``) has ``d = 0`` and an estimate of exactly 0 either way. Measured once on a
small trained conv net (docs/criteria.md): every signed estimate was negative, every true change
positive, and the signed order picked the most damaging site; ``absolute=True`` did better.

The estimate sees neither BN re-estimation nor fine-tuning; ``probe`` measures the first. Cost:
``batches`` forward+backward passes, whatever the number of sites. ``price`` divides the
estimate by the time (or FLOPs) the fold would save, as easier-latency prices a site.
"""

from __future__ import annotations

import copy
import functools
import itertools
import time
from typing import Any

import torch

from easier.edit.switches import set_site_rule
from easier.entropy.estimate import batch_input
from easier.errors import ConfigError
from easier.graph.capture import call_model, to_device
from easier.methods._lib.pricing import Pricing
from easier.methods.base import Context, Method, Step, register_method
from easier.parallel.loaders import make_loader, targets
from easier.train.finetune import logits_of
from easier.train.objective import cross_entropy, hits


def _toward(t: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y + t·(z − y)``: the site moved a fraction ``t`` of the way to the identity."""
    return y + t * (z - y)


def _toward_affine(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, z: torch.Tensor,
                   y: torch.Tensor) -> torch.Tensor:
    return y + t * (z * a.to(z.dtype) + b.to(z.dtype) - y)


def taylor_estimates(model: torch.nn.Module, sites: list[str], batches: Any, *,
                     device: torch.device | str = "cpu", input_key: str | None = None,
                     fits: dict[str, Any] | None = None) -> dict[str, float]:
    """{site: first-order ΔL of linearizing it}, mean per target over ``batches``.

    ``fits`` ({site: AffineFit}) estimates the affine stand-in instead of the identity for the
    sites it names. ``model`` is not modified (the rules go on a copy).
    """
    work = copy.deepcopy(model).to(device).eval()
    for p in work.parameters():
        p.requires_grad_(False)  # only ∂L/∂t is needed
    dtype = next((p.dtype for p in work.parameters() if p.is_floating_point()), torch.float32)
    ts = {}  # in the model's dtype: float64 is not available on every device (MPS)
    for site in sites:
        t = ts[site] = torch.zeros((), dtype=dtype, device=device, requires_grad=True)
        fit = (fits or {}).get(site)
        rule = (functools.partial(_toward, t) if fit is None
                else functools.partial(_toward_affine, t, fit.a.to(device), fit.b.to(device)))
        set_site_rule(work, site, rule)
    total = {s: torch.zeros((), dtype=torch.float64) for s in sites}
    seen = 0
    for batch in batches:
        x = to_device(batch_input(batch, input_key), device)
        y = targets(batch).to(device)
        logits = logits_of(call_model(work, x))
        loss = cross_entropy(logits, y, x, reduction="sum")
        seen += hits(logits.detach(), y, x)[1]
        if not loss.requires_grad:  # no site on the path to the loss
            continue
        grads = torch.autograd.grad(loss, [ts[s] for s in sites], allow_unused=True)
        for s, g in zip(sites, grads, strict=True):
            if g is not None:
                total[s] += g.detach().double().cpu()
    if seen == 0:
        raise ConfigError("taylor: the training data gave no batch")
    return {s: float(total[s]) / seen for s in sites}


@register_method
class Taylor(Method):
    """Lowest first-order loss change E[⟨∂L/∂y, z − σ(z)⟩] (signed; ``absolute=True``: |·|)."""

    name = "taylor"
    description = "lowest first-order loss change of linearizing (one backward pass)"

    def __init__(self, batches: int = 4, absolute: bool = False, price: str | None = None,
                 lookahead: bool = True, batch_sizes: int | tuple[int, ...] | list[int] = (1,)):
        if int(batches) < 1:
            raise ConfigError(f"taylor: batches={batches!r} must be >= 1")
        self.batches, self.absolute = int(batches), bool(absolute)
        if isinstance(batch_sizes, int):  # `--method-option batch_sizes=64`
            batch_sizes = (batch_sizes,)
        self.batch_sizes = tuple(int(b) for b in batch_sizes)
        self.pricing = Pricing(price, lookahead, self.batch_sizes)

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"batches": self.batches, "absolute": self.absolute,
                                "price": self.pricing.price}
        if self.pricing.price is not None:
            opts.update(lookahead=self.pricing.lookahead, batch_sizes=list(self.batch_sizes))
        return opts

    def estimate(self, ctx: Context) -> dict[str, float]:
        """The signed estimate of every remaining site (see the module doc)."""
        if ctx.train_eval is None:
            raise ConfigError("taylor estimates on training data: pass train_eval (or train)")
        loader = make_loader(ctx.train_eval, ctx.batch_size, shuffle=False)
        fits = ctx.affine_fits(ctx.model) if ctx.linearize_mode == "affine" else None
        return taylor_estimates(ctx.model, list(ctx.remaining),
                                itertools.islice(loader, self.batches), device=ctx.device,
                                input_key=ctx.input_key, fits=fits)

    def step(self, ctx: Context) -> Step:
        t0 = time.perf_counter()
        signed = self.estimate(ctx)
        seconds = time.perf_counter() - t0
        scores = {n: abs(v) for n, v in signed.items()} if self.absolute else signed
        example = self.example if self.example is not None else ctx.example
        ranked, priced = self.pricing.rank(ctx.model, example, ctx.kinds, ctx.remaining, scores)
        chosen = ranked[: ctx.k]
        info: dict[str, Any] = {"taylor_cost": {"seconds": seconds,
                                                "candidates": len(ctx.remaining)}, **priced}
        if self.absolute:
            info["taylor_signed"] = signed
        what = "|first-order loss change|" if self.absolute else "first-order loss change"
        reason = (f"lowest {what}" if self.pricing.price is None
                  else f"lowest {what} per {priced['fold_saving_unit']} saved")
        return Step(ctx.linearize(chosen), chosen, scores, reason, info)
