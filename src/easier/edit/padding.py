"""Padding relocation: the step that makes a later fold of a conv chain exact.

Once the activation between two convs is gone, ``conv(p1) -> [bn] -> conv(p2)`` is one affine map,
but its zero padding sits in the *middle*: a merged conv pads the *input*, so a naive merge is
wrong on a ring at the borders. Moving all padding to the chain's first conv
(``P = p1 + s1·p2 + s1·s2·p3 + ...``, the others 0) keeps every output size and changes the
function only on that ring (the maps *inside* the chain grow; a chain whose growth changes a
shape the model reads is left alone, :func:`shape_safe`); done right when the activation is
removed, the fine-tuning that follows adapts to it, and the fold becomes exact. The chain is
read from a capture of the model (convs, BNs, identities/dropouts and the sites being removed,
linked by single users); the new paddings are set on the user's eager conv modules and
recorded with the edit.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from easier.graph.capture import Capture, call_model, captured
from easier.graph.sites import GraphSite

__all__ = ["conv_paddings", "fold_ready", "int_padding", "relocate", "set_padding", "shape_safe"]

_CONV_OPS = {"conv1d", "conv2d", "conv3d"}
_BN_OPS = {"batch_norm", "_native_batch_norm_legit_no_training"}
_ID_OPS = {"dropout", "clone", "alias", "contiguous", "getitem", "detach"}


def int_padding(conv: nn.Module) -> tuple[int, ...] | None:
    """Explicit per-axis zero padding of a conv, or None when it cannot be written that way."""
    if conv.padding_mode != "zeros":
        return None
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0,) * len(conv.kernel_size)
        pads = []
        for d, k in zip(conv.dilation, conv.kernel_size, strict=True):
            if d * (k - 1) % 2:  # 'same' with an odd total pads asymmetrically
                return None
            pads.append(d * (k - 1) // 2)
        return tuple(pads)
    return tuple(int(p) for p in conv.padding)


def set_padding(conv: nn.Module, padding: Sequence[int]) -> None:
    conv.padding = tuple(int(p) for p in padding)
    # kept in step for completeness; zeros-mode convs pass `padding` straight to F.convNd
    conv._reversed_padding_repeated_twice = tuple(p for p in reversed(conv.padding) for _ in "xx")


def conv_paddings(model: nn.Module, padding: dict[str, Sequence[int]]) -> None:
    """Set the recorded paddings on the model's conv modules (in place)."""
    for path, pad in padding.items():
        set_padding(model.get_submodule(path), pad)


