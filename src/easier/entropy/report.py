"""The result of an entropy pass: layer and per-neuron entropies of the measured sites."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from easier.entropy.counters import binary_entropy
from easier.errors import DataError, SiteError
from easier.graph.sites import Site

__all__ = ["EntropyReport", "NeuronStats"]


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
