"""Chains: maximal runs of conv (or linear) layers that one merged layer can replace.

A *chain* is a run of conv (or linear) layers of the prepared graph (:mod:`.graph`) where every
intermediate output has exactly one user. It stops at anything else: pooling, LayerNorm, a
remaining activation, reshape/permute, concatenation, a BN that could not be folded, a layer
called more than once. A residual ``f(x) + x`` (or ``f(x) + g(x)`` with ``g`` one conv/linear
on ``x``, e.g. a strided 1x1 shortcut) ends its chain and is folded with it when the geometry
allows; merging across the add would duplicate the skip path.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from easier.edit.padding import int_padding
from easier.merge.graph import call_counts, node_shape, only_user

__all__ = ["PADDING_REASON", "Chain", "chain_is_exact", "find_chains", "geometry"]

PADDING_REASON = "padding not relocated: merge would be inexact at borders"
_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _submodule(gm: fx.GraphModule, node: Any) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        return gm.get_submodule(str(node.target))
    return None


def _single_input_call(node: fx.Node) -> bool:
    return len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node)


def _add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two tensor operands of a plain ``a + b`` node, else None."""
    if node.op != "call_function" or node.target is not operator.add or node.kwargs:
        return None
    if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    return node.args[0], node.args[1]


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
    if type(mod) in _CONV_TYPES and int_padding(mod) is not None:
        return "conv"
    if type(mod) is nn.Linear:
        return "linear"
    return None


def geometry(mods: Sequence[nn.Module]) -> tuple[list[int], list[int], list[int]]:
    """Merged (kernel, stride, padding) per axis of a conv chain."""
    first = mods[0]
    k = [d * (kk - 1) + 1 for d, kk in zip(first.dilation, first.kernel_size, strict=True)]
    s, p = list(first.stride), list(int_padding(first))  # type: ignore[arg-type]
    for m in mods[1:]:
        for ax in range(len(k)):
            k[ax] += s[ax] * m.dilation[ax] * (m.kernel_size[ax] - 1)
            p[ax] += s[ax] * int_padding(m)[ax]  # type: ignore[index]
            s[ax] *= m.stride[ax]
    return k, s, p


def chain_is_exact(gm: fx.GraphModule, chain: Chain) -> bool:
    """True when merging gives the same function everywhere (later convs do not pad)."""
    if chain.kind != "conv":
        return True
    mods = [gm.get_submodule(m) for m in chain.modules]
    return all(not any(int_padding(m)) for m in mods[1:])


def _residual_problem(gm: fx.GraphModule, chain: Chain, other: fx.Node) -> str:
    """Why the add of ``chain`` with ``other`` cannot be folded ('' when it can)."""
    end = only_user(chain.nodes[-1])
    shapes = {node_shape(chain.nodes[-1]), node_shape(other), node_shape(end)}
    if len(shapes) != 1 or None in shapes:
        return "residual operands differ in shape (broadcasting add)"
    mods = [gm.get_submodule(m) for m in chain.modules]
    if chain.kind == "linear":
        if other is chain.input and mods[0].in_features != mods[-1].out_features:
            return "residual identity needs in_features == out_features"
        return ""
    k, s, p = geometry(mods)
    if other is chain.input:
        if any(x != 1 for x in s):
            return f"identity residual needs stride 1, merged stride is {s}"
        if any(not 0 <= pp < kk for pp, kk in zip(p, k, strict=True)):
            return f"identity residual needs 0 <= padding < kernel (K={k}, P={p})"
        return ""
    g = gm.get_submodule(str(other.target))
    if list(g.stride) != s:
        return f"shortcut stride {list(g.stride)} differs from merged stride {s}"
    pg = int_padding(g)
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
    counts = call_counts(gm)
    kinds = {n: _layer_kind(gm, n, counts) for n in gm.graph.nodes}

    def nxt(a: fx.Node) -> fx.Node | None:
        """The layer that continues a's run: a's only user, same kind, fed by a."""
        b = only_user(a)
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
        add = only_user(run[-1])
        ops = _add_operands(add) if add is not None else None
        if ops is not None and add not in claimed and ops[0] is not ops[1]:
            other = ops[1] if ops[0] is run[-1] else ops[0]
            is_shortcut = (
                other in singles
                and other not in claimed
                and other is not run[0]
                and other.args[0] is chain.input
                and only_user(other) is add
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
