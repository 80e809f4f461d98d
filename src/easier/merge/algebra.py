"""Merged weights: the one layer that computes a chain (and its residual), exactly.

* conv∘conv, per spatial axis: ``K = d1(k1-1) + s1·d2(k2-1) + 1``, ``S = s1·s2``,
  ``P = p1 + s1·p2``, dilation 1. Grouped weights are expanded to block-diagonal, merged densely
  and re-emitted as grouped when the result is still block-diagonal (depthwise∘depthwise stays
  depthwise).
* linear∘linear: ``W = W2 W1``, ``b = W2 b1 + b2``.
* residuals: the identity at the kernel centre tap ``P``; a shortcut layer's weight at its taps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from easier.edit.padding import int_padding
from easier.merge.chains import Chain
from easier.merge.graph import finish

__all__ = ["apply_merges", "merge_chain"]

_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FNS = (F.conv1d, F.conv2d, F.conv3d)


def _dense(conv: nn.Module) -> torch.Tensor:
    """Conv weight with groups expanded to a block-diagonal (C_out, C_in, k...) tensor."""
    w, g = conv.weight.detach(), conv.groups
    if g == 1:
        return w.clone()
    co, ci = conv.out_channels, conv.in_channels
    out = w.new_zeros(co, ci, *w.shape[2:])
    for j in range(g):
        out[j * co // g : (j + 1) * co // g, j * ci // g : (j + 1) * ci // g] = w[
            j * co // g : (j + 1) * co // g
        ]
    return out


def _dilate(w: torch.Tensor, d: Sequence[int]) -> torch.Tensor:
    if all(x == 1 for x in d):
        return w
    size = [(k - 1) * dd + 1 for k, dd in zip(w.shape[2:], d, strict=True)]
    out = w.new_zeros(*w.shape[:2], *size)
    out[(slice(None), slice(None), *(slice(None, None, dd) for dd in d))] = w
    return out


def _compose(w2: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """Full convolution over space, contraction over the middle channel: (C2,C1,A)x(C1,C0,J)."""
    n = w1.dim() - 2
    flipped = w2.flip(list(range(2, 2 + n)))
    out = _CONV_FNS[n - 1](w1.transpose(0, 1), flipped, padding=[a - 1 for a in w2.shape[2:]])
    return out.transpose(0, 1)


def _bias(m: nn.Module, n: int, like: torch.Tensor) -> torch.Tensor:
    return m.bias.detach().clone() if m.bias is not None else like.new_zeros(n)


def _regroup(w: torch.Tensor, groups: int) -> tuple[torch.Tensor, int]:
    """(weight, groups): the grouped form of a dense weight when it is block-diagonal."""
    co, ci = w.shape[:2]
    if groups > 1 and co % groups == 0 and ci % groups == 0:
        v = w.reshape(groups, co // groups, groups, ci // groups, *w.shape[2:])
        idx = torch.arange(groups)
        blocks = v[idx, :, idx]  # (g, co/g, ci/g, k...)
        mask = torch.ones(groups, groups, dtype=torch.bool)
        mask[idx, idx] = False
        if not v.transpose(1, 2)[mask].any():
            return blocks.reshape(co, ci // groups, *w.shape[2:]), groups
    return w, 1


def _merge_convs(gm: fx.GraphModule, chain: Chain) -> nn.Module:
    mods = [gm.get_submodule(m) for m in chain.modules]
    first = mods[0]
    w = _dilate(_dense(first), first.dilation)
    b = _bias(first, first.out_channels, w)
    stride, pad = list(first.stride), list(int_padding(first))  # type: ignore[arg-type]
    for m in mods[1:]:
        w2 = _dense(m)
        b = _bias(m, m.out_channels, w) + w2.sum(dim=tuple(range(2, w2.dim()))) @ b
        w = _compose(_dilate(w2, [s * d for s, d in zip(stride, m.dilation, strict=True)]), w)
        pad = [p + s * q for p, s, q in zip(pad, stride, int_padding(m), strict=True)]
        stride = [s * t for s, t in zip(stride, m.stride, strict=True)]
    groups = math.gcd(*(m.groups for m in mods))
    has_bias = any(m.bias is not None for m in mods)
    if chain.add is not None and chain.shortcut is None:
        idx = torch.arange(w.shape[0])
        w[(idx, idx, *pad)] += 1
    elif chain.add is not None:
        g = gm.get_submodule(str(chain.shortcut.target))
        lo = [p - q for p, q in zip(pad, int_padding(g), strict=True)]  # type: ignore[arg-type]
        taps = tuple(
            slice(lo_, lo_ + d * (k - 1) + 1, d)
            for lo_, d, k in zip(lo, g.dilation, g.kernel_size, strict=True)
        )
        w[(slice(None), slice(None), *taps)] += _dense(g)
        b = b + _bias(g, g.out_channels, w)
        groups, has_bias = math.gcd(groups, g.groups), has_bias or g.bias is not None
    w, groups = _regroup(w, groups)
    n = w.dim() - 2
    merged = _CONV_TYPES[n - 1](
        first.in_channels,
        w.shape[0],
        tuple(w.shape[2:]),
        stride=tuple(stride),
        padding=tuple(pad),
        groups=groups,
        bias=has_bias,
        device=w.device,
        dtype=w.dtype,
    )
    return _filled(merged, w, b)


def _filled(layer: nn.Module, w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    """``layer`` with the merged weight, and bias when it has one (merge_chain runs no-grad)."""
    layer.weight.copy_(w)
    if layer.bias is not None:
        layer.bias.copy_(b)
    return layer


def _merge_linears(gm: fx.GraphModule, chain: Chain) -> nn.Module:
    mods = [gm.get_submodule(m) for m in chain.modules]
    w = mods[0].weight.detach().clone()
    b = _bias(mods[0], mods[0].out_features, w)
    for m in mods[1:]:
        w2 = m.weight.detach()
        w, b = w2 @ w, w2 @ b + _bias(m, m.out_features, w)
    has_bias = any(m.bias is not None for m in mods)
    if chain.add is not None and chain.shortcut is None:
        w = w + torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
    elif chain.add is not None:
        g = gm.get_submodule(str(chain.shortcut.target))
        w, b = w + g.weight.detach(), b + _bias(g, g.out_features, w)
        has_bias = has_bias or g.bias is not None
    merged = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=w.device, dtype=w.dtype)
    return _filled(merged, w, b)


def merge_chain(gm: fx.GraphModule, chain: Chain) -> nn.Module:
    """The single layer computing ``chain`` (and its residual), by the formulas of this module.

    Exact everywhere when :func:`chain_is_exact`; otherwise only in the interior (the zero
    padding between the layers is lost), which is why callers refuse such chains.
    """
    with torch.no_grad():
        return _merge_linears(gm, chain) if chain.kind == "linear" else _merge_convs(gm, chain)


def apply_merges(gm: fx.GraphModule, merges: Sequence[tuple[Chain, nn.Module]]) -> None:
    """Replace each chain (and its residual) of ``gm`` by its merged layer, in place.

    The merged layer takes the qualified name of the chain's first layer.
    """
    for chain, module in merges:
        target = chain.modules[0]
        end = chain.end
        gm.add_submodule(target, module)
        with gm.graph.inserting_before(end):
            new = gm.graph.call_module(target, (chain.input,))
        new.meta.update({k: v for k, v in end.meta.items() if k == "tensor_meta"})
        end.replace_all_uses_with(new)
        dead = ([chain.add] if chain.add is not None else []) + chain.nodes[::-1]
        dead += [chain.shortcut] if chain.shortcut is not None else []
        for node in dead:
            gm.graph.erase_node(node)
    finish(gm)
