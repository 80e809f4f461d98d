"""Which eager module an op of a ``torch.export`` capture belongs to, for methods that walk it.

EGP and TLC walk back from a site's pre-activation to the layers that compute it (BatchNorm,
conv, linear), then edit those layers' parameters on the eager model. In a capture (see
:mod:`easier.capture`) a layer is an aten op (``conv2d``, ``linear``, ``batch_norm``) whose
weight is a ``get_attr`` node named by its eager path; it counts as the module's call only when
that module is an ``nn.Conv*``/``nn.Linear``/``nn.BatchNorm*`` and the op was called from it
(``nn_module_stack``), so a functional conv on a borrowed weight is not mistaken for the layer.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

from torch import fx, nn

from easier.errors import ConfigError, TraceError
from easier.graph.capture import Capture, capture, default_example, node_scope

__all__ = ["LAYERS", "capture_for", "layer_calls", "module_of", "norm_input", "pass_input"]

LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
_LAYER_OPS = {"conv1d", "conv2d", "conv3d", "convolution", "linear"}
_NORM_OPS = {"batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm",
             "cudnn_batch_norm"}
_PASS_OPS = {"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "clone",
             "alias", "detach", "contiguous"}


def capture_for(model: nn.Module, example_input: Any, what: str, uses: str) -> Capture:
    """A capture of ``model`` on ``example_input`` (else the model's default example).

    ``uses`` says what the method reads on the graph; a model torch.export cannot capture is a
    TraceError saying so and pointing to methods that need no graph.
    """
    if example_input is None:
        example_input = default_example(model)
    if example_input is None:
        raise ConfigError(
            f"{what} reads the model's torch.export graph, which needs an example input: pass "
            "example_input= (one model input); inside reduce() the loop passes one"
        )
    try:
        return capture(model, example_input)
    except TraceError as exc:
        raise TraceError(f"{uses} on the torch.export graph, but {exc}; use a method that needs "
                         "no graph (e.g. easier, layer-folding)") from exc


def _op(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def module_of(model: nn.Module, node: Any, types: tuple[type, ...]) -> str | None:
    """Path of the module of ``types`` that applies op ``node`` with its own weight, or None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    op = _op(node)
    if op not in _LAYER_OPS and op not in _NORM_OPS:
        return None
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    path = str(weight.target).rpartition(".")[0]
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        return None
    if not isinstance(mod, types) or node_scope(node)[0] != path:
        return None
    return path


def norm_input(model: nn.Module, node: Any) -> tuple[str, fx.Node, fx.Node] | None:
    """(BatchNorm path, its input node, its op node) when ``node`` is an nn.BatchNorm output."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        node = node.args[0]  # the tuple-returning batch norm ops
    if not isinstance(node, fx.Node) or node.op != "call_function" or _op(node) not in _NORM_OPS:
        return None
    path = module_of(model, node, (nn.modules.batchnorm._BatchNorm,))
    src = node.args[0] if node.args else None
    return (path, src, node) if path is not None and isinstance(src, fx.Node) else None


def pass_input(node: Any) -> fx.Node | None:
    """The input of a dropout/clone/alias op (the identity in eval mode), else None."""
    if (isinstance(node, fx.Node) and node.op == "call_function" and _op(node) in _PASS_OPS
            and node.args and isinstance(node.args[0], fx.Node)):
        return node.args[0]
    return None


def layer_calls(model: nn.Module, gm: fx.GraphModule) -> Counter[str]:
    """How many ops of the capture each conv/linear/BatchNorm module applies."""
    types = (*LAYERS, nn.modules.batchnorm._BatchNorm)
    return Counter(p for n in gm.graph.nodes if (p := module_of(model, n, types)) is not None)
