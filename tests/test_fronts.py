"""Per-iteration models (RunConfig(keep_iterations=True)) and the accuracy/latency fronts."""

import copy
import csv
import importlib
import itertools
import json
import random
import shutil

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from _harness import crash_at
from easier import RunConfig, StopRule
from easier.cli import main
from easier.errors import ConfigError, StateError
from easier.io.records import RunDir, load_iteration, saved_iterations
from easier.merge import LatencyConfig
from easier.methods.easier import Easier
from easier.pipeline.fronts import (
    FrontConfig,
    fold_point,
    front_run,
    measure_front,
    pareto_indices,
    read_front,
)
from easier.pipeline.reduce import reduce
from easier.train.finetune import FineTune

reduce_mod = importlib.import_module("easier.pipeline.iteration")  # the loop body, to monkeypatch


class Net(nn.Module):
    """Three ReLU sites in a small MLP: seconds-long runs, every removal foldable."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 24), nn.Linear(24, 24), nn.Linear(24, 24)
        self.head = nn.Linear(24, 3)
        self.r1, self.r2, self.r3 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x):
        return self.head(self.r3(self.fc3(self.r2(self.fc2(self.r1(self.fc1(x)))))))


def toy_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


FT = FineTune(epochs=1, lr=0.05, batch_size=32)


def run(out, method, *, resume=False, delta=100.0, run_all=False, keep=True, most=3):
    torch.manual_seed(0)
    return reduce(Net(), toy_data(), toy_data(48, 1), finetune=FT, method=method, out=out,
                  resume=resume, stop=StopRule(delta=delta, max_removals=most, run_all=run_all),
                  run=RunConfig(seed=0, keep_iterations=keep, verbose=False))


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("front") / "r"
    return out, run(out, "easier")


@pytest.mark.slow
def test_every_iteration_is_kept_bit_identical_and_marked(tmp_path, monkeypatch):
    # scripted accuracies: iteration 2 falls below the floor (rejected), --all goes on to 3;
    # each evaluated model is copied as the loop holds it in memory
    accs = iter([90.0, 89.5, 70.0, 89.0])
    real = reduce_mod.evaluate_all
    seen = []

    def scripted(model, *a):
        seen.append(copy.deepcopy(model).eval())
        return {**real(model, *a), "val_acc": next(accs)}

    monkeypatch.setattr(reduce_mod, "evaluate_all", scripted)
    res = run(tmp_path / "r", "easier", delta=1.0, run_all=True)
    hist = res.history
    assert [h["accepted"] for h in hist] == [True, True, False, False]
    assert [h["meets_threshold"] for h in hist] == [True, True, False, True]
    assert saved_iterations(tmp_path / "r") == [0, 1, 2, 3] and len(seen) == 4
    x = torch.randn(5, 8)
    for h, want in zip(hist, seen, strict=True):
        it = load_iteration(tmp_path / "r", h["iteration"], Net())
        assert (it.iteration, it.accepted, it.meets_threshold) == (
            h["iteration"], h["accepted"], h["meets_threshold"])
        assert list(it.removed) == h["removed"]
        got, ref = it.model.state_dict(), want.state_dict()
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
        with torch.no_grad():
            assert torch.equal(it.model.eval()(x), want(x))
    # the returned model is the last accepted one (iteration 1), not the kept rejected ones
    with torch.no_grad():
        assert torch.equal(seen[1](x), res.model.eval()(x))
        assert not torch.equal(seen[3](x), seen[1](x))


def test_runs_keep_no_iterations_unless_asked(tmp_path):
    run(tmp_path / "r", "easier", keep=False, most=1)
    assert saved_iterations(tmp_path / "r") == []
    with pytest.raises(StateError, match="keep_iterations"):
        load_iteration(tmp_path / "r", 0, Net())
    with pytest.raises(StateError, match="keep_iterations"):
        measure_front(tmp_path / "r", FrontConfig(plan="all"), model=Net())


@pytest.mark.slow
def test_resumed_run_keeps_the_same_iterations(kept_run, tmp_path):
    whole, res = kept_run
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", crash_at(Easier, 2))
    assert saved_iterations(tmp_path / "cut") == [0, 1]
    run(tmp_path / "cut", "easier", resume=True)
    n = len(res.history)
    assert saved_iterations(whole) == saved_iterations(tmp_path / "cut") == list(range(n))
    for k in range(n):
        a = load_iteration(whole, k, Net()).model.state_dict()
        b = load_iteration(tmp_path / "cut", k, Net()).model.state_dict()
        assert all(torch.equal(a[name], b[name]) for name in a)


# --- fronts ---------------------------------------------------------------------------------

DIMS = (8, 24, 24, 24, 3)  # Net's layer widths; site rK sits after layer K
SITES = ("r1", "r2", "r3")


def hand_flops(removed):
    """FLOPs per sample of Net with ``removed`` ReLUs, every linear chain merged (plan "all"):
    each run of layers between two kept ReLUs is one in x out matrix."""
    cuts = [0] + [i + 1 for i, s in enumerate(SITES) if s not in removed] + [len(DIMS) - 1]
    return sum(2 * DIMS[a] * DIMS[b] for a, b in itertools.pairwise(cuts))


def flop_timer(calls):
    """A fake timer: one call costs its FLOPs / 1000 ms, times a load drift per round that hits
    both models alike (so only a paired ratio is exact)."""
    from torch.utils.flop_counter import FlopCounterMode

    def timer(job, fns):
        calls.append(job)
        costs = []
        for fn in fns:
            with FlopCounterMode(display=False) as fc:
                fn()
            costs.append(fc.get_total_flops() / 1e3)
        return [[c * (1 + 0.7 * (r % 3)) for r in range(job.rounds)] for c in costs]

    return timer


def test_fold_of_every_point_matches_its_model(kept_run):
    out, res = kept_run
    cfg = FrontConfig(plan="all")
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    for h in res.history:
        model = load_iteration(out, h["iteration"], Net()).model.eval()
        folded, plan, note = fold_point(model, x, cfg)
        assert (plan, note) == ("all", None)
        y = torch.randn(7, 8, dtype=torch.float64)
        with torch.no_grad():
            want = model.double()(y)
            got = folded.double()(y)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # merged in float32
        # every linear chain merged: one weight layer per run between kept ReLUs
        assert sum(isinstance(m, nn.Linear) for m in folded.modules()) == 4 - len(h["removed"])


def test_front_speedups_are_the_fake_timers(kept_run):
    out, res = kept_run
    calls = []
    front = measure_front(out, FrontConfig(plan="all", batch_sizes=(1, 3), rounds=6,
                                           timer=flop_timer(calls)), model=Net())
    assert [p.iteration for p in front.points] == [h["iteration"] for h in res.history]
    assert sorted((j.iteration, j.batch_size) for j in calls) == sorted(
        (h["iteration"], b) for h in res.history for b in (1, 3))
    dense = hand_flops(())
    for p, h in zip(front.points, res.history, strict=True):
        assert p.flops == hand_flops(h["removed"]) and p.depth == 4 - len(h["removed"])
        assert (p.val_acc, p.accepted, p.removed) == (h["val_acc"], h["accepted"],
                                                      len(h["removed"]))
        for b in (1, 3):
            s, lo, hi = p.speedup(b)
            assert s == pytest.approx(dense / hand_flops(h["removed"]))
            assert lo == pytest.approx(s) and hi == pytest.approx(s)  # the drift cancels
            # the medians are not paired: each is the drifting middle round's cost
            assert p.timings[b].before_ms == pytest.approx(b * dense / 1e3 * 1.7)
    # the fronts: brute-force dominance over (accuracy, hand-counted cost)
    for by, cost in (("latency", lambda h: hand_flops(h["removed"]) / dense),
                     ("flops", lambda h: hand_flops(h["removed"]))):
        pts = [(h["val_acc"], cost(h)) for h in res.history]
        want = [h["iteration"] for h, p in zip(res.history, pts, strict=True)
                if not any(dominated(p, q) for q in pts)]
        assert sorted(p.iteration for p in front.pareto(by)) == want


def test_front_files_round_trip(kept_run, tmp_path):
    out, _ = kept_run
    front = front_run(out, FrontConfig(plan="flops", timer=flop_timer([])), model=Net())
    assert read_front(out) == front
    rows = list(csv.DictReader((out / "front.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [p.iteration for p in front.points]
    on = {p.iteration for p in front.pareto()}
    assert {int(r["iteration"]) for r in rows if r["pareto_b1"] == "True"} == on
    for r, p in zip(rows, front.points, strict=True):
        assert float(r["speedup_b1"]) == pytest.approx(p.speedup(1)[0])


@pytest.mark.parametrize("bad", [{"plan": "fastest"}, {"batch_sizes": ()},
                                 {"batch_sizes": (0,)}, {"rounds": 2}, {"min_run_time": 0}])
def test_front_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        FrontConfig(**bad)


def test_a_changed_iteration_file_is_refused(kept_run, tmp_path):
    shutil.copytree(kept_run[0], tmp_path / "r")
    path = RunDir(tmp_path / "r").iteration_file(1)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match="corrupt"):
        load_iteration(tmp_path / "r", 1, Net())


def dominated(p, q):
    """q dominates p: at least as accurate and as cheap, better in one."""
    return q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1])


def test_pareto_indices_match_brute_force():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(0, 12)
        pts = [(float(rng.randint(0, 5)), float(rng.randint(0, 5))) for _ in range(n)]
        want = {i for i, p in enumerate(pts) if not any(dominated(p, q) for q in pts)}
        got = pareto_indices(pts)
        assert set(got) == want and len(got) == len(want), (trial, pts)
        assert [pts[i][1] for i in got] == sorted(pts[i][1] for i in got)


# --- easier compare --fronts ----------------------------------------------------------------

TINY = ["--model", "convnet", "--width", "0.25", "--data", "digits", "--quiet",
        "--pretrain-epochs", "1", "--epochs", "1", "--plan", "flops", "--threads", "1"]


@pytest.mark.slow
def test_cli_compare_fronts_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--methods", "easier,random", "--max-removals", "1",
                 "--delta", "100", "--fronts", "--front-batch", "1,2", "--out", str(out)]) == 0
    assert "fronts.png" in capsys.readouterr().out
    assert (out / "fronts.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "comparison.md").read_text()
    for name in ("easier", "random"):
        hist = [json.loads(x) for x in (out / name / "history.jsonl").read_text().splitlines()]
        rows = list(csv.DictReader((out / name / "front.csv").open()))
        assert [int(r["iteration"]) for r in rows] == [h["iteration"] for h in hist] == [0, 1]
        assert [float(r["val_acc"]) for r in rows] == [h["val_acc"] for h in hist]
        assert all(float(r["speedup_b1"]) > 0 and float(r["speedup_b2"]) > 0 for r in rows)
        assert [int(r["removed"]) for r in rows] == [0, 1]
        for b in (1, 2):  # the marks agree with a brute-force dominance check of the rows
            pts = [(float(r["test_acc"] or r["val_acc"]), -float(r[f"speedup_b{b}"]))
                   for r in rows]
            assert [r[f"pareto_b{b}"] == "True" for r in rows] == [
                not any(dominated(p, q) for q in pts) for p in pts]
        assert md.count(f"| {name} | ") == 1 + len(rows)  # its summary row + one per iteration
    # a front of the run directory reads back with the library
    front = read_front(out / "easier")
    assert front.plan == "flops" and front.batch_sizes == (1, 2)


@pytest.mark.parametrize("extra, says", [
    (["--fronts", "--front-batch", "1,x"], "'x' is not an integer"),
    (["--fronts", "--front-batch", "0"], "must be an integer >= 1"),
    (["--front-batch", "4"], "add --fronts"),
])
def test_cli_bad_front_options_exit_2(tmp_path, capsys, extra, says):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--methods", "easier", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and err.startswith("easier: error:") and "\n" not in err
    assert not (out / "easier").exists()  # refused before any run


def test_compare_refuses_to_resume_fronts_of_a_run_that_kept_none(tmp_path):
    from easier.pipeline.compare import compare

    out = tmp_path / "cmp"
    run(out / "easier", "easier", keep=False, most=1)
    before = sorted(p.name for p in (out / "easier").iterdir())
    with pytest.raises(ConfigError, match="without fronts"):
        compare(Net, toy_data(), toy_data(48, 1), methods=["random", "easier"], out=out,
                resume=True, fronts=True, finetune=FT)
    assert not (out / "random").exists()  # refused before any method ran
    assert sorted(p.name for p in (out / "easier").iterdir()) == before


@pytest.mark.parametrize("merged_is_faster", [True, False])
def test_front_latency_plan_uses_the_injected_fold_timer(kept_run, merged_is_faster):
    out, res = kept_run
    fast, slow = [1.0] * 7, [2.0] * 7

    def fold_timer(job, fns):  # [unmerged, merged] for a chain, [BN-folded, folded] for a model
        return [slow, fast] if merged_is_faster else [fast, slow]

    front = measure_front(out, FrontConfig(plan="latency", latency=LatencyConfig(
        batch_sizes=(1,), timer=fold_timer), timer=flop_timer([])), model=Net())
    for p, h in zip(front.points, res.history, strict=True):
        merged_depth = 4 - len(h["removed"])
        assert p.depth == (merged_depth if merged_is_faster else 4)
        assert p.speedup(1)[0] == pytest.approx(hand_flops(()) / p.flops)


def test_iterations_not_kept_are_listed_not_drawn(kept_run, tmp_path):
    shutil.copytree(kept_run[0], tmp_path / "r")
    for k in (2, 3):  # as if the run was resumed without keep_iterations after iteration 1
        RunDir(tmp_path / "r").iteration_file(k).unlink()
    lines = []
    front = measure_front(tmp_path / "r", FrontConfig(plan="all", timer=flop_timer([])),
                          model=Net(), log=lines.append)
    assert [p.iteration for p in front.points] == [0, 1] and front.missing == (2, 3)
    assert "[2, 3] were not kept" in lines[-1]
