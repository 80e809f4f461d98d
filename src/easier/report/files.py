"""Reports of a run: JSON lines, CSV, a markdown table and a PNG a person can read."""

from __future__ import annotations

import csv
import io
from typing import Any

from easier.io.records import RunDir, atomic_write_bytes, atomic_write_text

__all__ = ["history_csv", "history_figure", "history_table", "plot_history", "png_bytes",
           "pyplot", "write_reports"]

PHASES = ("step", "finetune", "eval")  # the loop's per-iteration wall-time phases


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def _chosen(h: dict[str, Any]) -> str:
    if h["chosen"]:
        return ", ".join(h["chosen"])
    return "dense" if h["iteration"] == 0 else "none removed"


def history_table(history: list[dict[str, Any]], baseline: dict[str, Any]) -> str:
    """Markdown table: one row per iteration (accuracy per number of removed sites)."""
    rows = ["| iter | removed | chosen | H (bits) | train acc | val acc | test acc "
            "| accepted | ft steps | s |", "|---:|---:|---|---:|---:|---:|---:|:---:|---:|---:|"]
    for h in history:
        ent = h.get("entropy") or {}
        hs = ", ".join(f"{ent[c]:.3f}" for c in h["chosen"] if c in ent) or "–"
        rows.append(
            f"| {h['iteration']} | {len(h['removed'])} | {_chosen(h)} | "
            f"{hs} | {_fmt(h.get('train_acc'))} | {_fmt(h.get('val_acc'))} | "
            f"{_fmt(h.get('test_acc'))} | {'yes' if h['accepted'] else 'no'} | "
            f"{_fmt(h.get('finetune_steps'), 'd')} | {_fmt(_total_seconds(h), '.1f')} |"
        )
    return "\n".join(rows)


def _total_seconds(h: dict[str, Any]) -> float | None:
    secs = h.get("seconds")
    if isinstance(secs, dict):
        return secs.get("total", sum(secs.values()))
    return secs


