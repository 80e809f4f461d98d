"""NEPENTHE: EGP's rounds with an entropy-aware, size-aware budget (Liao et al. 2024).

NEPENTHE (arXiv 2404.16890) has no public code and its budget formula (``weights_to_prune``) is
not in the paper text we could read, so this is a documented reconstruction. A round is the same
as :class:`~easier.methods.egp.Egp` (measure, linearize sites at ``H = 0``, prune the prunable
layers, fine-tune); only the per-layer allocation differs:

    s_l = H_l * mean|w|  (surviving weights)     I_l = mean_k(s_k) / s_l
    n_l  ∝  R_l * exp(I_l / tau)                  (R_l = surviving weights of layer l)

water-filled and rounded exactly as in EGP (:func:`~easier.methods.egp.waterfill`), with the
global budget ``B = rho * sum(R)``.

Provenance:

* **From the paper text** (abstract, OpenReview reviews, summaries; see the research notes):
  the same family as EGP (iterative unstructured pruning, re-weighted by layer entropy, until a
  layer's rectifier can be dropped); neuron state = sign of the pre-activation with exact zeros
  *excluded* (our exact estimator does exactly that); layer entropy = mean of neuron entropies;
  an "irrelevance" computed from the layer entropy and the weight magnitude drives an
  entropy-aware budget that moves pruning towards low-entropy layers; a zero-entropy layer's
  rectifier becomes the identity.
* **Reconstructed / our choice**: the allocation above. Why: EGP's ``I_l = sum(s) / s_l`` grows
  with the number of layers, so its softmax is nearly one-hot and empties whole layers greedily
  (the failure LaCoOT reports for EGP on MobileNetV2). Dividing by the *mean* score makes the
  irrelevance scale-free (1 for an average layer); weighting by ``R_l`` makes the *fraction* of a
  layer pruned, not the count, grow with irrelevance, so layers of equal score all lose the
  fraction ``rho`` (plain layer-wise magnitude pruning) and a layer at half the average score
  loses ``e ≈ 2.7x`` more of its weights at ``tau = 1``. ``tau -> inf`` is uniform layer-wise
  pruning; small ``tau`` approaches EGP's greedy behaviour. Everything else (site -> layer map,
  masks, rounding, when sites are linearized, OFF channels) is EGP's, with its documented choices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from easier.errors import ConfigError
from easier.methods.base import register_method
from easier.methods.egp import Egp

__all__ = ["Nepenthe", "nepenthe_logits"]


def nepenthe_logits(
    scores: Sequence[float], remaining: Sequence[int], tau: float = 1.0
) -> list[float]:
    """Softmax logits ``log R_l + (mean(s) / s_l) / tau`` (``s_l = 0`` layers share the budget)."""
    if any(s == 0 for s in scores):
        return [
            math.log(r) if s == 0 else -math.inf for s, r in zip(scores, remaining, strict=True)
        ]
    mean = sum(scores) / len(scores)
    return [math.log(r) + mean / s / tau for s, r in zip(scores, remaining, strict=True)]


@register_method
class Nepenthe(Egp):
    """EGP with NEPENTHE's entropy-aware budget (reconstructed; see the module docstring).

    ``tau`` is the temperature of the allocation: larger spreads pruning evenly over layers.
    """

    name = "nepenthe"
    description = "entropy-aware unstructured pruning; zero-entropy sites linearized (NEPENTHE)"

    def __init__(self, rho: float = 0.5, tau: float = 1.0, dead: str = "zero"):
        super().__init__(rho=rho, dead=dead)
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ConfigError(f"tau={tau!r}: the allocation temperature must be a number > 0")
        self.tau = float(tau)

    def options(self) -> dict[str, Any]:
        return {"rho": self.rho, "tau": self.tau, "dead": self.dead}

    def logits(self, scores: Sequence[float], remaining: Sequence[int]) -> list[float]:
        return nepenthe_logits(scores, remaining, self.tau)
