"""torch.fx view of activation sites, kept for the sibling methods that rewrite fx graphs.

The pipeline itself captures models with torch.export (:mod:`easier.sites`); EGP, TLC and Layer
Folding still analyse and rewrite a ``torch.fx`` trace, so they need an fx-traceable model.
Site names follow the same scheme as :mod:`easier.sites`.

Original description:

A site is a call, not a module: one ``nn.ReLU`` called twice is two sites, and ``F.relu(x)``,
``torch.relu(x)`` and ``x.relu_()`` are sites too. Sites are found by tracing the model with
``torch.fx``; a model fx cannot trace falls back to module hooks, which can see only activation
modules that are called exactly once per forward pass (and says which ones it lost).

Names are readable and stable:

* a module call is named by the module path: ``layer1.0.relu1``;
* a repeated call of the same module gets fx's own suffix: ``layer1.0.relu@1`` is the second call;
* a functional or method call is named by the module it is written in and the op:
  ``layer1.0:relu`` (``:relu`` at the root), then ``layer1.0:relu@1`` for the next one.

The names are pinned in the graph's node metadata, so a linearized model keeps the names of the
sites it still has.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..capture import eval_mode
from ..errors import SiteError, TraceError

__all__ = ["activation_input", "keep_unreferenced_state", "node_kind", "site_nodes",
           "sites_of_graph", "trace"]

from ..sites import KINDS, Site

_META = "easier_site"  # node.meta key pinning a site's name

# Module classes, most specific first (ReLU6 subclasses Hardtanh, not ReLU, but keep order anyway).
_MODULE_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.ReLU6, "ReLU6"),
    (nn.ReLU, "ReLU"),
    (nn.LeakyReLU, "LeakyReLU"),
    (nn.PReLU, "PReLU"),
    (nn.GELU, "GELU"),
    (nn.SiLU, "SiLU"),
)


def _function_table() -> dict[Callable[..., Any], tuple[str, str, bool]]:
    """Callable -> (kind, op name, always in place)."""
    table: dict[Callable[..., Any], tuple[str, str, bool]] = {}

    def add(fn: Any, kind: str, op: str, inplace: bool = False) -> None:
        if fn is not None:
            table[fn] = (kind, op, inplace)

    add(F.relu, "ReLU", "relu")
    add(torch.relu, "ReLU", "relu")
    add(getattr(F, "relu_", None), "ReLU", "relu", True)
    add(getattr(torch, "relu_", None), "ReLU", "relu", True)
    add(F.relu6, "ReLU6", "relu6")
    add(F.leaky_relu, "LeakyReLU", "leaky_relu")
    add(getattr(F, "leaky_relu_", None), "LeakyReLU", "leaky_relu", True)
    add(F.prelu, "PReLU", "prelu")
    add(getattr(torch, "prelu", None), "PReLU", "prelu")
    add(F.gelu, "GELU", "gelu")
    add(F.silu, "SiLU", "silu")
    return table


_FUNCTIONS = _function_table()
_METHODS: dict[str, tuple[str, str, bool]] = {
    "relu": ("ReLU", "relu", False),
    "relu_": ("ReLU", "relu", True),
}

# Producers that decide where the channel axis of a pre-activation is.
_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm,
                  nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)
_CHANNEL_LAST = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention, nn.Bilinear)
_CHANNEL_FIRST_FNS = {F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.group_norm,
                      F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_CHANNEL_LAST_FNS = {F.linear, F.layer_norm, torch.matmul, torch.bmm, operator.matmul,
                     F.embedding}
# Ops through which the channel layout of the producer carries over unchanged.
_PASS_THROUGH_FNS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                     torch.add, torch.sub, torch.mul, operator.neg, F.dropout}
_PASS_THROUGH_METHODS = {"add", "add_", "sub", "mul", "contiguous", "clone", "float", "to"}


# ---------------------------------------------------------------------------------------------
# classification of fx nodes


def _module_kind(module: nn.Module) -> str | None:
    for cls, kind in _MODULE_KINDS:
        if isinstance(module, cls):
            return kind
    return None


def node_kind(gm: fx.GraphModule, node: fx.Node) -> tuple[str, str, str, bool] | None:
    """(kind, form, op-or-target, inplace) if ``node`` applies an activation, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        kind = _module_kind(mod)
        if kind is not None:
            return kind, "module", str(node.target), bool(getattr(mod, "inplace", False))
    elif node.op == "call_function" and node.target in _FUNCTIONS:
        kind, op, always = _FUNCTIONS[node.target]
        inplace = always or bool(node.kwargs.get("inplace", False))
        # positional inplace flag: relu(x, True), relu6(x, True), leaky_relu(x, slope, True)
        pos = {"relu": 1, "relu6": 1, "leaky_relu": 2}.get(op)
        if pos is not None and len(node.args) > pos:
            inplace = inplace or bool(node.args[pos])
        return kind, "function", op, inplace
    elif node.op == "call_method" and node.target in _METHODS:
        kind, op, inplace = _METHODS[str(node.target)]
        return kind, "method", op, inplace
    return None


def activation_input(node: fx.Node) -> fx.Node:
    """The node whose value is the pre-activation of site ``node``."""
    arg = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    if not isinstance(arg, fx.Node):
        raise SiteError(f"activation node {node.name!r} has no tensor input in the graph")
    return arg


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path)


