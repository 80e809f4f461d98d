"""The benchmark scripts in bench/ at --quick sizes, so that they cannot rot.

Each script's ``main`` runs in this process (bench_entropy's memory children and run_all's
scripts in subprocesses, as they always do); the returned tables are checked for their rows and
columns, and their numbers against what they must equal by construction.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
ONE = ["--threads", "1"]  # tiny models run faster on one thread, and never oversubscribe
THREADS_AT_IMPORT = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _restore_threads():
    """The scripts' --threads sets torch's global thread count: give it back after each test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _bench(name: str):
    """Import a bench/ script as a module (bench/ is not a package)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def _pm(cell: str) -> tuple[float, float]:
    m = re.fullmatch(r"(-?[\d.]+) ± ([\d.]+)", cell)
    assert m, f"not 'mean ± std': {cell!r}"
    return float(m[1]), float(m[2])


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


# ---------------------------------------------------------------------------------------------
# _common


def test_table_renders_formats_alignment_and_rejects_bad_rows():
    common = _bench("_common")
    t = common.Table("T", ["name", "ms", "ratio"], formats={"ms": ".2f"}, suffix={"ratio": "x"})
    t.add("a", 1.234, 2.0)
    t.add("b", None, 0.5)
    lines = t.markdown().splitlines()
    assert lines[0] == "### T"
    assert lines[-4:] == [
        "| name | ms | ratio |",
        "|---|---:|---:|",
        "| a | 1.23 | 2x |",
        "| b | – | 0.5x |",
    ]
    assert t.column("ratio") == [2.0, 0.5]
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        t.add("c", 1.0)


def test_band_reads_the_comparison_and_its_inverse():
    common = _bench("_common")
    from easier.perf.timing import compare_samples

    # 9 rounds: the band is the 2nd..8th smallest per-round ratio (sign-test, >= 95 %)
    before = [10.0] * 9
    after = [2.0, 4.0, 4.5, 4.8, 5.0, 5.2, 5.5, 6.0, 9.0]
    c = compare_samples(before, after)
    assert c.ratio == pytest.approx(0.5)
    assert common.band(c) == "0.40..0.60"
    assert common.band(c, inverse=True) == f"{1 / 0.6:.2f}..{1 / 0.4:.2f}"


def test_paired_times_relative_cost_of_real_work():
    common = _bench("_common")
    small, big = list(range(2_000)), list(range(40_000))
    comps = common.paired([lambda: sorted(small), lambda: sorted(big)], rounds=9,
                          min_sample_s=0.01)
    assert comps[0].ratio == pytest.approx(1.0) and comps[0].runs == 9
    # 20x the elements: far more than 2x the time, even on a loaded machine (paired rounds)
    assert comps[1].ratio > 2 and comps[1].ratio_lo <= comps[1].ratio <= comps[1].ratio_hi


def test_bench_has_one_paired_timing_implementation():
    """bench/ times through easier.perf.timing: no script keeps its own timing loop."""
    for f in BENCH.glob("*.py"):
        text = f.read_text()
        assert "def interleaved" not in text and "def median_iqr" not in text, f.name
        assert "perf_counter()" not in text or f.name in PERF_COUNTER_OK, f.name


# setup, capture and whole-run wall clocks (no ratios), not paired comparisons
PERF_COUNTER_OK = {"bench_entropy.py", "bench_bert_fold.py", "bench_entropy_order.py",
                   "bench_latency_method.py", "bench_reproduction.py", "bench_time_to_result.py",
                   "run_all.py", "zoo_sweep.py", "bench_fmnist.py"}


def test_every_script_takes_out():
    for f in sorted(BENCH.glob("bench_*.py")):
        text = f.read_text()
        own = all(f'"--{flag}"' in text for flag in ("quick", "threads", "out"))
        assert "add_common_args(ap)" in text or own, f"{f.name}: no --quick/--threads/--out"
        assert "write_out(args.out" in text or "args.out" in text, (
            f"{f.name}: --out is parsed but never written")


@pytest.mark.slow
def test_fold_quick_prints_and_writes_bands(tmp_path):
    bf = _bench("bench_fold")
    out = tmp_path / "f.md"
    table = bf.main(["--quick", *ONE, "--min-run-time", "0.03", "--rounds", "3",
                     "--out", str(out)])
    rows = [dict(zip(table.columns, r, strict=True)) for r in table.rows]
    assert len(rows) == 2 * len(bf.cases()) and {r["batch"] for r in rows} == {1, 8}
    for r in rows:
        for ratio, cell in (("speed-up vs orig", "orig band"), ("vs relocated",
                                                                "relocated band")):
            lo, hi = map(float, r[cell].split(".."))
            assert lo <= round(r[ratio], 2) <= hi and _positive(r[ratio])
        assert all(_positive(r[c]) for c in ("orig ms", "relocated ms", "merged ms"))
    text = out.read_text()
    assert text.startswith("machine:") and "| chain | batch |" in text


# ---------------------------------------------------------------------------------------------
# bench_reproduction


def test_reproduction_curve_helpers_on_hand_made_histories():
    rep = _bench("bench_reproduction")
    pts = {0: 90.0, 1: 90.0, 2: 88.5, 3: 80.0}
    assert rep.area(pts) == pytest.approx(((90 + 90) / 2 + (90 + 88.5) / 2 + (88.5 + 80) / 2) / 3)
    assert rep.removed_before_drop(pts, 1.0) == 1  # 88.5 is the first point below 89
    assert rep.removed_before_drop(pts, 20.0) == 3  # never drops: all removed
    hist = [
        {"iteration": 0, "removed": [], "test_acc": 90.0},
        {"iteration": 1, "removed": ["a"], "test_acc": 91.0, "meets_threshold": True},
        {"iteration": 2, "removed": ["a", "b"], "test_acc": None, "failed": "nan"},
        {"iteration": 3, "removed": ["a", "b"], "test_acc": 70.0, "meets_threshold": False},
    ]
    assert rep.curve(hist) == {0: 90.0, 1: 91.0, 2: 70.0}
    assert rep.first_rejection(hist) == 3


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory):
    rep = _bench("bench_reproduction")
    tmp = tmp_path_factory.mktemp("repro")
    threads = torch.get_num_threads()  # module scope: set up before _restore_threads runs
    try:
        tables = rep.main(
            ["--quick", *ONE, "--workdir", str(tmp / "work"), "--plot", str(tmp / "r.png"),
             "--json", str(tmp / "r.json"), "--out", str(tmp / "r.md")]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return tables, tmp


@pytest.mark.slow
def test_reproduction_quick_tables(reproduction):
    (acc, summary, budget), tmp = reproduction
    methods = ["easier", "random", "max-entropy"]
    assert acc.columns == ["removed", *methods]
    assert acc.column("removed") == [0, 1, 2]  # quick: 2 sites
    dense = [_pm(c) for c in acc.rows[0][1:]]
    assert len(set(dense)) == 1, "all orders must start from the same pretrained model"
    for row in acc.rows:
        for cell in row[1:]:
            mean, std = _pm(cell)
            assert 0 <= mean <= 100 and std >= 0

    # the area column is the trapezoid mean of the raw curves, recomputed here with numpy
    curves = json.loads((tmp / "r.json").read_text())["curves"]
    for row in summary.rows:
        areas = []
        for seed in (0, 1):
            c = curves[f"{seed}/{row[0]}"]
            ks = sorted(int(k) for k in c)
            areas.append(np.trapezoid([c[str(k)] for k in ks], ks) / (ks[-1] - ks[0]))
        assert _pm(row[1])[0] == pytest.approx(np.mean(areas), abs=0.006)
    assert summary.column("method") == methods

    assert budget.column("seed") == [0, 1]
    for row in budget.rows:
        n = row[2]  # fine-tunes until the first rejection
        assert 1 <= n <= 2 and 0 <= row[1] <= n
        assert row[5] == 3 * n and row[6] == 160 * n  # quick pretrain is 3 epochs
        assert _positive(row[3]) and row[4] >= 0

    assert (tmp / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp / "work" / "seed0" / "pretrained.pt").is_file()
    assert (tmp / "work" / "seed1" / "easier" / "summary.json").is_file()
    md = (tmp / "r.md").read_text()
    assert "Paper's claim" in md and "| removed | easier | random | max-entropy |" in md


# ---------------------------------------------------------------------------------------------
# bench_fold_models


@pytest.mark.slow
def test_fold_models_quick(reproduction):
    fm = _bench("bench_fold_models")
    run_dir = reproduction[1] / "work" / "seed0" / "easier"
    main_t, sets, verdict = fm.main(
        ["--quick", *ONE, "--models", "resnet18", "--plans", "none,latency,all",
         "--latency-at", "1,8", "--rounds", "2", "--run", str(run_dir)]
    )  # fmt: skip
    assert main_t.columns[-6:] == ["b1 ms", "b1 speed-up", "b1 band", "b8 ms", "b8 speed-up",
                                   "b8 band"]
    kept = json.loads((run_dir / "summary.json").read_text())["linearized"]
    assert sets.rows[1][2] == (", ".join(kept) if kept else "")
    labels = {r[0] for r in main_t.rows}
    assert len(labels) == 2 and "resnet18" in labels
    for label in labels:
        rows = {r[1]: dict(zip(main_t.columns, r, strict=True)) for r in main_t.rows
                if r[0] == label}  # fmt: skip
        assert list(rows) == ["unfolded", "none", "latency", "latency@8", "latency@1+8", "all"]
        base = rows["unfolded"]
        assert base["b1 speed-up"] == 1.0 and base["b8 speed-up"] == 1.0
        # BN folding removes no conv/linear FLOPs: FlopCounterMode counts none for BN
        assert rows["none"]["FLOPs ratio"] == pytest.approx(1.0)
        assert rows["none"]["merged chains"].startswith("0/")
        merged, chains = map(int, rows["all"]["merged chains"].split("/"))
        assert merged == chains
        assert rows["all"]["depth"] <= base["depth"]
        if label == "resnet18":  # each relu1 chain conv1->conv2 becomes one conv
            assert (merged, rows["all"]["depth"]) == (8, base["depth"] - 8)
        for plan, r in rows.items():
            for b in (1, 8):
                assert _positive(r[f"b{b} ms"]) and _positive(r[f"b{b} speed-up"])
                lo, hi = map(float, r[f"b{b} band"].split(".."))  # paired-rounds band
                assert lo <= round(r[f"b{b} speed-up"], 2) <= hi
            if plan != "unfolded":
                assert r["rel err"] < 1e-4  # the folds are exact up to float rounding
    row = dict(zip(verdict.columns, verdict.rows[0], strict=True))
    assert row["model"] == "resnet18" and row["latency never slower"] in ("yes", "no")
    assert _positive(row["latency b1 speed-up"]) and _positive(row["latency b8 speed-up"])


# ---------------------------------------------------------------------------------------------
# bench_bert_fold


@pytest.mark.slow
def test_bert_fold_quick():
    pytest.importorskip("transformers")
    bb = _bench("bench_bert_fold")
    fold_t, cap_t = bb.main(["--quick", *ONE])
    rows = [dict(zip(fold_t.columns, r, strict=True)) for r in fold_t.rows]
    assert [r["batch x seq"] for r in rows] == ["1 x 16", "2 x 16"]
    h, i = bb.TINY["hidden_size"], bb.TINY["intermediate_size"]
    layers, tokens = bb.TINY["num_hidden_layers"], 16
    for b, r in zip((1, 2), rows, strict=True):
        # each MLP: 2 linears (h->i->h) become one h->h linear; nothing else changes
        saved = 2 * b * tokens * layers * (2 * h * i - h * h)
        assert r["FLOPs unfolded"] - r["FLOPs folded"] == saved
        assert r["FLOPs ratio"] == pytest.approx(r["FLOPs folded"] / r["FLOPs unfolded"])
        assert r["max rel err"] < 1e-4 and r["rounds"] == 2 and _positive(r["speed-up"])
        lo, hi = map(float, r["speed-up band"].split(".."))
        assert lo <= round(r["speed-up"], 2) <= hi
    assert [r[0].split(" ")[0] for r in cap_t.rows] == [*bb.PAPER_MODELS, "tiny"]
    assert all(_positive(r[2]) and r[5] > 0 for r in cap_t.rows)


# ---------------------------------------------------------------------------------------------
# bench_entropy


@pytest.mark.slow
def test_entropy_quick_time_and_memory(tmp_path):
    be = _bench("bench_entropy")
    out = tmp_path / "e.md"
    time_t, mem_t = be.main(["--quick", *ONE, "--models", "resnet18", "--out", str(out)])
    (name, sites, plain, hooked, ratio, band, setup, whole, whole_band), = time_t.rows  # fmt: skip
    assert name == "resnet18" and sites == 17
    assert _positive(plain) and _positive(hooked) and _positive(ratio)
    assert _positive(setup) and _positive(whole)
    for r, b in ((ratio, band), (whole, whole_band)):  # each ratio inside its noise band
        lo, hi = map(float, b.split(".."))
        assert lo <= round(r, 3) <= hi
    row = dict(zip(mem_t.columns, mem_t.rows[0], strict=True))
    assert row["model"] == "resnet18"
    for c in ("plain pass (MiB)", "entropy pass (MiB)", "pass ratio", "process ratio"):
        assert _positive(row[c]), c
    assert row["process ratio"] == pytest.approx(
        row["entropy process (MiB)"] / row["plain process (MiB)"]
    )
    # the whole process holds torch and the model: far more than one pass at quick sizes
    assert row["plain process (MiB)"] > row["plain pass (MiB)"]
    text = out.read_text()
    assert text.startswith("machine:") and "| resnet18 | 17 |" in text


# ---------------------------------------------------------------------------------------------
# run_all


@pytest.mark.slow
def test_run_all_quick_writes_the_document(tmp_path):
    ra = _bench("run_all")
    doc = tmp_path / "docs" / "BENCH.md"
    sections = ra.main(["--quick", *ONE, "--only", "fold,reproduction", "--doc", str(doc)])
    text = doc.read_text()
    assert text.startswith("# Benchmarks") and "python bench/run_all.py" in text
    assert len(sections) == 2 and "FAILED" not in text
    assert "## Folding hand-built linear chains" in text and "| chain | batch |" in text
    assert "## Reproduction: does the entropy order matter?" in text
    assert "| removed | easier | random | max-entropy |" in text
    assert (doc.parent / "reproduction.png").is_file()  # the plot lands next to the document


@pytest.mark.slow
def test_thread_count_is_restored_after_the_scripts(reproduction):
    assert torch.get_num_threads() == THREADS_AT_IMPORT


def test_run_all_quick_never_defaults_to_the_real_document():
    ra = _bench("run_all")
    real = ra.ROOT / "docs" / "BENCHMARKS.md"
    quick = ra.doc_path(True, None)
    try:
        assert quick != real and quick.name.startswith("BENCHMARKS-quick-")
    finally:
        quick.unlink(missing_ok=True)
    assert ra.doc_path(False, None) == real
    assert ra.doc_path(True, "x.md") == Path("x.md")


# ---------------------------------------------------------------------------------------------
# bench_entropy_order


@pytest.mark.slow
def test_entropy_order_quick_run_tables_and_pairing(tmp_path):
    eo = _bench("bench_entropy_order")
    js = tmp_path / "r.json"
    tables = eo.main(["--quick", "--seeds", "0", "--orders", "easier,easier-train,random",
                      "--json", str(js), *ONE])
    pre = next(t for t in tables if "pre-FT" in t.title)
    post = next(t for t in tables if "post-FT" in t.title and "minus" not in t.title)
    res = json.loads(js.read_text())["mlp6"]
    hist = res["runs"]["0/random"]
    # every k of the post-FT table is the history's test top-1 after k removals (1 seed: ± 0.0)
    for row in post.rows:
        k = row[0]
        h = next(h for h in hist if len(h["removed"]) == k)
        assert _pm(row[3]) == (pytest.approx(h["test_acc"], abs=0.051), 0.0)  # random
    for row in pre.rows:
        for cell in row[1:]:
            assert 0.0 <= _pm(cell)[0] <= 100.0
    paired = next(t for t in tables if "minus" in t.title)
    assert {r[0] for r in paired.rows} == {"easier-train", "random"}
    assert "all-linear cost" in paired.note
    timing = next(t for t in tables if "eval mode" in t.title)
    assert timing.rows[0][0] == len(res["runs"]["0/easier-train"]) - 1  # one check per step
    # --load re-renders the same tables from the JSON without running anything
    again = eo.main(["--load", str(js), "--plot", str(tmp_path / "p.png"), *ONE])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert [t.rows for t in again] == [t.rows for t in tables]


def test_entropy_order_statistics_against_hand_values():
    eo = _bench("bench_entropy_order")
    lo, hi = eo.bootstrap_ci([2.0, 2.0, 2.0])
    assert lo == hi == 2.0
    lo, hi = eo.bootstrap_ci([-1.0, 0.0, 1.0, 2.0, 3.0])
    assert -1.0 <= lo < 1.0 < hi <= 3.0  # the mean (1.0) lies inside, within the data range
    hist = [{"removed": [], "test_acc": 90.0, "accepted": True, "pre_ft_test_acc": None},
            {"removed": ["a"], "test_acc": 89.5, "accepted": True, "pre_ft_test_acc": 70.0},
            {"removed": ["a", "b"], "test_acc": 80.0, "accepted": False,
             "pre_ft_test_acc": 40.0}]
    assert eo.by_k(hist, "pre_ft_test_acc") == {0: 90.0, 1: 70.0, 2: 40.0}
    assert eo.kept(hist) == 1


# ---------------------------------------------------------------------------------------------
# bench_latency_method


@pytest.mark.slow
def test_latency_method_quick_run_fronts(tmp_path):
    bl = _bench("bench_latency_method")
    summary, _ = bl.main(["--quick", "--methods", "easier,easier-latency",
                               "--save", str(tmp_path), *ONE])
    fronts = json.loads((tmp_path / "fronts.json").read_text())["resnet18"]
    for name in ("easier", "easier-latency"):
        pts = fronts[f"0/{name}"]
        assert [p["removed"] for p in pts] == [0, 1, 2]  # one point per iteration
        assert all(p["speedup"] > 0 and p["band"][0] <= p["band"][1] for p in pts)
        row = next(r for r in summary.rows if r[1] == name)
        best = max((p for p in pts if p["test_acc"] >= pts[0]["test_acc"] - 1.0),
                   key=lambda p: p["speedup"])
        assert row[3].startswith(f"{best['speedup']:.2f} ")
    # --load re-times the saved points without training
    again = bl.main(["--load", str(tmp_path), "--quick", "--methods", "easier,easier-latency",
                     *ONE])
    assert [r[:3] for r in again[0].rows] == [r[:3] for r in summary.rows]


def test_latency_method_pareto_against_brute_force():
    bl = _bench("bench_latency_method")
    rng = np.random.default_rng(0)
    pts = [{"test_acc": float(a), "ms": float(m)}
           for a, m in zip(rng.integers(0, 5, 40), rng.integers(0, 5, 40), strict=True)]
    front = bl.pareto(pts)
    for p in pts:  # on the front iff no point is at least as good on both and better on one
        dominated = any((q["test_acc"] >= p["test_acc"] and q["ms"] <= p["ms"])
                        and (q["test_acc"], q["ms"]) != (p["test_acc"], p["ms"]) for q in pts)
        assert (p in front) == (not dominated)


# bench_linear_replacement, bench_entropy_floor


@pytest.mark.slow
def test_linear_replacement_quick_rows_per_site():
    lr = _bench("bench_linear_replacement")
    table, summary = lr.main(["--quick", *ONE])
    rows = [dict(zip(table.columns, r, strict=True)) for r in table.rows]
    assert [r["site"] for r in rows] == ["body.3", "body.6"]  # every site of the quick MLP once
    for r in rows:
        for v in ("identity stale", "affine stale", "identity BN", "affine BN"):
            assert r["dense"] - 100.0 <= r[v] <= r["dense"], v  # a drop from the dense top-1
    (model, sites, *_means, wins), = summary.rows  # fmt: skip
    assert model == "mlp6" and sites == 2 and wins.endswith("/2")


@pytest.mark.slow
def test_entropy_floor_quick_counts_agree_and_shares_are_positive():
    ef = _bench("bench_entropy_floor")
    (table,) = ef.main(["--quick", *ONE, "--models", "resnet18"])  # asserts equal counts first
    row = dict(zip(table.columns, table.rows[0], strict=True))
    assert row["model"] == "resnet18" and row["sites"] == 17
    for c in table.columns[2:]:
        if c.endswith(" band"):  # each share inside its noise band
            lo, hi = map(float, row[c].split(".."))
            assert lo <= round(row[c[:-5]], 3) <= hi, c
        else:
            assert _positive(row[c]), c


# bench_time_to_result


@pytest.mark.slow
def test_time_to_result_quick_tables(tmp_path):
    tt = _bench("bench_time_to_result")
    out = tmp_path / "t.md"
    summary, per_seed = tt.main(["--quick", *ONE, "--out", str(out)])
    assert summary.column("variant") == list(tt.VARIANTS)
    assert per_seed.column("variant") == list(tt.VARIANTS)
    ft = tt.QUICK["default"].finetune
    steps = dict(zip(per_seed.column("variant"), per_seed.column("steps"), strict=True))
    per_iter = dict(zip(per_seed.column("variant"), per_seed.column("steps per iteration"),
                        strict=True))
    for variant, cell in per_iter.items():
        counts = [int(c) for c in cell.split()]
        assert sum(counts) == steps[variant] and len(counts) == 2  # quick: max_removals 2
        # today's loop runs the budget; an early stop ends at a check (every 2 steps)
        assert all(c == ft.max_steps if variant == tt.BASELINE else c % 2 == 0 and c <= 6
                   for c in counts)
    ratios = dict(zip(summary.column("variant"), summary.column("steps vs today"), strict=True))
    for variant, r in ratios.items():
        assert r == pytest.approx(steps[variant] / steps[tt.BASELINE])
    text = out.read_text()
    assert "### Time to result: default" in text and "load average" in text


@pytest.mark.slow
def test_time_to_result_rows_file_resumes_without_rerunning(tmp_path, monkeypatch):
    tt = _bench("bench_time_to_result")
    rows = tmp_path / "rows.jsonl"
    base = ["--quick", *ONE, "--rows", str(rows)]
    first = tt.main([*base, "--variants", "today (full budget)"])
    assert len(rows.read_text().splitlines()) == 1
    calls = []
    real = tt.easier.reduce
    monkeypatch.setattr(tt.easier, "reduce", lambda *a, **k: calls.append(1) or real(*a, **k))
    # the saved run is reused, only the new variant runs; the tables hold both
    _summary, per_seed = tt.main([*base, "--variants", "today (full budget),early stop"])
    assert len(calls) == 1 and len(rows.read_text().splitlines()) == 2
    assert per_seed.column("variant") == ["today (full budget)", "early stop"]
    assert per_seed.rows[0] == first[1].rows[0]  # the first run's row, read back unchanged