def history_csv(history: list[dict[str, Any]]) -> str:
    """CSV, one row per iteration: accuracies, costs, optimizer steps of the fine-tune, wall
    time per phase (``seconds_PHASE``;
    ``seconds`` is the total) and every measured site entropy (``H:SITE``, bits; empty where
    the site was not measured that iteration)."""
    sites: list[str] = []
    for h in history:
        sites += [s for s in (h.get("entropy") or {}) if s not in sites]
    cols = ["iteration", "removed", "chosen", "train_loss", "train_acc", "val_loss", "val_acc",
            "test_loss", "test_acc", "accepted", "params", "flops", "depth", "activations",
            "finetune_steps", "seconds", *(f"seconds_{p}" for p in PHASES), "failed",
            *(f"H:{s}" for s in sites)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for h in history:
        row = dict(h)
        row["removed"] = len(h["removed"])
        row["chosen"] = " ".join(h["chosen"])
        secs = h.get("seconds")
        row["seconds"] = _total_seconds(h)
        if isinstance(secs, dict):
            row.update({f"seconds_{p}": secs.get(p) for p in PHASES})
        row.update({f"H:{s}": v for s, v in (h.get("entropy") or {}).items()})
        w.writerow(["" if row.get(c) is None else row.get(c) for c in cols])
    return buf.getvalue()


def report_markdown(history: list[dict[str, Any]], baseline: dict[str, Any],
                    cfg: dict[str, Any]) -> str:
    final = next(h for h in reversed(history) if h["accepted"])
    lines = [
        f"# easier run: {cfg.get('method')} on {cfg.get('model', 'model')} / "
        f"{cfg.get('data', 'data')}",
        "",
        f"- baseline val top-1: {baseline['val_acc']:.2f}% "
        f"(test {_fmt(baseline.get('test_acc'))}%), delta = {cfg.get('delta')} points",
        f"- kept model: {len(final['removed'])} of {len(cfg.get('units', cfg.get('sites', [])))} "
        f"{cfg.get('unit', 'site')}s removed at iteration {final['iteration']}: "
        f"val {final['val_acc']:.2f}%, "
        f"test {_fmt(final.get('test_acc'))}%",
        f"- removed: {', '.join(final['removed']) or 'none'}",
        "",
        history_table(history, baseline),
        "",
        "Accuracy is top-1 in %, H is the layer entropy of the chosen site(s) when measured. "
        "Params and FLOPs do not change until the model is folded (`easier fold`).",
        "",
    ]
    return "\n".join(lines)


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None when the plot extra is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def png_bytes(fig: Any) -> bytes:
    """The figure as PNG bytes (110 dpi); the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def history_figure(history: list[dict[str, Any]], baseline: dict[str, Any], delta: float,
                   sites: list[str]) -> Any:
    """A matplotlib Figure (None without matplotlib): accuracy vs removed units with the δ
    line, the rejected iterations and the kept model marked; and a site × iteration entropy
    heat map with a labelled colour bar."""
    plt = pyplot()
    if plt is None:
        return None
    import numpy as np

    fig, (ax, hm) = plt.subplots(1, 2, figsize=(12, 4.5),
                                 gridspec_kw={"width_ratios": [1, 1.3]})
    x = [len(h["removed"]) for h in history]
    for key, label in (("val_acc", "val"), ("test_acc", "test"), ("train_acc", "train")):
        pts = [(xi, h[key]) for xi, h in zip(x, history, strict=True) if h.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    floor = baseline["val_acc"] - delta
    ax.axhline(floor, color="red", linestyle="--", label=f"baseline val − δ ({floor:.2f})")
    rejected = [(xi, h["val_acc"]) for xi, h in zip(x, history, strict=True)
                if not h["accepted"] and h.get("val_acc") is not None]
    if rejected:
        ax.scatter(*zip(*rejected, strict=True), marker="X", s=110, color="red", zorder=5,
                   label="rejected")
    kept = next(h for h in reversed(history) if h["accepted"])
    ax.scatter([len(kept["removed"])], [kept["val_acc"]], marker="*", s=260, color="gold",
               edgecolor="black", zorder=6, label=f"kept model (iteration {kept['iteration']})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("removed units")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("accuracy vs removed activations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    measured = [h for h in history if h.get("entropy")]
    if measured:
        grid = np.full((len(sites), len(measured)), np.nan)
        for j, h in enumerate(measured):
            for i, s in enumerate(sites):
                if s in h["entropy"]:
                    grid[i, j] = h["entropy"][s]
        # colour range fitted to the data (entropies often sit in a narrow band near 1 bit)
        lo = float(np.nanmin(grid)) if np.isfinite(grid).any() else 0.0
        hi = float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0
        im = hm.imshow(grid, aspect="auto", cmap="viridis", vmin=lo, vmax=max(hi, lo + 1e-3),
                       interpolation="nearest")
        for j, h in enumerate(measured):
            for c in h["chosen"]:
                if c in sites:
                    hm.scatter(j, sites.index(c), marker="x", color="red", s=30)
        hm.set_yticks(range(len(sites)))
        hm.set_yticklabels(sites, fontsize=6 if len(sites) > 20 else 8)
        hm.set_xticks(range(len(measured)))
        hm.set_xticklabels([str(h["iteration"]) for h in measured])
        hm.set_xlabel("iteration (x = chosen)")
        hm.set_title("layer entropy before each removal")
        fig.colorbar(im, ax=hm, label="layer entropy (bits)")
    else:
        hm.axis("off")
    fig.tight_layout()
    return fig


def plot_history(history: list[dict[str, Any]], baseline: dict[str, Any], delta: float,
                 sites: list[str]) -> bytes | None:
    """PNG bytes of :func:`history_figure` (None without matplotlib)."""
    fig = history_figure(history, baseline, delta, sites)
    return None if fig is None else png_bytes(fig)


def write_reports(run: RunDir, history: list[dict[str, Any]], baseline: dict[str, Any],
                  cfg: dict[str, Any]) -> None:
    run.write_jsonl("history.jsonl", history)
    atomic_write_text(run.file("history.csv"), history_csv(history))
    atomic_write_text(run.file("report.md"), report_markdown(history, baseline, cfg))
    png = plot_history(history, baseline, float(cfg.get("delta", 0.0)), list(cfg.get("sites", [])))
    if png is not None:
        atomic_write_bytes(run.file("report.png"), png)
