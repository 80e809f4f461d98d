"""Layer entropy of activation sites: how close each rectifier is to a linear map.

For every neuron of a site, the pre-activation ``z`` is ON when ``z > 0`` and OFF when ``z < 0``
(exact zeros are not counted, as in the paper). ON/OFF counts are accumulated in int64 over the
*whole* set of batches, then the neuron entropy is the binary entropy of ``p_on = on / (on + off)``
in bits (``0·log 0 = 0``; a neuron never ON nor OFF has entropy 0) and the layer entropy is the
mean over neurons. Nothing but the counts is stored.

A neuron is a channel: positions of a conv map (N, C, H, W) and tokens of a (B, T, C) tensor are
pooled per channel. The channel axis is inferred from the layer producing the pre-activation and
can be overridden; ``neuron="element"`` makes every (channel, position) its own neuron.

``estimator="reference"`` reproduces the reference code (VGCQ/EASIER ``get_entropy_layer``)
exactly, to compare with published numbers: ON is ``z >= 0``; per mini-batch, p_on is averaged
over batch and positions per channel, its entropy taken per channel and averaged over channels;
the per-batch layer entropies are then averaged over batches. It is biased (low for small batches)
and should not be used to choose sites unless parity is the point.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .capture import Capture, call_model, capture, eval_mode
from .errors import DataError, NonFiniteError, NoSitesError, SiteError, TraceError
from .sites import KINDS, GraphSite, Site, find_sites, graph_sites, module_sites, sites_by_hooks

__all__ = ["EntropyPass", "EntropyReport", "NeuronStats", "binary_entropy", "measure_entropy"]

ESTIMATORS = ("exact", "reference")
_CHUNK = 1 << 18  # elements counted at a time: a 1 MiB float32 temporary, cache-sized
NEURONS = ("channel", "element")


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Binary entropy in bits, with 0·log 0 = 0."""
    p = p.double()
    q = 1.0 - p
    return -(torch.xlogy(p, p) + torch.xlogy(q, q)) / math.log(2.0)


# ---------------------------------------------------------------------------------------------
# counters


class _Scratch:
    """One reusable buffer shared by all counters of a pass.

    A fresh full-size temporary per site and batch costs page faults that dominate the count
    itself on CPU; reusing one buffer halves the entropy pass overhead.
    """

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None

    def take(self, like: torch.Tensor) -> torch.Tensor:
        n = like.numel()
        b = self.buf
        if b is None or b.numel() < n or b.dtype != like.dtype or b.device != like.device:
            b = self.buf = torch.empty(n, dtype=like.dtype, device=like.device)
        return b[:n].view(like.shape)


