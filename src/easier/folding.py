"""Fold linear layers that an activation removal made adjacent into fewer real layers, exactly.

Once an activation is gone, ``conv -> bn -> conv`` (or ``linear -> linear``) is one affine map
run as several layers. :func:`fold` rewrites a ``torch.fx`` copy of the model so that each such
*chain* becomes one layer, verifies the result numerically and says what it did in a
:class:`~easier.plan.FoldPlan`. The rules, all exact:

* **BN into the preceding conv/linear** (eval statistics), when the layer's output feeds only that
  BN. Always done (exact and never slower); a BN after anything else is left alone.
* **conv∘conv**: per spatial axis ``K = d1(k1-1) + s1·d2(k2-1) + 1``, ``S = s1·s2``,
  ``P = p1 + s1·p2``, dilation 1. Grouped weights are expanded to block-diagonal, merged densely and
  re-emitted as grouped when the result is still block-diagonal (depthwise∘depthwise stays
  depthwise; anything with a dense conv becomes dense). Only ``padding_mode='zeros'`` convs join.
* **linear∘linear**: ``W = W2 W1``, ``b = W2 b1 + b2`` on ``(..., C)`` inputs.
* **Residuals**: ``f(x) + x`` becomes one layer with the identity at the kernel centre tap ``P``
  (needs stride 1 and ``0 <= P < K``, which the relocated form gives: ``P == K // 2``);
  ``f(x) + g(x)`` with ``g`` a single conv/linear on ``x`` (e.g. a 1x1 stride-2 conv+BN shortcut)
  adds ``g``'s weight at the matching taps and its bias.

A *chain* is a maximal run of conv (or linear) layers where every intermediate output has exactly
one user. It stops at anything else: pooling, LayerNorm, a remaining activation, reshape/flatten,
concatenation, custom modules, functional convs, a BN that could not be folded, a module called
more than once. A residual add ends its chain: if the add's output feeds more linear layers, those
start a new chain (merging across the add would duplicate the skip path).

Zero padding is the trap: the unmerged chain pads the *intermediate* map with zeros, the merged
layer pads the *input*, so a naive merge is wrong on a ring at the borders. The exact remedy is
:func:`relocate_padding` / :func:`fold_ready`, applied when the activation is removed and before
fine-tuning: all padding moves to the chain's first conv, after which the merge is exact. A chain
whose later convs still pad is never merged (the planner refuses it), and :func:`fold` verifies
every result against the original model and raises :class:`~easier.errors.FoldError` otherwise.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import ConfigError, DataError, FoldError

if TYPE_CHECKING:
    from .plan import FoldPlan

__all__ = [
    "Chain",
    "apply_merges",
    "build_folded",
    "chain_is_exact",
    "find_chains",
    "fold",
    "fold_ready",
    "fold_run",
    "merge_chain",
    "relocate_padding",
    "verify_fold",
]

_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_IDENTITY_TYPES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_DROPOUT_FNS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
}
_ADD_FNS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_CONV_FNS = (F.conv1d, F.conv2d, F.conv3d)

PADDING_REASON = "padding not relocated: merge would be inexact at borders"


# ---------------------------------------------------------------------------------------------
# small helpers


def _as_args(example_input: Any) -> tuple[Any, ...]:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def _trace(model: nn.Module) -> fx.GraphModule:
    """The model as a GraphModule (used as is when it already is one)."""
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        raise FoldError(
            f"fold needs an fx-traceable model, but torch.fx cannot trace "
            f"{type(model).__name__}: {type(exc).__name__}: {exc}. Remove data-dependent control "
            "flow from forward(), or trace the model yourself and pass the GraphModule."
        ) from exc


def _int_padding(conv: nn.Module) -> tuple[int, ...] | None:
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


def _set_padding(conv: nn.Module, padding: Sequence[int]) -> None:
    conv.padding = tuple(int(p) for p in padding)
    # kept in step for completeness; zeros-mode convs pass `padding` straight to F.convNd
    conv._reversed_padding_repeated_twice = tuple(p for p in reversed(conv.padding) for _ in "xx")


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _dtype(node: fx.Node) -> torch.dtype:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", torch.get_default_dtype())


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _call_counts(gm: fx.GraphModule) -> Counter[str]:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")


def _submodule(gm: fx.GraphModule, node: Any) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        return gm.get_submodule(str(node.target))
    return None


def _single_input_call(node: fx.Node) -> bool:
    return len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node)


def _is_identity_like(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Identity, or a dropout that is off (module in eval, or traced with training=False)."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))) in _IDENTITY_TYPES
    if node.op == "call_function" and node.target in _DROPOUT_FNS:
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return training is False
    return False


def _add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two tensor operands of a plain ``a + b`` node (any spelling), else None."""
    if node.op == "call_function" and node.target in _ADD_FNS:
        if node.target is torch.add and node.kwargs.get("alpha", 1) != 1:
            return None
        if set(node.kwargs) - {"alpha"}:
            return None
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        if node.kwargs.get("alpha", 1) != 1 or set(node.kwargs) - {"alpha"}:
            return None
    else:
        return None
    if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    return node.args[0], node.args[1]


