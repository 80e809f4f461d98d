"""Which blocks LaCoOT may replace by identity: the reference's per architecture, or by shape.

See :func:`candidate_blocks`; provenance in the docstring of :mod:`easier.methods.lacoot`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from easier.errors import ConfigError

__all__ = ["RULES", "candidate_blocks"]

RULES = ("auto", "paper", "generic")
_SWIN_BLOCKS = ("SwinTransformerBlock", "SwinTransformerBlockV2")
_RESNET_BLOCKS = ("BasicBlock", "Bottleneck")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# block classes that survive the removal of every candidate (layerK.0, PatchMerging, ...)
_FAMILY = (*_RESNET_BLOCKS, *_SWIN_BLOCKS, "InvertedResidual", "PatchMerging", "PatchMergingV2")



def _is_leaf(m: nn.Module) -> bool:
    return next(m.children(), None) is None


def _is_stage(m: nn.Module) -> bool:
    """A container that only groups blocks (e.g. a ResNet stage): looked into, never a block.

    Identities count as removed blocks, so a stage stays a stage after LaCoOT removals.
    """
    return isinstance(m, _CONTAINERS) and all(
        isinstance(c, nn.Identity) or not _is_leaf(c) for c in m.children()
    )


def _depthwise_stride1(unit: nn.Module) -> bool:
    first = unit[0] if isinstance(unit, nn.Sequential) and len(unit) else None
    return (
        isinstance(first, nn.Conv2d)
        and first.groups == first.in_channels == first.out_channels
        and all(s == 1 for s in first.stride)
    )


def _paper_family(model: nn.Module) -> bool:
    """Whether ``model`` is a ResNet, Swin or MobileNetV2, even with all its candidates removed."""
    return any(type(m).__name__ in _FAMILY for m in model.modules())


def _paper_blocks(model: nn.Module) -> list[str]:
    """The reference's candidates, found by block class name (easier.models and torchvision)."""
    out = []
    for name, m in model.named_modules():
        kind = type(m).__name__
        index = name.rpartition(".")[2]
        if kind in _RESNET_BLOCKS:
            # layerK.0 is never a candidate: the reference compares consecutive block outputs
            if index.isdigit() and int(index) >= 1 and getattr(m, "downsample", None) is None:
                out.append(name)
        elif kind in _SWIN_BLOCKS:
            out.append(name)
        elif kind == "InvertedResidual":
            conv = getattr(m, "conv", None)
            # expanded blocks only (expand, dw, project, BN): the t=1 block's dw unit is conv[0]
            if isinstance(conv, nn.Sequential) and len(conv) == 4 and _depthwise_stride1(conv[1]):
                out.append(f"{name}.conv.1")
    return out


@torch.no_grad()
def _io_shapes(model: nn.Module, example: Tensor) -> dict[str, tuple[Any, Any, int]]:
    """Per module: (first input shape, output shape, number of calls) on ``example``."""
    seen: dict[str, tuple[Any, Any, int]] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            a = tuple(args[0].shape) if args and isinstance(args[0], Tensor) else None
            o = tuple(output.shape) if isinstance(output, Tensor) else None
            calls = seen[name][2] + 1 if name in seen else 1
            seen[name] = (a, o, calls) if calls == 1 else (seen[name][0], seen[name][1], calls)

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return seen


def _generic_blocks(model: nn.Module, example: Tensor) -> list[str]:
    """Outermost non-leaf, non-stage modules called once that map a shape to the same shape."""
    shapes = _io_shapes(model, example)
    out: list[str] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if _is_leaf(child):
                continue
            a, o, calls = shapes.get(name, (None, None, 0))
            if calls == 1 and a is not None and a == o and not _is_stage(child):
                out.append(name)
            else:
                walk(name, child)

    walk("", model)
    return out


def _example_input(model: nn.Module, input_shape: Sequence[int] | None) -> Tensor:
    if input_shape is None:
        spec = getattr(model, "easier_spec", None) or {}
        if "in_channels" not in spec or "image_size" not in spec:
            raise ConfigError(
                f"lacoot's shape rule needs an example input, but {type(model).__name__} is not "
                "from easier.models: pass input_shape=(C, H, W) (one sample, no batch axis) or "
                "name the blocks with blocks=[...]"
            )
        input_shape = (spec["in_channels"], spec["image_size"], spec["image_size"])
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # a private generator: finding blocks must not move the global RNG of a seeded run
    return torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)


def _present(model: nn.Module, name: str) -> bool | None:
    """True if ``name`` is a live module, False if it (or an ancestor) is an identity, None if
    it never existed."""
    mod: nn.Module = model
    for part in name.split("."):
        if isinstance(mod, nn.Identity):
            return False
        child = mod._modules.get(part)
        if child is None:
            return None
        mod = child
    return not isinstance(mod, nn.Identity)


def candidate_blocks(
    model: nn.Module,
    blocks: str | Sequence[str] = "auto",
    input_shape: Sequence[int] | None = None,
) -> list[str]:
    """Return the names of the blocks LaCoOT may still replace by identity, in model order.

    ``blocks`` is a rule or an explicit list of module names:

    * ``"paper"``: the reference's candidates, by block class: ResNet ``BasicBlock``/
      ``Bottleneck`` without a downsample shortcut except the first block of each stage (4 on
      ResNet-18); every Swin transformer block (12 on Swin-T); the stride-1 depthwise unit
      ``conv.1`` of every expanded MobileNetV2 ``InvertedResidual`` (13 CIFAR / 12 ImageNet);
    * ``"generic"``: on one example input (``input_shape``, or the model's ``easier_spec``), the
      outermost submodules that are not the root, not a leaf layer, not a container of blocks
      (a stage), are called once, and map their input shape to the same output shape;
    * ``"auto"`` (default): ``"paper"`` for a ResNet, Swin or MobileNetV2 (recognised by its
      block classes, which stay after every candidate is removed), else ``"generic"``.

    Blocks already replaced by ``nn.Identity`` are left out. easier's ``convnet``, ``vgg16_bn``,
    ``lenet`` and ``mlp`` hold no such block (their layers are leaves of one module): name
    identity-shaped modules explicitly to use LaCoOT on them.
    """
    if isinstance(blocks, str):
        if blocks not in RULES:
            raise ConfigError(f"blocks={blocks!r}: give a rule {list(RULES)} or a list of names")
        if blocks == "paper" or (blocks == "auto" and _paper_family(model)):
            return _paper_blocks(model)
        return _generic_blocks(model, _example_input(model, input_shape))
    out = []
    for name in blocks:
        live = _present(model, name)
        if live is None:
            valid = [n for n, m in model.named_modules() if n and not _is_leaf(m)]
            raise ConfigError(
                f"block {name!r} is not a module of {type(model).__name__}; "
                f"non-leaf modules: {valid[:20]}"
            )
        if live:
            out.append(name)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(out, key=order.__getitem__)
