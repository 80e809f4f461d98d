"""The fold's view of a model: its torch.export capture, lifted to layer calls and BN-folded.

The capture (:mod:`easier.capture`) holds aten ops whose weights are parameters
(``get_attr``). Each op the fold can merge becomes a ``call_module`` of a real layer sharing those
parameters, so the merge rules read layers, not op signatures:

* ``aten.conv1d/2d/3d`` (grouped and depthwise included; string padding "valid", and "same"
  where it is symmetric) -> ``nn.ConvNd``;
* ``aten.linear`` -> ``nn.Linear``; ``aten.addmm(b, x, W)`` (Hugging Face ``Conv1D``, whose weight
  is stored transposed), with the ``view`` that flattens tokens before it and the one after ->
  ``nn.Linear`` on the token tensor;
* ``aten.batch_norm`` in inference (module or functional BN, e.g. timm's ``BatchNormAct2d``) ->
  ``nn.BatchNormNd``;
* dropout in eval, ``alias``, ``detach`` -> dropped; ``clone``/``contiguous`` too, but only when
  they change nothing (:mod:`.noop`); zero ``F.pad``s; ``aten.add.Tensor`` -> ``+``.

Then every BN whose input is a single-use conv/linear is folded into it, and so is an elementwise
scale by a per-channel parameter (ConvNeXt's layer scale) and an added per-channel parameter
(what an affine-linearized site ``a * z + b`` leaves). Node shapes are recorded.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from easier.errors import DataError, FoldError, TraceError
from easier.graph.capture import capture, flat_inputs
from easier.merge.noop import noop_copy

__all__ = ["call_counts", "node_dtype", "node_shape", "only_user", "prepare", "prepare_graph"]

_aten = torch.ops.aten
_CONV = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}
_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_IDENTITY = {"alias", "detach"}  # views: dropping them changes neither values nor strides
_COPY = {"clone", "contiguous"}  # copies: dropped only when they change nothing (_noop_copy)
_DROPOUT = {"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"}


def node_shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def node_dtype(node: fx.Node) -> torch.dtype:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", torch.get_default_dtype())


def only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def call_counts(gm: fx.GraphModule) -> Counter[str]:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")


def _op(node: fx.Node) -> str:
    if node.op != "call_function":
        return ""
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _param(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj if isinstance(obj, torch.Tensor) else None
    return None


class _Lifter:
    """Adds one layer module per weight (shared by repeated calls) and rewrites nodes to it."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.made: dict[str, str] = {}  # weight get_attr target -> module name
        self.names: set[str] = {n for n, _ in gm.named_modules()}

    def _name(self, weight: fx.Node, kind: str) -> str:
        owner = str(weight.target).rpartition(".")[0] or kind
        held = owner in self.names and next(self.gm.get_submodule(owner).children(), None)
        base = f"{owner}.lifted" if held else owner
        name, i = base, 1
        while held and name in self.names and name not in self.made.values():
            name, i = f"{base}{i}", i + 1
        return name

    def module(self, weight: fx.Node, kind: str, build: Any) -> str:
        key = f"{kind}:{weight.target}"
        if key not in self.made:
            name = self._name(weight, kind)
            self.gm.add_submodule(name, build())
            self.made[key] = name
            self.names.add(name)
        return self.made[key]

    def replace(self, node: fx.Node, target: str, source: fx.Node, end: fx.Node | None = None
                ) -> None:
        end = end or node
        with self.gm.graph.inserting_before(end):
            new = self.gm.graph.call_module(target, (source,))
        new.meta.update(end.meta)
        end.replace_all_uses_with(new)
        if end is not node:
            self.gm.graph.erase_node(end)
        self.gm.graph.erase_node(node)


