"""Layer entropy of activation sites: how close each rectifier is to a linear map.

For every neuron of a site, the pre-activation ``z`` is ON when ``z > 0`` and OFF when ``z < 0``
(exact zeros are not counted, as in the paper). ON/OFF counts are accumulated in int64 over the
*whole* set of batches, then the neuron entropy is the binary entropy of ``p_on = on / (on + off)``
in bits (``0·log 0 = 0``; a neuron never ON nor OFF has entropy 0) and the layer entropy is the
mean over neurons. Nothing but the counts is stored.

A neuron is a channel: positions of a conv map (N, C, H, W) and tokens of a (B, T, C) tensor are
pooled per channel. The channel axis is inferred from the layer producing the pre-activation and
can be overridden; ``neuron="element"`` makes every (channel, position) its own neuron.

How the counts are kept, and the ``reference`` estimator, are in :mod:`easier.counters`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from easier.entropy.counters import (
    ESTIMATORS,
    NEURONS,
    Scratch,
    SiteCounter,
    binary_entropy,
    instrument,
)
from easier.entropy.report import EntropyReport, NeuronStats
from easier.errors import DataError, NoSitesError, SiteError, TraceError
from easier.graph.capture import Capture, call_model, capture, eval_mode
from easier.graph.sites import KINDS, Site, find_sites, graph_sites, module_sites, sites_by_hooks

# EntropyReport and NeuronStats live in easier.entropy_report, binary_entropy and the estimators
# in easier.counters; all are importable from here too.
__all__ = ["ESTIMATORS", "NEURONS", "EntropyPass", "EntropyReport", "NeuronStats", "batch_input",
           "binary_entropy", "measure_entropy", "model_device"]


def batch_input(batch: Any, input_key: str | Sequence[str] | None = None) -> Any:
    """The model input of a batch.

    A tensor; ``(input, target, ...)``; or a dict (e.g. a Hugging Face batch): by default every
    key but ``label``/``labels`` is passed as a keyword argument; ``input_key`` names the one
    model input (passed positionally) or a list of keys (passed as keyword arguments).
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        if input_key is None:  # a Hugging Face batch: every key but the labels is an input
            keys = [k for k in batch if k not in ("label", "labels")]
        else:
            keys = [input_key] if isinstance(input_key, str) else list(input_key)
        missing = [k for k in keys if k not in batch]
        if not keys or missing:
            raise DataError(
                f"batch is a dict with keys {sorted(batch)}; pass input_key= naming the model "
                "input (e.g. input_key='pixel_values', or a list of keys passed as keyword "
                "arguments: input_key=['input_ids', 'attention_mask'])"
            )
        if isinstance(input_key, str):
            return batch[input_key]
        return {k: batch[k] for k in keys}
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise DataError(
        f"cannot find the model input in a batch of type {type(batch).__name__}; batches must be "
        "tensors, (input, target) tuples/lists, or dicts with input_key"
    )


