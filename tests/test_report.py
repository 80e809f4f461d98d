"""Report contents checked against the history passed in (not only that a PNG is written)."""

import csv
import io

from easier.report.files import history_csv, history_table, plot_history, report_markdown

BASE = {"val_acc": 90.0, "test_acc": 89.5}
HISTORY = [
    {"iteration": 0, "chosen": [], "removed": [], "entropy": None, "train_acc": 95.0,
     "val_acc": 90.0, "test_acc": 89.5, "accepted": True, "train_loss": 0.2, "params": 100,
     "seconds": {"total": 1.5}},
    {"iteration": 1, "chosen": ["relu2"], "removed": ["relu2"],
     "entropy": {"relu1": 0.9, "relu2": 0.125, "relu3": 0.5}, "train_acc": 94.0,
     "val_acc": 89.25, "test_acc": None, "accepted": True, "seconds": {"step": 1.0, "total": 3.0},
     "finetune_steps": 40},
    {"iteration": 2, "chosen": ["relu3"], "removed": ["relu2", "relu3"],
     "entropy": {"relu1": 0.8, "relu3": 0.4375}, "train_acc": None, "val_acc": 80.0,
     "test_acc": 79.0, "accepted": False, "seconds": 2.0},
]
CFG = {"method": "easier", "model": "convnet", "data": "digits", "delta": 1.0,
       "sites": ["relu1", "relu2", "relu3"]}


def test_table_has_one_row_per_iteration_with_its_values():
    rows = history_table(HISTORY, BASE).splitlines()
    assert len(rows) == 2 + 3
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]
    assert cells[0] == ["0", "0", "dense", "–", "95.00", "90.00", "89.50", "yes", "–", "1.5"]
    assert cells[1] == ["1", "1", "relu2", "0.125", "94.00", "89.25", "–", "yes", "40", "3.0"]
    assert cells[2] == ["2", "2", "relu3", "0.438", "–", "80.00", "79.00", "no", "–", "2.0"]


def test_csv_rows_match_the_history():
    rows = list(csv.DictReader(io.StringIO(history_csv(HISTORY))))
    assert [r["iteration"] for r in rows] == ["0", "1", "2"]
    assert [r["removed"] for r in rows] == ["0", "1", "2"]  # counts, not names
    assert [r["chosen"] for r in rows] == ["", "relu2", "relu3"]
    assert [r["seconds"] for r in rows] == ["1.5", "3.0", "2.0"]  # the total, or the number
    assert [r["accepted"] for r in rows] == ["True", "True", "False"]
    assert [r["finetune_steps"] for r in rows] == ["", "40", ""]
    assert rows[1]["test_acc"] == "" and rows[0]["params"] == "100"


def test_markdown_reports_the_last_accepted_model():
    md = report_markdown(HISTORY, BASE, CFG)
    assert md.startswith("# easier run: easier on convnet / digits\n")
    assert "- baseline val top-1: 90.00% (test 89.50%), delta = 1.0 points" in md
    # iteration 2 was rejected: the kept model is iteration 1's
    assert ("- kept model: 1 of 3 sites removed at iteration 1: val 89.25%, test –%" in md)
    assert "- removed: relu2\n" in md
    assert history_table(HISTORY, BASE) in md


def test_plot_is_a_png_of_the_expected_size():
    png = plot_history(HISTORY, BASE, 1.0, CFG["sites"])
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(png[16:20], "big")
    height = int.from_bytes(png[20:24], "big")
    assert (width, height) == (12 * 110, int(4.5 * 110))  # figsize x dpi


def test_csv_has_every_site_entropy_and_phase_times():
    rows = list(csv.DictReader(io.StringIO(history_csv(HISTORY))))
    # sites in order of first measurement; blank where not measured that iteration
    assert [c for c in rows[0] if c.startswith("H:")] == ["H:relu1", "H:relu2", "H:relu3"]
    assert [rows[1][f"H:{s}"] for s in ("relu1", "relu2", "relu3")] == ["0.9", "0.125", "0.5"]
    assert [rows[2][f"H:{s}"] for s in ("relu1", "relu2", "relu3")] == ["0.8", "", "0.4375"]
    assert rows[0]["H:relu1"] == ""
    assert (rows[1]["seconds_step"], rows[1]["seconds_finetune"]) == ("1.0", "")
    assert rows[0]["seconds_step"] == "" and rows[2]["seconds_step"] == ""  # no phases recorded


def _offsets(ax, label):
    found = [c for c in ax.collections if c.get_label() == label]
    assert len(found) == 1, [c.get_label() for c in ax.collections]
    return found[0].get_offsets().tolist()


def test_plot_marks_the_rejected_iteration_and_the_kept_model():
    import matplotlib.pyplot as plt

    from easier.report.files import history_figure

    fig = history_figure(HISTORY, BASE, 1.0, CFG["sites"])
    try:
        acc, heat, bar = fig.axes
        assert _offsets(acc, "rejected") == [[2.0, 80.0]]  # iteration 2: 2 removed, val 80
        assert _offsets(acc, "kept model (iteration 1)") == [[1.0, 89.25]]
        floor = [ln for ln in acc.lines if ln.get_label().startswith("baseline val")]
        assert floor[0].get_ydata()[0] == 90.0 - 1.0
        assert bar.get_ylabel() == "layer entropy (bits)"
        assert [t.get_text() for t in heat.get_yticklabels()] == CFG["sites"]
    finally:
        plt.close(fig)


def _row(method, latency, acc):
    return {"method": method, "latency_ms_b1": latency, "test_acc": acc, "val_acc": acc,
            "curve": [(0, 90.0, None), (1, acc, None)]}


def test_comparison_plot_names_methods_in_a_legend_and_clips_an_outlier():
    import matplotlib.pyplot as plt

    from easier.pipeline.compare import comparison_figure, latency_axis_limit

    rows = [_row("easier", 1.0, 88.0), _row("egp", 1.2, 87.0), _row("tlc", 0.9, 86.0),
            _row("random", 30.0, 85.0)]
    fig = comparison_figure(rows)
    try:
        _, lat = fig.axes
        assert [t.get_text() for t in lat.get_legend().get_texts()] == [r["method"] for r in rows]
        assert not any(t.get_text() in {r["method"] for r in rows} for t in lat.texts)
        right = lat.get_xlim()[1]
        assert 1.2 < right < 30.0  # the 30 ms point does not stretch the axis
        assert _offsets(lat, "random")[0][0] <= right
        assert [t.get_text() for t in lat.texts] == ["30 ms"]
    finally:
        plt.close(fig)
    assert latency_axis_limit([1.0, 1.2, 0.9]) is None  # no outlier: matplotlib's own limits
    assert latency_axis_limit([1.0, 30.0]) is None  # too few points to call one an outlier
