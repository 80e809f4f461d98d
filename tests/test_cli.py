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
                 "folded.pt", "folded.pt2", "fold_plan.json", "fold.md"):
        assert (run_dir / name).is_file(), name
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["model"] == "convnet" and cfg["data"] == "digits" and cfg["input_shape"] == [1, 8, 8]
    folded = torch.jit.load(str(run_dir / "folded.pt"))
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


def test_compare_writes_one_table(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--methods", "easier,random", "--max-removals", "1",
                 "--delta", "100", "--out", str(out)]) == 0
    table = (out / "comparison.md").read_text()
    assert "| easier |" in table and "| random |" in table
    lines = (out / "comparison.csv").read_text().splitlines()
    assert lines[0].startswith("method,removed") and len(lines) == 3
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_exported_program_matches_torchscript(run_dir):
    x = torch.randn(3, 1, 8, 8)
    ep = torch.export.load(str(run_dir / "folded.pt2")).module()
    torch.testing.assert_close(ep(x), torch.jit.load(str(run_dir / "folded.pt"))(x))
