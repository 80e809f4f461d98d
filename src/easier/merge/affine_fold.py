"""Fold what a layer's output goes through linearly back into the layer: an inference BN, an
elementwise scale by a per-channel parameter (ConvNeXt's layer scale) and an added per-channel
parameter (what an affine-linearized site ``a * z + b`` leaves). Works on the lifted graph of
:mod:`easier.merge.graph` (layers as ``call_module`` nodes, shapes recorded)."""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from easier.merge.graph_nodes import CONV_MODULES, call_counts, node_shape, param_of

__all__ = ["fold_affine"]

_aten = torch.ops.aten


def _fold_bn_into(layer: nn.Module, bn: nn.Module) -> None:
    with torch.no_grad():
        t = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        t = t / torch.sqrt(bn.running_var + bn.eps)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        w = layer.weight * t.reshape(-1, *([1] * (layer.weight.dim() - 1)))
        b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        b = (b - bn.running_mean) * t + beta
        layer.weight = nn.Parameter(w.to(layer.weight.dtype))
        layer.bias = nn.Parameter(b.to(layer.weight.dtype))


def _scale_of(gm: fx.GraphModule, node: fx.Node, layer: fx.Node) -> torch.Tensor | None:
    """The per-output-channel factor of ``node = layer * param``, if it is one."""
    if node.target not in (_aten.mul.Tensor, operator.mul) or len(node.args) != 2:
        return None
    other = node.args[1] if node.args[0] is layer else node.args[0]
    p = param_of(gm, other)
    shape = node_shape(layer)
    if p is None or shape is None or not p.is_floating_point():
        return None
    return _per_channel(gm, p, layer)


def _offset_of(gm: fx.GraphModule, node: fx.Node, layer: fx.Node) -> torch.Tensor | None:
    """The per-output-channel term of ``node = layer + param``, if it is one.

    An affine-linearized site (``a * z + b``) leaves such an add once its scale is folded.
    """
    if node.target not in (_aten.add.Tensor, operator.add) or len(node.args) != 2 or node.kwargs:
        return None
    other = node.args[1] if node.args[0] is layer else node.args[0]
    p = param_of(gm, other)
    if p is None or not p.is_floating_point():
        return None
    return _per_channel(gm, p, layer)


def _per_channel(gm: fx.GraphModule, p: torch.Tensor, layer: fx.Node) -> torch.Tensor | None:
    """``p`` as a vector over ``layer``'s output channels, when it broadcasts as one."""
    mod = gm.get_submodule(str(layer.target))
    shape = node_shape(layer)
    if shape is None or p.dim() > len(shape):  # it would broadcast the output to a new rank
        return None
    if isinstance(mod, nn.Linear):
        ok = p.dim() >= 1 and p.shape[-1] == mod.out_features and p.numel() == p.shape[-1]
        return p.reshape(-1) if ok else None
    n = len(mod.kernel_size)
    want = (mod.out_channels, *([1] * n))
    ok = tuple(p.shape[-n - 1:]) == want and p.numel() == mod.out_channels
    return p.reshape(-1) if ok else None


def fold_affine(gm: fx.GraphModule) -> list[str]:
    """Fold BNs, per-channel scales and offsets into the single-use conv/linear before them."""
    counts = call_counts(gm)
    folded = []
    for node in list(gm.graph.nodes):
        src = node.args[0] if node.args else None
        if node.op == "call_module":
            bn = gm.get_submodule(str(node.target))
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or counts[str(node.target)] != 1:
                continue
            if bn.running_mean is None:
                continue  # no running statistics: it normalises with batch statistics
        elif node.op == "call_function" and node.target in (_aten.mul.Tensor, operator.mul,
                                                              _aten.add.Tensor, operator.add):
            bn = None
            src = next((a for a in node.args if isinstance(a, fx.Node) and a.op == "call_module"),
                       None)
        else:
            continue
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        layer = gm.get_submodule(str(src.target))
        if counts[str(src.target)] != 1 or not isinstance(layer, (nn.Linear, *CONV_MODULES)):
            continue
        if bn is not None:
            shape = node_shape(src)
            if isinstance(layer, nn.Linear):
                ok = isinstance(bn, nn.BatchNorm1d) and shape is not None and len(shape) == 2
                ok = ok and layer.out_features == bn.num_features
            else:
                ok = layer.out_channels == bn.num_features and shape is not None and \
                    len(shape) == len(layer.kernel_size) + 2
            if not ok:
                continue
            _fold_bn_into(layer, bn)
            label = f"{src.target}<-{node.target}"
        elif node.target in (_aten.add.Tensor, operator.add):
            offset = _offset_of(gm, node, src)
            if offset is None:
                continue
            with torch.no_grad():
                bias = offset if layer.bias is None else layer.bias + offset
                layer.bias = nn.Parameter(bias.to(layer.weight.dtype))
            label = f"{src.target}<-offset"
        else:
            scale = _scale_of(gm, node, src)
            if scale is None:
                continue
            with torch.no_grad():
                w = layer.weight * scale.reshape(-1, *([1] * (layer.weight.dim() - 1)))
                layer.weight = nn.Parameter(w)
                if layer.bias is not None:
                    layer.bias = nn.Parameter(layer.bias * scale)
            label = f"{src.target}<-scale"
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded.append(label)
    return folded
