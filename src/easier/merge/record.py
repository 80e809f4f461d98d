"""The record of a fold: per-chain decisions (:class:`ChainDecision`) and the :class:`FoldPlan`.

Plain data, written to and read from JSON (``to_dict``/``from_dict``); a plan saved by an older
easier (without the timing fields) still loads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from easier.errors import ConfigError

__all__ = ["ChainDecision", "FoldPlan"]


@dataclass
class ChainDecision:
    """What the planner decided for one chain, and why."""

    chain_id: int
    kind: str  # "conv" or "linear"
    nodes: list[str]
    modules: list[str]
    residual: str | None  # "identity", the shortcut module's name, or None
    decision: str  # "merge" or "keep"
    reason: str
    input_shape: list[int] | None = None
    kernel: list[int] | None = None  # merged layer (conv chains)
    stride: list[int] | None = None
    padding: list[int] | None = None
    groups: int | None = None
    flops_before: int | None = None
    flops_after: int | None = None
    latency_before_ms: float | None = None  # at the first timed batch size
    latency_after_ms: float | None = None
    timing: dict[str, dict[str, Any]] | None = None  # batch size -> Comparison.to_dict()
    inconclusive: bool = False  # timing could not tell: decided by FLOPs
    same_as: int | None = None  # decision copied from this chain (same layers and shapes)


@dataclass
class FoldPlan:
    """The record of one fold: per-chain decisions, BN folds, and the verification error."""

    mode: str
    chains: list[ChainDecision] = field(default_factory=list)
    bn_folded: list[str] = field(default_factory=list)  # "layer<-bn"
    max_abs_error: float | None = None
    num_threads: int | None = None
    whole_model_ms: dict[str, float] | None = None  # {"bn_folded", "folded"} at the first size
    notes: list[str] = field(default_factory=list)
    batch_sizes: list[int] | None = None  # the batch sizes a timed plan holds for
    whole_model: dict[str, dict[str, Any]] | None = None  # batch size -> Comparison.to_dict()

    @property
    def merged(self) -> list[ChainDecision]:
        return [c for c in self.chains if c.decision == "merge"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FoldPlan:
        try:
            d = dict(d)
            d["chains"] = [ChainDecision(**c) for c in d.get("chains", [])]
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(
                f"not a FoldPlan dictionary ({exc}); load one written by FoldPlan.to_dict()."
            ) from exc

    def __str__(self) -> str:
        err = "not verified" if self.max_abs_error is None else f"{self.max_abs_error:.2g}"
        head = (
            f"FoldPlan mode={self.mode} threads={self.num_threads}: "
            f"{len(self.merged)}/{len(self.chains)} chains merged, "
            f"{len(self.bn_folded)} BN folded, max |err| {err}"
        )
        if self.batch_sizes:
            head += f"; timed for batch sizes {', '.join(map(str, self.batch_sizes))}"
            unsure = sum(c.inconclusive for c in self.chains)
            if unsure:
                head += f" ({unsure} chain(s) timing inconclusive: FLOPs choice)"
        if self.whole_model_ms:
            head += (
                f"; whole model {self.whole_model_ms['bn_folded']:.3g} ms (BN folded) vs "
                f"{self.whole_model_ms['folded']:.3g} ms (folded) at batch "
                f"{(self.batch_sizes or ['?'])[0]}"
            )
        cols = [
            "id",
            "kind",
            "layers",
            "residual",
            "merged k/s/p",
            "decision",
            "FLOPs",
            "ms",
            "reason",
        ]
        rows = [cols] + [_row(c) for c in self.chains]
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols) - 1)]
        lines = [head]
        for r in rows:
            lines.append("  ".join([*(v.ljust(w) for v, w in zip(r, widths, strict=False)), r[-1]]))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.4g}"


def _row(c: ChainDecision) -> list[str]:
    geo = "–"
    if c.kernel is not None:
        geo = "/".join("x".join(map(str, v)) for v in (c.kernel, c.stride, c.padding))
    flops = "–" if c.flops_before is None else _human(c.flops_before)
    if c.flops_after is not None:
        flops += f"->{_human(c.flops_after)}"
    ms = "–"
    if c.latency_before_ms is not None and c.latency_after_ms is not None:
        ms = f"{c.latency_before_ms:.3g}->{c.latency_after_ms:.3g}"
    return [
        str(c.chain_id),
        c.kind,
        ">".join(c.modules),
        c.residual or "–",
        geo,
        c.decision,
        flops,
        ms,
        c.reason,
    ]
