import importlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import easier
from easier import ConfigError, EntropyConfig, RunConfig, StateError, StopRule
from easier.io.records import load_model
from easier.pipeline.reduce import reduce
from easier.train.finetune import FineTune, TrainResult


class Net(nn.Module):
    """Four ReLU sites in a small MLP: seconds-long runs."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.fc4, self.head = nn.Linear(32, 32), nn.Linear(32, 3)
        self.r1, self.r2, self.r3, self.r4 = nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x):
        x = self.r1(self.fc1(x))
        x = self.r2(self.fc2(x))
        x = self.r3(self.fc3(x))
        return self.head(self.r4(self.fc4(x)))


def toy_data(n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


FT = FineTune(epochs=1, lr=0.05, batch_size=32)
reduce_mod = importlib.import_module("easier.pipeline.iteration")  # the loop body, to monkeypatch


def test_end_to_end_writes_every_file(tmp_path):
    torch.manual_seed(0)
    data = toy_data()
    out = tmp_path / "run"
    res = reduce(Net(), data, toy_data(60, 1), test=toy_data(60, 2), finetune=FT,
                 pretrain=FineTune(epochs=2, batch_size=32), out=out,
                 stop=StopRule(delta=100.0, max_removals=2))
    assert len(res.linearized) == 2 and res.stop_reason.startswith("max_removals")
    for name in ("config.json", "history.jsonl", "history.csv", "summary.json", "model.pt",
                 "report.md", "report.png", "state.pt"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    first = rows[1]
    assert set(first["entropy"]) == {"r1", "r2", "r3", "r4"}
    assert first["chosen"] == [min(first["entropy"], key=first["entropy"].get)]
    assert set(rows[2]["entropy"]) == {"r1", "r2", "r3", "r4"} - set(first["chosen"])
    for key in ("train_acc", "val_acc", "test_acc", "val_loss", "params", "flops", "seconds"):
        assert rows[2][key] is not None, key
    summary = json.loads((out / "summary.json").read_text())
    assert summary["linearized"] == res.linearized and summary["done"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 2 | 2 |" in (out / "report.md").read_text()
    # the saved model rebuilds with weights_only=True and computes the same function
    again = load_model(out / "model.pt", Net())
    x = torch.randn(5, 8)
    res.model.eval()
    torch.testing.assert_close(again.eval()(x), res.model(x))
    assert easier.linearized_sites(again) == res.linearized


def scripted(monkeypatch, accuracies):
    """Replace training and evaluation by a scripted validation-accuracy sequence."""
    seq = iter(accuracies)
    monkeypatch.setattr(reduce_mod, "fine_tune", lambda *a, **k: TrainResult(epochs=1, loss=0.1,
                                                                              accuracy=50.0))
    monkeypatch.setattr("easier.pipeline.scores.evaluate", lambda *a, **k: (0.5, next(seq)))


def test_delta_rule_stops_at_first_drop_and_keeps_last_good(monkeypatch):
    scripted(monkeypatch, [90.0, 89.5, 89.0, 88.9, 89.9])  # floor = 89.0 with delta 1
    res = reduce(Net(), toy_data(), toy_data(30), finetune=FT, stop=StopRule(delta=1.0))
    assert [h["val_acc"] for h in res.history] == [90.0, 89.5, 89.0, 88.9]
    assert [h["accepted"] for h in res.history] == [True, True, True, False]
    assert len(res.linearized) == 2 and res.linearized == res.history[2]["removed"]
    assert "88.90 < baseline 90.00" in res.stop_reason


def test_run_all_logs_every_site_but_returns_last_accepted(monkeypatch):
    scripted(monkeypatch, [90.0, 89.5, 80.0, 89.9, 70.0])
    res = reduce(Net(), toy_data(), toy_data(30), finetune=FT,
                 stop=StopRule(delta=1.0, run_all=True))
    assert len(res.history) == 5 and res.stop_reason == "no site left"
    assert [h["accepted"] for h in res.history] == [True, True, False, False, False]
    assert res.history[3]["meets_threshold"] and len(res.linearized) == 1


def test_one_shot_and_zero_entropy_option(monkeypatch):
    scripted(monkeypatch, [90.0, 90.0])
    res = reduce(Net(), toy_data(), toy_data(30), finetune=FT, stop=StopRule(one_shot=3))
    assert len(res.history) == 2 and len(res.history[1]["chosen"]) == 3
    ent = res.history[1]["entropy"]
    assert res.history[1]["chosen"] == sorted(ent, key=lambda n: (ent[n], list(ent).index(n)))[:3]


def test_nan_fine_tune_keeps_previous_model(monkeypatch):
    monkeypatch.setattr(reduce_mod, "fine_tune",
                        lambda *a, **k: TrainResult(failed="non-finite loss (nan) at epoch 1"))
    res = reduce(Net(), toy_data(), toy_data(30), finetune=FT)
    assert res.linearized == [] and "fine-tuning failed" in res.stop_reason
    assert res.history[-1]["failed"].startswith("non-finite")


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="valid methods"):
        reduce(Net(), toy_data(), toy_data(30), method="nope")
    out = tmp_path / "r"
    reduce(Net(), toy_data(), toy_data(30), finetune=FT, out=out, stop=StopRule(max_removals=1))
    with pytest.raises(StateError, match="already holds a run"):
        reduce(Net(), toy_data(), toy_data(30), finetune=FT, out=out,
               stop=StopRule(max_removals=1))
    with pytest.raises(ConfigError, match=r"differs in \['stop.delta'\]"):
        reduce(Net(), toy_data(), toy_data(30), finetune=FT, out=out, resume=True,
               stop=StopRule(max_removals=1, delta=3.0))
    (out / "state.pt").write_bytes(b"truncated")
    with pytest.raises(StateError, match=r"corrupt or truncated.*state.prev.pt"):
        reduce(Net(), toy_data(), toy_data(30), finetune=FT, out=out, resume=True,
               stop=StopRule(max_removals=1))
    assert (out / "state.pt").read_bytes() == b"truncated"  # left untouched


SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_reduce import Net, toy_data, FT
    from easier import RunConfig, StopRule
    from easier.pipeline.reduce import reduce
    from easier.train.finetune import FineTune
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ft = FineTune(epochs=3, lr=0.05, batch_size=8)
    res = reduce(Net(), toy_data(600), toy_data(60, 1), finetune=ft, out=sys.argv[1],
                 resume=len(sys.argv) > 2, stop=StopRule(delta=100.0),
                 run=RunConfig(seed=3, log=print))
    print("DONE", res.linearized)
""")


