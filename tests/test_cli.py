import json

import pytest
import torch

from easier.cli import main

TINY = ["--model", "convnet", "--width", "0.25", "--data", "digits", "--quiet",
        "--pretrain-epochs", "1", "--epochs", "1", "--plan", "flops", "--threads", "1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["reduce", *TINY, "--max-removals", "1", "--delta", "100", "--out", str(out)]) == 0
    return out


def test_reduce_writes_run_and_folded_model(run_dir, capsys):
    for name in ("config.json", "history.jsonl", "model.pt", "report.png", "report.md",
                 "folded.pt2", "fold_plan.json", "fold.md"):
        assert (run_dir / name).is_file(), name
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["model"] == "convnet" and cfg["data"] == "digits" and cfg["input_shape"] == [1, 8, 8]
    assert not (run_dir / "folded.pt").exists()  # TorchScript only with `fold --torchscript`
    folded = torch.export.load(str(run_dir / "folded.pt2")).module()
    assert folded(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_entropy_command_prints_site_table(run_dir, capsys):
    assert main(["entropy", str(run_dir / "model.pt"), "--data", "digits", "--json",
                 "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out)
    removed = json.loads((run_dir / "summary.json").read_text())["linearized"]
    assert len(removed) == 1 and removed[0] not in rep["entropy"]
    assert all(0.0 <= h <= 1.0 for h in rep["entropy"].values())


def test_fold_command(run_dir, capsys):
    assert main(["fold", str(run_dir), "--plan", "all"]) == 0
    text = capsys.readouterr().out
    assert "max |error|" in text and "depth" in text
    assert json.loads((run_dir / "fold_plan.json").read_text())["mode"] == "all"


def test_bad_names_exit_2_with_valid_choices(tmp_path, capsys):
    assert main(["reduce", *TINY, "--model", "resnet99", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet99'" in err and "resnet18" in err
    assert main(["reduce", *TINY, "--data", "imagenet", "--out", str(tmp_path / "y")]) == 2
    assert "mnist5k" in capsys.readouterr().err
    assert main(["reduce", *TINY, "--method", "magic", "--out", str(tmp_path / "z")]) == 2
    assert "valid methods" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_writes_one_table(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--methods", "easier,random", "--max-removals", "1",
                 "--delta", "100", "--out", str(out)]) == 0
    table = (out / "comparison.md").read_text()
    assert "| easier |" in table and "| random |" in table
    lines = (out / "comparison.csv").read_text().splitlines()
    assert lines[0].startswith("method,removed") and len(lines) == 3
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_exported_program_matches_the_reduced_model(run_dir):
    from easier.io.records import load_model

    x = torch.randn(3, 1, 8, 8)
    ep = torch.export.load(str(run_dir / "folded.pt2")).module()
    with torch.no_grad():
        want = load_model(run_dir / "model.pt").eval()(x)
    torch.testing.assert_close(ep(x), want, rtol=1e-4, atol=1e-5)


# --- errors: one line, exit 2 for a bad option and 1 for a runtime failure -------------------


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("easier: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("bad", [["--device", "tpu"], ["--threads", "-1"], ["--delta", "nan"],
                                 ["--lr", "nan"], ["--max-removals", "-3"], ["--width", "0"],
                                 ["--dist-timeout", "0"], ["--dev", "cpu"]])
def test_bad_options_are_one_line_exit_2_before_any_output(tmp_path, capsys, bad):
    out = tmp_path / "run"
    assert main(["reduce", *TINY, "--out", str(out), *bad]) == 2
    line = one_line_error(capsys)
    assert bad[0] in line
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("argv, owner", [(["fold", "RUN", "--threads", "1"], "easier fold"),
                                         (["reduce", "--epoch", "2"], "easier reduce"),
                                         (["--bogus"], "easier")])
def test_an_unknown_option_names_the_command_it_was_given_to(capsys, argv, owner):
    assert main(argv) == 2
    line = one_line_error(capsys)
    assert line.endswith(f"(see {owner} --help)"), line
    assert "easier: error: easier:" not in line  # the program's name is said once


def test_help_shows_defaults(capsys):
    assert main(["reduce", "--help"]) == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    assert "(default: 0.25 for easier's own models" in flat and "(default: 1.0)" in text
    assert "--dist-timeout" in text
    assert "--linearize {identity,affine}" in text
    assert " ".join(text.split("--linearize {identity,affine}\n")[1].split()[:30]).count(
        "(default: identity)") == 1


@pytest.mark.slow
def test_affine_linearization_is_recorded_resumed_and_folded(tmp_path, run_dir, capsys):
    from easier.io.records import load_model

    assert json.loads((run_dir / "config.json").read_text())["edit"]["linearize"] == "identity"
    out = tmp_path / "affine"
    args = ["reduce", *TINY, "--max-removals", "1", "--delta", "100", "--out", str(out)]
    assert main([*args, "--linearize", "affine"]) == 0
    assert json.loads((out / "config.json").read_text())["edit"]["linearize"] == "affine"
    model = load_model(out / "model.pt")  # weights_only=True
    site = json.loads((out / "summary.json").read_text())["linearized"][0]
    assert any(k.startswith(f"{site}.affine.") for k in model.state_dict())
    assert main(["fold", str(out), "--plan", "all"]) == 0
    err = float(capsys.readouterr().out.split("max |error|")[1].split()[0].strip(":,"))
    assert err < 1e-4
    assert main([*args, "--max-removals", "2", "--resume"]) == 2  # identity now: refused
    assert "linearize" in capsys.readouterr().err


@pytest.mark.slow
def test_disk_full_while_writing_reports_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    import errno
    import os

    import easier.pipeline.state

    def full(run, *_a, **_k):
        path = run.file("history.csv")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(easier.pipeline.state, "write_reports", full)
    out = tmp_path / "run"
    assert main(["reduce", *TINY, "--max-removals", "1", "--delta", "100", "--out", str(out)]) == 1
    line = one_line_error(capsys)
    assert "No space left on device" in line and "history.csv" in line and "--resume" in line
    assert main(["reduce", *TINY, "--max-removals", "1", "--delta", "100", "--out", str(out),
                 "--resume", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err  # --debug shows it


@pytest.fixture
def broken_run(run_dir, tmp_path):
    """A copy of the finished run with no checksums (so config.json edits are not caught by
    the checksum first)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "checksums.json").unlink()
    return copy


@pytest.mark.parametrize("config,words", [("[1, 2]", "not a JSON object"),
                                          ('{"input_shape": "1x8x8"}', "input_shape")])
def test_bad_config_json_is_one_line_exit_1(broken_run, capsys, config, words):
    (broken_run / "config.json").write_text(config)
    assert main(["fold", str(broken_run)]) == 1
    assert words in one_line_error(capsys)


def test_edited_run_file_is_caught_by_its_checksum(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["input_shape"] = [1, 9, 9]
    (copy / "config.json").write_text(json.dumps(cfg))
    assert main(["reduce", *TINY, "--max-removals", "2", "--delta", "100", "--out", str(copy),
                 "--resume"]) == 1
    assert "config.json is corrupt" in one_line_error(capsys)


@pytest.mark.slow
def test_fold_of_a_locked_run_is_refused_naming_the_holder(broken_run, capsys):
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from easier.io.records import lock_run_dir\n"
         "with lock_run_dir(sys.argv[1]):\n print('locked', flush=True); sys.stdin.read()",
         str(broken_run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = (broken_run / "fold_plan.json").read_bytes()
        assert main(["fold", str(broken_run)]) == 1
        assert f"PID {holder.pid}" in one_line_error(capsys)
        assert (broken_run / "fold_plan.json").read_bytes() == before  # nothing written
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_image_over_the_bomb_limit_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    import numpy as np

    Image = pytest.importorskip("PIL.Image")

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for k in range(10):
            Image.fromarray(np.full((4, 4, 3), 20 * k, dtype=np.uint8)).save(
                tmp_path / "imgs" / c / f"{k}.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    assert main(["reduce", *TINY, "--data", f"imagefolder:{tmp_path / 'imgs'}", "--image-size",
                 "8", "--out", str(tmp_path / "run")]) == 1
    line = one_line_error(capsys)
    assert ".png" in line and "MAX_IMAGE_PIXELS" in line


# --- what a new user sees -----------------------------------------------------------------


def test_compare_checks_every_method_name_before_running_any(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--methods", "easier,foo", "--out", str(out)]) == 2
    line = one_line_error(capsys)
    assert "'foo'" in line and "valid methods" in line
    assert not out.exists()  # nothing ran, not even easier
    assert main(["compare", *TINY, "--methods", "easier,egp", "--method-option", "egp:bogus=1",
                 "--out", str(out)]) == 2
    assert "bogus" in one_line_error(capsys) and not out.exists()


def test_device_defaults_to_auto(tmp_path):
    from easier.cli import build_parser

    p = build_parser()
    assert p.parse_args(["reduce"]).device == "auto"
    assert p.parse_args(["compare"]).device == "auto"
    (tmp_path / "model.pt").write_bytes(b"")  # the checkpoint must exist to be parsed
    assert p.parse_args(["entropy", str(tmp_path / "model.pt")]).device == "auto"


def test_model_too_small_for_the_images_suggests_image_size(tmp_path, capsys):
    assert main(["reduce", *TINY, "--model", "lenet", "--out", str(tmp_path / "r")]) == 2
    line = one_line_error(capsys)
    assert "lenet needs image_size >= 16" in line and "--image-size 16" in line


def test_methods_lists_each_with_its_description_and_marks(capsys):
    from easier.cli import build_parser
    from easier.methods import create_method, list_methods

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == list_methods()
    p = build_parser()
    default = p.parse_args(["reduce"]).method
    for name, line in zip(list_methods(), lines, strict=True):
        assert type(create_method(name)).description in line
        assert line.endswith("[default]") == (name == default)
    assert sum(ln.endswith("[recommended]") for ln in lines) == 1
    # what compare runs by default: the default and the recommended method among them
    compared = p.parse_args(["compare"]).methods.split(",")
    recommended = next(ln.split()[0] for ln in lines if ln.endswith("[recommended]"))
    assert {default, recommended} <= set(compared) <= set(list_methods())


def test_datasets_lists_the_forms_to_type(capsys):
    from easier.data import list_datasets

    assert main(["datasets"]) == 0
    firsts = [ln.split()[0] for ln in capsys.readouterr().out.splitlines()]
    assert {"mnist5k", "digits", "cifar10:PATH", "tiny-imagenet:PATH",
            "imagefolder:PATH", "module.path:callable"} <= set(firsts)
    assert len(firsts) == len(list_datasets()) + 1


@pytest.mark.slow
def test_reduce_ends_with_dense_vs_returned_and_a_summary(tmp_path, capsys):
    out = tmp_path / "again"
    assert main(["reduce", *TINY, "--max-removals", "1", "--delta", "100", "--out",
                 str(out)]) == 0
    text = capsys.readouterr().out
    hist = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    after = json.loads((out / "fold_measure.json").read_text())["after"]
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"{hist[0]['activations'] - after['activations']}/"
                           f"{hist[0]['activations']} activations removed, depth "
                           f"{hist[0]['depth']} → {after['depth']}")
    assert "| dense (given) | returned (folded) | change |" in text