def _int_padding(mode: str, kernel: Any, dilation: list[int]) -> list[int] | None:
    """The symmetric int padding a string padding stands for, or None when there is none."""
    if mode == "valid":
        return [0] * len(kernel)
    extent = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
    if mode != "same" or any(e % 2 for e in extent):
        return None
    return [e // 2 for e in extent]


def _conv(lift: _Lifter, node: fx.Node) -> None:
    gm, op = lift.gm, _op(node)
    w, b = _param(gm, node.args[1]), _param(gm, _arg(node, 2, "bias", None))
    if w is None or (_arg(node, 2, "bias", None) is not None and b is None):
        return
    n = w.dim() - 2
    stride = _arg(node, 3, "stride", [1] * n)
    padding = _arg(node, 4, "padding", [0] * n)
    dilation = _arg(node, 5, "dilation", [1] * n)
    groups = int(_arg(node, 6, "groups", 1))
    if isinstance(stride, int):
        stride = [stride] * n
    if isinstance(dilation, int):
        dilation = [dilation] * n
    if isinstance(padding, int):
        padding = [padding] * n
    if isinstance(padding, str):  # conv2d.padding overload: "valid", or "same" (stride 1)
        padding = _int_padding(padding, w.shape[2:], dilation)
        if padding is None:
            return  # "same" with an even extent pads asymmetrically: left as it is

    def build() -> nn.Module:
        m = _CONV[op](w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=tuple(stride),
                      padding=tuple(padding),
                      dilation=tuple(dilation), groups=groups, bias=b is not None,
                      device="meta")
        m.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)
        if b is not None:
            m.bias = b if isinstance(b, nn.Parameter) else nn.Parameter(b, requires_grad=False)
        return m

    lift.replace(node, lift.module(node.args[1], f"{op}{stride}{padding}{dilation}{groups}", build),
                 node.args[0])


def _linear_module(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    m.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)
    if b is not None:
        m.bias = b if isinstance(b, nn.Parameter) else nn.Parameter(b, requires_grad=False)
    return m


def _linear(lift: _Lifter, node: fx.Node) -> None:
    w, b = _param(lift.gm, node.args[1]), _param(lift.gm, _arg(node, 2, "bias", None))
    if w is None or w.dim() != 2 or (_arg(node, 2, "bias", None) is not None and b is None):
        return
    lift.replace(node, lift.module(node.args[1], "linear", lambda: _linear_module(w, b)),
                 node.args[0])


def _addmm(lift: _Lifter, node: fx.Node) -> None:
    """``view(addmm(b, view(x, [-1, in]), W), [..., out])`` -> Linear(W.T, b) on x."""
    gm = lift.gm
    b, x, w = _param(gm, node.args[0]), node.args[1], _param(gm, node.args[2])
    if b is None or w is None or w.dim() != 2 or node.kwargs or len(node.args) > 3:
        return
    source, end = x, None
    if isinstance(x, fx.Node) and _op(x) in {"view", "reshape", "_unsafe_view"}:
        source = x.args[0]
        user = only_user(node)
        if user is not None and _op(user) in {"view", "reshape", "_unsafe_view"}:
            end = user
        if end is None or len(x.users) != 1:
            source, end = x, None

    def build() -> nn.Module:
        return _linear_module(nn.Parameter(w.detach().t().contiguous(), requires_grad=False), b)

    lift.replace(node, lift.module(node.args[2], "addmm", build), source, end)
    if end is not None and not x.users:
        gm.graph.erase_node(x)


def _batch_norm(lift: _Lifter, node: fx.Node) -> None:
    gm, op = lift.gm, _op(node)
    legit = op == "_native_batch_norm_legit_no_training"
    w, b = _param(gm, node.args[1]), _param(gm, node.args[2])
    mean, var = _param(gm, node.args[3]), _param(gm, node.args[4])
    if legit:
        eps = float(_arg(node, 6, "eps", 1e-5))
        users = list(node.users)
        if len(users) != 1 or _op(users[0]) != "getitem" or users[0].args[1] != 0:
            return
        end = users[0]
    else:
        if _arg(node, 5, "training", True):
            return
        eps, end = float(_arg(node, 7, "eps", 1e-5)), None
    rank = len(node.args[0].meta["val"].shape) if "val" in node.args[0].meta else 0
    if mean is None or var is None or rank not in _BN:
        return
    if (node.args[1] is not None and w is None) or (node.args[2] is not None and b is None):
        return

    def build() -> nn.Module:
        m = _BN[rank](mean.shape[0], eps=eps, affine=w is not None, device=mean.device,
                      dtype=mean.dtype)
        if w is not None:
            m.weight, m.bias = (t if isinstance(t, nn.Parameter) else nn.Parameter(t)
                                for t in (w, b))
        m.running_mean, m.running_var = mean, var
        return m.eval()

    lift.replace(node, lift.module(node.args[3], "bn", build), node.args[0], end)