class _Counter(nn.Module):
    """Reduces one site's pre-activations to per-neuron counts; stores no activations.

    Runs inside the forward pass, so it is written to stay cheap: one temporary, three
    read-only reductions, and a finiteness flag kept on the device (no host sync per batch).
    """

    def __init__(self, site: Site, neuron: str, axis: int | None, estimator: str,
                 scratch: _Scratch | None = None, check_finite: bool = True):
        super().__init__()
        self.strict_finite = check_finite
        self.scratch = scratch or _Scratch()
        self.site = site
        self.neuron = neuron
        self.axis = axis
        self.estimator = estimator
        self.on: torch.Tensor | None = None
        self.off: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None  # observations per neuron, zeros included
        self.bad: torch.Tensor | None = None  # count of NaN/Inf seen
        self.p_sum: torch.Tensor | None = None  # reference estimator: sums over batches
        self.h_sum: torch.Tensor | None = None
        self.layer_sum = 0.0
        self.batches = 0

    def _layout(self, z: torch.Tensor) -> torch.Tensor:
        """View z as (batch-like rows, neurons...) with neurons on axis 1, no copy when possible."""
        if z.ndim == 0:
            return z.reshape(1, 1)
        if z.ndim == 1:  # one scalar per sample: a single neuron
            return z.reshape(-1, 1)
        if self.neuron == "element":
            return z.reshape(z.shape[0], -1)
        axis = 1 if self.axis is None else self.axis % z.ndim
        if axis == 0:
            raise SiteError(
                f"site {self.site.name!r}: channel_axis points at the batch axis (0) of a "
                f"tensor of shape {tuple(z.shape)}; pass the axis of the neurons instead"
            )
        if axis == z.ndim - 1 and z.is_contiguous():
            # channel-last tokens: rows of C values, reduced natively (2x faster than movedim)
            return z.reshape(-1, z.shape[-1])
        if axis != 1:
            z = z.movedim(axis, 1)
        return z

    def forward(self, z: torch.Tensor) -> None:
        z = self._layout(z.detach())
        dims = (0, *range(2, z.ndim))
        n = z.numel() // z.shape[1]
        if self.bad is None:
            self._allocate(z)
        elif (self.on is not None and self.on.shape[0] != z.shape[1]) or (
                self.p_sum is not None and self.p_sum.shape[0] != z.shape[1]):
            have = (self.on if self.on is not None else self.p_sum).shape[0]  # type: ignore[union-attr]
            raise DataError(
                f"site {self.site.name!r}: the number of neurons changed from {have} to "
                f"{z.shape[1]} between batches (shape {tuple(z.shape)}); with neuron='element' "
                "every batch must have the same non-batch shape"
            )
        if self.estimator == "exact":
            # Counting through sign() costs one temporary and two read-only reductions: much
            # cheaper than comparisons to bool tensors, whose reductions are slow on CPU. The
            # batch is counted in chunks, so the temporary stays small (and in cache); sums of
            # +-1/0 are exact in float32 while a chunk has < 2**24 values per channel.
            rows = max(1, _CHUNK // max(1, z[:1].numel()))
            for start in range(0, z.shape[0], rows):
                zc = z[start:start + rows]
                if self.strict_finite:  # NaN and Inf propagate into a plain per-channel sum
                    self.bad += (~torch.isfinite(zc.sum(dim=dims))).sum()  # type: ignore[operator]
                acc = torch.float32 if zc.numel() // zc.shape[1] < 2**24 else torch.float64
                sgn = self.scratch.take(zc)
                torch.sign(zc, out=sgn)
                diff = sgn.sum(dim=dims, dtype=acc)  # on - off
                both = sgn.abs_().sum(dim=dims, dtype=acc)  # on + off
                on = ((both + diff) / 2).round().long()
                self.on += on  # type: ignore[operator]
                self.off += both.round().long() - on  # type: ignore[operator]
            self.seen += n  # type: ignore[operator]
        else:
            if self.strict_finite:
                self.bad += (~torch.isfinite(z.sum(dim=dims))).sum()  # type: ignore[operator]
            p = (z >= 0).sum(dim=dims).double() / n
            h = binary_entropy(p)
            self.p_sum += p  # type: ignore[operator]
            self.h_sum += h  # type: ignore[operator]
            self.layer_sum += float(h.mean())
        self.batches += 1

    def _allocate(self, z: torch.Tensor) -> None:
        c, dev = z.shape[1], z.device
        self.bad = torch.zeros((), dtype=torch.int64, device=dev)
        if self.estimator == "exact":
            self.on = torch.zeros(c, dtype=torch.int64, device=dev)
            self.off = torch.zeros(c, dtype=torch.int64, device=dev)
            self.seen = torch.zeros(c, dtype=torch.int64, device=dev)
        else:
            self.p_sum = torch.zeros(c, dtype=torch.float64, device=dev)
            self.h_sum = torch.zeros(c, dtype=torch.float64, device=dev)

    def check_finite(self) -> None:
        if self.bad is not None and int(self.bad) > 0:
            raise NonFiniteError(
                f"site {self.site.name!r}: NaN or Inf pre-activations in {int(self.bad)} "
                "channel-batch(es); "
                "the entropy would be meaningless. Check the model's weights and inputs (e.g. "
                "normalisation, a diverged fine-tune) before measuring."
            )

    def stats(self) -> dict[str, Any]:
        if self.estimator == "exact":
            return {"on": self.on.cpu(), "off": self.off.cpu(),  # type: ignore[union-attr]
                    "seen": self.seen.cpu(), "batches": self.batches}  # type: ignore[union-attr]
        b = max(self.batches, 1)
        return {"p_on": (self.p_sum / b).cpu(), "h": (self.h_sum / b).cpu(),  # type: ignore[operator]
                "layer": self.layer_sum / b, "batches": self.batches}


# ---------------------------------------------------------------------------------------------
# report


@dataclass(frozen=True)
class NeuronStats:
    """Per-neuron statistics of one site. Counts are None for the reference estimator."""

    p_on: torch.Tensor
    entropy: torch.Tensor
    on: torch.Tensor | None = None
    off: torch.Tensor | None = None
    zeros: torch.Tensor | None = None


class EntropyReport:
    """Entropies of measured sites: ``report[name]`` is the layer entropy in bits.

    ``report.neurons(name)`` gives per-neuron p_on and entropy; ``ranking()`` orders sites from
    most to least linear (ties broken by execution order); ``to_dict``/``from_dict`` round-trip
    through JSON; ``str(report)`` is a readable table.
    """

    def __init__(self, sites: Sequence[Site], stats: dict[str, dict[str, Any]], *,
                 estimator: str, neuron: str, batches: int, samples: int):
        self.sites = list(sites)
        self.estimator = estimator
        self.neuron = neuron
        self.batches = batches
        self.samples = samples
        self._stats = stats
        self._layer: dict[str, float] = {}
        self._neurons: dict[str, NeuronStats] = {}
        for site in self.sites:
            s = stats[site.name]
            if estimator == "exact":
                on, off, seen = s["on"].long(), s["off"].long(), s["seen"].long()
                total = on + off
                p = torch.where(total > 0, on.double() / total.clamp(min=1).double(),
                                torch.zeros((), dtype=torch.float64))
                h = binary_entropy(p)
                self._neurons[site.name] = NeuronStats(p, h, on, off, seen - total)
                self._layer[site.name] = float(h.mean()) if h.numel() else 0.0
            else:
                p, h = s["p_on"].double(), s["h"].double()
                self._neurons[site.name] = NeuronStats(p, h)
                self._layer[site.name] = float(s["layer"])

    # mapping-like access
    def __getitem__(self, name: str) -> float:
        if name not in self._layer:
            raise SiteError(f"no site {name!r} in this report; measured sites: {self.names}")
        return self._layer[name]

    def __contains__(self, name: object) -> bool:
        return name in self._layer

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.names)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def items(self) -> list[tuple[str, float]]:
        return [(n, self._layer[n]) for n in self.names]

    def as_dict(self) -> dict[str, float]:
        """Site name -> layer entropy, in execution order."""
        return dict(self.items())

    def neurons(self, name: str) -> NeuronStats:
        self[name]  # raises a clear error for unknown names
        return self._neurons[name]

    def ranking(self, exclude: Iterable[str] = ()) -> list[str]:
        """Site names from lowest to highest entropy; ties go to the earlier site."""
        skip = set(exclude)
        order = {s.name: s.index for s in self.sites}
        return sorted((n for n in self.names if n not in skip),
                      key=lambda n: (self._layer[n], order[n]))

    def site(self, name: str) -> Site:
        self[name]
        return next(s for s in self.sites if s.name == name)

    # serialisation
    def to_dict(self) -> dict[str, Any]:
        def enc(v: Any) -> Any:
            return v.tolist() if isinstance(v, torch.Tensor) else v

        return {
            "format": "easier.EntropyReport/1",
            "estimator": self.estimator,
            "neuron": self.neuron,
            "batches": self.batches,
            "samples": self.samples,
            "sites": [s.to_dict() for s in self.sites],
            "entropy": self.as_dict(),
            "stats": {n: {k: enc(v) for k, v in st.items()} for n, st in self._stats.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EntropyReport:
        if d.get("format") != "easier.EntropyReport/1":
            raise DataError(f"not an EntropyReport dict (format={d.get('format')!r})")
        tensors = {"on": torch.int64, "off": torch.int64, "seen": torch.int64,
                   "p_on": torch.float64, "h": torch.float64}
        stats = {n: {k: torch.tensor(v, dtype=tensors[k]) if k in tensors else v
                     for k, v in st.items()} for n, st in d["stats"].items()}
        return cls([Site.from_dict(s) for s in d["sites"]], stats, estimator=d["estimator"],
                   neuron=d["neuron"], batches=d["batches"], samples=d["samples"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EntropyReport) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (f"EntropyReport({len(self)} sites, estimator={self.estimator!r}, "
                f"neuron={self.neuron!r}, batches={self.batches}, samples={self.samples})")

    def __str__(self) -> str:
        rank = {n: i + 1 for i, n in enumerate(self.ranking())}
        width = max([len("site"), *(len(n) for n in self.names)])
        head = (f"{'#':>3}  {'site':<{width}}  {'kind':<9}  {'neurons':>7}  {'H (bits)':>8}  "
                f"{'rank':>4}  {'always on':>9}  {'always off':>10}")
        lines = [repr(self), head, "-" * len(head)]
        for s in self.sites:
            nst = self._neurons[s.name]
            zero_h = nst.entropy == 0
            lin = float(((nst.p_on == 1) & zero_h).double().mean()) if nst.p_on.numel() else 0.0
            dead = float(((nst.p_on == 0) & zero_h).double().mean()) if nst.p_on.numel() else 0.0
            lines.append(
                f"{s.index:>3}  {s.name:<{width}}  {s.kind:<9}  {nst.entropy.numel():>7}  "
                f"{self._layer[s.name]:>8.4f}  {rank[s.name]:>4}  {lin:>9.1%}  {dead:>10.1%}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# measurement


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
        scratch = _Scratch()
        self.counters = {s.name: _Counter(s, neuron, _axis_for(s, channel_axis), estimator,
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
            self.runner = _instrument(cap.gm, self.counters, located)
            self.dynamic = cap.dynamic_batch
            self._runners[_signature(example)] = self.runner

    def _runner_for(self, x: Any) -> nn.Module:
        """The instrumented capture for this input (a static capture is redone per shape)."""
        if self.dynamic:
            return self.runner
        key = _signature(x)
        if key not in self._runners:
            cap = capture(self.model, x, dynamic_batch=False)
            self._runners[key] = _instrument(cap.gm, self.counters,
                                             graph_sites(self.model, cap, self.kinds))
        return self._runners[key]

    @torch.no_grad()
    def run(self, batches: Iterable[Any], *, input_key: str | None = None,
            progress: bool = False) -> None:
        """Count every batch (eval mode, no grad; the model's modes are restored)."""
        stream = batches
        if progress:
            from .progress import progress as show_progress

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


def _instrument(gm: fx.GraphModule, counters: dict[str, _Counter],
                located: Sequence[GraphSite]) -> fx.GraphModule:
    """``gm`` (a capture, changed in place) with a counter node before each chosen site."""
    by_name = {g.site.name: g for g in located}
    for i, (name, counter) in enumerate(counters.items()):
        if name not in by_name:
            raise SiteError(f"site {name!r} is not in this capture; sites: {list(by_name)}")
        g = by_name[name]
        path = f"_easier_counter_{i}"
        gm.add_submodule(path, counter)
        group = set(g.nodes)
        first = next(n for n in gm.graph.nodes if n in group and g.input in n.all_input_nodes)
        with gm.graph.inserting_before(first):
            gm.graph.call_module(path, (g.input,))
    gm.recompile()
    return gm
