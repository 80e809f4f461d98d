"""TLC, "Till the Layers Collapse" (Liao et al., AAAI 2025): BN-guided layer collapse.

A BN output channel is modelled as ``z ~ N(beta, gamma^2)``. Collapsing a site removes its
mostly-OFF channels (``beta <= 0``: the producing conv/linear filters are masked to zero and the
BN's gamma and beta of those channels are set to 0, so the channel is exactly 0) and linearizes
the rest (the activation becomes the identity). Candidate sites are ranked by how much the
validation loss rises when each is collapsed alone; the lowest gap goes first.

Provenance (``ZhuLIAO001/TLC``, ``TLC_ResNet18.py``, ``TLC_VGG16bn.py``, ``TLC_SwinT.py``):

* **Taken from the reference code:** OFF means ``beta <= 0`` and those conv filters are masked;
  the score is the loss gap ``L(collapsed) - L(current)`` in eval mode on the *first* validation
  batch (``testVal`` breaks after one batch; ``batches=1`` here); the joint rule
  (``select="joint"``): sort by gap; if the smallest gap is negative, collapse the ``k`` lowest
  jointly for ``k = 2 .. n-1`` and take the first ``k`` whose joint gap is ``> 0``, that layer
  included; otherwise, or if no ``k`` flips the sign, take the single lowest; without BN,
  ``beta``/``gamma`` are the per-feature mean and std (``torch.std``) of the pre-activation on
  validation data and the producing Linear's rows with mean ``<= 0`` are masked; the ON/OFF
  error likelihood ``Phi(-|beta| / |gamma|)`` is computed but not used to rank (recorded here).
* **Reconstructed from the paper text:** the reading of ``beta > 0`` as "mostly ON, linearize"
  and ``beta <= 0`` as "mostly OFF, remove", with the removed channels' layer then foldable.
* **Our choices:** a site's BN is found on the model's ``torch.export`` capture (the BN whose
  output, through dropout only, is the site's pre-activation), not by module names, so a post-add
  ReLU (ResNet ``relu2``) has no BN and uses the statistics path with nothing to mask (the
  reference pairs ``bn2`` with ``relu2`` and zeroes residual-branch channels); BN gamma *and*
  beta are zeroed for ``beta <= 0`` (the reference zeroes them for ``beta < 0`` only) and are
  *kept* at zero through fine-tuning by :meth:`TLC.after_step` (the reference leaves them
  trainable, so a channel can regrow as a constant); the producer's bias is masked with its
  weight; a producer or BN is masked only when its output feeds nothing but this site; the
  statistics path uses the same batches as the ranking; ``select="lowest"`` takes the ``k``
  lowest gaps (``k`` from the loop), and ``select="joint"`` does too when the loop asks for
  ``k > 1`` (one-shot); candidates are scored on the plain linearization (no padding
  relocation, which would add a border change to the gap) and only the chosen site(s) are
  relocated for folding. Stopping is the shared loop's accuracy rule instead of the reference's
  "one activation left or val accuracy < 20%".

Noise: with ``batches=1`` every candidate is scored on the same batch (a paired comparison),
but gaps smaller than the batch-to-batch spread of the loss (about ``std(CE) / sqrt(batch)``)
rank by chance; raise ``batches`` (``None`` = the whole validation set) for a steadier order.
The joint rule may remove more than one site per iteration, so it can overshoot
``max_removals`` on its last iteration (use ``select="lowest"`` for an exact budget).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from easier.edit.recalibrate import reestimate_bn
from easier.errors import ConfigError, SiteError, StateError
from easier.graph.capture import Capture, default_example, flat_inputs
from easier.graph.sites import KINDS, GraphSite, graph_sites
from easier.methods._lib.graph_walk import (
    capture_for,
    layer_calls,
    module_of,
    norm_input,
    pass_input,
)
from easier.methods.base import Context, Method, Step, register_method

__all__ = ["TLC", "Collapse", "apply_masks", "collapse_plans", "select_joint"]

SELECT = ("joint", "lowest")
_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class Collapse:
    """How one site collapses: its per-channel ``beta``/``gamma`` and the parameters masked.

    ``source`` is ``"bn"`` (the BN's bias and |weight|) or ``"stats"`` (mean and std of the
    pre-activation on validation data). ``masks`` maps parameter names to the boolean
    channels (along dim 0) set to zero: the OFF channels, ``beta <= 0``.
    """

    site: str
    source: str
    beta: torch.Tensor
    gamma: torch.Tensor
    bn: str | None
    producer: str | None
    masks: dict[str, torch.Tensor]

    @property
    def off(self) -> torch.Tensor:
        return self.beta <= 0

    def error(self) -> float:
        """Mean likelihood that a channel's ON/OFF decision is wrong: ``Phi(-|beta|/gamma)``."""
        z = -self.beta.abs() / self.gamma.clamp_min(1e-30)
        e = torch.where(
            self.gamma > 0, 0.5 * (1 + torch.erf(z / math.sqrt(2))), torch.zeros_like(z)
        )
        return float(e.mean()) if e.numel() else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "bn": self.bn,
            "producer": self.producer,
            "channels": int(self.beta.numel()),
            "off": int(self.off.sum()),
            "masked": sorted(self.masks),
            "error": self.error(),
        }


