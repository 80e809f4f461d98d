"""LaCoOT: collapse whole blocks whose output distribution matches their input (Quétu et al., 2025).

Training adds ``lam * mean_b MSW_2(in_b, out_b)`` over the candidate blocks ``b``; afterwards
the blocks are ranked by that distance on validation data and replaced by ``nn.Identity``,
lowest first, while the loop's accuracy rule (``baseline - delta``) holds. No fine-tuning after
a removal unless ``finetune_after=True``. Nothing needs folding: the removed blocks are gone.

Where each part comes from (tags as in ``research/siblings.md`` §3):

* Taken from the reference implementation's behaviour (``VGCQ/LaCoOT`` with POT's
  ``ot.sliced.max_sliced_wasserstein_distance`` defaults): 50 Gaussian directions normalised to
  unit length, redrawn at every call; 1-D ``W_2^2`` of equal-size clouds by sorting; MSW =
  square root of the largest ``W_2^2`` over the slices (no optimisation over directions); each
  sample's features flattened into one point; loss = CE + ``lam`` times the plain mean over
  the monitored blocks, at every training step; the candidates of ResNet-18 (``layerK.1``, the
  four non-downsampling second blocks; ``layerK.0`` never), Swin-T (all 12 transformer blocks)
  and MobileNetV2 (the stride-1 depthwise conv-BN-ReLU6 units ``features[k].conv[1]`` of the
  expanded blocks: 13 on the CIFAR variant, 12 on the ImageNet one); the published ``lam``
  values (ResNet-18 CIFAR-10 5, MobileNetV2 CIFAR-10 9, Swin-T CIFAR-10 0.1, Swin-T
  Tiny-ImageNet 1); no fine-tuning after removal; validation MSW ranks the blocks, removed
  cumulatively in ascending order (the MobileNetV2 script).
* Reconstructed from the paper's text (via a third-party note): remove the block with the
  smallest MSW, re-evaluate, continue while the accuracy drop stays within a threshold.
* Our choices: points are ``reshape(x.shape[0], -1)`` (the reference's ``reshape(batch_size,
  -1)`` silently mixes samples of a partial batch); Swin blocks compare block input with block
  output (the reference compares the input with the MLP branch before the residual add); the
  ResNet order is by MSW, not the reference's fixed deepest-first order; Swin is ranked by MSW,
  not the reference's ``|z-score| + percentile``; the MobileNetV2 script's off-by-one mapping
  is not reproduced; the validation MSW of a block is the batch-size-weighted mean of per-batch
  MSWs with directions from a generator seeded per iteration (reproducible across resumes);
  the ranking is computed once and reused (``rescore=False``, the default unless fine-tuning,
  as the reference ranks once from its CSV); the threshold is the loop's ``delta``; the square
  root has a zero gradient at exactly 0 (POT's would be NaN); the shape-based rule for models
  other than ResNet/Swin/MobileNetV2 (see :func:`candidate_blocks`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from ..linearize import replace_with_identity
from ..sites import KINDS, EasierWarning
from .base import Context, Method, Step, register_method

__all__ = [
    "Lacoot",
    "MSWRegularizer",
    "block_distances",
    "candidate_blocks",
    "max_sliced_wasserstein",
    "wasserstein2_1d",
]

RULES = ("auto", "paper", "generic")
PUBLISHED_LAMBDAS = {  # [code] README/CSV of VGCQ/LaCoOT
    "resnet18/cifar10": 5.0,
    "mobilenet_v2/cifar10": 9.0,
    "swin_t/cifar10": 0.1,
    "swin_t/tiny-imagenet-200": 1.0,
}
_SWIN_BLOCKS = ("SwinTransformerBlock", "SwinTransformerBlockV2")
_RESNET_BLOCKS = ("BasicBlock", "Bottleneck")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# block classes that survive the removal of every candidate (layerK.0, PatchMerging, ...)
_FAMILY = (*_RESNET_BLOCKS, *_SWIN_BLOCKS, "InvertedResidual", "PatchMerging", "PatchMergingV2")


# ---------------------------------------------------------------------------------------------
# the distance


def wasserstein2_1d(u: Tensor, v: Tensor) -> Tensor:
    """Squared 2-Wasserstein distance per column between equal-size 1-D clouds ``(n, P)``.

    With uniform weights and equal sizes the optimal plan matches the sorted samples.
    """
    return (u.sort(dim=0).values - v.sort(dim=0).values).pow(2).mean(dim=0)


def _sqrt0(v: Tensor) -> Tensor:
    """sqrt with gradient 0 (not NaN) at exactly 0: identical clouds give a finite loss."""
    return torch.where(v > 0, v.clamp_min(1e-30).sqrt(), torch.zeros_like(v))


def max_sliced_wasserstein(
    x: Tensor,
    y: Tensor,
    n_projections: int = 50,
    *,
    generator: torch.Generator | None = None,
    directions: Tensor | None = None,
) -> Tensor:
    """Return ``MSW_2`` between two point clouds, one point per sample (differentiable).

    Each sample is flattened into a point, ``reshape(n, -1)``. The maximum runs over
    ``n_projections`` random unit directions drawn from ``generator`` (torch's global RNG when
    None), or over the columns of ``directions`` ``(d, P)`` when given (normalised here).
    """
    if x.shape[0] != y.shape[0] or x[0].numel() != y[0].numel():
        raise DataError(
            f"MSW compares clouds of equal size and dimension, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}: only blocks whose input and output shapes are equal can be "
            "replaced by identity; choose other blocks"
        )
    dtype = torch.promote_types(x.dtype, torch.float32)
    xs, ys = x.reshape(x.shape[0], -1).to(dtype), y.reshape(y.shape[0], -1).to(dtype)
    if directions is None:
        if n_projections < 1:
            raise ConfigError(f"n_projections={n_projections}: need at least 1 direction")
        directions = torch.randn(
            xs.shape[1], n_projections, generator=generator, device=xs.device, dtype=dtype
        )
    else:
        directions = directions.to(device=xs.device, dtype=dtype)
    directions = directions / directions.norm(dim=0, keepdim=True)
    return _sqrt0(wasserstein2_1d(xs @ directions, ys @ directions).max())


# ---------------------------------------------------------------------------------------------
# candidate blocks


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


# ---------------------------------------------------------------------------------------------
# regularizer and scoring


class _Capture:
    """Forward hooks that keep the latest (input, output) of each named block."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.feats: dict[str, tuple[Tensor, Tensor]] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]
        self.active = True

    def _hook(self, name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
                self.feats.pop(name, None)  # re-insert: dict order = call order
                self.feats[name] = (args[0], output)

        return fn

    def take(self) -> dict[str, tuple[Tensor, Tensor]]:
        feats, self.feats = self.feats, {}
        return feats

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.active = False
        self.feats = {}


class MSWRegularizer:
    """``lam`` times the mean MSW between input and output batch of every candidate block.

    ``attach(model)`` hooks the candidate blocks of that model (the training loop calls it and
    removes the returned handle afterwards); ``__call__(model)`` turns the features captured in
    the current forward pass into the loss term and forgets them. Directions come from torch's
    global RNG, so a seeded run is reproducible.
    """

    def __init__(self, lam: float, n_projections: int, blocks: Callable[[nn.Module], list[str]]):
        self.lam = lam
        self.n_projections = n_projections
        self.blocks = blocks
        self._captures: dict[int, _Capture] = {}

    def attach(self, model: nn.Module) -> _Capture:
        names = self.blocks(model)
        if not names:
            warnings.warn(
                f"lacoot: {type(model).__name__} has no candidate block, so the "
                "regularizer is 0 and nothing can be removed; pass blocks=[...]",
                EasierWarning,
                stacklevel=2,
            )
        capture = _Capture(model, names)
        self._captures = {k: c for k, c in self._captures.items() if c.active}
        self._captures[id(model)] = capture
        return capture

    def __call__(self, model: nn.Module) -> Tensor:
        capture = self._captures.get(id(model))
        if capture is None or not capture.active:
            raise ConfigError(
                "the lacoot regularizer sees no block features: call "
                "attach(model) before training (easier.train.fine_tune does)"
            )
        feats = capture.take()
        if not feats:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            return torch.zeros((), device=device)
        total = sum(max_sliced_wasserstein(a, b, self.n_projections) for a, b in feats.values())
        return self.lam * total / len(feats)


@torch.no_grad()
def block_distances(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Any]] | Sequence[Tensor],
    blocks: Sequence[str],
    n_projections: int = 50,
    *,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Return each block's MSW between its input and output, in eval mode.

    Per batch one MSW with fresh directions; the result is the batch-size-weighted mean.
    """
    capture = _Capture(model, blocks)
    sums = dict.fromkeys(blocks, 0.0)
    seen = 0
    was = model.training
    model.eval()
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
            feats = capture.take()
            missing = [n for n in blocks if n not in feats]
            if missing:
                raise ConfigError(
                    f"block(s) {missing} did not run in the forward pass (or "
                    "did not take and return one tensor): choose other blocks"
                )
            for name in blocks:
                a, b = feats[name]
                d = max_sliced_wasserstein(a, b, n_projections, generator=generator)
                sums[name] += float(d) * a.shape[0]
            seen += x.shape[0]
    finally:
        capture.remove()
        model.train(was)
    if seen == 0:
        raise DataError("lacoot needs validation data to rank the blocks; got no batch")
    return {n: s / seen for n, s in sums.items()}


# ---------------------------------------------------------------------------------------------
# the method


@register_method
class Lacoot(Method):
    """Regularize block in/out distances in training, then drop the closest blocks.

    Options: ``lam`` (regularizer weight; 5 is the paper's ResNet-18/CIFAR-10 value, see
    ``PUBLISHED_LAMBDAS``), ``n_projections`` (random directions per MSW), ``blocks`` (rule or
    names, see :func:`candidate_blocks`), ``input_shape`` (for the shape rule on models outside
    easier.models), ``score_batches`` (validation batches used for the ranking, None = all),
    ``finetune_after`` (fine-tune after each removal; the paper does not), ``rescore`` (measure
    again every iteration; default: only when fine-tuning, else rank once and reuse).
    """

    name = "lacoot"
    description = "lowest max-sliced Wasserstein distance block -> identity (LaCoOT)"
    unit = "block"
    finetune = False  # the paper's default; each instance sets its own from finetune_after

    def __init__(
        self,
        lam: float = 5.0,
        n_projections: int = 50,
        blocks: str | Sequence[str] = "auto",
        input_shape: Sequence[int] | None = None,
        score_batches: int | None = None,
        finetune_after: bool = False,
        rescore: bool | None = None,
    ):
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not lam >= 0:
            raise ConfigError(f"lam={lam!r}: the regularizer weight must be a number >= 0")
        if (
            not isinstance(n_projections, int)
            or isinstance(n_projections, bool)
            or n_projections < 1
        ):
            raise ConfigError(f"n_projections={n_projections!r}: need an integer >= 1")
        if score_batches is not None and (not isinstance(score_batches, int) or score_batches < 1):
            raise ConfigError(f"score_batches={score_batches!r}: need None (all) or >= 1")
        if isinstance(blocks, str):
            if blocks not in RULES:
                raise ConfigError(
                    f"blocks={blocks!r}: give a rule {list(RULES)} or a list of module names"
                )
        elif not all(isinstance(b, str) for b in blocks) or not blocks:
            raise ConfigError(f"blocks={blocks!r}: give a non-empty list of module names")
        self.lam = float(lam)
        self.n_projections = n_projections
        self.blocks: str | list[str] = blocks if isinstance(blocks, str) else list(blocks)
        self.input_shape = None if input_shape is None else [int(s) for s in input_shape]
        self.score_batches = score_batches
        self.finetune = bool(finetune_after)  # type: ignore[misc]  # per instance
        self.rescore = self.finetune if rescore is None else bool(rescore)
        self._scores: dict[str, float] | None = None

    def options(self) -> dict[str, Any]:
        return {
            "lam": self.lam,
            "n_projections": self.n_projections,
            "blocks": self.blocks,
            "input_shape": self.input_shape,
            "score_batches": self.score_batches,
            "finetune_after": self.finetune,
            "rescore": self.rescore,
        }

    def units(self, model: nn.Module, kinds: Sequence[str] = KINDS) -> list[str]:
        return candidate_blocks(model, self.blocks, self.input_shape)

    def regularizer(self) -> MSWRegularizer | None:
        if self.lam == 0:
            return None
        return MSWRegularizer(self.lam, self.n_projections, self.units)

    def score(self, ctx: Context) -> dict[str, float]:
        """MSW of every remaining block on the validation batches (seeded per iteration)."""
        gen = torch.Generator(device=ctx.device).manual_seed(ctx.rng.getrandbits(63))
        return block_distances(
            ctx.model,
            ctx.val_batches(self.score_batches),
            ctx.remaining,
            self.n_projections,
            generator=gen,
        )

    def step(self, ctx: Context) -> Step:
        known = self._scores
        if (
            self.rescore
            or not ctx.removed
            or known is None
            or any(u not in known for u in ctx.remaining)
        ):
            known = self._scores = self.score(ctx)
        scores = {u: known[u] for u in ctx.remaining}
        order = {n: i for i, n in enumerate(ctx.remaining)}
        chosen: list[str] = []
        for name in sorted(ctx.remaining, key=lambda n: (scores[n], order[n])):
            if len(chosen) == ctx.k:
                break
            if not any(name.startswith(c + ".") or c.startswith(name + ".") for c in chosen):
                chosen.append(name)
        return Step(
            replace_with_identity(ctx.model, chosen),
            chosen,
            scores,
            "lowest block MSW" + (" (re-measured)" if self.rescore else " (ranked once)"),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"scores": None if self._scores is None else dict(self._scores)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scores = state.get("scores")
        self._scores = None if scores is None else {str(k): float(v) for k, v in scores.items()}