def _zero_pad(node: fx.Node) -> bool:
    """``F.pad(x, [0, 0, ...])``: an identity (Hugging Face's TF-style padding of 1x1 convs)."""
    if _op(node) not in {"pad", "constant_pad_nd"} or len(node.args) < 2:
        return False
    pads = node.args[1]
    return (isinstance(node.args[0], fx.Node) and isinstance(pads, (list, tuple))
            and all(isinstance(p, int) and p == 0 for p in pads))


def _lift(gm: fx.GraphModule) -> None:
    lift = _Lifter(gm)
    for node in list(gm.graph.nodes):
        op = _op(node)
        if op in _CONV:
            _conv(lift, node)
        elif op == "linear":
            _linear(lift, node)
        elif op == "addmm":
            _addmm(lift, node)
        elif op in {"batch_norm", "_native_batch_norm_legit_no_training"}:
            _batch_norm(lift, node)
        elif ((op in _IDENTITY or (op in _DROPOUT and not _arg(node, 2, "train", True)))
              and node.args and isinstance(node.args[0], fx.Node) and not node.kwargs) \
                or (op in _COPY and noop_copy(node)) or _zero_pad(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif op in {"add", "add_"} and node.target in (_aten.add.Tensor, _aten.add_.Tensor) \
                and not node.kwargs and len(node.args) == 2:
            node.target = operator.add


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
    p = _param(gm, other)
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
    p = _param(gm, other)
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


def _fold_affine(gm: fx.GraphModule) -> list[str]:
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
        if counts[str(src.target)] != 1 or not isinstance(layer, (nn.Linear, *_CONV.values())):
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


def finish(gm: fx.GraphModule, recompile: bool = True) -> None:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    if recompile:  # Python code generation: only needed if the module will be called
        gm.recompile()
    gm.delete_all_unused_submodules()


def prepare(model: nn.Module, example_input: Any) -> tuple[fx.GraphModule, list[str]]:
    """A lifted, BN-folded eval capture of ``model`` with node shapes recorded.

    The capture is made on a copy, so folding never touches ``model``'s parameters.
    """
    try:
        cap = capture(copy.deepcopy(model), example_input)
    except TraceError as exc:
        raise FoldError(f"fold needs a captured graph: {exc}. Remove what export cannot follow "
                        "from forward() (see the torch.export docs), or fold with plan='none'."
                        ) from exc
    return prepare_graph(cap.gm, example_input, type(model).__name__)


def prepare_graph(gm: fx.GraphModule, example_input: Any, name: str = "the model", *,
                  recompile: bool = True) -> tuple[fx.GraphModule, list[str]]:
    """:func:`prepare` on an existing capture ``gm`` (modified in place): lift, check, BN-fold.

    Lets a caller edit one capture many ways (e.g. bypass an activation) without re-exporting.
    ``recompile=False`` skips generating the module's Python code (a third of the cost on small
    graphs) for a caller that only reads the graph and its modules, never calls ``gm`` itself.
    """
    _lift(gm)
    finish(gm, recompile)
    for p in gm.parameters():
        if not torch.isfinite(p).all():
            raise FoldError(f"{name} has NaN or Inf weights; folding would "
                            "spread them. Check the checkpoint or the fine-tune that made it.")
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*flat_inputs(gm, example_input))
    except Exception as exc:
        raise DataError(f"fold could not run the model on example_input: {exc}") from exc
    folded = _fold_affine(gm)
    finish(gm, recompile)
    return gm.eval(), folded
