"""A candidate chain as the planner and the savings estimate see it: its FLOPs, its signature,
and the chain unmerged and merged, ready to be timed.

Kept apart from the planner's modes (:mod:`.plan`) because :mod:`.savings` prices chains the same
way without planning a fold.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from easier.merge.algebra import merge_chain
from easier.merge.chains import Chain
from easier.merge.graph import node_shape
from easier.merge.latency import LatencyConfig, TimingJob
from easier.perf.timing import Comparison

__all__ = ["Candidate", "chain_flops", "chain_signature", "layer_flops", "make_candidate"]


def layer_flops(module: nn.Module, out_shape: tuple[int, ...]) -> int:
    """Forward FLOPs (2·MACs) of a conv or linear layer producing ``out_shape``.

    Matches ``FlopCounterMode``: bias and elementwise work are not counted.
    """
    if isinstance(module, nn.Linear):
        return 2 * math.prod(out_shape[:-1]) * module.in_features * module.out_features
    n = len(module.kernel_size)
    batch = math.prod(out_shape[: -n - 1])
    per_out = (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return 2 * batch * module.out_channels * per_out * math.prod(out_shape[-n:])


def chain_flops(gm: fx.GraphModule, chain: Chain) -> int:
    """FLOPs of a chain as it runs unmerged (shapes from the prepared graph)."""
    nodes = chain.nodes + ([chain.shortcut] if chain.shortcut is not None else [])
    return sum(layer_flops(gm.get_submodule(str(n.target)), node_shape(n)) for n in nodes)


def _layer_signature(module: nn.Module) -> list[Any]:
    keys = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride",
            "padding", "dilation", "groups", "padding_mode")
    sig: list[Any] = [type(module).__name__]
    sig += [[k, getattr(module, k)] for k in keys if hasattr(module, k)]
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(weight, torch.Tensor):
        sig += [list(weight.shape), str(weight.dtype)]
    return [*sig, bias is not None]


def chain_signature(gm: fx.GraphModule, chain: Chain) -> str:
    """What makes two chains time alike: layer types and hyper-parameters, residual, input shape
    (without the batch dimension). Equal signatures get equal decisions."""
    layers = [_layer_signature(gm.get_submodule(m)) for m in chain.modules]
    shortcut = (_layer_signature(gm.get_submodule(str(chain.shortcut.target)))
                if chain.shortcut is not None else None)
    shape = list(node_shape(chain.input) or [])[1:]
    residual = chain.residual if chain.residual in (None, "identity") else "shortcut"
    return json.dumps([chain.kind, layers, residual, shortcut, shape], default=str)


class _ChainRunner(nn.Module):
    """The unmerged chain as a module, for timing it on its own."""

    def __init__(
        self, layers: list[nn.Module], residual: str | None, shortcut: nn.Module | None
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.residual, self.shortcut = residual, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in self.layers:
            y = layer(y)
        if self.shortcut is not None:
            return y + self.shortcut(x)
        return y + x if self.residual == "identity" else y


@dataclass
class Candidate:
    """One exactly mergeable chain, as a mode sees it. ``time()`` measures on first call."""

    chain: Chain
    flops_before: int
    flops_after: int
    unmerged: nn.Module
    merged: nn.Module
    input_shape: tuple[int, ...]
    dtype: torch.dtype
    config: LatencyConfig
    sizes: tuple[int, ...]  # batch sizes to time at
    signature: str = ""
    timings: dict[int, Comparison] | None = None
    inconclusive: bool = False  # set by a mode that fell back to FLOPs

    @property
    def margin(self) -> float:
        return self.config.margin

    def time(self) -> dict[int, Comparison]:
        """Paired comparison (unmerged, merged) per batch size, at the chain's input shape."""
        if self.timings is None:
            device = next(self.merged.parameters()).device
            cfg, self.timings = self.config, {}
            for b in self.sizes:
                x = torch.randn((b, *self.input_shape[1:]), dtype=self.dtype, device=device)
                job = TimingJob("chain", b, cfg.rounds, cfg.min_run_time, self.chain.id,
                                self.signature)
                self.timings[b] = cfg.compare(job, lambda x=x: self.unmerged(x),
                                              lambda x=x: self.merged(x))
        return self.timings


def make_candidate(gm: fx.GraphModule, chain: Chain, cfg: LatencyConfig,
                   sizes: tuple[int, ...]) -> Candidate:
    """The chain unmerged and merged, ready to be priced in FLOPs or timed (nothing is timed
    yet). The merge is exact only when :func:`chain_is_exact`; timing does not need it to be."""
    merged = merge_chain(gm, chain)
    shortcut = gm.get_submodule(str(chain.shortcut.target)) if chain.shortcut else None
    return Candidate(
        chain=chain,
        flops_before=chain_flops(gm, chain),
        flops_after=layer_flops(merged, node_shape(chain.end)),
        unmerged=_ChainRunner([gm.get_submodule(m) for m in chain.modules], chain.residual,
                              shortcut),
        merged=merged,
        input_shape=node_shape(chain.input),
        dtype=merged.weight.dtype,
        config=cfg,
        sizes=sizes,
        signature=chain_signature(gm, chain),
    )
