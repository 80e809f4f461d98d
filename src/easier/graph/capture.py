"""Capture a model as an aten-level graph with ``torch.export`` (non-strict), the first step.

Like PyTorch's PT2E flow (export -> insert observers -> calibrate -> convert), everything that
needs to *see* a model works on its capture: site discovery, the entropy counters (observer nodes
inserted before each site) and the fold. Training never does: the user's eager module is what
gets fine-tuned. Non-strict export runs the model's Python as it is, so Hugging Face
transformers, timm-style and torchvision-style code are captured; each node keeps the module path
it was called from in ``node.meta["nn_module_stack"]``, which is how sites get readable names.

The batch dimension is captured as dynamic (``Dim.AUTO``), so one capture serves every batch
size; a model that pins its batch size is captured again for each new input shape.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from easier.errors import ConfigError, TraceError

G = TypeVar("G", fx.GraphModule, fx.Graph)

__all__ = ["Capture", "as_call", "call_model", "capture", "captured", "copy_graph",
           "counting_copy", "default_example", "eval_mode", "flat_inputs", "logits_of",
           "model_version", "node_scope", "to_device"]


class eval_mode:
    """Context manager: put a module in eval() and restore every submodule's own mode after."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for m, mode in self.modes:
            m.training = mode


def as_call(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) of a model input: a tensor, a tuple of positional args, or a dict."""
    if isinstance(example_input, dict):
        return (), dict(example_input)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    return (example_input,), {}


def to_device(x: Any, device: torch.device | str | None) -> Any:
    """A model input (tensor, tuple, dict, nested) with every tensor moved to ``device``."""
    if device is None:
        return x
    return pytree.tree_map(
        lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t, x)


def default_example(model: nn.Module, batch: int = 2) -> torch.Tensor | None:
    """A random input shaped from the spec a model of ``easier.models`` records, else None."""
    spec = getattr(model, "easier_spec", None)
    if not isinstance(spec, dict) or not spec.get("image_size") or not spec.get("in_channels"):
        return None
    size, c = int(spec["image_size"]), int(spec["in_channels"])
    p = next(model.parameters(), None)
    return torch.randn(batch, c, size, size, generator=torch.Generator().manual_seed(0)).to(
        p.device if p is not None else "cpu")


def call_model(model: nn.Module, example_input: Any) -> Any:
    """Call ``model`` on a tensor, a tuple of positional args, or a dict of keyword args."""
    args, kwargs = as_call(example_input)
    return model(*args, **kwargs)


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, ``out.logits`` (Hugging Face), or ``out[0]``."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(f"cannot find logits in a model output of type {type(out).__name__}; "
                      "return a tensor, a tuple whose first item is the logits, or an object "
                      "with .logits")


@dataclass
class Capture:
    """An exported, unlifted ``GraphModule`` of a model in eval mode, with how it was called.

    ``gm`` holds the model's parameters as ``get_attr`` nodes (named by their eager paths) and
    runs like the model (same call signature and output structure).
    """

    gm: fx.GraphModule
    example: Any
    dynamic_batch: bool
    program: torch.export.ExportedProgram | None = None  # what torch.export.save writes

    def nodes(self) -> Iterator[fx.Node]:
        return iter(self.gm.graph.nodes)


def node_scope(node: fx.Node) -> tuple[str, str, str]:
    """(module path, module class name, call key) of the innermost module a node was called in.

    The root module is ``("", cls, key)``; nodes outside any module (inputs, parameters) give
    ``("", "", "")``.
    """
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", "", ""
    key, (path, cls) = list(stack.items())[-1]
    return str(path), str(cls if isinstance(cls, str) else getattr(cls, "__name__", cls)), key


def _batch_dims(example_input: Any) -> Any:
    """dynamic_shapes spec marking dim 0 of every tensor input as Dim.AUTO."""
    args, kwargs = as_call(example_input)

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return {0: torch.export.Dim.AUTO} if x.dim() > 0 else None
        if isinstance(x, (tuple, list)):
            return type(x)(spec(v) for v in x)
        if isinstance(x, dict):
            return {k: spec(v) for k, v in x.items()}
        return None

    return tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}


def capture(model: nn.Module, example_input: Any, *, dynamic_batch: bool = True) -> Capture:
    """Export ``model`` in eval mode on ``example_input``; raise TraceError if export cannot.

    The model's training flags are restored afterwards and the model is not modified. The
    returned graph shares the model's parameter tensors.
    """
    if example_input is None:
        raise TraceError(
            "capturing a model with torch.export needs an example input: pass one model input "
            "(a tensor, a tuple of positional arguments, or a dict of keyword arguments)"
        )
    args, kwargs = as_call(example_input)
    tries = [True, False] if dynamic_batch else [False]
    errors = []
    with eval_mode(model), torch.no_grad():
        for dyn in tries:
            try:
                shapes = None
                if dyn:
                    a, k = _batch_dims(example_input)
                    shapes = {**dict(zip(_arg_names(model, len(a)), a, strict=False)), **k}
                    if len(shapes) != len(a) + len(k):
                        shapes = None
                ep = torch.export.export(model, args, kwargs, strict=False,
                                         dynamic_shapes=shapes)
                gm = _plain(ep.module())
                return Capture(gm, example_input, dyn, ep)
            except Exception as exc:  # export raises many types; report the last one
                errors.append(exc)
    exc = errors[-1]
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    raise TraceError(
        f"torch.export cannot capture {type(model).__name__}: {type(exc).__name__}: {first[:300]}"
    ) from exc


def _arg_names(model: nn.Module, n: int) -> list[str]:
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names[:n]


def _plain(gm: fx.GraphModule) -> fx.GraphModule:
    """A plain GraphModule of an unlifted export (train()/eval() allowed), without its guards.

    The input-shape guard export inserts is dropped: the batch size varies, and a wrong input
    fails in the first op that sees it anyway.
    """
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target) == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    out = fx.GraphModule(gm, gm.graph)
    out.recompile()
    return out


def copy_graph(gm: G) -> G:
    """A deep copy of a captured graph (module or bare ``fx.Graph``), without torch's noise.

    Copying an exported graph copies its pytree specs, and torch 2.13's ``LeafSpec`` shim warns
    (``isinstance(treespec, LeafSpec)`` is deprecated) on every copy: a warning about torch's
    internals that a user can do nothing about, printed once per iteration otherwise.
    """
    return _deepcopy(gm)


def _deepcopy(obj: Any) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(obj)


def flat_inputs(gm: fx.GraphModule, example_input: Any) -> list[Any]:
    """The example input flattened to the graph's placeholders (for fx interpreters)."""
    args, kwargs = as_call(example_input)
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        return list(args) + list(kwargs.values())
    flat, _ = pytree.tree_flatten((args, kwargs))
    try:
        from torch.fx._pytree import tree_flatten_spec

        return list(tree_flatten_spec((args, kwargs), info.in_spec))
    except Exception:  # spec mismatch: fall back to plain flattening
        return flat