# ---------------------------------------------------------------------------------------------
# padding relocation (on the unfolded, trainable graph)


def _raw_kind(gm: fx.GraphModule, node: Any, counts: Counter[str]) -> str | None:
    """'conv' / 'bn' / 'id' when ``node`` can sit inside a linear conv chain, else None."""
    if not isinstance(node, fx.Node):
        return None
    if _is_identity_like(gm, node) and node.args and isinstance(node.args[0], fx.Node):
        return "id"
    mod = _submodule(gm, node)
    if mod is None or counts[str(node.target)] != 1 or not _single_input_call(node):
        return None
    if type(mod) in _CONV_TYPES and _int_padding(mod) is not None:
        return "conv"
    if type(mod) in _BN_TYPES:
        return "bn"
    return None


def _raw_chain(gm: fx.GraphModule, node: fx.Node, counts: Counter[str]) -> list[fx.Node]:
    """The maximal conv/BN/identity chain through ``node`` (empty when node is not in one)."""
    if _raw_kind(gm, node, counts) is None:
        return []

    def nxt(n: fx.Node) -> fx.Node | None:
        u = _only_user(n)
        if u is not None and _raw_kind(gm, u, counts) and u.args[0] is n:
            return u
        return None

    start = node
    while True:
        prev = start.args[0]
        if _raw_kind(gm, prev, counts) and nxt(prev) is start:
            start = prev
        else:
            break
    chain = [start]
    while (n := nxt(chain[-1])) is not None:
        chain.append(n)
    return chain


def _relocate(gm: fx.GraphModule, convs: list[fx.Node]) -> list[str]:
    mods = [gm.get_submodule(str(n.target)) for n in convs]
    total = list(_int_padding(mods[0]))  # type: ignore[arg-type]
    stride = list(mods[0].stride)
    for m in mods[1:]:
        for ax, p in enumerate(_int_padding(m)):  # type: ignore[arg-type]
            total[ax] += stride[ax] * p
        stride = [a * b for a, b in zip(stride, m.stride, strict=True)]
    changed = []
    for i, (node, m) in enumerate(zip(convs, mods, strict=True)):
        want = tuple(total) if i == 0 else (0,) * len(total)
        if tuple(m.padding) != want:
            _set_padding(m, want)
            changed.append(str(node.target))
    return changed


