"""Layer Folding (Dror et al., 2021): learn a slope per activation, linearize the most linear.

Every activation site ``y = act(x)`` becomes ``alpha * x + (1 - alpha) * act(x)`` with a
trainable ``alpha`` (init 0: the original function). A penalty pulls the slopes towards 1
during training; each iteration linearizes the ``k`` sites with the largest ``alpha`` and
fine-tunes. The slopes are a recorded eager edit (op ``"slopes"``: the site's call is overridden
in place, see :func:`easier.edit.switches.set_site_rule`, and the alphas live in one new submodule),
so any model ``find_sites`` handles gets slopes, and saved models rebuild under
``torch.load(weights_only=True)``.

Provenance (``LayerFolding/Layer-Folding``, ``ResNet_Cifar10_prefold.py`` / ``_postfold.py``):

* **Taken from the reference code:** the mix ``alpha*x + (1-alpha)*act(x)`` with one scalar
  ``alpha`` per activation, initialised at 0; the penalty ``lam * sum_s |1 - alpha_s^2|``,
  *summed* over the slopes (the pre-fold script adds one term per ``alpha`` to the loss), with the
  default ``lam = 0.25`` (``-l 0.25``); ``alpha`` kept non-negative after every optimizer step;
  the slopes are trained on an already trained network (the script loads ``resnet20.pt``,
  100 epochs of SGD, lr 0.001, momentum 0.9, no weight decay) before anything is folded.
* **Reconstructed from the paper text:** a site whose slope is (near) 1 is linear and its layer
  can be folded into the next one (the reference folds at ``alpha >= 0.9`` with an approximate,
  cropped kernel; here the site is linearized exactly and :func:`easier.fold` merges exactly).
* **Our choices:** the sum runs over the sites whose slope is still active (a linearized
  site's slope is gone), so one ``lam`` weighs more in total on a model with more sites, as in
  the reference; ``penalty="square"`` offers ``lam * (1 - alpha)^2``, whose gradient is non-zero
  at the initial ``alpha = 0`` (``|1 - alpha^2|`` has gradient ``-2 alpha``, i.e. zero there, so
  in the reference only the task loss moves a slope off 0); ``alpha`` is clamped to ``[0, 1]``
  (the reference clamps at 0 only; above 1 its penalty pushes back down); slopes go on *every*
  activation site (the reference leaves the stem ReLU plain); instead of a fixed 0.9
  threshold, one iteration linearizes the ``k`` largest slopes and the shared loop's accuracy
  rule decides when to stop; the loop's pretraining and fine-tuning apply their weight decay to
  ``alpha`` too (the reference pre-fold run has none; the warm-up below has none either).

When a site is linearized by this method, its mix is first dropped (the site computes its
plain activation again) and then the activation is removed, so the conv/BN layers on both
sides become one foldable chain. Mixes that remain are activation sites in the capture (the mix
ops sit inside the site's call), so fold chains stop there.

Every slope starts at 0, so ranking before any training would be a tie that model order breaks.
The method counts the optimizer steps the loop ran (pretraining counts); at the first ranking,
if there were none and every slope is still exactly 0 (``reduce`` from a checkpoint), it first
trains a copy with the penalty (``warmup_epochs`` at ``warmup_lr``, see
:mod:`easier.methods.warmup`; recorded in the history under ``"warmup"``); ``warmup_epochs=0``
refuses instead.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from easier.edit.linearize import linearized_sites, record_edit, register_edit
from easier.edit.switches import set_site_rule
from easier.errors import ConfigError, SiteError
from easier.graph.capture import call_model, default_example, eval_mode
from easier.graph.sites import KINDS, find_sites
from easier.methods._lib.warmup import Warmup, warm_up
from easier.methods.base import Context, SiteMethod, Step, register_method

__all__ = [
    "SLOPES",
    "LayerFolding",
    "SlopePenalty",
    "Slopes",
    "add_slopes",
    "drop_slopes",
    "slope_values",
]

SLOPES = "easier_slopes"
"""Name of the submodule that holds the slopes of an edited model."""

PENALTIES = ("abs", "square")

class Slopes(nn.Module):
    """The slopes of all mixed sites: ``forward(x, y, key) = alpha[key]*x + (1-alpha[key])*y``.

    One module serves every site (one call per site, keyed), so a model has a single new
    submodule and state_dict keys ``easier_slopes.alpha.<key>``. When both inputs are the same
    tensor (the site was linearized under the mix), the output is exactly ``x``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.ParameterDict()
        self.sites: dict[str, str] = {}  # site name -> key in alpha (plain data, rebuilt by edits)

    def forward(self, x: torch.Tensor, y: torch.Tensor, key: str) -> torch.Tensor:
        if x is y:
            return x
        a = self.alpha[key].to(x.dtype)
        return a * x + (1 - a) * y

    def extra_repr(self) -> str:
        return f"sites={list(self.sites)}"


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a (Distributed)DataParallel wrapper, as training may pass it."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


