"""What a newcomer trips on (issue 26): messages in CLI words, options checked, numbers with
units, no speed claim inside the timing noise, a report that says what the run did."""

from __future__ import annotations

import csv
import io
import json

import pytest
from torch import nn

from easier.cli import main, session
from easier.cli.session import build_base, built_name, effective_width
from easier.errors import ConfigError
from easier.report.files import NOT_FOLDED, history_csv, with_outcome
from easier.report.outcome import Outcome, Side, speed, summary_line

TINY = ["--model", "convnet", "--data", "digits", "--quiet", "--pretrain-epochs", "1",
        "--epochs", "1", "--plan", "flops", "--threads", "1", "--max-removals", "1",
        "--delta", "100"]


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("easier: error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("newcomer") / "run"
    assert main(["reduce", *TINY, "--out", str(out)]) == 0
    return out


def test_misspelled_flag_gets_a_suggestion(capsys):
    assert main(["reduce", "--detla", "1"]) == 2
    assert "did you mean --delta?" in error_line(capsys)
    assert main(["reduce", "--zzzz", "1"]) == 2
    assert "did you mean" not in error_line(capsys)  # nothing close: no guess


def test_missing_paths_say_they_do_not_exist(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    for argv in (["fold", str(missing)], ["entropy", str(missing)],
                 ["reduce", "--checkpoint", str(missing)]):
        assert main(argv) == 2
        line = error_line(capsys)
        assert f"'{missing}' does not exist" in line, line


def test_unknown_method_option_lists_the_valid_ones(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["reduce", *TINY, "--out", str(out), "--method-option", "foo=1"]) == 2
    line = error_line(capsys)
    assert "method 'easier' has no option 'foo'" in line and "unexpected keyword" not in line
    assert "also_zero=False" in line  # an option of Easier(also_zero=False, ...)
    assert main(["reduce", *TINY, "--out", str(out), "--method-option", "also_zeros=1"]) == 2
    assert "did you mean also_zero?" in error_line(capsys)
    assert main(["reduce", *TINY, "--method", "random", "--out", str(out),
                 "--method-option", "x=1"]) == 2
    assert "takes no options" in error_line(capsys)
    assert not out.exists()


def test_width_applies_only_when_given_or_to_easiers_models(tmp_path, monkeypatch):
    assert effective_width("convnet", None) == 0.25
    assert effective_width("timm:resnet18", None) == 1.0
    assert effective_width("mod:make", None) is None and effective_width("mod:make", 2.0) == 2.0
    # a third-party name without --width is not refused for a width nobody gave (timm is not
    # installed here: the error is about the package, not the width)
    with pytest.raises(ConfigError) as info:
        build_base("timm:resnet18", width=None, num_classes=10, in_channels=3, image_size=32)
    assert "width" not in str(info.value) and "timm" in str(info.value)
    seen = {}
    (tmp_path / "mymodel.py").write_text(
        "import torch\n"
        "def make(num_classes, width=1.0):\n"
        "    make.width = width\n"
        "    return torch.nn.Linear(4, num_classes)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_base("mymodel:make", width=None, num_classes=3, in_channels=1, image_size=2)
    import mymodel
    seen["default"] = mymodel.make.width
    build_base("mymodel:make", width=0.5, num_classes=3, in_channels=1, image_size=2)
    seen["given"] = mymodel.make.width
    assert seen == {"default": 1.0, "given": 0.5}
    banner = built_name("mymodel:make", model, None)
    assert banner == "mymodel:make (Linear, 15 params)"  # 4*3 weights + 3 biases, no width
    assert "width 0.25" in built_name("convnet", nn.Linear(2, 2), 0.25)


def test_second_identical_command_is_refused_before_loading(finished_run, capsys, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in finished_run.iterdir()}

    def no_loading(*_a, **_k):
        raise AssertionError("setup (data, model) must not run")

    monkeypatch.setattr("easier.cli.commands.setup", no_loading)
    monkeypatch.setattr(session, "setup", no_loading)
    assert main(["reduce", *TINY, "--out", str(finished_run)]) == 1
    line = error_line(capsys)
    assert "already holds a finished run" in line and "--resume" in line
    assert "resume=True" not in line  # CLI words, not the API's
    assert main(["reduce", *TINY, "--out", str(finished_run), "--resume"]) == 0
    text = capsys.readouterr().out
    assert "finished run" in text and "nothing was changed" in text
    assert {p.name: p.stat().st_mtime_ns for p in finished_run.iterdir()} == before


def test_report_md_says_what_the_run_did_fold_included(finished_run):
    report = (finished_run / "report.md").read_text()
    plan = json.loads((finished_run / "fold_plan.json").read_text())
    assert NOT_FOLDED not in report  # the fold ran
    assert "| dense (given) | returned (folded) | change |" in report
    merged = sum(c["decision"] == "merge" for c in plan["chains"])
    assert f"Folded (plan flops): {merged} of {len(plan['chains'])} chain(s) merged" in report


def test_history_csv_flops_are_per_sample(finished_run):
    rows = list(csv.DictReader(io.StringIO((finished_run / "history.csv").read_text())))
    assert "flops" not in rows[0] and "flops_per_sample" in rows[0]
    hist = [json.loads(x) for x in (finished_run / "history.jsonl").read_text().splitlines()]
    # the loop counts at its example batch of 2: per sample is half of it
    assert float(rows[0]["flops_per_sample"]) == hist[0]["flops"] / 2
    # the dense model counted by hand: the returned table's FLOPs per sample match the fold's
    after = json.loads((finished_run / "fold_measure.json").read_text())["after"]
    assert after["flops_per_sample"] == after["flops"] / after["batch_size"]


def test_csv_of_an_old_history_leaves_the_column_empty():
    old = [{"iteration": 0, "chosen": [], "removed": [], "accepted": True, "flops": 10}]
    row = next(csv.DictReader(io.StringIO(history_csv(old))))
    assert row["flops_per_sample"] == ""


def _outcome(band):
    side = Side(90.0, None, 10, 5, 100, None, 1000.0)
    return Outcome(side, side, 1, "site", True, {1: (1.0, 4.84)}, {1: band})


@pytest.mark.parametrize("band", [(0.10, 16.04), (0.12, 4.13), (1.0, 1.0)])
def test_no_speed_claim_when_the_noise_band_holds_1(band):
    line = summary_line(_outcome(band))
    assert "faster" not in line and "slower" not in line and "×" not in line
    assert f"no measurable difference at batch 1 after folding (timing noise: folded/unfolded " \
           f"{band[0]:.2f}–{band[1]:.2f})" in line


def test_a_band_clear_of_1_is_claimed():
    assert speed(1.0, 4.84, (3.9, 5.1)) == "4.84× slower"
    assert speed(2.0, 1.0, (0.4, 0.6)) == "2.00× faster"


def test_with_outcome_is_idempotent_and_keeps_the_note_when_not_folded():
    base = f"# run\n\n| table |\n\nAccuracy is top-1. {NOT_FOLDED}\n"
    fold = {"plan": {"mode": "all", "chains": [{"decision": "merge"}, {"decision": "keep"}],
                     "bn_folded": ["a<-b"], "max_abs_error": 1e-6, "notes": ["x"]}}
    once = with_outcome(base, "TABLE", "SUMMARY", fold)
    assert NOT_FOLDED not in once and "1 of 2 chain(s) merged, 1 BN folded" in once
    assert with_outcome(once, "TABLE", "SUMMARY", fold) == once
    assert NOT_FOLDED in with_outcome(base, "TABLE", "SUMMARY", None)




def test_a_larger_budget_still_resumes_a_finished_run(finished_run):
    from easier.cli.session import existing_run

    cfg = json.loads((finished_run / "config.json").read_text())
    stop = cfg["stop"]
    same = {k: stop[k] for k in ("max_removals", "max_iterations", "run_all")}
    assert existing_run(finished_run, True, True, same) is not None  # finished: nothing to do
    assert existing_run(finished_run, True, True, dict(same, max_removals=2)) is None  # go on
    assert existing_run(finished_run, True, True, dict(same, run_all=True)) is None
