"""Which modules and graph ops compute a rectifier: the activation kinds and how to tell them.

Torch's activation classes are known by class; any other parameter-free leaf module is probed:
run on a fixed input, it is of the kind whose reference function it matches (so Hugging Face's
``NewGELUActivation``, the tanh formula with no ``gelu`` op, is a GELU). In a captured graph an
aten op is a site when it is one of the rectifier ops (``hardtanh`` only with ``min_val=0``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from easier.errors import SiteError
from easier.graph.capture import eval_mode

__all__ = ["KINDS", "aten_kind", "check_kinds", "is_rectifier_op", "module_kind", "module_sites"]

KINDS: tuple[str, ...] = ("ReLU", "ReLU6", "LeakyReLU", "PReLU", "GELU", "SiLU", "Hardswish")
"""Activation kinds that are sites (pass a subset as ``kinds=``)."""

_aten = torch.ops.aten
# aten op -> (kind, op name used in site names)
_ATEN: dict[Any, tuple[str, str]] = {}
for _ops, _kind, _name in (
    (("relu", "relu_"), "ReLU", "relu"),
    (("relu6", "relu6_"), "ReLU6", "relu6"),
    (("hardtanh", "hardtanh_"), "ReLU6", "relu6"),  # only with min_val == 0 (checked below)
    (("leaky_relu", "leaky_relu_"), "LeakyReLU", "leaky_relu"),
    (("prelu", "_prelu_kernel"), "PReLU", "prelu"),
    (("gelu", "gelu_"), "GELU", "gelu"),
    (("silu", "silu_"), "SiLU", "silu"),
    (("hardswish", "hardswish_"), "Hardswish", "hardswish"),  # x * relu6(x + 3) / 6
):
    for _op in _ops:
        _packet = getattr(_aten, _op, None)
        if _packet is not None:
            for _overload in _packet.overloads():
                _ATEN[getattr(_packet, _overload)] = (_kind, _name)

_MODULE_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.ReLU6, "ReLU6"),
    (nn.ReLU, "ReLU"),
    (nn.LeakyReLU, "LeakyReLU"),
    (nn.PReLU, "PReLU"),
    (nn.GELU, "GELU"),
    (nn.SiLU, "SiLU"),
    (nn.Hardswish, "Hardswish"),
)


def _references() -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor], float]]:
    import torch.nn.functional as F

    return [
        ("ReLU", torch.relu, 1e-6),
        ("ReLU6", lambda x: x.clamp(0, 6), 1e-6),
        ("GELU", F.gelu, 2.5e-2),  # erf, tanh and sigmoid (QuickGELU) forms are all within this
        ("SiLU", F.silu, 1e-4),
        ("Hardswish", F.hardswish, 1e-5),
    ]


@torch.no_grad()
def _probe(module: nn.Module) -> str | None:
    """The kind a parameter-free module computes on a probe input, or None."""
    x = torch.linspace(-8.0, 8.0, 2001, dtype=torch.float32).reshape(3, 667)
    try:
        y = module(x.clone())
    except Exception:  # not an elementwise function of one tensor
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or not y.is_floating_point():
        return None
    y = y.float()
    if not torch.isfinite(y).all():
        return None
    best, err = None, math.inf
    for kind, fn, tol in _references():
        e = float((y - fn(x)).abs().max())
        if e <= tol and e < err:
            best, err = kind, e
    if best is None:  # leaky: x for x > 0, a·x with 0 < a < 1 for x < 0
        pos, neg = x > 0, x < 0
        a = float((y[neg] / x[neg]).mean())
        if (0 < a < 1 and torch.allclose(y[pos], x[pos], atol=1e-6)
                and torch.allclose(y[neg], a * x[neg], atol=1e-5)):
            best = "LeakyReLU"
    return best


def module_kind(module: nn.Module) -> str | None:
    """The rectifier kind a module's whole forward computes, or None (see the module doc)."""
    kind = getattr(module, "easier_kind", None)  # an edited site keeps the kind it replaced
    if isinstance(kind, str):
        return kind
    for cls, k in _MODULE_KINDS:
        if isinstance(module, cls):
            return k
    if isinstance(module, nn.Hardtanh):
        return "ReLU6" if module.min_val == 0 else None
    if type(module).__module__.startswith("torch.") or next(module.children(), None) is not None:
        return None
    if next(module.parameters(recurse=False), None) is not None:
        return None
    cache = module.__dict__.setdefault("_easier_probe", {})
    if "kind" not in cache:
        with eval_mode(module):
            cache["kind"] = _probe(module)
    return cache["kind"]


def module_sites(model: nn.Module, kinds: Sequence[str] = KINDS) -> dict[str, nn.Module]:
    """Activation modules of the given kinds, by qualified name."""
    return {name: m for name, m in model.named_modules()
            if (k := module_kind(m)) is not None and k in kinds
            and not getattr(m, "easier_linearized", False)}


def is_rectifier_op(target: Any) -> bool:
    """Whether ``target`` (a graph node's target) is one of the rectifier aten ops."""
    return target in _ATEN


def aten_kind(node: fx.Node) -> tuple[str, str] | None:
    """(kind, op name used in site names) when ``node`` calls a rectifier op, else None."""
    if node.op != "call_function" or node.target not in _ATEN:
        return None
    kind, op = _ATEN[node.target]
    if op == "relu6" and "hardtanh" in str(node.target):
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        if lo != 0:
            return None
    return kind, op


def check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SiteError(f"unknown activation kind(s) {unknown}; valid kinds: {list(KINDS)}")
    return kinds