def _source(site: GraphSite) -> tuple[fx.Node, bool]:
    """The node behind dropout/clone ops that feeds ``site``, and whether every link on the way
    has no other user (only then may its channels be zeroed without side effects).
    """
    node, users = site.input, set(site.nodes)
    alone = True
    while True:
        alone = alone and set(node.users) <= users
        src = pass_input(node)
        if src is None:
            return node, alone
        users, node = {node}, src


def _producer_masks(
    model: nn.Module, node: Any, calls: Counter[str], channels: int, off: torch.Tensor
) -> tuple[str | None, dict[str, torch.Tensor]]:
    name = module_of(model, node, _PRODUCERS)
    if name is None or calls[name] != 1:
        return None, {}
    mod = model.get_submodule(name)
    out = mod.out_channels if isinstance(mod, nn.modules.conv._ConvNd) else mod.out_features
    if out != channels:
        return None, {}
    masks = {f"{name}.weight": off.clone()}
    if mod.bias is not None:
        masks[f"{name}.bias"] = off.clone()
    return name, masks


@torch.no_grad()
def _values(
    cap: Capture, wanted: set[str], batches: Sequence[tuple[Any, torch.Tensor]]
) -> dict[str, list[torch.Tensor]]:
    """Values of the named nodes of the capture on each batch (eval mode)."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in wanted}

    class _Values(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.name in got and isinstance(out, torch.Tensor):
                got[n.name].append(out.detach())
            return out

    for x, _ in batches:
        _Values(cap.gm).run(*flat_inputs(cap.gm, x))
    return got


def collapse_plans(
    model: nn.Module,
    sites: Sequence[str],
    batches: Sequence[tuple[Any, torch.Tensor]] | None = None,
    *,
    kinds: Sequence[str] = KINDS,
    example_input: Any = None,
) -> dict[str, Collapse]:
    """How to collapse each site of ``model``: from its BN, else from validation statistics.

    The BN and producer of each site are found on the model's ``torch.export`` capture, made on
    ``example_input`` (default: the first batch's input, else the model's spec). ``batches``
    (input, target) pairs are needed only for sites without a BN in front.
    """
    if example_input is None and batches and default_example(model) is None:
        example_input = batches[0][0]
    cap = capture_for(model, example_input, "TLC", "TLC finds each site's BN")
    located = {g.site.name: g for g in graph_sites(model, cap, kinds)}
    unknown = [s for s in sites if s not in located]
    if unknown:
        raise SiteError(f"unknown site(s) {unknown}; valid sites: {list(located)}")
    calls = layer_calls(model, cap.gm)
    plans: dict[str, Collapse] = {}
    pending: list[tuple[str, fx.Node, bool]] = []
    for name in sites:
        src, alone = _source(located[name])
        found = norm_input(model, src)
        bn = model.get_submodule(found[0]) if found is not None else None
        if found is None or calls[found[0]] != 1 or not bn.affine:
            pending.append((name, src, alone))
            continue
        path, before, op = found
        beta, gamma = bn.bias.detach().cpu().clone(), bn.weight.detach().abs().cpu().clone()
        off = beta <= 0
        masks = {}
        if alone:
            masks = {f"{path}.weight": off.clone(), f"{path}.bias": off.clone()}
        producer, more = None, {}
        if alone and set(before.users) == {op}:
            producer, more = _producer_masks(model, before, calls, bn.num_features, off)
        plans[name] = Collapse(name, "bn", beta, gamma, path, producer, {**more, **masks})
    if pending:
        if not batches:
            raise ConfigError(
                f"site(s) {[p[0] for p in pending]} have no BN in front, so TLC needs validation "
                "batches for their statistics; pass validation data"
            )
        values = _values(cap, {located[n].input.name for n, _, _ in pending}, batches)
        for name, src, alone in pending:
            parts = values[located[name].input.name]
            ndim = parts[0].dim()
            axis = (located[name].site.channel_axis or 1) % ndim if ndim > 1 else 0
            flat = torch.cat([p.movedim(axis, 0).reshape(p.shape[axis], -1) for p in parts], 1)
            flat = flat.float().cpu()
            beta = flat.mean(1)
            gamma = flat.std(1) if flat.shape[1] > 1 else torch.zeros_like(beta)
            producer, masks = None, {}
            own = module_of(model, src, _PRODUCERS)
            is_conv = own is not None and isinstance(model.get_submodule(own),
                                                     nn.modules.conv._ConvNd)
            own_axis = 1 if is_conv else ndim - 1
            if own is not None and alone and axis == own_axis:
                producer, masks = _producer_masks(model, src, calls, beta.numel(), beta <= 0)
            plans[name] = Collapse(name, "stats", beta, gamma, None, producer, masks)
    return plans


@torch.no_grad()
def apply_masks(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    cache: dict[tuple[str, torch.device], torch.Tensor] | None = None,
) -> None:
    """Set the masked channels (dim 0) of the named parameters of ``model`` to zero, in place.

    ``cache`` keeps the masks already moved to each parameter's device (called every step).
    """
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module  # training may pass the wrapped model
    for name, mask in masks.items():
        try:
            p = model.get_parameter(name)
        except AttributeError:
            raise StateError(
                f"TLC mask for parameter {name!r} does not fit this model (no such parameter); "
                "masks belong to the run that made them: start a new run or pass its model"
            ) from None
        m = None if cache is None else cache.get((name, p.device))
        if m is None:
            m = mask.to(p.device).reshape(-1, *([1] * (p.dim() - 1)))
            if cache is not None:
                cache[(name, p.device)] = m
        p.masked_fill_(m, 0)


def select_joint(
    gaps: dict[str, float], joint_gap: Callable[[list[str]], float], limit: int | None = None
) -> tuple[list[str], list[dict[str, Any]]]:
    """The reference's rule: sites chosen from per-site gaps, plus the joint gaps it tried.

    ``gaps`` is in model order (ties go to the earlier site); ``joint_gap(sites)`` is the loss
    gap of collapsing those sites together. ``limit`` caps the sites chosen (the run's
    ``max_removals`` budget): the joint set stops growing there and is taken as it is.
    """
    order = {n: i for i, n in enumerate(gaps)}
    ranked = sorted(gaps, key=lambda n: (gaps[n], order[n]))
    tried: list[dict[str, Any]] = []
    if limit is not None and limit < 1:
        return [], tried
    if ranked and gaps[ranked[0]] < 0:
        for k in range(2, len(ranked)):
            if limit is not None and k > limit:
                return ranked[:limit], tried
            gap = joint_gap(ranked[:k])
            tried.append({"k": k, "gap": gap})
            if gap > 0:
                return ranked[:k], tried
    return ranked[:1], tried


@register_method
class TLC(Method):
    """Collapse the site(s) whose BN-guided collapse raises the validation loss least.

    ``batches`` is how many validation batches score the candidates (1 as in the reference;
    None for all); ``select`` is ``"joint"`` (the reference rule) or ``"lowest"``.
    ``bn_batches`` training batches re-estimate the BN statistics of every collapsed candidate
    before its loss is taken (:func:`easier.edit.recalibrate.reestimate_bn`): a loss gap measured
    with the dense model's statistics mostly measures how stale they are. 0 scores as the
    reference does (and as runs made before this option did).
    """

    name = "tlc"
    description = "BN-guided collapse, lowest validation-loss gap first (TLC, Liao et al.)"

    def __init__(self, batches: int | None = 1, select: str = "joint", bn_batches: int = 4):
        if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 0:
            raise ConfigError(f"bn_batches={bn_batches!r}: must be an integer >= 0")
        self.bn_batches = bn_batches
        if select not in SELECT:
            raise ConfigError(f"select={select!r}; valid: {list(SELECT)}")
        if batches is not None and (
            isinstance(batches, bool) or not isinstance(batches, int) or batches < 1
        ):
            raise ConfigError(f"batches={batches!r}: must be a positive integer or None (all)")
        self.batches = batches
        self.select = select
        self.masks: dict[str, torch.Tensor] = {}
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    def options(self) -> dict[str, Any]:
        # bn_batches=0 is recorded as before the option existed, so those runs still resume
        return {"batches": self.batches, "select": self.select,
                **({"bn_batches": self.bn_batches} if self.bn_batches else {})}

    def prepare(self, model: nn.Module) -> nn.Module:
        self.masks, self._on_device = {}, {}  # a fresh run starts without masks
        return model

    def _collapsed(
        self, ctx: Context, plans: dict[str, Collapse], sites: list[str], fold_ready: bool | None
    ) -> nn.Module:
        if fold_ready is False:  # a candidate, scored only: switched by name, no capture (fast)
            model = ctx.linearize(sites, fold_ready=False, capture=False)
        else:
            model = ctx.linearize(sites, fold_ready=fold_ready)
        for s in sites:
            apply_masks(model, plans[s].masks)
        if fold_ready is False and self.bn_batches and ctx.train_eval is not None:
            reestimate_bn(model, ctx.train_eval, batches=self.bn_batches,
                          batch_size=ctx.batch_size, input_key=ctx.input_key)
        return model

    def step(self, ctx: Context) -> Step:
        if ctx.val is None:
            raise ConfigError("TLC ranks sites by validation loss: pass validation data")
        batches = ctx.val_batches(self.batches)
        plans = collapse_plans(ctx.model, ctx.remaining, batches, kinds=ctx.kinds,
                               example_input=ctx.example)
        base = ctx.loss(ctx.model, batches)

        def gap(sites: list[str]) -> float:
            # scored without padding relocation: the gap is the collapse's, not the border's
            return ctx.loss(self._collapsed(ctx, plans, sites, False), batches) - base

        gaps = {s: gap([s]) for s in ctx.remaining}
        tried: list[dict[str, Any]] = []
        if self.select == "joint" and ctx.k == 1:
            chosen, tried = select_joint(gaps, gap, ctx.max_k)
            reason = f"joint: {len(chosen)} lowest gaps" if len(chosen) > 1 else "lowest loss gap"
        else:
            order = {n: i for i, n in enumerate(ctx.remaining)}
            chosen = sorted(ctx.remaining, key=lambda n: (gaps[n], order[n]))[: ctx.k]
            reason = f"{len(chosen)} lowest loss gap(s)"
        model = self._collapsed(ctx, plans, chosen, None)  # fold-ready if the run is
        for s in chosen:
            for name, mask in plans[s].masks.items():
                old = self.masks.get(name)
                self.masks[name] = mask.clone() if old is None else old | mask
        self._on_device = {}
        info = {
            "tlc": {
                "base_loss": base,
                "batches": len(batches),
                "joint": tried,
                "sites": {s: plans[s].to_dict() for s in ctx.remaining},
            }
        }
        return Step(model, chosen, gaps, reason, info)

    def after_step(self, model: nn.Module) -> None:
        apply_masks(model, self.masks, self._on_device)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {k: v.clone() for k, v in self.masks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = {k: v.bool().cpu().clone() for k, v in (state.get("masks") or {}).items()}
        self._on_device = {}