def relocate_padding(gm: fx.GraphModule, junctions: Iterable[fx.Node | str]) -> list[str]:
    """Move all zero padding of each conv chain through ``junctions`` to the chain's first conv.

    Returns the qualified names of the convs whose padding changed. ``junctions`` are the nodes
    (or node names) that fed a removed activation; the chain through each is the maximal run of
    convs, BNs and identity/dropout layers with single-user links. Its first conv gets
    ``P = p1 + s1·p2 + s1·s2·p3 + ...`` and the others 0, mutating ``gm``'s conv modules in place.

    Output sizes are unchanged (each extra ``s1·p2`` of input padding yields exactly ``p2`` extra
    intermediate positions, which the next conv now consumes unpadded). The *function* changes
    on a border ring: the intermediate map used to be zero-padded and is now computed from the
    zero-padded input. That is the trade-off: done right after removing the activation, the
    fine-tuning that follows adapts to it, and the later :func:`fold` of the chain becomes
    exact. A chain that was not relocated is never merged. Idempotent.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    counts = _call_counts(gm)
    changed: list[str] = []
    seen: set[fx.Node] = set()
    for j in junctions:
        node = by_name.get(j) if isinstance(j, str) else j
        if node is None or node.graph is not gm.graph:
            raise ConfigError(
                f"junction {j!r} is not a node of this graph; pass nodes (or node names) of gm."
            )
        chain = _raw_chain(gm, node, counts)
        convs = [n for n in chain if _raw_kind(gm, n, counts) == "conv"]
        if len(convs) < 2 or chain[0] in seen:
            continue
        seen.add(chain[0])
        changed += _relocate(gm, convs)
    return changed


def fold_ready(model: nn.Module, example_input: Any) -> fx.GraphModule:
    """Return a traced copy of ``model`` with the padding of every linear conv chain relocated.

    Same trade-off as :func:`relocate_padding`: the function changes at the borders of every
    chain of two or more convs with nothing non-linear between them, so fine-tune afterwards;
    a later :func:`fold` then merges those chains exactly. The convs changed are listed in
    ``result.relocated_convs``; ``example_input`` is used to check output shapes are unchanged.
    """
    gm = _trace(copy.deepcopy(model))
    counts = _call_counts(gm)
    chains: list[list[fx.Node]] = []
    seen: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node in seen or _raw_kind(gm, node, counts) != "conv":
            continue
        chain = _raw_chain(gm, node, counts)
        seen.update(chain)
        chains.append(chain)
    before = _output_shapes(gm, example_input)
    changed: list[str] = []
    for chain in chains:
        convs = [n for n in chain if _raw_kind(gm, n, counts) == "conv"]
        if len(convs) >= 2:
            changed += _relocate(gm, convs)
    after = _output_shapes(gm, example_input)
    if before != after:  # cannot happen by the algebra above; guard against unseen layer types
        raise FoldError(
            f"padding relocation changed output shapes {before} -> {after}; "
            "please report this model."
        )
    gm.relocated_convs = changed
    gm.training = model.training
    return gm


def _output_shapes(model: nn.Module, example_input: Any) -> list[tuple[int, ...]]:
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = model(*_as_args(example_input))
    finally:
        for m, t in flags.items():
            m.training = t
    return [tuple(t.shape) for t in _flatten(out)]


# ---------------------------------------------------------------------------------------------
# preparing a model for folding: copy, eval, trace, drop identities, fold BN, record shapes


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


def _fold_batchnorms(gm: fx.GraphModule) -> list[str]:
    counts = _call_counts(gm)
    folded = []
    for node in list(gm.graph.nodes):
        bn = _submodule(gm, node)
        if type(bn) not in _BN_TYPES or counts[str(node.target)] != 1:
            continue
        if bn.running_mean is None or not _single_input_call(node):
            continue  # no running statistics: it normalises with batch statistics even in eval
        src = node.args[0]
        layer = _submodule(gm, src)
        if layer is None or len(src.users) != 1 or counts[str(src.target)] != 1:
            continue
        if type(layer) in _CONV_TYPES:
            ok = _CONV_TYPES.index(type(layer)) == _BN_TYPES.index(type(bn))
            ok = ok and layer.out_channels == bn.num_features
        elif type(layer) is nn.Linear:
            shape = _shape(src)
            ok = isinstance(bn, nn.BatchNorm1d) and shape is not None and len(shape) == 2
            ok = ok and layer.out_features == bn.num_features
        else:
            ok = False
        if not ok:
            continue
        _fold_bn_into(layer, bn)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded.append(f"{src.target}<-{node.target}")
    return folded


def _prepare(model: nn.Module, example_input: Any) -> tuple[fx.GraphModule, list[str]]:
    """A traced eval copy with identities dropped, BN folded and node shapes recorded."""
    gm = _trace(copy.deepcopy(model))
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*_as_args(example_input))
    except Exception as exc:
        raise DataError(f"fold could not run the model on example_input: {exc}") from exc
    for node in list(gm.graph.nodes):
        if _is_identity_like(gm, node) and node.args and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    bn_folded = _fold_batchnorms(gm)
    _finish(gm)
    return gm, bn_folded


def _finish(gm: fx.GraphModule) -> None:
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()


# ---------------------------------------------------------------------------------------------
# chains


@dataclass
class Chain:
    """A maximal run of conv (or linear) layers with single-user links, plus a foldable residual.

    ``add`` is the residual add node folded with the chain (None when there is none), ``shortcut``
    the single layer on the skip path (None for an identity skip). ``note`` says why a residual
    next to the chain could not be folded with it, if one could not.
    """

    id: int
    kind: str  # "conv" or "linear"
    nodes: list[fx.Node]
    add: fx.Node | None = None
    shortcut: fx.Node | None = None
    note: str = ""

    @property
    def input(self) -> fx.Node:
        return self.nodes[0].args[0]

    @property
    def end(self) -> fx.Node:
        return self.add if self.add is not None else self.nodes[-1]

    @property
    def modules(self) -> list[str]:
        return [str(n.target) for n in self.nodes]

    @property
    def residual(self) -> str | None:
        if self.add is None:
            return None
        return "identity" if self.shortcut is None else str(self.shortcut.target)


def _layer_kind(gm: fx.GraphModule, node: Any, counts: Counter[str]) -> str | None:
    """'conv' or 'linear' for a layer that may join a chain in the prepared graph."""
    mod = _submodule(gm, node)
    if mod is None or counts[str(node.target)] != 1 or not _single_input_call(node):
        return None
    if type(mod) in _CONV_TYPES and _int_padding(mod) is not None:
        return "conv"
    if type(mod) is nn.Linear:
        return "linear"
    return None


def _geometry(mods: Sequence[nn.Module]) -> tuple[list[int], list[int], list[int]]:
    """Merged (kernel, stride, padding) per axis of a conv chain."""
    first = mods[0]
    k = [d * (kk - 1) + 1 for d, kk in zip(first.dilation, first.kernel_size, strict=True)]
    s, p = list(first.stride), list(_int_padding(first))  # type: ignore[arg-type]
    for m in mods[1:]:
        for ax in range(len(k)):
            k[ax] += s[ax] * m.dilation[ax] * (m.kernel_size[ax] - 1)
            p[ax] += s[ax] * _int_padding(m)[ax]  # type: ignore[index]
            s[ax] *= m.stride[ax]
    return k, s, p


def chain_is_exact(gm: fx.GraphModule, chain: Chain) -> bool:
    """True when merging gives the same function everywhere (later convs do not pad)."""
    if chain.kind != "conv":
        return True
    mods = [gm.get_submodule(m) for m in chain.modules]
    return all(not any(_int_padding(m)) for m in mods[1:])


def _residual_problem(gm: fx.GraphModule, chain: Chain, other: fx.Node) -> str:
    """Why the add of ``chain`` with ``other`` cannot be folded ('' when it can)."""
    shapes = {_shape(chain.nodes[-1]), _shape(other), _shape(_only_user(chain.nodes[-1]))}
    if len(shapes) != 1 or None in shapes:
        return "residual operands differ in shape (broadcasting add)"
    mods = [gm.get_submodule(m) for m in chain.modules]
    if chain.kind == "linear":
        if other is chain.input and mods[0].in_features != mods[-1].out_features:
            return "residual identity needs in_features == out_features"
        return ""
    k, s, p = _geometry(mods)
    if other is chain.input:
        if any(x != 1 for x in s):
            return f"identity residual needs stride 1, merged stride is {s}"
        if any(not 0 <= pp < kk for pp, kk in zip(p, k, strict=True)):
            return f"identity residual needs 0 <= padding < kernel (K={k}, P={p})"
        return ""
    g = gm.get_submodule(str(other.target))
    if list(g.stride) != s:
        return f"shortcut stride {list(g.stride)} differs from merged stride {s}"
    pg = _int_padding(g)
    for ax in range(len(k)):
        lo = p[ax] - pg[ax]  # type: ignore[index]
        hi = lo + g.dilation[ax] * (g.kernel_size[ax] - 1)
        if lo < 0 or hi >= k[ax]:
            return f"shortcut taps do not fit inside the merged kernel (K={k}, P={p})"
    return ""


def find_chains(gm: fx.GraphModule) -> list[Chain]:
    """Candidate chains of a prepared graph, in graph order: two or more layers, or a residual.

    ``gm`` must come from the fold preparation (BN folded, identities dropped, shapes recorded).
    """
    counts = _call_counts(gm)
    kinds = {n: _layer_kind(gm, n, counts) for n in gm.graph.nodes}

    def nxt(a: fx.Node) -> fx.Node | None:
        """The layer that continues a's run: a's only user, same kind, fed by a."""
        b = _only_user(a)
        if b is None or kinds.get(b) != kinds[a] or b.args[0] is not a:
            return None
        same_type = type(_submodule(gm, a)) is type(_submodule(gm, b))
        return b if same_type or kinds[a] == "linear" else None

    runs: list[list[fx.Node]] = []
    for node in gm.graph.nodes:
        prev = node.args[0] if node.args else None
        is_layer = isinstance(prev, fx.Node) and kinds[prev] is not None
        if kinds[node] is None or (is_layer and nxt(prev) is node):
            continue  # not a layer, or not the start of a run
        run = [node]
        while (b := nxt(run[-1])) is not None:
            run.append(b)
        runs.append(run)

    singles = {run[0] for run in runs if len(run) == 1}
    claimed: set[fx.Node] = set()
    chains: list[Chain] = []
    # longer runs claim residual adds first, so a 1x1 shortcut never claims a 3x3 main path
    for run in sorted(runs, key=lambda r: -len(r)):
        if run[0] in claimed:
            continue
        chain = Chain(id=-1, kind=kinds[run[0]], nodes=run)  # type: ignore[arg-type]
        add = _only_user(run[-1])
        ops = _add_operands(add) if add is not None else None
        if ops is not None and add not in claimed and ops[0] is not ops[1]:
            other = ops[1] if ops[0] is run[-1] else ops[0]
            is_shortcut = (
                other in singles
                and other not in claimed
                and other is not run[0]
                and other.args[0] is chain.input
                and _only_user(other) is add
                and type(_submodule(gm, other)) is type(_submodule(gm, run[0]))
            )
            if other is chain.input or is_shortcut:
                problem = _residual_problem(gm, chain, other)
                if problem:
                    chain.note = f"residual not folded: {problem}"
                else:
                    chain.add, chain.shortcut = add, (None if other is chain.input else other)
                    claimed.add(add)
                    if chain.shortcut is not None:
                        claimed.add(chain.shortcut)
        if len(run) >= 2 or chain.add is not None:
            claimed.update(run)
            chains.append(chain)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    chains.sort(key=lambda c: order[c.nodes[0]])
    for i, c in enumerate(chains):
        c.id = i
    return chains


# ---------------------------------------------------------------------------------------------
# merged weights


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
    stride, pad = list(first.stride), list(_int_padding(first))  # type: ignore[arg-type]
    for m in mods[1:]:
        w2 = _dense(m)
        b = _bias(m, m.out_channels, w) + w2.sum(dim=tuple(range(2, w2.dim()))) @ b
        w = _compose(_dilate(w2, [s * d for s, d in zip(stride, m.dilation, strict=True)]), w)
        pad = [p + s * q for p, s, q in zip(pad, stride, _int_padding(m), strict=True)]
        stride = [s * t for s, t in zip(stride, m.stride, strict=True)]
    groups = math.gcd(*(m.groups for m in mods))
    has_bias = any(m.bias is not None for m in mods)
    if chain.add is not None and chain.shortcut is None:
        idx = torch.arange(w.shape[0])
        w[(idx, idx, *pad)] += 1
    elif chain.add is not None:
        g = gm.get_submodule(str(chain.shortcut.target))
        lo = [p - q for p, q in zip(pad, _int_padding(g), strict=True)]  # type: ignore[arg-type]
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
    with torch.no_grad():
        merged.weight.copy_(w)
        if has_bias:
            merged.bias.copy_(b)
    return merged


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
    with torch.no_grad():
        merged.weight.copy_(w)
        if has_bias:
            merged.bias.copy_(b)
    return merged


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
    _finish(gm)


# ---------------------------------------------------------------------------------------------
# verification and the verb


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in _flatten(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return []


def _random_like(example_input: Any) -> tuple[Any, ...] | None:
    """A same-shaped random input, or None when an input is not a floating tensor."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for a in _as_args(example_input):
        if not isinstance(a, torch.Tensor) or not a.is_floating_point():
            return None
        out.append(torch.randn(a.shape, generator=gen, dtype=a.dtype).to(a.device))
    return tuple(out)