# ---------------------------------------------------------------------------------------------
# capture once per model version (the PT2E pattern: one exported program, passed along)

# model -> {input signature: (model version, capture)}; weak, so a dropped model frees its graph
_CAPTURES: weakref.WeakKeyDictionary[nn.Module, dict[Any, tuple[Any, Capture]]] = (
    weakref.WeakKeyDictionary())
_PLAIN = (bool, int, float, str, tuple, type(None))


def model_version(model: nn.Module) -> tuple[Any, ...]:
    """What a capture of ``model`` depends on: its module objects and their plain settings
    (a conv's padding), the site switches and hooks, and the identity and storage of every
    parameter and buffer. Training updates tensors in place, which a capture shares, so
    fine-tuning keeps the version; an edit (a new module, a moved padding, a switch) changes it.
    """
    parts: list[Any] = []
    for name, m in model.named_modules():
        plain = tuple((k, v) for k, v in vars(m).items()  # not `training`: captures are eval
                      if not k.startswith("_") and k != "training" and isinstance(v, _PLAIN))
        switch = getattr(m, "_easier_switch", None)
        parts.append((name, id(m), type(m), plain, len(m._forward_hooks),
                      len(m._forward_pre_hooks),
                      None if switch is None else repr(sorted(vars(switch).items()))))
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        parts.append((name, id(t), t.data_ptr(), tuple(t.shape), t.dtype, t.device))
    return tuple(parts)


def _signature(example_input: Any, batch: bool) -> Any:
    """The input's structure, shapes (without the batch size when ``batch`` is False), dtypes."""
    flat, spec = pytree.tree_flatten(as_call(example_input))
    return str(spec), tuple(
        (tuple(x.shape) if batch or x.dim() == 0 else tuple(x.shape[1:]), x.dtype, x.device)
        if isinstance(x, torch.Tensor) else repr(x) for x in flat)


def captured(model: nn.Module, example_input: Any, *, dynamic_batch: bool = True) -> Capture:
    """The capture of this version of ``model``: exported once, reused by every stage (sites,
    depth, the entropy pass, linearize, the fold) until an edit changes the model.

    The returned graph is shared: a caller that changes it must work on a copy
    (:func:`counting_copy` shares the weights, :func:`copy_graph` copies them too).
    """
    if example_input is None:
        return capture(model, example_input)  # raises the TraceError that explains it
    version = model_version(model)
    entries = _CAPTURES.setdefault(model, {})
    keys = ([("dynamic", _signature(example_input, False))] if dynamic_batch else []) + [
        ("static", _signature(example_input, True))]
    for key in keys:
        hit = entries.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
    cap = capture(model, example_input, dynamic_batch=dynamic_batch)
    key = keys[0] if cap.dynamic_batch else keys[-1]
    stale = [k for k, (v, _) in entries.items() if v != version]
    for k in stale:  # an older version's graph is never asked for again
        del entries[k]
    entries[key] = (version, cap)
    return cap


def counting_copy(cap: Capture) -> Capture:
    """A capture with its own graph but the same weights (for a pass that inserts nodes)."""
    gm = fx.GraphModule(cap.gm, _deepcopy(cap.gm.graph))  # graph copied, weights shared
    return Capture(gm, cap.example, cap.dynamic_batch, cap.program)
