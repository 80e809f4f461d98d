"""Run several methods on the same model, data, seed and budget, and tabulate them side by side.

Each method runs the shared loop (:func:`easier.pipeline.reduce.reduce`) in its own resumable run
directory ``OUT/METHOD``, from the same freshly initialised model (same seed) with the same
pretraining and fine-tuning budget, and its kept model goes through the same :func:`fold` and
:func:`measure`. The table (markdown + CSV) and the plot are written to ``OUT``. With
``fronts``, every iteration's model is kept, folded and timed against the dense one
(:mod:`easier.fronts`): ``OUT/METHOD/front.csv`` per method, ``OUT/fronts.png`` for all.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from easier.errors import ConfigError
from easier.io.records import RunDir, atomic_write_bytes, atomic_write_text
from easier.methods import create_method
from easier.pipeline.fronts import Front, FrontConfig, front_run
from easier.pipeline.settings import RunConfig
from easier.report.files import png_bytes
from easier.report.outcome import returned_nonzero

__all__ = ["compare", "comparison_figure", "comparison_table", "fronts_figure", "fronts_table",
           "latency_axis_limit"]

COLUMNS = ("method", "removed", "unit", "baseline_val_acc", "val_acc", "test_acc", "params",
           "nonzero_params", "flops", "depth", "activations", "latency_ms_b1", "latency_ms_b64",
           "fold_error", "seconds")


def compare(
    make_model: Callable[[], nn.Module],
    train: Any,
    val: Any,
    *,
    methods: Sequence[str],
    out: str | Path,
    method_options: dict[str, dict[str, Any]] | None = None,
    plan: str = "latency",
    resume: bool = False,
    log: Callable[[str], None] | None = None,
    fronts: bool | FrontConfig = False,
    **reduce_kwargs: Any,
) -> list[dict[str, Any]]:
    """Reduce with each method and return one row per method (also written to ``out``).

    ``make_model()`` must return the same freshly initialised model every call (seed inside it).
    ``reduce_kwargs`` (test, train_eval, pretrain, finetune, stop, entropy, run) are shared;
    ``log`` (else ``run.log``) also gets one header line per method. ``fronts`` (True, or a
    :class:`FrontConfig`; True folds with ``plan`` and times batch 1) keeps every iteration's
    model and adds each method's :class:`~easier.pipeline.fronts.Front` to its row
    (``row["front"]``).
    """
    from easier.pipeline.reduce import reduce

    run = reduce_kwargs.pop("run", None) or RunConfig()
    if log is not None:
        run = dataclasses.replace(run, log=log)
    front_cfg = (fronts if isinstance(fronts, FrontConfig)
                 else FrontConfig(plan=plan) if fronts else None)
    if front_cfg is not None:
        run = dataclasses.replace(run, keep_iterations=True)
    say = run.log or (lambda _m: None)
    out = Path(out)
    if front_cfg is not None and resume:
        check_fronts_resumable(out, methods)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in methods:
        strategy = create_method(name, **(method_options or {}).get(name, {}))
        say(f"== {name} ==")
        run_dir = out / name
        result = reduce(make_model(), train, val, method=strategy, out=run_dir,
                        resume=resume and RunDir(run_dir).exists(), fold=plan, run=run,
                        **copy.copy(reduce_kwargs))
        final = next(h for h in reversed(result.history) if h["accepted"])
        after = result.extras["fold"]["after"]
        told = result.extras.get("outcome")  # reduce counted the returned program already
        lat = {lt["batch_size"]: lt["median_ms"] for lt in after["latency"]}
        rows.append({
            "method": name, "removed": len(final["removed"]), "unit": strategy.unit,
            "val_acc": final["val_acc"], "test_acc": final.get("test_acc"),
            "params": after["params"],
            "nonzero_params": (told.returned.nonzero_params if told is not None
                               else returned_nonzero(result)),
            "flops": after["flops_per_sample"],
            "depth": after["depth"], "activations": after["activations"],
            "latency_ms_b1": lat.get(1), "latency_ms_b64": lat.get(64),
            "fold_error": result.extras["fold"]["plan"]["max_abs_error"],
            # the run's own time (pretraining + iterations), also right for a resumed run
            "seconds": sum(h["seconds"]["total"] for h in result.history),
            "removed_units": final["removed"],
            "baseline_val_acc": result.baseline["val_acc"],
            "baseline_test_acc": result.baseline.get("test_acc"),
            "curve": [(len(h["removed"]), h["val_acc"], h.get("test_acc"))
                      for h in result.history if not h.get("failed")],
        })
        if front_cfg is not None:
            rows[-1]["front"] = front_run(run_dir, front_cfg, model=make_model(), log=say)
    write_comparison(out, rows)
    return rows


def check_fronts_resumable(out: Path, methods: Sequence[str]) -> None:
    """Refuse, before any run, to resume a method run that kept no iteration models."""
    for name in methods:
        run = RunDir(out / name)
        if run.exists() and not run.iteration_file(0).is_file():
            raise ConfigError(f"{run.path} was run without fronts, so its iteration models are "
                              "gone: compare with fronts into a new output directory")


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-2) else f"{v:.2f}"
    return str(v)


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, one row per method (dense baseline first)."""
    head = "| " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def write_comparison(out: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*COLUMNS, "removed_units"])
    for r in rows:
        w.writerow([r.get(c) for c in COLUMNS] + [" ".join(r["removed_units"])])
    atomic_write_text(out / "comparison.csv", buf.getvalue())
    text = ("# Comparison\n\nEach method starts from the same freshly initialised model, seed "
            "and budget; `baseline_val_acc` is its own dense model after pretraining (methods "
            "with a training-time regularizer, such as lacoot, pretrain with it). Params, FLOPs "
            "(per sample), depth (weight layers on the longest path) and latency (ms per batch) "
            "are measured on each method's kept model after folding; `nonzero_params` counts the "
            "kept model's weights that are not exactly zero (before folding: pruning methods "
            "such as egp leave the dense count in `params`).\n\n"
            + comparison_table(rows) + "\n")
    fronts = {r["method"]: r["front"] for r in rows if r.get("front") is not None}
    if fronts:
        text += ("\n## Fronts: accuracy against the folded model's measured latency\n\n"
                 "One row per iteration (rejected ones too: kept = no). Each model is folded "
                 "and timed against the dense one (iteration 0, folded the same way) in paired "
                 "interleaved rounds; speed-up = dense / folded with its noise band; "
                 "front = on the method's Pareto front (accuracy up, paired latency down). "
                 "Per-method detail: `METHOD/front.csv`.\n\n" + fronts_table(fronts) + "\n")
    atomic_write_text(out / "comparison.md", text)
    fig = comparison_figure(rows)
    if fig is not None:
        atomic_write_bytes(out / "comparison.png", png_bytes(fig))
    fig = fronts_figure(fronts) if fronts else None
    if fig is not None:
        atomic_write_bytes(out / "fronts.png", png_bytes(fig))


