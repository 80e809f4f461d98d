"""Early stop and distillation (easier.recovery) against brute-force and float64 references."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from _harness import crash_at, history_rows
from easier import ConfigError, Recovery, RunConfig, StopRule
from easier.io.atomic import atomic_write_text
from easier.io.records import load_model
from easier.methods.easier import Easier
from easier.pipeline.reduce import reduce
from easier.train.finetune import FineTune, fine_tune, seed_everything
from easier.train.recovery import TEACHER_FILE, Distill, EarlyStop, distill_loss


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3))


def data(n=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] + x[:, 2] > 0.5).long()
    return TensorDataset(x, y)


FT = FineTune(epochs=3, lr=0.05, batch_size=16)  # 12 steps an epoch, 36 in all


def subset_acc_by_hand(model, x, y):
    """Accuracy in % written independently of easier: one batched forward, float64 count."""
    was = model.training
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    model.train(was)
    return float((pred == y).double().mean() * 100)


def trajectory():
    """Subset accuracy after every step of the full budget (brute force), from the same seed."""
    model, train, val = mlp(), data(), data(64, seed=1)
    x, y = val.tensors
    accs = []
    fine_tune(model, train, FT, seed=3,
              after_step=lambda m: accs.append(subset_acc_by_hand(m, x, y)))
    return accs


@pytest.mark.parametrize("every", [1, 5])
def test_early_stop_stops_at_the_first_check_at_or_above_the_floor(every):
    x, y = data(64, seed=1).tensors
    accs = trajectory()
    assert len(accs) == 36
    checks = {s: accs[s - 1] for s in range(every, 37, every)}
    # a floor reached part-way: the median check value is met by some check but not all
    floor = sorted(checks.values())[len(checks) // 2]
    expected = min(s for s, a in checks.items() if a >= floor)
    for floor_, want, early in ((floor, expected, expected < 36), (-math.inf, every, True),
                                (101.0, 36, False)):
        model = mlp()
        stop = EarlyStop([(x[:32], y[:32]), (x[32:], y[32:])], every, floor_)
        res = fine_tune(model, data(), FT, seed=3, stop_check=stop)
        assert res.steps == want and res.stopped_early == early
        assert [s for s, _ in stop.checks] == list(range(every, want + 1, every))
        assert [a for _, a in stop.checks] == pytest.approx([checks[s] for s, _ in stop.checks])


def test_distill_loss_equals_the_float64_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g) * 3, torch.randn(8, 5, generator=g) * 3
    y = torch.randint(0, 5, (8,), generator=g)
    for w, temp in ((0.0, 4.0), (0.3, 2.0), (1.0, 0.5), (0.7, 1.0)):
        S, Tt = s.double().numpy(), t.double().numpy()

        def log_softmax(z):
            z = z - z.max(1, keepdims=True)
            return z - np.log(np.exp(z).sum(1, keepdims=True))

        ce = -log_softmax(S)[np.arange(8), y.numpy()].mean()
        pt = np.exp(log_softmax(Tt / temp))
        kl = (pt * (np.log(pt) - log_softmax(S / temp))).sum(1).mean()
        want = (1 - w) * ce + w * temp ** 2 * kl
        got = distill_loss(s, t, y, weight=w, temperature=temp)
        assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_distill_weight_zero_trains_exactly_like_plain_cross_entropy():
    teacher = mlp(seed=7).eval().requires_grad_(False)
    plain, kd0, kd = mlp(), mlp(), mlp()
    seed_everything(5)
    fine_tune(plain, data(), FT, seed=3)
    seed_everything(5)
    fine_tune(kd0, data(), FT, seed=3, loss_fn=Distill(teacher, 0.0, 4.0))
    seed_everything(5)
    fine_tune(kd, data(), FT, seed=3, loss_fn=Distill(teacher, 0.5, 4.0))
    for a, b in zip(plain.state_dict().values(), kd0.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c)
               for a, c in zip(plain.parameters(), kd.parameters(), strict=True))


def test_recovery_settings_are_checked_naming_the_field():
    for kwargs, field in (({"early_stop_every": 0}, "early_stop_every"),
                          ({"early_stop_batches": 0}, "early_stop_batches"),
                          ({"distill": 1.5}, "distill"), ({"distill": -0.1}, "distill"),
                          ({"temperature": 0.0}, "temperature"),
                          ({"early_stop_margin": math.nan}, "early_stop_margin"),
                          ({"early_stop_every": True}, "early_stop_every")):
        with pytest.raises(ConfigError, match=f"Recovery.{field}="):
            Recovery(**kwargs)
    with pytest.raises(ConfigError, match=r"Recovery\.finish_on_reject="):
        Recovery(finish_on_reject=1)
    assert not Recovery().active and Recovery(distill=0.1).active
    three = Recovery(early_stop_every=3)
    assert Recovery.from_dict(three.to_dict()) == three
    # a field left out of a saved dict takes its default
    old = {k: v for k, v in three.to_dict().items() if k != "finish_on_reject"}
    assert Recovery.from_dict(old).finish_on_reject is True


def rigged_val(n=64):
    """Validation data whose first 16 samples (the early-stop subset: one batch of 16) are
    labelled like the training data and whose other 48 carry a label no model predicts for
    them, so the subset says "recovered" while the full set can never be within delta."""
    x, y = data(n, seed=1).tensors
    y = y.clone()
    y[16:] = (y[16:] + 1) % 3
    return TensorDataset(x, y)


@pytest.mark.slow
@pytest.mark.parametrize("finish", [True, False])
def test_a_removal_is_rejected_only_after_the_whole_budget(tmp_path, finish):
    rec = Recovery(early_stop_every=2, early_stop_batches=1, finish_on_reject=finish)
    budget = 2 * math.ceil(192 / 16)  # epochs x batches of the fine-tune below
    res = reduce(mlp(), data(), rigged_val(), out=tmp_path / "r", recovery=rec,
                 finetune=FineTune(epochs=2, lr=0.02, batch_size=16), pretrain=PRE,
                 stop=StopRule(delta=1.0, max_removals=3), run=RunConfig(seed=1, verbose=False))
    last = res.history[-1]
    assert not last["accepted"] and last["finetune_stopped_early"]
    first = last["early_stop_checks"][-1][0]  # the early stop's own step count
    assert first < budget
    if finish:
        assert last["finetune_continued"] == budget - first
        assert last["finetune_steps"] == budget
        assert last["early_stop_val_acc"] < res.baseline["val_acc"] - 1.0
    else:
        assert "finetune_continued" not in last and last["finetune_steps"] == first


REC = Recovery(early_stop_every=2, early_stop_batches=1, distill=0.5, temperature=2.0)
PRE = FineTune(epochs=4, lr=0.05, batch_size=16)


def run(out, method="easier", resume=False, recovery=REC, delta=100.0):
    return reduce(mlp(), data(), data(64, seed=1), method=method, out=out, resume=resume,
                  finetune=FineTune(epochs=2, lr=0.02, batch_size=16), pretrain=PRE,
                  stop=StopRule(delta=delta, max_removals=3), run=RunConfig(seed=1, verbose=False),
                  recovery=recovery)


def test_steps_recorded_are_the_steps_that_ran(tmp_path):
    res = run(tmp_path / "r", delta=2.0)
    rows = res.history[1:]
    assert rows and all(r["finetune_steps"] <= 24 for r in rows)
    for r in rows:
        checks = r["early_stop_checks"]
        first = r["finetune_steps"] - r.get("finetune_continued", 0)
        assert [c[0] for c in checks] == list(range(2, first + 1, 2))
        # stopped early at a check, or else the whole budget ran
        if r["finetune_stopped_early"]:
            assert checks and checks[-1][0] == first
        else:
            assert r["finetune_steps"] == 24
        if r.get("finetune_continued"):  # rejected after the early stop: the budget was finished
            assert r["finetune_steps"] == 24
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["recovery"] == REC.to_dict()


@pytest.mark.slow
def test_resume_after_a_kill_keeps_the_dense_teacher(tmp_path):
    whole = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", method=crash_at(Easier, 2))
    resumed = run(tmp_path / "cut", resume=True)
    # the teacher is the dense model: the same weights pretraining gives, independently
    dense = mlp()
    seed_everything(1)
    fine_tune(dense, data(), PRE, seed=1)
    for name in ("whole", "cut"):
        t = load_model(tmp_path / name / TEACHER_FILE, mlp()).state_dict()
        for k, v in dense.state_dict().items():
            assert torch.equal(t[k], v), (name, k)
    assert history_rows(tmp_path / "cut") == history_rows(tmp_path / "whole")
    assert resumed.linearized == whole.linearized


def test_old_run_directory_without_the_key_resumes_and_another_setting_is_refused(tmp_path):
    out = tmp_path / "old"
    with pytest.raises(KeyboardInterrupt):
        run(out, method=crash_at(Easier, 2), recovery=Recovery())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.pop("recovery") is None
    atomic_write_text(out / "config.json", json.dumps(cfg))  # as written before Recovery
    with pytest.raises(ConfigError, match="recovery"):
        run(out, resume=True)
    assert run(out, resume=True, recovery=Recovery()).history[-1]["iteration"] >= 2
    assert not (out / TEACHER_FILE).exists()


def test_cli_flags_default_to_recovery_defaults_and_are_checked(capsys):
    from easier.cli import main
    from easier.cli.parser import build_parser

    p = build_parser()
    a = p.parse_args(["reduce"])
    got = Recovery(early_stop_every=a.early_stop_every, early_stop_batches=a.early_stop_batches,
                   early_stop_margin=a.early_stop_margin, distill=a.distill,
                   temperature=a.distill_temperature, finish_on_reject=a.early_stop_finish)
    assert got == Recovery()
    assert p.parse_args(["reduce", "--no-early-stop-finish"]).early_stop_finish is False
    a = p.parse_args(["reduce", "--early-stop-every", "7", "--distill", "0.25"])
    assert (a.early_stop_every, a.distill) == (7, 0.25)
    for bad in (["--distill", "1.5"], ["--early-stop-every", "0"], ["--distill-temperature", "0"]):
        assert main(["reduce", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("easier: error:") and bad[0] in err and "\n" not in err


class DictNet(nn.Module):
    """Takes keyword inputs and returns a Hugging Face ModelOutput, like an HF classifier."""

    def __init__(self, seed):
        super().__init__()
        self.net = mlp(seed)

    def forward(self, pixel_values, scale):
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=self.net(pixel_values * scale))


def test_distill_and_subset_check_take_dict_batches_and_model_outputs():
    from easier.train.recovery import read_subset, subset_accuracy

    x, y = data(64, seed=1).tensors
    rows = [{"pixel_values": x[i], "scale": torch.tensor([2.0]), "label": y[i]} for i in range(64)]
    teacher, student = DictNet(7).eval(), DictNet(0)
    batch = {"pixel_values": x[:8], "scale": torch.full((8,), 2.0)[:, None]}
    s = student(**batch).logits
    want = distill_loss(s, teacher.net(x[:8] * 2.0), y[:8], weight=0.5, temperature=2.0)
    got = Distill(teacher, 0.5, 2.0)(s, y[:8], batch)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    subset = read_subset(rows, 2, 16, "cpu", None)  # the first 2 batches of 16, in order
    assert [len(b[1]) for b in subset] == [16, 16] and torch.equal(subset[1][1], y[16:32])
    assert subset_accuracy(student, subset) == pytest.approx(
        subset_acc_by_hand(student.net, x[:32] * 2.0, y[:32]))