def _run(script, out, *extra):
    return subprocess.Popen([sys.executable, "-c", script, str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    script = SCRIPT.format(tests=os.path.dirname(__file__))
    full = _run(script, tmp_path / "full")
    assert full.wait(600) == 0, full.stdout.read()
    killed = _run(script, tmp_path / "killed")
    hist = tmp_path / "killed" / "history.jsonl"
    deadline = time.time() + 600  # generous: a loaded CI machine is slow to start torch
    while time.time() < deadline:  # kill mid-run, once the first removal has been saved
        if hist.exists() and len(hist.read_text().splitlines()) >= 2:
            break
        assert killed.poll() is None, killed.stdout.read()  # it must not have died on its own
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert len(hist.read_text().splitlines()) < 5, "the run finished before it was killed"
    resumed = _run(script, tmp_path / "killed", "--resume")
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log
    assert "resumed" in log

    def rows(d):
        out = [json.loads(x) for x in (tmp_path / d / "history.jsonl").read_text().splitlines()]
        for r in out:
            r.pop("seconds")
        return out

    assert rows("killed") == rows("full")
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_with_larger_budget_equals_uninterrupted(tmp_path):
    def run(out, limit, resume=False):
        torch.manual_seed(0)
        return reduce(Net(), toy_data(), toy_data(60, 1), finetune=FT, out=out, resume=resume,
                      stop=StopRule(delta=100.0, max_removals=limit), run=RunConfig(seed=5))

    short = run(tmp_path / "a", 1)
    assert len(short.history) == 2 and short.stop_reason.startswith("max_removals=1")
    longer = run(tmp_path / "a", 3, resume=True)
    straight = run(tmp_path / "b", 3)

    def rows(res):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in res.history]

    assert len(longer.history) == 4 and rows(longer) == rows(straight)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["stop"]["max_removals"] == 3
    x = toy_data(5, 9).tensors[0]
    torch.testing.assert_close(longer.model.eval()(x), straight.model.eval()(x), rtol=0, atol=0)


# --- settings, lock and log ---------------------------------------------------------------


@pytest.mark.parametrize("make, field", [
    (lambda: StopRule(delta=-0.5), "StopRule.delta"),
    (lambda: StopRule(delta=float("nan")), "StopRule.delta"),
    (lambda: StopRule(max_removals=-1), "StopRule.max_removals"),
    (lambda: StopRule(max_iterations=1.5), "StopRule.max_iterations"),
    (lambda: StopRule(one_shot=0), "StopRule.one_shot"),
    (lambda: StopRule(run_all="yes"), "StopRule.run_all"),
    (lambda: EntropyConfig(batches=0), "EntropyConfig.batches"),
    (lambda: EntropyConfig(kinds=("ReLU", "Tanh")), "EntropyConfig.kinds"),
    (lambda: EntropyConfig(kinds="ReLU"), "EntropyConfig.kinds"),
    (lambda: EntropyConfig(kinds=()), "EntropyConfig.kinds"),
    (lambda: RunConfig(seed=-1), "RunConfig.seed"),
    (lambda: RunConfig(device="tpu"), "RunConfig.device"),
    (lambda: RunConfig(verbose=1), "RunConfig.verbose"),
    (lambda: RunConfig(input_key=3), "RunConfig.input_key"),
    (lambda: RunConfig(log="stdout"), "RunConfig.log"),
])
def test_a_bad_setting_is_refused_naming_its_field(make, field):
    with pytest.raises(ConfigError, match=rf"^{field}="):
        make()


def test_settings_are_config_objects_only(monkeypatch):
    scripted(monkeypatch, [90.0, 89.5, 88.9, 90.0])
    new = reduce(Net(), toy_data(), toy_data(30), finetune=FT,
                 stop=StopRule(delta=1.0, max_removals=3), entropy=EntropyConfig(batches=2),
                 run=RunConfig(seed=4, verbose=False))
    assert "88.90 < baseline 90.00" in new.stop_reason
    with pytest.raises(TypeError, match="delta"):  # the pre-config keywords are gone
        reduce(Net(), toy_data(), toy_data(30), finetune=FT, delta=1.0)
    with pytest.raises(ConfigError, match=r"reduce\(stop=\.\.\.\) takes a StopRule, got dict"):
        reduce(Net(), toy_data(), toy_data(30), stop={"delta": 1.0})


def test_configs_are_recorded_by_group_and_a_changed_one_blocks_resume(tmp_path):
    out = tmp_path / "r"
    reduce(Net(), toy_data(), toy_data(30), finetune=FT, out=out,
           stop=StopRule(delta=2.5, max_removals=1), entropy=EntropyConfig(kinds=("ReLU",)),
           run=RunConfig(seed=7, verbose=False, extra={"model": "mlp"}))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["stop"]["delta"], cfg["stop"]["max_removals"], cfg["entropy"]["kinds"],
            cfg["run"]["seed"], cfg["edit"], cfg["model"]) == (
        2.5, 1, ["ReLU"], 7, {"linearize": "identity", "fold_ready": True}, "mlp")
    for group, cls in (("stop", StopRule), ("entropy", EntropyConfig), ("run", RunConfig)):
        assert cls.from_dict(cfg[group]).to_dict() == cfg[group]  # what resume reads back
    with pytest.raises(ConfigError, match=r"differs in \['entropy.batches'\]"):
        reduce(Net(), toy_data(), toy_data(30), finetune=FT, out=out, resume=True,
               stop=StopRule(delta=2.5, max_removals=1),
               run=RunConfig(seed=7, verbose=False, extra={"model": "mlp"}),
               entropy=EntropyConfig(kinds=("ReLU",), batches=3))