def latency_axis_limit(latencies: Sequence[float], factor: float = 3.0) -> float | None:
    """Right edge of the latency axis, or None to let matplotlib choose: points beyond
    ``factor`` × the median (one noisy measurement) are clipped so they do not squash the rest."""
    if len(latencies) < 3:
        return None
    ordered = sorted(latencies)
    median = ordered[len(ordered) // 2]
    inside = [v for v in ordered if v <= factor * median]
    if len(inside) == len(ordered):
        return None
    return max(inside) * 1.25


def comparison_figure(rows: list[dict[str, Any]]) -> Any:
    """A matplotlib Figure (None without matplotlib): accuracy vs removed depth per method, and
    accuracy vs batch-1 latency with one colour per method named in a legend (labels never
    overlap); latencies beyond the clipped axis sit at its edge, annotated with their value."""
    from easier.report.files import pyplot

    plt = pyplot()
    if plt is None:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    timed = [r for r in rows if r.get("latency_ms_b1") is not None]
    limit = latency_axis_limit([r["latency_ms_b1"] for r in timed])
    for r in rows:
        pts = [(n, t if t is not None else v) for n, v, t in r["curve"]]
        (line,) = a.plot(*zip(*pts, strict=True), marker="o", label=r["method"])
        if r.get("latency_ms_b1") is None:
            continue
        acc = r["test_acc"] if r["test_acc"] is not None else r["val_acc"]
        lat = r["latency_ms_b1"]
        if limit is not None and lat > limit:
            b.scatter(limit, acc, s=60, marker=">", color=line.get_color(), label=r["method"])
            b.annotate(f"{lat:.3g} ms", (limit, acc), fontsize=8, ha="right",
                       xytext=(-8, 6), textcoords="offset points")
        else:
            b.scatter(lat, acc, s=50, color=line.get_color(), label=r["method"])
    if limit is not None:
        b.set_xlim(right=limit * 1.05)
    a.set_xlabel("removed units (sites or blocks)")
    a.set_ylabel("top-1 accuracy (%) (test if available)")
    a.set_title("accuracy vs removed depth")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    b.set_xlabel("latency after folding (ms, batch 1)"
                 + ("; ▶ = beyond the axis, value shown" if limit is not None else ""))
    b.set_ylabel("top-1 accuracy of the kept model (%)")
    b.set_title("accuracy vs latency")
    b.grid(alpha=0.3)
    if timed:
        b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fronts_table(fronts: dict[str, Front]) -> str:
    """Markdown, one row per method and iteration: accuracy, cost, paired timing per batch."""
    sizes = next(iter(fronts.values())).batch_sizes
    cols = ["method", "iter", "removed", "kept", "val_acc", "test_acc", "flops", "depth",
            "merged", *(f"{h} b{b}" for b in sizes
                        for h in ("dense → folded ms", "speed-up (band)", "front"))]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, front in fronts.items():
        on = {b: {p.iteration for p in front.pareto("latency", b)} for b in sizes}
        for p in front.points:
            cells = [name, str(p.iteration), str(p.removed), "yes" if p.accepted else "no",
                     _cell(p.val_acc), _cell(p.test_acc), _cell(p.flops), str(p.depth),
                     str(p.merged)]
            for b in sizes:
                c = p.timings[b]
                s, lo, hi = p.speedup(b)
                cells += [f"{c.before_ms:.3g} → {c.after_ms:.3g}",
                          f"{s:.2f}× ({lo:.2f}–{hi:.2f})", "●" if p.iteration in on[b] else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fronts_figure(fronts: dict[str, Front]) -> Any:
    """A matplotlib Figure (None without matplotlib): accuracy against the folded model's
    latency relative to the dense one (paired, at the first timed batch size; the bars are the
    noise band; the top axis converts at the median dense latency), and against FLOPs per
    sample. One line per method through its iterations: the dense point a star, rejected
    iterations hollow, the method's Pareto points ringed in black."""
    from easier.report.files import pyplot

    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    b = next(iter(fronts.values())).batch_sizes[0]
    for name, front in fronts.items():
        pts, color = front.points, None
        for ax, by in ((axes[0], "latency"), (axes[1], "flops")):
            xs = [p.timings[b].ratio if by == "latency" else p.flops for p in pts]
            ys = [p.accuracy for p in pts]
            (line,) = ax.plot(xs, ys, "-", lw=1, alpha=0.6, color=color, label=name)
            color = line.get_color()
            if by == "latency":
                ax.errorbar(xs, ys, xerr=[[x - p.timings[b].ratio_lo for x, p in zip(
                    xs, pts, strict=True)], [p.timings[b].ratio_hi - x for x, p in zip(
                        xs, pts, strict=True)]], fmt="none", ecolor=color, alpha=0.35, lw=1)
            for x, y, p in zip(xs, ys, pts, strict=True):
                ax.scatter(x, y, s=130 if p.iteration == 0 else 28, zorder=3,
                           marker="*" if p.iteration == 0 else "o",
                           facecolors=color if p.accepted else "none", edgecolors=color)
            best = {p.iteration for p in front.pareto(by, b)}
            ax.scatter([x for x, p in zip(xs, pts, strict=True) if p.iteration in best],
                       [p.accuracy for p in pts if p.iteration in best], s=110,
                       facecolors="none", edgecolors="black", linewidths=1.2, zorder=4)
    dense_ms = sorted(p.timings[b].before_ms for f in fronts.values() for p in f.points)
    ms = dense_ms[len(dense_ms) // 2]
    axes[0].axvline(1.0, color="gray", ls=":", lw=1)
    top = axes[0].secondary_xaxis("top", functions=(lambda r: r * ms, lambda t: t / ms))
    top.set_xlabel(f"≈ ms at batch {b} (median dense {ms:.3g} ms)", fontsize=8)
    threads = "/".join(map(str, sorted({f.num_threads for f in fronts.values()})))
    axes[0].set_xlabel(f"latency of the folded model / the dense one (paired, batch {b}, "
                       f"{threads} threads; bars: noise band)")
    axes[0].set_title("accuracy vs measured latency (★ dense, ○ rejected, black ring = front)",
                      fontsize=10, pad=36)
    axes[1].set_xlabel("FLOPs per sample of the folded model")
    axes[1].set_title("accuracy vs FLOPs", fontsize=10)
    for ax in axes:
        ax.set_ylabel("top-1 accuracy (%) (test if available)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
