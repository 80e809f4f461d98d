"""Where the neurons of a pre-activation are: its channel axis, read from the capture.

Walk back from the pre-activation node to the layer that produced it (a conv or BN: axis 1; a
linear, matmul or LayerNorm: the last axis), then follow that axis forward through what lies in
between: elementwise ops (with broadcasting), ``transpose``/``permute`` (the axis moves),
``view``/``reshape``/``flatten``/``unsqueeze`` (the axis is kept when a dimension of the same size
starts at the same flat offset; trailing axes merged into the last one, as attention heads are,
make the last axis the neurons; otherwise the axis is lost). So a conv map flattened to tokens,
``conv(x).flatten(2).transpose(1, 2)`` (Segformer's Mix-FFN), has its channels last.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx

from easier.graph.activations import is_rectifier_op

__all__ = ["concrete_shape", "infer_axis"]

_FIRST = {"conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
          "conv_transpose3d", "batch_norm", "_native_batch_norm_legit_no_training",
          "group_norm", "instance_norm", "cudnn_batch_norm", "native_batch_norm"}
_LAST = {"linear", "addmm", "mm", "matmul", "bmm", "layer_norm", "embedding", "baddbmm",
         "native_layer_norm", "rms_norm"}
_PASS = {"add", "add_", "sub", "mul", "mul_", "div", "neg", "dropout", "clone", "contiguous",
         "_to_copy", "to", "alias", "getitem", "type_as", "detach", "slice", "expand"}
_RESHAPE = {"view", "reshape", "reshape_as", "_unsafe_view", "unsqueeze", "flatten",
            "squeeze"}


def concrete_shape(val: Any) -> tuple[int, ...] | None:
    """A fake tensor's shape on the example input (symbolic sizes resolved to their hint)."""
    if not isinstance(val, torch.Tensor):
        return None
    out = []
    for s in val.shape:
        if isinstance(s, int):
            out.append(s)
        else:
            hint = getattr(getattr(s, "node", None), "hint", None)
            if hint is None:
                return None
            out.append(int(hint))
    return tuple(out)


def _op_name(node: fx.Node) -> str:
    t = node.target
    name = getattr(t, "__name__", str(t))
    return name.split(".")[0]


def _shape(node: Any) -> tuple[int, ...] | None:
    return concrete_shape(node.meta.get("val")) if isinstance(node, fx.Node) else None


def _reshaped(src: tuple[int, ...], out: tuple[int, ...], axis: int) -> int | None:
    """The axis of ``out`` holding ``src``'s axis after a reshape, or None when it is split."""
    before = math.prod(src[:axis])
    for b in range(len(out)):
        if math.prod(out[:b]) == before and out[b] == src[axis]:
            return b
    # trailing axes merged into the last one, e.g. attention heads (B, T, H, D) -> (B, T, H*D):
    # every (head, feature) pair is a neuron of the last axis
    if out and axis == len(src) - 1 and any(math.prod(src[k:]) == out[-1] for k in range(axis)):
        return len(out) - 1
    return None


def _moved(node: fx.Node, src: fx.Node, axis: int) -> int | None:
    """``src``'s axis ``axis`` as an axis of ``node``'s output, or None when it is lost."""
    op, out, shape = _op_name(node), _shape(node), _shape(src)
    if out is None or shape is None:
        return None
    if op == "transpose":
        d0, d1 = (int(d) % len(shape) for d in node.args[1:3])
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if op == "permute":
        dims = [int(d) % len(shape) for d in node.args[1]]
        return dims.index(axis)
    if op in _RESHAPE:
        return _reshaped(shape, out, axis)
    if len(out) < len(shape):
        return None
    b = axis + len(out) - len(shape)  # broadcasting adds leading axes
    return b if out[b] == shape[axis] else None


def _walk(node: fx.Node, depth: int) -> tuple[int | None, str | None]:
    """(axis of ``node``'s output, producer op); axis None when the producer's axis was lost."""
    if depth > 24 or node.op != "call_function":
        return None, None
    op, shape = _op_name(node), _shape(node)
    if op in _FIRST:
        return 1, op
    if op in _LAST:
        return (len(shape) - 1 if shape else -1), op
    moves = op in _RESHAPE or op in {"transpose", "permute"}
    if not (moves or op in _PASS or is_rectifier_op(node.target)):
        return None, None
    args = node.all_input_nodes[:1] if moves else node.all_input_nodes
    for arg in args:
        if arg.op != "call_function":
            continue
        axis, producer = _walk(arg, depth + 1)
        if producer is None:
            continue
        if axis is None or op == "getitem":  # getitem: one tensor of a tuple (e.g. a BN's)
            return axis, producer
        if axis < 0:  # last axis of a tensor of unknown rank: kept by elementwise ops only
            return (None if moves else axis), producer
        return _moved(node, arg, axis), producer
    return None, None


def infer_axis(node: fx.Node) -> tuple[int | None, str | None]:
    """(channel axis, producer op) of the pre-activation ``node``: 1 for maps, -1 for tokens
    (the last axis), another int when the channels moved, None when they cannot be told."""
    axis, producer = _walk(node, 0)
    shape = _shape(node)
    if axis is not None and shape is not None and axis == len(shape) - 1 \
            and (len(shape) != 2 or producer in _LAST):  # (N, C) maps keep axis 1
        axis = -1
    if axis is not None and shape is not None and axis >= len(shape):
        axis = None
    return axis, producer
