"""EGP: entropy-guided unstructured pruning until layers lose their non-linearity (Liao+ 2023).

One iteration (a *round*) of ``egp``:

1. measure the entropy of the remaining sites (``ctx.entropy()``: our exact estimator);
2. linearize every remaining site whose entropy is exactly 0 (``Step.chosen``, may be empty);
3. map each other site to the weight layer that produces its pre-activation (:func:`site_layers`)
   and keep the layers with ``H > 0`` and at least one surviving weight: the prunable layers;
4. score ``s_l = H_l * mean|w|`` over surviving weights, irrelevance ``I_l = sum(s) / s_l``,
   allocation ``softmax(I)`` (shifted by ``max I``), global budget ``B = rho * (surviving weights
   of the prunable layers)``, water-filled (:func:`waterfill`) so no layer loses more than it has;
5. in each layer, prune the ``n_l`` smallest-``|w|`` surviving weights; masks persist (method
   state, re-applied after every optimizer step); the loop then fine-tunes.

Provenance (reference: ``ZhuLIAO001/Unstructured_Relu_Pruning_Reduce_Depth``, ``src/main.py``):

* **From the reference code's behaviour**: the score ``H * mean|w != 0|``; dropping layers at
  ``H = 0`` or with no surviving weight; ``I = T / s`` with ``T`` the sum over prunable layers; the
  softmax computed as ``exp(I - max I)``; ``B = rho * surviving weights`` with ``rho = 0.5``;
  water-filling that caps *every* over-allocated layer of a pass at once, subtracts their weights
  from ``B`` and their scores from ``T`` and recomputes the softmax over the rest; L1 pruning of
  surviving weights only (``prune.l1_unstructured`` on a pruned module), masks kept through
  retraining, no rewinding; the site -> layer map ``relu -> conv1``, ``relu1 -> conv1``,
  ``relu2 -> conv2`` (fc and downsample convs never pruned). That map is the reference's
  *Tiny-ImageNet* ResNet-18 only: its CIFAR-10 ResNet-18 shares one ReLU module between the
  stem and every block, so its hooks see one site and it prunes only for the stem there. The
  reference runs a fixed 9 pruning rounds whatever the entropies do; here the
  loop stops on its accuracy rule, ``max_iterations`` or an exhausted budget (pass
  ``max_iterations=9`` for the reference's count).
* **From the paper text**: zero-entropy layers are "removable"; their activation becomes the
  identity (a constant for OFF neurons). The reference never edits activations: it only stops
  pruning a layer once it reaches ``H = 0``. We linearize such a site at the start of the round
  after it reached ``H = 0`` -- the first point where the reference would notice it.
* **Our choices**:
  - entropy: our exact estimator (ON/OFF counts pooled over all batches, exact zeros excluded,
    mean over *all* neurons of the site) on un-augmented training images. The reference averages
    per mini-batch over *non-degenerate* neurons only (``0 < p < 1``), counts ``z = 0`` as OFF,
    averages the batches, and uses augmented data. Both give ``H = 0`` when every neuron is
    always ON or always OFF (up to exact zeros); in between, ours is lower when neurons are dead.
  - site -> layer rule (:func:`site_layers`): walk back from the pre-activation through BatchNorm,
    Identity and Dropout modules to the nn.Conv*/nn.Linear that computes it; at an addition take
    the operand whose layer is deepest in the graph (longest path from the input), i.e. the
    residual branch rather than the shortcut -- this reproduces ``relu2 -> conv2`` with or without
    a downsample. Sites reaching anything else (LayerNorm, pooling, a functional conv) have no
    layer: they are never pruned for, and are linearized only if they reach ``H = 0`` anyway.
    Several sites on one layer give it the largest of their entropies.
  - integers: ``B`` is rounded half up (so pruning goes on until a layer is empty) and the
    per-layer amounts by largest remainder, so they sum to ``B`` exactly; the reference floors
    each layer's amount and prunes slightly less.
  - masks: weights are set to exactly 0 and re-zeroed after every optimizer step (the model's
    ``state_dict`` keeps its keys) instead of torch's pruning re-parametrisation; the forward pass
    is the same, but gradient clipping, if used, sees the masked weights' gradients.
  - ``dead="zero"`` (default): when a ReLU/ReLU6 site at ``H = 0`` is linearized, its always-OFF
    channels are zeroed (BN weight and bias masked to 0, or the layer's output row and bias when
    there is no BN), so the linearized model computes exactly what the rectifier did on the
    measured data. That needs the site to read the BN/layer output directly; after a residual add
    (or with ``dead="identity"``) OFF channels become identity and fine-tuning absorbs the change.
  - the fine-tune after each round is the loop's schedule (the reference retrains 160 epochs).
  - every zero-entropy site is linearized in one round (``ctx.k`` is not used), but no more than
    ``ctx.max_k`` (what ``max_removals`` still allows), earliest sites first; the others stay
    out of pruning like every ``H = 0`` layer. Bound the number of rounds with ``max_iterations``.
  - when a round has nothing left to prune (no prunable layer, or a budget that rounds to 0), the
    method reports no units afterwards, so the loop stops ("no site left") instead of spinning.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from easier.errors import ConfigError, StateError
from easier.graph.sites import KINDS
from easier.methods._lib.budget import egp_logits, round_half_up, waterfill
from easier.methods._lib.layer_map import LayerLink, site_layers
from easier.methods.base import Context, Method, Step, register_method

__all__ = ["Egp", "LayerLink", "egp_logits", "site_layers", "waterfill"]

_DEAD_ZERO_KINDS = ("ReLU", "ReLU6")  # kinds whose OFF state outputs exactly 0



@register_method
class Egp(Method):
    """Entropy-guided unstructured pruning; zero-entropy sites are linearized.

    ``rho`` is the fraction of the prunable layers' surviving weights pruned per round;
    ``dead`` is what always-OFF channels of a linearized ReLU become: ``"zero"`` (exact) or
    ``"identity"`` (the plain linearization).
    """

    name = "egp"
    description = "entropy-guided unstructured pruning; zero-entropy sites linearized (EGP)"
    unit = "site"
    finetune = True

    def __init__(self, rho: float = 0.5, dead: str = "zero"):
        if not (isinstance(rho, (int, float)) and 0 < rho <= 1):
            raise ConfigError(f"rho={rho!r}: the fraction pruned per round must be in (0, 1]")
        if dead not in ("zero", "identity"):
            raise ConfigError(f"dead={dead!r}; valid: 'zero', 'identity'")
        self.rho = float(rho)
        self.dead = dead
        self.masks: dict[str, torch.Tensor] = {}  # parameter name -> bool, True = kept
        self.layers: list[str] = []  # every layer ever mapped from a site, in site order
        self.exhausted = False
        self._fill: dict[str, torch.Tensor] = {}  # ~mask on the parameter's device

    def options(self) -> dict[str, Any]:
        return {"rho": self.rho, "dead": self.dead}

    # -- allocation (NEPENTHE overrides) --------------------------------------------------------

    def logits(self, scores: Sequence[float], remaining: Sequence[int]) -> list[float]:
        return egp_logits(scores, remaining)

    # -- loop hooks -----------------------------------------------------------------------------

    def units(self, model: nn.Module, kinds: Sequence[str] = KINDS) -> list[str]:
        return [] if self.exhausted else super().units(model, kinds)

    def after_step(self, model: nn.Module) -> None:
        if self.masks:
            self.apply_masks(model)

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {k: v.detach().cpu().clone() for k, v in self.masks.items()},
            "layers": list(self.layers),
            "exhausted": self.exhausted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = {k: v.clone().bool() for k, v in state.get("masks", {}).items()}
        self.layers = list(state.get("layers", []))
        self.exhausted = bool(state.get("exhausted", False))
        self._fill = {}

    @torch.no_grad()
    def apply_masks(self, model: nn.Module) -> None:
        """Set every masked parameter entry of ``model`` to exactly 0."""
        params = dict(model.named_parameters())
        for name, mask in self.masks.items():
            p = params.get(name)
            if p is None:
                raise StateError(
                    f"{self.name}: the model has no parameter {name!r} that a pruning mask "
                    "refers to; masks belong to the model this method pruned (do not reuse a "
                    "method instance across models)"
                )
            fill = self._fill.get(name)
            if fill is None or fill.device != p.device:
                fill = self._fill[name] = (~mask).to(p.device)
            p.masked_fill_(fill, 0.0)

    # -- one round ------------------------------------------------------------------------------

    def _mask(self, model: nn.Module, name: str) -> torch.Tensor:
        if name not in self.masks:
            self.masks[name] = torch.ones_like(
                model.get_parameter(name), dtype=torch.bool, device="cpu"
            )
        return self.masks[name]

    def _zero_dead(self, model: nn.Module, ctx: Context, site: str, link: LayerLink | None) -> int:
        """Mask the always-OFF channels of a zero-entropy ReLU site; returns how many."""
        report = ctx.entropy()
        if link is None or not link.direct or report.site(site).kind not in _DEAD_ZERO_KINDS:
            return 0
        stats = report.neurons(site)
        if stats.on is None:
            return 0
        dead = (stats.on == 0).nonzero().flatten()
        if not len(dead):
            return 0
        if link.norm is not None:
            bn = model.get_submodule(link.norm)
            if bn.weight is None or bn.bias is None or len(stats.on) != bn.num_features:
                return 0  # a non-affine BN cannot output 0 by masking parameters
            targets = [f"{link.norm}.weight", f"{link.norm}.bias"]
        else:
            layer = model.get_submodule(link.layer)
            if getattr(layer, "transposed", False) or len(stats.on) != layer.weight.shape[0]:
                return 0  # output channels are not the weight's first axis
            targets = [f"{link.layer}.weight"] + (
                [f"{link.layer}.bias"] if layer.bias is not None else []
            )
        for t in targets:
            self._mask(model, t).index_fill_(0, dead, False)
        return len(dead)

    def step(self, ctx: Context) -> Step:
        report = ctx.entropy()
        links = site_layers(ctx.model, ctx.remaining, ctx.kinds, example_input=ctx.example)
        zero = [s for s in ctx.remaining if report[s] == 0.0]
        chosen = zero if ctx.max_k is None else zero[: max(ctx.max_k, 0)]
        model = ctx.linearize(chosen) if chosen else copy.deepcopy(ctx.model)

        layer_h: dict[str, float] = {}
        for s in ctx.remaining:
            link = links[s]
            if link is None:
                continue
            if link.layer not in self.layers:
                self.layers.append(link.layer)
                self._mask(model, f"{link.layer}.weight")
            if s not in zero:
                layer_h[link.layer] = max(layer_h.get(link.layer, 0.0), report[s])
        if not self.layers:
            raise ConfigError(
                f"{self.name}: no remaining site is computed by an nn.Conv/nn.Linear layer "
                f"(through BatchNorm/Identity/Dropout), so there is nothing to prune; sites: "
                f"{ctx.remaining}. Use a model with module layers, or another method."
            )
        dead = (
            sum(self._zero_dead(model, ctx, s, links[s]) for s in chosen)
            if self.dead == "zero"
            else 0
        )

        params = dict(model.named_parameters())
        prunable, scores_l, left = [], [], []
        for layer in self.layers:
            mask = self.masks[f"{layer}.weight"]
            alive = int(mask.sum())
            if layer_h.get(layer, 0.0) > 0 and alive > 0:
                w = params[f"{layer}.weight"].detach().abs().cpu()
                prunable.append(layer)
                scores_l.append(layer_h[layer] * float(w[mask].double().mean()))
                left.append(alive)
        budget = round_half_up(self.rho * sum(left))
        amounts = waterfill(scores_l, left, budget, self.logits) if budget else [0] * len(left)
        for layer, k in zip(prunable, amounts, strict=True):
            if k:
                self._prune_smallest(params[f"{layer}.weight"], self.masks[f"{layer}.weight"], k)
        self._fill = {}
        self.apply_masks(model)
        if budget == 0:
            self.exhausted = True

        score_of = dict(zip(prunable, scores_l, strict=True))
        site_scores = {
            s: (
                0.0
                if s in zero
                else score_of.get(links[s].layer, report[s])
                if links[s]
                else report[s]
            )
            for s in ctx.remaining
        }
        total = sum(self.masks[f"{layer}.weight"].numel() for layer in self.layers)
        kept = sum(int(self.masks[f"{layer}.weight"].sum()) for layer in self.layers)
        info = {
            "sparsity": 1.0 - kept / total,
            "pruned_per_layer": {layer: int(k) for layer, k in zip(prunable, amounts, strict=True)},
            "weights_left": {
                layer: int(self.masks[f"{layer}.weight"].sum()) for layer in self.layers
            },
            "budget": budget,
            "dead_channels_zeroed": dead,
        }
        reason = (
            f"{len(chosen)} zero-entropy site(s) linearized, {budget} weights pruned, "
            f"sparsity {info['sparsity']:.1%}"
        )
        return Step(model, chosen, site_scores, reason, info)

    @staticmethod
    @torch.no_grad()
    def _prune_smallest(weight: torch.Tensor, mask: torch.Tensor, k: int) -> None:
        """Clear the mask of the ``k`` smallest-|w| surviving entries (ties: lower index)."""
        mag = weight.detach().abs().cpu().double().flatten()
        mag[~mask.flatten()] = math.inf
        idx = torch.argsort(mag, stable=True)[:k]
        mask.view(-1)[idx] = False