def _infer_channel_axis(gm: fx.GraphModule, node: fx.Node, depth: int = 0) -> tuple[int | None,
                                                                                    str | None]:
    """Walk back from a pre-activation to the layer that produced it: (axis, producer)."""
    if depth > 16:
        return None, None
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, _CHANNEL_FIRST):
            return 1, type(mod).__name__
        if isinstance(mod, _CHANNEL_LAST):
            return -1, type(mod).__name__
        if isinstance(mod, (nn.Identity, nn.Dropout)) or _module_kind(mod) is not None:
            return _walk_args(gm, node, depth)
        return None, type(mod).__name__
    if node.op == "call_function":
        if node.target in _CHANNEL_FIRST_FNS:
            return 1, getattr(node.target, "__name__", str(node.target))
        if node.target in _CHANNEL_LAST_FNS:
            return -1, getattr(node.target, "__name__", str(node.target))
        if node.target in _PASS_THROUGH_FNS or node.target in _FUNCTIONS:
            return _walk_args(gm, node, depth)
    if node.op == "call_method" and (node.target in _PASS_THROUGH_METHODS
                                     or node.target in _METHODS):
        return _walk_args(gm, node, depth)
    return None, None


def _walk_args(gm: fx.GraphModule, node: fx.Node, depth: int) -> tuple[int | None, str | None]:
    for arg in node.all_input_nodes:
        axis, producer = _infer_channel_axis(gm, arg, depth + 1)
        if axis is not None:
            return axis, producer
    return None, None


# ---------------------------------------------------------------------------------------------
# tracing


def trace(model: nn.Module) -> fx.GraphModule:
    """Return an fx graph of ``model`` whose site nodes carry their pinned names.

    The graph shares parameters and submodules with ``model`` (nothing is copied). A
    ``GraphModule`` is used as it is, so names pinned by an earlier step are kept; to trace a
    model that needs a special tracer (e.g. Hugging Face ``transformers.utils.fx``), trace it
    yourself and pass the ``GraphModule``.
    """
    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        try:
            gm = fx.symbolic_trace(model)
        except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
            raise TraceError(
                f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}"
            ) from exc
    _pin_names(gm)
    return gm


def _pin_names(gm: fx.GraphModule) -> None:
    """Give every unnamed site node a unique readable name (idempotent)."""
    taken = {n.meta[_META] for n in gm.graph.nodes if _META in n.meta}
    seen: dict[str, int] = {}
    for node in gm.graph.nodes:
        if _META in node.meta:
            continue
        info = node_kind(gm, node)
        if info is None:
            continue
        _, form, what, _ = info
        base = what if form == "module" else f"{_scope(node)}:{what}"
        count = seen.get(base, 0)
        name = base if count == 0 else f"{base}@{count}"
        while name in taken:  # a name pinned earlier in a linearized graph
            count += 1
            name = f"{base}@{count}"
        seen[base] = count + 1
        taken.add(name)
        node.meta[_META] = name


def site_nodes(gm: fx.GraphModule, kinds: Sequence[str] = KINDS) -> dict[str, fx.Node]:
    """Map pinned site name -> fx node, in execution order, for sites of the given kinds."""
    out: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        info = node_kind(gm, node)
        if info is not None and info[0] in kinds and _META in node.meta:
            out[node.meta[_META]] = node
    return out


# ---------------------------------------------------------------------------------------------
# public entry


def _check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SiteError(f"unknown activation kind(s) {unknown}; valid kinds: {list(KINDS)}")
    return kinds


def call_model(model: nn.Module, example_input: Any) -> Any:
    """Call ``model`` on a tensor, a tuple of positional args, or a dict of keyword args."""
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def sites_of_graph(gm: fx.GraphModule, kinds: Sequence[str] = KINDS,
                   shapes: dict[str, tuple[int, ...]] | None = None) -> list[Site]:
    """Sites of an already traced graph (see :func:`trace`), in execution order."""
    shapes = shapes or {}
    sites = []
    for i, (name, node) in enumerate(site_nodes(gm, kinds).items()):
        kind, form, what, inplace = node_kind(gm, node)  # type: ignore[misc]
        axis, producer = _infer_channel_axis(gm, activation_input(node))
        target = what if form == "module" else f"{_scope(node)}:{what}".lstrip(":")
        sites.append(Site(name=name, kind=kind, form=form, target=target, index=i,
                          inplace=inplace, channel_axis=axis, producer=producer,
                          shape=shapes.get(node.name), node=node.name))
    return sites


@torch.no_grad()
def _shapes(gm: fx.GraphModule, example_input: Any) -> dict[str, tuple[int, ...]]:
    """Pre-activation shape of every site node, from one eval-mode run."""
    wanted: dict[str, list[str]] = {}
    for n in site_nodes(gm).values():
        wanted.setdefault(activation_input(n).name, []).append(n.name)
    shapes: dict[str, tuple[int, ...]] = {}

    class _Shapes(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                for site in wanted.get(n.name, ()):
                    shapes[site] = tuple(out.shape)
            return out

    if isinstance(example_input, dict):  # fx.Interpreter takes positional inputs only
        return shapes
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    with eval_mode(gm):
        _Shapes(gm).run(*args)
    return shapes




def keep_unreferenced_state(gm: fx.GraphModule, source: nn.Module) -> None:
    """fx drops submodules the forward never calls; put them back so state_dict keys match."""
    have = set(gm.state_dict())
    owners: dict[str, nn.Module] = {}
    for key in source.state_dict():
        if key not in have:
            path = key.rpartition(".")[0]
            if path and path not in owners:
                owners[path] = source.get_submodule(path)
    for path, mod in sorted(owners.items()):
        try:
            gm.get_submodule(path)
        except AttributeError:
            gm.add_submodule(path, mod)