def _op(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _owner(node: fx.Node) -> str | None:
    """Module path of the weight a conv/BN node uses (its second argument), if a parameter."""
    w = node.args[1] if len(node.args) > 1 else None
    if isinstance(w, fx.Node) and w.op == "get_attr":
        return str(w.target).rpartition(".")[0]
    return None


class _Links:
    """Single-user links of a capture, with the sites being removed collapsed to one link."""

    def __init__(self, model: nn.Module, cap: Capture, removed: Sequence[GraphSite]):
        self.model = model
        self.nodes = list(cap.gm.graph.nodes)
        self.group: dict[fx.Node, GraphSite] = {n: g for g in removed for n in g.nodes}
        self.uses = Counter(_owner(n) for n in cap.gm.graph.nodes
                            if n.op == "call_function" and _op(n) in _CONV_OPS | _BN_OPS)

    def kind(self, node: Any) -> str | None:
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return None
        if node in self.group:
            return "site"
        op = _op(node)
        if op in _ID_OPS:
            if op == "dropout" and (node.args[2] if len(node.args) > 2 else True):
                return None
            return "id"
        path = _owner(node)
        if path is None or self.uses[path] != 1:
            return None
        mod = self.model.get_submodule(path)
        if op in _CONV_OPS and isinstance(mod, nn.modules.conv._ConvNd) and not isinstance(
                mod, nn.modules.conv._ConvTransposeNd) and int_padding(mod) is not None:
            return "conv"
        if op in _BN_OPS and isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return "bn"
        return None

    def head(self, node: fx.Node) -> fx.Node:
        """The node whose output enters ``node``'s link (a site's pre-activation)."""
        return self.group[node].input if node in self.group else node.args[0]

    def tail(self, node: fx.Node) -> fx.Node:
        return self.group[node].output if node in self.group else node

    def next(self, node: fx.Node) -> fx.Node | None:
        out = self.tail(node)
        users = {id(self.group[u]) if u in self.group else id(u) for u in out.users}
        if len(users) != 1:
            return None
        user = next(u for u in out.users)
        if self.kind(user) is None or self.tail(user) is out:
            return None
        return user if self.head(user) is out else None

    def prev(self, node: fx.Node) -> fx.Node | None:
        src = self.head(node)
        if not isinstance(src, fx.Node):
            return None
        start = next((g.nodes[0] for g in self.group.values() if g.output is src), src)
        if self.kind(start) is None:
            return None
        return start if self.next(start) is node else None


def relocate(model: nn.Module, cap: Capture, removed: Sequence[GraphSite]) -> dict[str, list[int]]:
    """New paddings {conv path: padding} for the conv chains the removed sites join.

    A chain whose relocation changes a shape the model reads (it enlarges the maps inside the
    chain; a model that reads their height/width, e.g. to cut patches, then fails or changes an
    output shape) is left as it is: see :func:`shape_safe`.
    """
    links = _Links(model, cap, removed)
    return shape_safe(model, cap.example, _relocate(model, links, [g.nodes[0] for g in removed]))


def _output_shapes(model: nn.Module, example_input: Any) -> list[tuple[int, ...]] | None:
    """Shapes of every output tensor of one eval-mode run, or None when the run fails."""
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            out = call_model(model, example_input)
    except Exception:
        return None
    finally:
        for m, t in flags.items():
            m.training = t
    return [tuple(t.shape) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def shape_safe(model: nn.Module, example_input: Any,
               chains: Sequence[dict[str, list[int]]]) -> dict[str, list[int]]:
    """The relocations of ``chains`` that leave the model running with the same output shapes.

    Relocation keeps each chain's output size but enlarges the maps inside it; a model that
    reads those maps' shapes (a reshape into patches, an interpolation to their size) breaks
    or changes. Each chain is tried on ``model`` (paddings restored after): all at once first,
    then, if that fails, one by one; those that fail are skipped.
    """
    chains = [c for c in chains if c]
    if not chains:
        return {}
    want = _output_shapes(model, example_input)
    if want is None:  # the model does not run on its own example: nothing to compare with
        return {k: v for c in chains for k, v in c.items()}

    def fits(padding: dict[str, list[int]]) -> bool:
        convs = {p: model.get_submodule(p) for p in padding}
        # the exact attributes, so a 'same' padding comes back as the string it was
        old = {p: (c.padding, c._reversed_padding_repeated_twice) for p, c in convs.items()}
        conv_paddings(model, padding)
        try:
            return _output_shapes(model, example_input) == want
        finally:
            for p, c in convs.items():
                c.padding, c._reversed_padding_repeated_twice = old[p]

    merged = {k: v for c in chains for k, v in c.items()}
    if fits(merged):
        return merged
    kept = [c for c in chains if fits(c)]
    merged = {k: v for c in kept for k, v in c.items()}
    return merged if fits(merged) else {}


def fold_ready(model: nn.Module, example_input: Any) -> nn.Module:
    """A copy of ``model`` with the padding of *every* linear conv chain relocated.

    Same trade-off as ``linearize(..., fold_ready=True)``: the function changes at the borders
    of every chain of two or more convs with nothing non-linear between them, so fine-tune
    afterwards; a later fold merges those chains exactly. ``result.relocated_convs`` lists the
    convs changed.
    """
    new = copy.deepcopy(model)
    links = _Links(new, captured(new, example_input), [])
    starts = [n for n in links.nodes if links.kind(n) == "conv"]
    padding = shape_safe(new, example_input, _relocate(new, links, starts))
    conv_paddings(new, padding)
    new.relocated_convs = sorted(padding)
    return new


def _relocate(model: nn.Module, links: _Links, starts: Sequence[fx.Node]
              ) -> list[dict[str, list[int]]]:
    """New paddings per chain ({conv path: padding}, empty when nothing moves)."""
    chains: list[dict[str, list[int]]] = []
    seen: set[fx.Node] = set()
    for start in starts:
        while (p := links.prev(start)) is not None:
            start = p
        if start in seen:
            continue
        seen.add(start)
        chain = [start]
        while (n := links.next(chain[-1])) is not None:
            chain.append(n)
        convs = [_owner(n) for n in chain if links.kind(n) == "conv"]
        if len(convs) < 2:
            continue
        mods = [model.get_submodule(p) for p in convs]  # type: ignore[arg-type]
        total = list(int_padding(mods[0]))  # type: ignore[arg-type]
        stride = list(mods[0].stride)
        for m in mods[1:]:
            for ax, p in enumerate(int_padding(m)):  # type: ignore[arg-type]
                total[ax] += stride[ax] * p
            stride = [a * b for a, b in zip(stride, m.stride, strict=True)]
        out: dict[str, list[int]] = {}
        for i, (path, m) in enumerate(zip(convs, mods, strict=True)):
            want = list(total) if i == 0 else [0] * len(total)
            if list(int_padding(m)) != want:  # type: ignore[arg-type]
                out[str(path)] = want
        chains.append(out)
    return chains
