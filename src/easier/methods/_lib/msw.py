"""LaCoOT's distance: the max-sliced 2-Wasserstein distance between a block's input and output.

Used twice by :class:`~easier.methods.lacoot.Lacoot`: as a training term
(:class:`MSWRegularizer`, on the blocks' features of every training batch) and to rank the
blocks afterwards (:func:`block_distances`, on validation data). Provenance of every choice is in
the docstring of :mod:`easier.methods.lacoot`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from easier.errors import ConfigError, DataError
from easier.graph.sites import EasierWarning

__all__ = [
    "BlockCapture",
    "MSWRegularizer",
    "block_distances",
    "max_sliced_wasserstein",
    "wasserstein2_1d",
]



def wasserstein2_1d(u: Tensor, v: Tensor) -> Tensor:
    """Squared 2-Wasserstein distance per column between equal-size 1-D clouds ``(n, P)``.

    With uniform weights and equal sizes the optimal plan matches the sorted samples.
    """
    return (u.sort(dim=0).values - v.sort(dim=0).values).pow(2).mean(dim=0)


def _sqrt0(v: Tensor) -> Tensor:
    """sqrt with gradient 0 (not NaN) at exactly 0: identical clouds give a finite loss."""
    return torch.where(v > 0, v.clamp_min(1e-30).sqrt(), torch.zeros_like(v))


def max_sliced_wasserstein(
    x: Tensor,
    y: Tensor,
    n_projections: int = 50,
    *,
    generator: torch.Generator | None = None,
    directions: Tensor | None = None,
) -> Tensor:
    """Return ``MSW_2`` between two point clouds, one point per sample (differentiable).

    Each sample is flattened into a point, ``reshape(n, -1)``. The maximum runs over
    ``n_projections`` random unit directions drawn from ``generator`` (torch's global RNG when
    None), or over the columns of ``directions`` ``(d, P)`` when given (normalised here).
    """
    if x.shape[0] != y.shape[0] or x[0].numel() != y[0].numel():
        raise DataError(
            f"MSW compares clouds of equal size and dimension, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}: only blocks whose input and output shapes are equal can be "
            "replaced by identity; choose other blocks"
        )
    dtype = torch.promote_types(x.dtype, torch.float32)
    xs, ys = x.reshape(x.shape[0], -1).to(dtype), y.reshape(y.shape[0], -1).to(dtype)
    if directions is None:
        if n_projections < 1:
            raise ConfigError(f"n_projections={n_projections}: need at least 1 direction")
        directions = torch.randn(
            xs.shape[1], n_projections, generator=generator, device=xs.device, dtype=dtype
        )
    else:
        directions = directions.to(device=xs.device, dtype=dtype)
    directions = directions / directions.norm(dim=0, keepdim=True)
    return _sqrt0(wasserstein2_1d(xs @ directions, ys @ directions).max())



class BlockCapture:
    """Forward hooks that keep the latest (input, output) of each named block."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.feats: dict[str, tuple[Tensor, Tensor]] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]
        self.active = True

    def _hook(self, name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
                self.feats.pop(name, None)  # re-insert: dict order = call order
                self.feats[name] = (args[0], output)

        return fn

    def take(self) -> dict[str, tuple[Tensor, Tensor]]:
        feats, self.feats = self.feats, {}
        return feats

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.active = False
        self.feats = {}


class MSWRegularizer:
    """``lam`` times the mean MSW between input and output batch of every candidate block.

    ``attach(model)`` hooks the candidate blocks of that model (the training loop calls it and
    removes the returned handle afterwards); ``__call__(model)`` turns the features captured in
    the current forward pass into the loss term and forgets them. Directions come from torch's
    global RNG, so a seeded run is reproducible.
    """

    def __init__(self, lam: float, n_projections: int, blocks: Callable[[nn.Module], list[str]]):
        self.lam = lam
        self.n_projections = n_projections
        self.blocks = blocks
        self._captures: dict[int, BlockCapture] = {}

    def attach(self, model: nn.Module) -> BlockCapture:
        names = self.blocks(model)
        if not names:
            warnings.warn(
                f"lacoot: {type(model).__name__} has no candidate block, so the "
                "regularizer is 0 and nothing can be removed; pass blocks=[...]",
                EasierWarning,
                stacklevel=2,
            )
        capture = BlockCapture(model, names)
        self._captures = {k: c for k, c in self._captures.items() if c.active}
        self._captures[id(model)] = capture
        return capture

    def __call__(self, model: nn.Module) -> Tensor:
        capture = self._captures.get(id(model))
        if capture is None or not capture.active:
            raise ConfigError(
                "the lacoot regularizer sees no block features: call "
                "attach(model) before training (easier.train.finetune.fine_tune does)"
            )
        feats = capture.take()
        if not feats:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            return torch.zeros((), device=device)
        total = sum(max_sliced_wasserstein(a, b, self.n_projections) for a, b in feats.values())
        return self.lam * total / len(feats)


@torch.no_grad()
def block_distances(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Any]] | Sequence[Tensor],
    blocks: Sequence[str],
    n_projections: int = 50,
    *,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Return each block's MSW between its input and output, in eval mode.

    Per batch one MSW with fresh directions; the result is the batch-size-weighted mean.
    """
    capture = BlockCapture(model, blocks)
    sums = dict.fromkeys(blocks, 0.0)
    seen = 0
    was = model.training
    model.eval()
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
            feats = capture.take()
            missing = [n for n in blocks if n not in feats]
            if missing:
                raise ConfigError(
                    f"block(s) {missing} did not run in the forward pass (or "
                    "did not take and return one tensor): choose other blocks"
                )
            for name in blocks:
                a, b = feats[name]
                d = max_sliced_wasserstein(a, b, n_projections, generator=generator)
                sums[name] += float(d) * a.shape[0]
            seen += x.shape[0]
    finally:
        capture.remove()
        model.train(was)
    if seen == 0:
        raise DataError("lacoot needs validation data to rank the blocks; got no batch")
    return {n: s / seen for n, s in sums.items()}