def _to_device(x: Any, device: torch.device | None) -> Any:
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, tuple):
        return tuple(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def model_device(model: nn.Module) -> torch.device:
    p = next(itertools.chain(model.parameters(), model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


def _select(all_sites: list[Site], sites: Sequence[str | Site] | None) -> list[Site]:
    if sites is None:
        return all_sites
    by_name = {s.name: s for s in all_sites}
    names = [s.name if isinstance(s, Site) else s for s in sites]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SiteError(f"unknown site(s) {unknown}; valid sites: {list(by_name)}")
    wanted = set(names)
    return [s for s in all_sites if s.name in wanted]


def _axis_for(site: Site, channel_axis: int | dict[str, int] | None) -> int | None:
    if isinstance(channel_axis, dict):
        return channel_axis.get(site.name, site.channel_axis)
    if channel_axis is not None:
        return channel_axis
    return site.channel_axis


class EntropyPass:
    """Counters attached to a model for one measurement: set up, ``run`` batches, ``report``.

    The building block of :func:`measure_entropy`; a distributed pass runs each rank's shard and
    sums the counters before ``report``. ``example`` is one model input: the model is captured
    with ``torch.export`` on it and a counter node is inserted before every chosen site (the
    PT2E observer pattern); a model export cannot capture is counted through module hooks.
    """

    def __init__(self, model: nn.Module, example: Any, sites: Sequence[str | Site] | None = None,
                 *, neuron: str = "channel", channel_axis: int | dict[str, int] | None = None,
                 estimator: str = "exact", kinds: Sequence[str] = KINDS,
                 check_finite: bool = True, device: torch.device | str | None = None):
        if estimator not in ESTIMATORS:
            raise SiteError(f"estimator={estimator!r}; valid: {list(ESTIMATORS)}")
        if neuron not in NEURONS:
            raise SiteError(f"neuron={neuron!r}; valid: {list(NEURONS)}")
        self.model, self.estimator, self.neuron = model, estimator, neuron
        self.kinds = tuple(kinds)
        self.device = torch.device(device) if device is not None else model_device(model)
        self.samples = 0
        example = _to_device(example, self.device)
        try:
            cap: Capture | None = capture(model, example)
        except TraceError as exc:
            cap, reason = None, str(exc)
        if cap is None:
            found = sites_by_hooks(model, example, kinds, reason=reason)
        else:
            located = graph_sites(model, cap, kinds)
            found = [g.site for g in located]
            if not found:
                find_sites(model, example, kinds=kinds)  # raises NoSitesError with its message
                raise NoSitesError(f"{type(model).__name__} has no activation site")
        self.chosen = _select(found, sites)
        scratch = Scratch()
        self.counters = {s.name: SiteCounter(s, neuron, _axis_for(s, channel_axis), estimator,
                                          scratch, check_finite) for s in self.chosen}
        self._handles: list[Any] = []
        self._runners: dict[Any, nn.Module] = {}
        if cap is None:
            mods = module_sites(model, kinds)
            for name, c in self.counters.items():
                self._handles.append(mods[name].register_forward_pre_hook(
                    lambda _m, args, c=c: c(args[0])))
            self.runner: nn.Module = model
            self.dynamic = True
        else:
            self.runner = instrument(cap.gm, self.counters, located)
            self.dynamic = cap.dynamic_batch
            self._runners[_signature(example)] = self.runner

    def _runner_for(self, x: Any) -> nn.Module:
        """The instrumented capture for this input (a static capture is redone per shape)."""
        if self.dynamic:
            return self.runner
        key = _signature(x)
        if key not in self._runners:
            cap = capture(self.model, x, dynamic_batch=False)
            self._runners[key] = instrument(cap.gm, self.counters,
                                             graph_sites(self.model, cap, self.kinds))
        return self._runners[key]

    @torch.no_grad()
    def run(self, batches: Iterable[Any], *, input_key: str | None = None,
            progress: bool = False) -> None:
        """Count every batch (eval mode, no grad; the model's modes are restored)."""
        stream = batches
        if progress:
            from easier.report.progress import progress as show_progress

            stream = show_progress(stream, desc="entropy")
        with eval_mode(self.model):
            for batch in stream:
                x = _to_device(batch_input(batch, input_key), self.device)
                call_model(self._runner_for(x), x)
                self.samples += _batch_size(x)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def report(self) -> EntropyReport:
        for c in self.counters.values():
            c.check_finite()
        nb = max((c.batches for c in self.counters.values()), default=0)
        return EntropyReport(self.chosen, {n: c.stats() for n, c in self.counters.items()},
                             estimator=self.estimator, neuron=self.neuron, batches=nb,
                             samples=self.samples)


def measure_entropy(
    model: nn.Module,
    batches: Iterable[Any],
    sites: Sequence[str | Site] | None = None,
    *,
    neuron: str = "channel",
    channel_axis: int | dict[str, int] | None = None,
    estimator: str = "exact",
    input_key: str | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    kinds: Sequence[str] = KINDS,
    check_finite: bool = True,
    progress: bool = False,
) -> EntropyReport:
    """Measure the layer entropy of every activation site over all ``batches``.

    The model runs in ``eval()`` mode under ``torch.no_grad()`` and its modes are restored
    afterwards; the model is not modified. ``batches`` yields tensors, ``(input, target)`` pairs or
    dicts (give ``input_key``). ``sites`` restricts the measurement to some site names.
    ``channel_axis`` overrides the inferred neuron axis (one int for all sites, or per site name).
    A NaN or Inf pre-activation raises :class:`NonFiniteError` naming the site;
    ``check_finite=False`` skips that check to save one read of every pre-activation (a NaN
    would then count as an excluded zero).
    """
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise DataError(
            "measure_entropy got an empty batch iterable; pass a DataLoader or list with at least "
            "one batch (a one-shot generator that was already consumed is empty)"
        ) from None
    counting = EntropyPass(model, batch_input(first, input_key), sites, neuron=neuron,
                           channel_axis=channel_axis, estimator=estimator, kinds=kinds,
                           check_finite=check_finite, device=device)
    stream: Iterable[Any] = itertools.chain([first], it)
    if max_batches is not None:
        stream = itertools.islice(stream, max_batches)
    try:
        counting.run(stream, input_key=input_key, progress=progress)
    finally:
        counting.close()
    return counting.report()


def _batch_size(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.ndim else 1
    if isinstance(x, (tuple, list)) and x:
        return _batch_size(x[0])
    if isinstance(x, dict) and x:
        return _batch_size(next(iter(x.values())))
    return 0


def _signature(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, (tuple, list)):
        return tuple(_signature(v) for v in x)
    if isinstance(x, dict):
        return tuple((k, _signature(v)) for k, v in sorted(x.items()))
    return None