HOLDER = textwrap.dedent("""
    import sys
    from easier.io.records import lock_run_dir
    with lock_run_dir(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()  # hold until the parent closes stdin
""")


@pytest.mark.slow
def test_reduce_takes_the_run_directory_lock(tmp_path):
    out = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"  # synchronised on output, not time
        with pytest.raises(StateError, match=rf"in use.*PID {proc.pid}"):
            reduce(Net(), toy_data(), toy_data(30), finetune=FT, out=out,
                   stop=StopRule(max_removals=1))
        assert not (out / "config.json").exists()  # refused before writing anything
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    # the lock is re-entrant: a caller holding it (as the CLI does) can still run reduce
    with easier.io.records.lock_run_dir(out):
        res = reduce(Net(), toy_data(), toy_data(30), finetune=FT, out=out,
                     stop=StopRule(max_removals=1), run=RunConfig(verbose=False))
    assert len(res.history) == 2


def test_one_log_line_per_iteration_by_default_and_none_when_silenced(monkeypatch, caplog,
                                                                       capsys):
    scripted(monkeypatch, [90.0, 89.5, 80.0])
    caplog.set_level(logging.INFO, logger="easier")
    reduce(Net(), toy_data(), toy_data(30), finetune=FT, stop=StopRule(delta=1.0))
    lines = [r.getMessage() for r in caplog.records if r.name == "easier"]
    iters = [m for m in lines if m.startswith("iter")]
    assert len(iters) == 3  # baseline, one kept, one rejected
    assert "dense baseline" in iters[0] and "val 90.00%" in iters[0]
    assert re.search(r"iter  1 \| r\d \(H=[\d.]+\) \| val 89\.50% \(floor 89\.00\) ok \|", iters[1])
    assert "val 80.00%" in iters[2] and "REJECTED" in iters[2] and iters[2].endswith("s")
    assert lines[-1].startswith("stopped: val top-1 80.00 < baseline")
    caplog.clear()
    scripted(monkeypatch, [90.0, 89.5, 80.0])
    reduce(Net(), toy_data(), toy_data(30), finetune=FT, stop=StopRule(delta=1.0),
           run=RunConfig(verbose=False))
    assert not [r for r in caplog.records if r.name == "easier"]
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_without_logging_configured_the_lines_go_to_stderr(tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, {tests!r})
        from test_reduce import Net, toy_data, FT
        from easier import StopRule, reduce
        torch.set_num_threads(1)
        reduce(Net(), toy_data(60), toy_data(30), finetune=FT,
               stop=StopRule(max_removals=1, delta=100.0))
    """).format(tests=os.path.dirname(__file__))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    err = done.stderr.splitlines()
    assert sum(line.startswith("iter ") for line in err) == 2, done.stderr
    assert err[-1].startswith("stopped: max_removals=1 reached")


class _Constant(nn.Module):
    """Always predicts class 0 of ``k``: val top-1 is the share of class 0, known by hand."""

    def __init__(self, k: int):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, k)
        with torch.no_grad():  # logits = (1, 0, ..., 0) whatever the input
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.bias[0] = 1.0

    def forward(self, x):
        return self.head(self.act(self.fc(x)))


def _labelled(n, k, share0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(1, k, (n,), generator=g)
    y[: int(n * share0)] = 0
    return TensorDataset(torch.randn(n, 8, generator=g), y)


@pytest.mark.parametrize(("k", "share0", "warned"), [(10, 0.12, True), (3, 0.9, False)])
def test_a_dense_model_near_chance_is_flagged_before_any_removal(k, share0, warned):
    lines: list[str] = []
    reduce(_Constant(k), _labelled(60, k, share0), _labelled(50, k, share0, 1), finetune=FT,
           stop=StopRule(max_removals=1), run=RunConfig(log=lines.append))
    # 12 % correct with 10 classes is within 5 points of chance (10 %); 90 % with 3 is not
    flagged = [i for i, line in enumerate(lines) if "near chance" in line]
    assert bool(flagged) == warned
    if warned:
        assert flagged == [1] and lines[0].startswith("iter  0")  # right after the baseline
        assert f"{100 / k:.1f}% for {k} classes" in lines[1] and "12.0% val top-1" in lines[1]


def test_every_decision_reports_the_val_standard_error_and_a_noisy_delta_warns():
    lines: list[str] = []
    res = reduce(Net(), toy_data(), toy_data(30), finetune=FT,
                 stop=StopRule(delta=1.0, max_removals=1), run=RunConfig(log=lines.append))
    for h in res.history:  # binomial standard error of a top-1 on 30 images, by hand
        p = h["val_acc"] / 100
        assert h["val_se"] == pytest.approx(100 * (p * (1 - p) / 30) ** 0.5)
    se = res.history[0]["val_se"]
    assert 2 * se > 1.0  # 30 images: one point is far inside the noise, and the run says so
    assert any("below two standard errors" in x and "30 samples" in x for x in lines)
    quiet: list[str] = []
    reduce(Net(), toy_data(), toy_data(30), finetune=FT,
           stop=StopRule(delta=2 * se + 1, max_removals=1), run=RunConfig(log=quiet.append))
    assert not any("standard errors" in x for x in quiet)


def test_a_method_that_overspends_the_budget_is_stopped(tmp_path):
    """A method choosing more units than max_removals still allows is a bug in the method: the
    loop refuses it before editing anything, naming the method and Context.max_k."""
    import dataclasses

    from easier.methods.controls import RandomOrder

    class Greedy(RandomOrder):
        def step(self, ctx):
            return super().step(dataclasses.replace(ctx, k=len(ctx.remaining)))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 2))
    x = torch.randn(64, 4)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    with pytest.raises(ConfigError, match=r"chose 2 sites .*allows 1 more.*Context\.max_k"):
        reduce(model, data, data, method=Greedy(), stop=StopRule(delta=100.0, max_removals=1),
               finetune=FineTune(epochs=1, batch_size=32), run=RunConfig(verbose=False))
