"""ON/OFF counts taken during training, as the reference code measures its entropies.

The reference implementation (VGCQ/EASIER) records the pre-activations of every rectifier during
the last training epoch: train mode (batch statistics, dropout), augmented data, weights moving.
``easier`` measures in eval mode on un-augmented data after fine-tuning by default. This module
offers the reference timing: :class:`TrainCounts` plugs into training as a regularizer that adds
nothing to the loss (``fine_tune`` calls ``attach`` before the first step and removes the handle
at the end) and counts, per channel, how often each module site's input is > 0 and < 0 over the
last ``window`` training batches of the most recent training run.

Only module sites can be observed on the eager model (a functional ``F.relu`` call has no hook
to hold on to); a run whose sites include functional ones is refused with a clear error.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from easier.entropy.estimate import EntropyReport
from easier.errors import ConfigError, NoSitesError
from easier.graph.sites import KINDS, Site, find_sites

__all__ = ["TrainCounts"]


class TrainCounts:
    """Counts the ON/OFF states of module sites during training; ``report()`` gives entropies.

    ``window``: how many of the last training batches to keep (None: every batch of the last
    training run, i.e. the last epoch for one-epoch fine-tunes). ``example`` is one model input
    used to find the sites (their names and neuron axes) on the model being trained.
    """

    def __init__(self, example: Any, *, window: int | None = None,
                 kinds: Sequence[str] = KINDS):
        if window is not None and window < 1:
            raise ConfigError(f"window={window}: must be a number of batches >= 1 or None")
        self.example = example
        self.window = window
        self.kinds = tuple(kinds)
        self.sites: list[Site] = []
        self.steps: collections.deque[dict[str, tuple[torch.Tensor, ...]]] = (
            collections.deque(maxlen=window))
        self._current: dict[str, tuple[torch.Tensor, ...]] = {}

    # -- training hooks -------------------------------------------------------------------
    def attach(self, model: nn.Module) -> Any:
        """Hook every module site of ``model``; returns a handle whose ``remove()`` unhooks."""
        from easier.entropy.estimate import model_device
        from easier.graph.capture import to_device

        try:
            sites = find_sites(model, to_device(self.example, model_device(model)),
                               kinds=self.kinds)
        except NoSitesError:  # every site linearized: nothing left to count
            sites = []
        functional = [s.name for s in sites if s.form == "function"]
        if functional:
            raise ConfigError(
                f"entropy_during='train-epoch' observes module sites only; {functional} are "
                "functional calls (F.relu, ...) with no module to hook. Use the default "
                "entropy_during='eval' for this model"
            )
        self.sites = sites
        self.steps.clear()
        self._current = {}
        by_target: dict[str, list[Site]] = collections.defaultdict(list)
        for s in sites:
            by_target[s.target].append(s)
        modules = dict(model.named_modules())
        calls: dict[str, int] = collections.defaultdict(int)
        handles = [model.register_forward_pre_hook(lambda _m, _a: calls.clear())]
        for target, group in by_target.items():
            group.sort(key=lambda s: s.index)

            def hook(_m: nn.Module, args: tuple[Any, ...], target: str = target,
                     group: list[Site] = group) -> None:
                k = calls[target]
                calls[target] += 1
                if k < len(group) and _m.training:
                    self._count(group[k], args[0])

            handles.append(modules[target].register_forward_pre_hook(hook))
        return _Handles(handles)

    def __call__(self, model: nn.Module) -> float:
        """Closes one training step (called once per step by ``fine_tune``); adds 0 to the loss."""
        if self._current:
            self.steps.append(self._current)
            self._current = {}
        return 0.0

    @torch.no_grad()
    def _count(self, site: Site, z: torch.Tensor) -> None:
        z = z.detach()
        if z.ndim >= 2:
            axis = 1 if site.channel_axis is None else site.channel_axis % z.ndim
            z = z.movedim(axis, -1).reshape(-1, z.shape[axis])
        else:
            z = z.reshape(-1, 1)
        on, off = (z > 0).sum(0), (z < 0).sum(0)
        seen = torch.full_like(on, z.shape[0])
        if site.name in self._current:
            a, b, c = self._current[site.name]
            on, off, seen = on + a, off + b, seen + c
        self._current[site.name] = (on, off, seen)

    # -- results --------------------------------------------------------------------------
    @property
    def batches(self) -> int:
        return len(self.steps)

    def report(self) -> EntropyReport:
        """The exact estimator's report over the kept batches (same formula as eval mode)."""
        if not self.steps:
            raise ConfigError("no training batch was counted yet: train the model first "
                              "(pretrain, or a fine-tune) or use entropy_during='eval'")
        stats: dict[str, dict[str, Any]] = {}
        for s in self.sites:
            seen = [step[s.name] for step in self.steps if s.name in step]
            if not seen:
                continue
            on, off, total = (torch.stack(t).sum(0).long().cpu() for t in zip(*seen, strict=True))
            stats[s.name] = {"on": on, "off": off, "seen": total, "batches": len(seen)}
        chosen = [s for s in self.sites if s.name in stats]
        return EntropyReport(chosen, stats, estimator="exact", neuron="channel",
                             batches=len(self.steps), samples=0)

    def state_dict(self) -> dict[str, Any]:
        return {"sites": [s.to_dict() for s in self.sites],
                "steps": [{n: list(t) for n, t in st.items()} for st in self.steps]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sites = [Site.from_dict(d) for d in state.get("sites", [])]
        self.steps.clear()
        for st in state.get("steps", []):
            self.steps.append({n: tuple(t) for n, t in st.items()})


class _Handles:
    def __init__(self, handles: list[Any]):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