def verify_fold(
    reference: nn.Module,
    folded: nn.Module,
    example_input: Any,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> float:
    """Max abs output difference of two models on ``example_input`` and a random input.

    Both run in eval mode (on copies of their training flags, restored after). Raises FoldError
    when any output differs beyond ``rtol``/``atol`` (``torch.allclose`` semantics).
    """
    inputs = [("example", _as_args(example_input))]
    rand = _random_like(example_input)
    if rand is not None:
        inputs.append(("random", rand))
    flags = {m: m.training for mod in (reference, folded) for m in mod.modules()}
    worst = 0.0
    try:
        reference.eval()
        folded.eval()
        for label, args in inputs:
            with torch.no_grad():
                want, got = _flatten(reference(*args)), _flatten(folded(*args))
            if len(want) != len(got) or any(
                a.shape != b.shape for a, b in zip(want, got, strict=False)
            ):
                raise FoldError(
                    f"fold changed the output structure or shapes on the {label} "
                    "input; please report this model."
                )
            for a, b in zip(want, got, strict=True):
                err = float((a - b).abs().max()) if a.numel() else 0.0
                worst = max(worst, err)
                if not torch.allclose(a, b, rtol=rtol, atol=atol):
                    raise FoldError(
                        f"folded model differs from the original by max |err| = {err:.3g} on "
                        f"the {label} input (rtol={rtol}, atol={atol}). A merged chain was not "
                        "exact: relocate its padding (fold_ready / linearize(fold_ready=True)) "
                        "before fine-tuning, or fold with plan='none' (BN folding only)."
                    )
    finally:
        for m, t in flags.items():
            m.training = t
    return worst


def build_folded(model: nn.Module, example_input: Any, fold_plan: FoldPlan) -> fx.GraphModule:
    """The prepared copy of ``model`` (BN folded) with the plan's "merge" chains merged.

    No verification: :func:`fold` is the checked entry point.
    """
    gm, _ = _prepare(model, example_input)
    chains = {c.id: c for c in find_chains(gm)}
    merges = []
    for decision in fold_plan.chains:
        if decision.decision != "merge":
            continue
        chain = chains.get(decision.chain_id)
        if (
            chain is None
            or chain.modules != decision.modules
            or chain.residual != decision.residual
        ):
            raise ConfigError(
                f"the fold plan does not match this model (chain {decision.chain_id}: "
                f"{decision.modules}); make a new plan with plan_fold(model, example_input)."
            )
        merges.append((chain, merge_chain(gm, chain)))
    apply_merges(gm, merges)
    return gm.eval()


def fold(
    model: nn.Module,
    example_input: Any,
    plan: str | FoldPlan = "latency",
    *,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> fx.GraphModule:
    """Return an eval-mode GraphModule computing ``model``'s function with fewer layers.

    ``plan`` is a planner mode ("latency", "flops", "all", "none"; see :mod:`easier.plan`) or a
    :class:`~easier.plan.FoldPlan` from :func:`~easier.plan.plan_fold` (e.g. one saved to JSON)
    to apply as it is. BN folding is done in every mode. ``model`` is not modified. With
    ``verify``, the result is compared with the original on ``example_input`` and on a random
    input of the same shape; FoldError is raised beyond ``rtol``/``atol``, and the max error is
    recorded as ``result.fold_plan.max_abs_error``.

    The result is an inference graph: BN folded, identities and dropouts removed.
    """
    from .plan import FoldPlan, plan_fold  # plan.py builds on this module's rules

    if isinstance(plan, FoldPlan):
        fold_plan = copy.deepcopy(plan)
    elif isinstance(plan, str):
        fold_plan = plan_fold(model, example_input, plan)
    else:
        raise ConfigError(f"plan must be a mode name or a FoldPlan, not {type(plan).__name__}")
    gm = build_folded(model, example_input, fold_plan)
    gm.eval()
    if verify:
        reference = copy.deepcopy(model)
        fold_plan.max_abs_error = verify_fold(reference, gm, example_input, rtol=rtol, atol=atol)
    gm.fold_plan = fold_plan
    return gm


def fold_run(run_dir: str | Path, *, plan: str = "latency", model: nn.Module | None = None,
             batch_sizes: Sequence[int] = (1, 64), onnx: bool = False) -> dict[str, Any]:
    """Fold the kept model of a run directory; write folded.pt(2), fold_plan.json and fold.md.

    ``folded.pt`` is TorchScript (``torch.jit.load`` needs no easier code) and ``folded.pt2`` a
    ``torch.export`` program (``torch.export.load(path).module()``), the format PyTorch now
    recommends; it is skipped with a note if export fails. ``model`` is the base
    architecture for runs whose model is not from ``easier.models``. Returns the plan and the
    before/after measurements as plain data.
    """
    from .measurement import compare_table, measure
    from .state import RunDir, load_model

    run = RunDir(run_dir)
    reduced = load_model(run.file("model.pt"), model).eval()
    shape = run.read_config().get("input_shape")
    if not shape:
        raise FoldError(f"{run.config_path} has no input_shape; rerun `easier reduce` to record it")
    example = torch.randn(1, *shape)
    folded = fold(reduced, example, plan=plan)
    before = measure(reduced, example, batch_sizes=batch_sizes)
    after = measure(folded, example, batch_sizes=batch_sizes)
    import warnings

    with warnings.catch_warnings():  # torch.jit is deprecated upstream but still the portable file
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(folded, example), str(run.file("folded.pt")))
    fold_plan = folded.fold_plan  # type: ignore[attr-defined]
    try:
        batch = torch.export.Dim("batch")  # from a batch of 2: a size-1 dim would be specialised
        program = torch.export.export(folded, (example.expand(2, *shape).clone(),),
                                      dynamic_shapes=({0: batch},))
        torch.export.save(program, str(run.file("folded.pt2")))
    except Exception as exc:  # export covers fewer graphs than tracing; the .pt still exists
        fold_plan.notes.append(f"torch.export failed ({type(exc).__name__}: {exc}); "
                               "folded.pt2 not written")
    run.write_json("fold_plan.json", fold_plan.to_dict())
    run.write_json("fold_measure.json", {"before": before.to_dict(), "after": after.to_dict()})
    table = compare_table(before, after)
    from .state import atomic_write_text

    atomic_write_text(run.file("fold.md"), f"# fold (plan={plan})\n\n{table}\n\n"
                      f"max |error| of the folded model: {fold_plan.max_abs_error:.3g}\n\n"
                      f"```\n{fold_plan}\n```\n")
    if onnx:
        try:
            torch.onnx.export(folded, (example,), str(run.file("folded.onnx")))
        except Exception as exc:  # the onnx package is an optional extra
            raise FoldError(f"ONNX export failed ({type(exc).__name__}: {exc}); install the "
                            "extra (onnx, onnxscript) with: pip install 'easier[onnx]'") from exc
    return {"plan": fold_plan.to_dict(), "before": before.to_dict(), "after": after.to_dict(),
            "table": table}