def _mixer(model: nn.Module) -> Slopes | None:
    mod = getattr(_unwrap(model), SLOPES, None)
    return mod if isinstance(mod, Slopes) else None


def _active(model: nn.Module) -> dict[str, str]:
    """Site -> alpha key for the sites whose mix still acts (a linearized site's does not)."""
    mixer = _mixer(model)
    if mixer is None:
        return {}
    gone = set(linearized_sites(_unwrap(model)))
    return {site: key for site, key in mixer.sites.items() if site not in gone}


def slope_values(model: nn.Module) -> dict[str, float]:
    """Site name -> current alpha, for the sites whose mix is still active (model order)."""
    mixer = _mixer(model)
    return {site: float(mixer.alpha[key].detach())  # type: ignore[union-attr]
            for site, key in _active(model).items()}


def _key(name: str, params: nn.ParameterDict) -> str:
    """A ParameterDict key for a site name: no dots, unique, not a ParameterDict attribute."""
    key = re.sub(r"\W", "_", name) or "_"
    while key in params or hasattr(params, key):
        key += "_"
    return key


def _mix(mixer: Slopes, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return mixer(x, y, key)


def _install(model: nn.Module, names: list[str]) -> nn.Module:
    """A copy of ``model`` whose named sites mix with a new slope at 0 (no checks but names)."""
    new = copy.deepcopy(model)
    mixer = _mixer(new)
    if mixer is None:
        if hasattr(new, SLOPES):
            raise ConfigError(f"the model already has an attribute {SLOPES!r}; rename it")
        mixer = Slopes()
        new.add_module(SLOPES, mixer)
    for name in names:
        if name in mixer.sites:
            raise SiteError(f"site {name!r} already has a slope")
    ref = next((p for n, p in new.named_parameters() if not n.startswith(SLOPES)), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    for name in names:
        key = _key(name, mixer.alpha)
        mixer.alpha[key] = nn.Parameter(torch.zeros((), dtype=dtype, device=device))
        mixer.sites[name] = key
        set_site_rule(new, name, functools.partial(_mix, mixer, key))
        if ":" not in name:  # a module site, now a CallSwitch
            switch = new.get_submodule(name.partition("@")[0])
            if getattr(switch, "inplace", False):
                switch.inner.inplace = False  # the mix reads the pre-activation after the call
    return new


@torch.no_grad()
def _same_function(a: nn.Module, b: nn.Module, example_input: Any) -> bool:
    def run(m: nn.Module) -> list[Any]:  # on a copy of the input: a model may write into it
        x = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t,
                            example_input)
        with eval_mode(m):
            return pytree.tree_leaves(call_model(m, x))

    ya, yb = run(a), run(b)
    return len(ya) == len(yb) and all(
        not isinstance(u, torch.Tensor) or (isinstance(v, torch.Tensor) and u.shape == v.shape
                                            and torch.allclose(u, v, rtol=1e-4, atol=1e-5))
        for u, v in zip(ya, yb, strict=True))


def add_slopes(
    model: nn.Module,
    sites: Iterable[str] | None = None,
    *,
    kinds: Sequence[str] = KINDS,
    example_input: Any = None,
) -> nn.Module:
    """A copy of ``model`` whose sites compute ``alpha*x + (1-alpha)*act(x)``, alpha = 0.

    The edit is eager (see :func:`easier.edit.switches.set_site_rule`): the activation keeps its
    name and stays a site for ``find_sites`` and :func:`easier.linearize`. ``sites=None`` means
    every site of ``kinds``, found on a capture made on ``example_input`` (default: the input the
    model's spec describes). With an example input the copy is checked to compute the model's
    function at alpha = 0: an in-place activation whose input is read again elsewhere cannot take
    a slope. Recorded as the edit ``{"op": "slopes", "action": "add", "sites": [...]}``.
    """
    example = example_input if example_input is not None else default_example(model)
    if sites is None or example is not None:
        if example is None:
            raise ConfigError(
                "add_slopes needs example_input= (one model input) to find the model's sites; "
                "or name them with sites="
            )
        found = [s.name for s in find_sites(model, example,
                                            kinds=kinds if sites is None else KINDS)]
    names = found if sites is None else list(sites)
    if len(set(names)) != len(names):
        raise SiteError(f"site(s) {sorted({n for n in names if names.count(n) > 1})} given twice")
    if sites is not None and example is not None:
        unknown = [n for n in names if n not in found]
        if unknown:
            raise SiteError(f"unknown site(s) {unknown}; valid sites: {found}")
    new = _install(model, names)
    if example is not None and not _same_function(model, new, example):
        raise SiteError(
            "a slope changes the function at alpha = 0: an in-place activation's input is also "
            "read elsewhere, so the mix (which needs the pre-activation) cannot replace it; make "
            "the activation out of place (inplace=False) first"
        )
    return record_edit(new, model, {"op": "slopes", "action": "add", "sites": names})


def drop_slopes(model: nn.Module, sites: Iterable[str]) -> nn.Module:
    """A copy of ``model`` in which the named sites compute their plain activation again.

    The mix and its alpha are removed. :class:`LayerFolding` calls this right before
    linearizing a site, so the layers around it become adjacent and fold into one.
    Recorded as ``{"op": "slopes", "action": "drop", "sites": [...]}``.
    """
    names = list(sites)
    mixer = _mixer(model)
    unknown = [n for n in names if mixer is None or n not in mixer.sites]
    if unknown:
        have = list(mixer.sites) if mixer is not None else []
        raise SiteError(f"site(s) {unknown} have no slope; sites with slopes: {have}")
    new = copy.deepcopy(model)
    mixer = _mixer(new)
    assert mixer is not None  # copied with the model
    for name in names:
        del mixer.alpha[mixer.sites.pop(name)]
        set_site_rule(new, name, None)
    return record_edit(new, model, {"op": "slopes", "action": "drop", "sites": names})


@register_edit("slopes")
def _replay(model: nn.Module, sites: list[str], action: str = "add") -> nn.Module:
    if action == "add":
        edit = {"op": "slopes", "action": "add", "sites": list(sites)}
        return record_edit(_install(model, list(sites)), model, edit)
    if action == "drop":
        return drop_slopes(model, sites)
    raise ConfigError(f"unknown slopes action {action!r} in a checkpoint; valid: add, drop")


class SlopePenalty:
    """``lam * sum_s penalty(alpha_s)`` over the sites whose mix is still active (the reference
    adds one term per slope; a mean would weaken ``lam`` by the number of sites, 18 on
    ResNet-20)."""

    def __init__(self, lam: float, penalty: str):
        self.lam = lam
        self.penalty = penalty

    def __call__(self, model: nn.Module) -> torch.Tensor:
        mixer = _mixer(model)
        alphas = [mixer.alpha[k] for k in _active(model).values()] if mixer else []
        if not alphas or self.lam == 0:
            return torch.zeros(())
        a = torch.stack(alphas)
        term = (1 - a * a).abs() if self.penalty == "abs" else (1 - a) ** 2
        return self.lam * term.sum()


@register_method
class LayerFolding(SiteMethod):
    """Linearize the ``k`` sites whose trainable slope alpha is largest (score ``1 - alpha``).

    ``lam`` weighs the slope penalty, ``penalty`` is ``"abs"`` (``|1 - alpha^2|``, the
    reference) or ``"square"`` (``(1 - alpha)^2``); ``kinds`` restricts which activation kinds
    get a slope (default: all of ``easier.KINDS``); ``warmup_epochs`` / ``warmup_lr`` /
    ``warmup_steps`` train the slopes before the first ranking when the run trained nothing
    (0 epochs = refuse).
    """

    name = "layer-folding"
    description = "largest trainable slope first (Layer Folding, Dror et al.)"

    def __init__(
        self,
        lam: float = 0.25,
        penalty: str = "abs",
        kinds: Sequence[str] | None = None,
        warmup_epochs: int = 1,
        warmup_lr: float = 0.01,
        warmup_steps: int | None = None,
    ):
        if penalty not in PENALTIES:
            raise ConfigError(f"penalty={penalty!r}; valid: {list(PENALTIES)}")
        if not lam >= 0:
            raise ConfigError(f"lam={lam}: the slope penalty weight must be >= 0")
        bad = [k for k in kinds or () if k not in KINDS]
        if bad:
            raise ConfigError(f"unknown activation kind(s) {bad}; valid: {list(KINDS)}")
        self.lam = float(lam)
        self.penalty = penalty
        self.kinds = None if kinds is None else list(kinds)
        self.warmup = Warmup(warmup_epochs, warmup_lr, warmup_steps)
        self.trained_steps = 0  # optimizer steps the loop ran on the slopes

    def options(self) -> dict[str, Any]:
        return {"lam": self.lam, "penalty": self.penalty, "kinds": self.kinds,
                **self.warmup.options()}

    def prepare(self, model: nn.Module) -> nn.Module:
        self.trained_steps = 0  # a fresh run
        return add_slopes(model, kinds=self.kinds or KINDS, example_input=self.example)

    def units(self, model: nn.Module, kinds: Sequence[str] = KINDS) -> list[str]:
        """Sites that still carry an active slope (a model without slopes has none)."""
        active = slope_values(model)
        return [s for s in super().units(model, kinds) if s in active]

    def score(self, ctx: Context) -> dict[str, float]:
        alphas = slope_values(ctx.model)
        return {n: 1.0 - alphas[n] for n in ctx.remaining}

    def step(self, ctx: Context) -> Step:
        model, info = ctx.model, {}
        untouched = all(a == 0.0 for a in slope_values(model).values())
        if self.trained_steps == 0 and untouched and not ctx.removed:
            model, info["warmup"] = warm_up(
                model, ctx, self.warmup, self.regularizer(), self.after_step,
                "layer-folding ranks sites by trained slopes (all start at 0)",
            )
        alphas = slope_values(model)
        scores = {n: 1.0 - alphas[n] for n in ctx.remaining}
        order = {n: i for i, n in enumerate(ctx.remaining)}
        chosen = sorted(ctx.remaining, key=lambda n: (scores[n], order[n]))[: ctx.k]
        plain = drop_slopes(model, chosen)  # the mix goes, so the layers around can fold
        info["alpha"] = {n: alphas[n] for n in ctx.remaining}
        return Step(ctx.linearize(chosen, model=plain), chosen, scores, self.description, info)

    def regularizer(self) -> Callable[[nn.Module], torch.Tensor] | None:
        return SlopePenalty(self.lam, self.penalty) if self.lam > 0 else None

    def after_step(self, model: nn.Module) -> None:
        self.trained_steps += 1
        mixer = _mixer(model)
        if mixer is not None:
            with torch.no_grad():
                for a in mixer.alpha.values():
                    a.clamp_(0.0, 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"trained_steps": self.trained_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trained_steps = int(state.get("trained_steps", 0))
