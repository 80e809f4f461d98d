"""bench/bench_fmnist.py at --smoke size on a hand-made IDX set: both phases, resume, report."""

from __future__ import annotations

import importlib
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("bench_fmnist")


def idx_set(d: Path, n_train: int = 264, n_test: int = 40) -> Path:
    d.mkdir(parents=True)
    rng = np.random.RandomState(1)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = (np.arange(n) % 10).astype(np.uint8)
        x = rng.randint(0, 256, size=(n, 16, 16)).astype(np.uint8)
        (d / f"{split}-images-idx3-ubyte").write_bytes(
            struct.pack(">BBBBIII", 0, 0, 8, 3, n, 16, 16) + x.tobytes())
        (d / f"{split}-labels-idx1-ubyte").write_bytes(
            struct.pack(">BBBBI", 0, 0, 8, 1, n) + y.tobytes())
    return d


@pytest.mark.slow
def test_smoke_campaign_rows_resume_and_report(tmp_path: Path) -> None:
    n = torch.get_num_threads()
    bf = _bench()
    d = idx_set(tmp_path / "idx")
    rows, root, out = tmp_path / "rows.jsonl", tmp_path / "root", tmp_path / "r.md"
    argv = ["--smoke", "--data", f"idx:{d}", "--root", str(root), "--rows", str(rows),
            "--methods", "easier,random"]
    try:
        assert bf.main(argv) == 0
        got = [json.loads(line) for line in rows.read_text().splitlines()]
        assert [r["method"] for r in got] == ["easier", "random"]
        for r in got:
            assert "error" not in r, r.get("error")
            assert 0 <= r["removed"] <= 2  # smoke: max_removals 2
            assert r["curve"][0]["k"] == 0 and r["speedup_b1"] > 0
            assert r["settings"]["delta"] == 100.0 and r["machine"]["threads"] == 1
            assert r["dense_depth"] >= r["reduced_depth"]
        assert (root / "smoke" / "dense").is_dir()
        # the lean path (test_curve=False): curves on val, test once on the kept model
        import easier

        splits = bf.load_splits(bf.SMOKE, 0, f"idx:{d}")
        x = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
        y = torch.tensor([int(splits.test[i][1]) for i in range(len(splits.test))])
        for r in got:
            assert r["test_curve"] is False
            assert all(c["test"] is None and c["val"] is not None for c in r["curve"])
            kept = easier.load_model(root / "smoke" / "runs" / "resnet18-w0.0625-s0"
                                     / r["method"] / "model.pt").eval()
            with torch.no_grad():
                by_hand = (kept(x).argmax(1) == y).double().mean().item() * 100
            assert abs(r["test"] - by_hand) < 1e-6
        assert bf.main(argv) == 0  # resumed: nothing left to do, no new rows
        assert len(rows.read_text().splitlines()) == 2
        # --retime: one record per unit, merged into the unit's row; a second pass adds none
        assert bf.main([*argv, "--retime"]) == 0
        raw = [json.loads(line) for line in rows.read_text().splitlines()]
        re_rows = [r for r in raw if r.get("kind") == "retime"]
        assert sorted(r["method"] for r in re_rows) == ["easier", "random"]
        merged = {r["method"]: r for r in bf.read_rows(rows)}
        assert len(merged) == 2
        for r in re_rows:
            assert merged[r["method"]]["speedup_b1"] == r["speedup_b1"]
            assert merged[r["method"]]["timing_load"] == r["load"]
        assert bf.main([*argv, "--retime"]) == 0
        assert len(rows.read_text().splitlines()) == 4
        assert bf.main([*argv, "--report", "--out", str(out)]) == 0
        text = out.read_text()
        assert "### resnet18 (width 0.0625)" in text and "| random | 1 |" in text
        assert "Val top-1 after k removals, after fine-tuning" in text
        # the checkpoints gone (they live outside the repository): the dense table comes
        # from what the rows recorded of them
        side = json.loads((root / "smoke" / "dense" / "resnet18-w0.0625-s0.json").read_text())
        for f in (root / "smoke" / "dense").iterdir():
            f.unlink()
        out.unlink()
        assert bf.main([*argv, "--report", "--out", str(out)]) == 0
        dense_line = next(ln for ln in out.read_text().splitlines()
                          if ln.startswith("| resnet18 | 0.0625 | 0 |"))
        assert f"| {side['val_acc']:.2f} | {side['test_acc']:.2f} |" in dense_line
        # --retime without the kept models either: each unit is rebuilt from its architecture
        # and recorded sites, and re-timed only if it folds to the structure the unit recorded
        shutil.rmtree(root / "smoke" / "runs")
        unit_rows = [r for r in raw if r.get("kind") != "retime"]
        rows.write_text("".join(json.dumps(r) + "\n" for r in unit_rows))
        assert bf.main([*argv, "--retime"]) == 0
        again = [json.loads(line) for line in rows.read_text().splitlines()][2:]
        assert sorted(r["method"] for r in again) == ["easier", "random"]
        for r in again:
            u = next(u for u in unit_rows if u["method"] == r["method"])
            assert r["kind"] == "retime" and r["rebuilt"] is True
            # the fold's own figures (the latency plan's choices are timed, so flops and
            # depth may differ by a merge); the structure it started from may not
            for k in ("reduced_activations", "dense_params", "dense_flops"):
                assert r[k] == u[k], k
    finally:
        torch.set_num_threads(n)


def test_answer_names_the_most_removed_and_the_front_by_hand() -> None:
    bf = _bench()

    def row(method, seed, removed, test, speedup, band):
        return {"method": method, "seed": seed, "removed": removed, "test": test,
                "speedup_b1": speedup, "speedup_b1_band": band}

    rows = [
        # a: most removed (mean 5), slower; b: best accuracy, no measurable speedup (band
        # holds 1, counts as 1.00x); c: dominated by b (lower accuracy, speedup inside noise);
        # d: fastest, least accurate
        row("a", 0, 6, 90.0, 0.9, [0.85, 0.95]), row("a", 1, 4, 90.2, 0.9, [0.85, 0.95]),
        row("b", 0, 2, 92.0, 1.05, [0.95, 1.10]), row("b", 1, 2, 92.0, 1.05, [0.95, 1.10]),
        row("c", 0, 3, 91.0, 1.08, [0.97, 1.2]), row("c", 1, 3, 91.0, 1.02, [0.9, 1.1]),
        row("d", 0, 1, 89.0, 1.5, [1.4, 1.6]), row("d", 1, 1, 89.0, 1.5, [1.4, 1.6]),
    ]
    text = "\n".join(bf.answer(rows, ["a", "b", "c", "d"], bf.FULL))
    assert "within delta 1.0 (mean over 2 seeds): a (5.0)" in text
    front = text.split("front")[1]
    assert "b (92.00 %, 1.00x)" in front and "d (89.00 %, 1.50x)" in front
    assert "a (" not in front and "c (" not in front  # a: slower than b; c: b is as fast
