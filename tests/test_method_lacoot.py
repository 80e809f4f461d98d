import importlib
import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.utils.data import TensorDataset

from easier import ConfigError, DataError, EasierWarning, RunConfig, StopRule, find_sites, models
from easier.edit.linearize import edits_of, replace_with_identity
from easier.io.records import load_model
from easier.merge import fold
from easier.methods import create_method
from easier.methods.lacoot import (
    Lacoot,
    MSWRegularizer,
    block_distances,
    candidate_blocks,
    max_sliced_wasserstein,
    wasserstein2_1d,
)
from easier.pipeline.reduce import reduce
from easier.train.finetune import FineTune, TrainResult

reduce_mod = importlib.import_module("easier.pipeline.iteration")  # the loop body, to monkeypatch

# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and far faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def w2sq_assignment(a: np.ndarray, b: np.ndarray) -> float:
    """Squared W2 between equal-size uniform clouds by exact optimal assignment (no sorting)."""
    a2, b2 = a.reshape(len(a), -1), b.reshape(len(b), -1)
    cost = ((a2[:, None, :] - b2[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def image_data(n, seed, size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()
    return TensorDataset(x, y)


def tiny_resnet():
    return models.create("resnet18", num_classes=3, width=0.125, image_size=8)


class Residual(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.act(self.fc(x))


class ResMLP(nn.Module):
    """Stem, a stage of two residual blocks, a widening block, head: 2 identity-shaped blocks."""

    def __init__(self, d=6):
        super().__init__()
        self.stem = nn.Linear(4, d)
        self.stage = nn.Sequential(Residual(d), Residual(d))
        self.wide = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU())
        self.head = nn.Linear(2 * d, 3)

    def forward(self, x):
        return self.head(self.wide(self.stage(self.stem(x))))


# ---------------------------------------------------------------------------------------------
# the distance


def test_w2_1d_equals_optimal_assignment():
    g = torch.Generator().manual_seed(1)
    u, v = (
        torch.randn(9, 4, generator=g, dtype=torch.float64),
        torch.rand(9, 4, generator=g, dtype=torch.float64),
    )
    got = wasserstein2_1d(u, v)
    want = [w2sq_assignment(u[:, j, None].numpy(), v[:, j, None].numpy()) for j in range(4)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


def test_msw_is_the_largest_slice_and_a_lower_bound_of_w2():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 2, 2, 2, generator=g, dtype=torch.float64)  # points in R^8, flattened
    y = 1.5 * torch.randn(12, 8, generator=g, dtype=torch.float64) + 0.3
    dirs = torch.randn(8, 5, generator=g, dtype=torch.float64)
    got = float(max_sliced_wasserstein(x, y, directions=dirs))
    unit = (dirs / dirs.norm(dim=0)).numpy()
    xs, ys = x.reshape(12, -1).numpy(), y.numpy()
    want = math.sqrt(max(w2sq_assignment(xs @ unit[:, j], ys @ unit[:, j]) for j in range(5)))
    assert got == pytest.approx(want, rel=1e-10)
    # projections are 1-Lipschitz, so any slice is at most the full W2 between the clouds
    assert float(max_sliced_wasserstein(x, y, 500)) <= math.sqrt(w2sq_assignment(xs, ys)) + 1e-9


def test_msw_zero_for_equal_distributions_and_norm_of_a_shift():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    assert float(max_sliced_wasserstein(x, x)) == 0.0
    assert float(max_sliced_wasserstein(x, x[torch.randperm(64, generator=g)])) == 0.0
    v = torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)  # |v| = 5
    y = x + v
    assert float(max_sliced_wasserstein(x, y, directions=v[:, None])) == pytest.approx(5.0)
    # a slice at angle a sees a shift of 5|cos a|: the best of many random slices nears 5
    many = float(max_sliced_wasserstein(x, y, 4000, generator=g))
    assert 4.95 < many <= 5.0 + 1e-9
    few = float(max_sliced_wasserstein(x, y, 1, generator=g))
    assert few <= 5.0 + 1e-9
    with pytest.raises(DataError, match="input and output shapes are equal"):
        max_sliced_wasserstein(x, torch.randn(64, 4, dtype=torch.float64))


def test_msw_directions_come_from_the_seeded_global_rng():
    x, y = torch.randn(16, 10), torch.randn(16, 10) * 2
    torch.manual_seed(7)
    a = max_sliced_wasserstein(x, y)
    torch.manual_seed(7)
    b = max_sliced_wasserstein(x, y)
    c = max_sliced_wasserstein(x, y)
    assert torch.equal(a, b) and not torch.equal(b, c)


# ---------------------------------------------------------------------------------------------
# candidate blocks


def test_default_candidates_are_the_papers():
    assert candidate_blocks(tiny_resnet()) == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert candidate_blocks(tiny_resnet(), "generic") == [
        "layer1.0",
        "layer1.1",
        "layer2.1",
        "layer3.1",
        "layer4.1",
    ]
    mb = models.create("mobilenet_v2", num_classes=3, width=0.125, image_size=8)
    got = candidate_blocks(mb)
    assert got == [f"features.{k}.conv.1" for k in (2, 3, 5, 6, 8, 9, 10, 11, 12, 13, 15, 16, 17)]
    swin = models.create("swin_t", num_classes=3, width=0.125, image_size=16)
    assert len(candidate_blocks(swin)) == 12
    assert all(
        type(swin.get_submodule(n)).__name__ == "SwinTransformerBlock"
        for n in candidate_blocks(swin)
    )
    # all of them are identity-shaped: the model still runs with every one removed
    for model, size in ((mb, 8), (swin, 16)):
        out = replace_with_identity(model, candidate_blocks(model))(torch.randn(2, 3, size, size))
        assert out.shape == (2, 3)
    assert candidate_blocks(models.create("convnet", num_classes=3, width=0.25)) == []


def test_generic_rule_on_a_custom_model_and_explicit_names():
    net = ResMLP()
    with pytest.raises(ConfigError, match="input_shape"):
        candidate_blocks(net)  # not from easier.models: no example input known
    assert candidate_blocks(net, input_shape=(4,)) == ["stage.0", "stage.1"]  # stage: looked into
    assert candidate_blocks(net, ["stage.1", "stage.0"]) == ["stage.0", "stage.1"]
    gone = replace_with_identity(net, ["stage.0"])
    assert candidate_blocks(gone, input_shape=(4,)) == ["stage.1"]
    assert candidate_blocks(gone, ["stage.0", "stage.1"]) == ["stage.1"]
    assert candidate_blocks(replace_with_identity(net, ["stage"]), ["stage.0"]) == []
    with pytest.raises(ConfigError, match="not a module"):
        candidate_blocks(net, ["stage.7"])


def test_options_are_checked_and_recorded():
    for bad in (
        {"lam": -1},
        {"n_projections": 0},
        {"blocks": "all"},
        {"blocks": []},
        {"score_batches": 0},
    ):
        with pytest.raises(ConfigError):
            Lacoot(**bad)
    m = create_method("lacoot", lam=9.0, finetune_after=True)
    assert m.finetune and m.rescore and not Lacoot().finetune and not Lacoot().rescore
    assert Lacoot.finetune is False  # the class default is the paper's and stays so
    assert json.loads(json.dumps(m.options()))["lam"] == 9.0
    assert Lacoot(lam=0).regularizer() is None


# ---------------------------------------------------------------------------------------------
# regularizer


class TwoBlocks(nn.Module):
    def __init__(self, d=5):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))
        self.b = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        return self.head(self.b(self.a(x)))


def test_regularizer_is_lam_times_mean_msw_of_the_current_batch():
    net, x = TwoBlocks(), torch.randn(32, 5)
    reg = Lacoot(lam=2.0, blocks=["a", "b"]).regularizer()
    handle = reg.attach(net)
    net(x)
    torch.manual_seed(11)
    got = reg(net)
    assert float(reg(net)) == 0.0  # features are consumed by a call
    got.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.a.parameters())
    assert net.head.weight.grad is None  # the term only sees the blocks
    handle.remove()
    with torch.no_grad():
        ha = net.a(x)
        torch.manual_seed(11)
        want = (max_sliced_wasserstein(x, ha) + max_sliced_wasserstein(ha, net.b(ha))) / 2
    assert float(got.detach()) == pytest.approx(2.0 * float(want), rel=1e-6)
    net(x)
    with pytest.raises(ConfigError, match="attach"):
        reg(net)


def test_regularizer_alone_drives_a_block_towards_identity_in_distribution():
    torch.manual_seed(0)
    net, x = TwoBlocks(d=4), torch.randn(64, 4)
    reg = Lacoot(lam=1.0, blocks=["a"]).regularizer()
    handle = reg.attach(net)
    before = block_distances(net, [x], ["a"], 200, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(net.a.parameters(), lr=0.05)
    for _ in range(100):
        net(x)
        loss = reg(net)
        opt.zero_grad()
        loss.backward()
        opt.step()
    handle.remove()
    after = block_distances(net, [x], ["a"], 200, generator=torch.Generator().manual_seed(0))
    assert after["a"] < 0.4 * before["a"]


def test_regularizer_warns_when_there_is_nothing_to_regularize():
    net = models.create("convnet", num_classes=3, width=0.25, image_size=8)
    reg = Lacoot().regularizer()
    with pytest.warns(EasierWarning, match="no candidate block"):
        handle = reg.attach(net)
    net(torch.randn(2, 3, 8, 8))
    assert float(reg(net)) == 0.0  # attached, but no block: the term is 0, not an error
    handle.remove()


def test_fine_tune_attaches_and_detaches_the_hooks():
    from easier.train.finetune import fine_tune

    net = tiny_resnet()
    reg = Lacoot().regularizer()
    assert isinstance(reg, MSWRegularizer)
    res = fine_tune(net, image_data(64, 0), FineTune(batch_size=32, max_steps=2), regularizer=reg)
    assert res.steps == 2 and math.isfinite(res.loss)
    assert all(not m._forward_hooks for m in net.modules())


# ---------------------------------------------------------------------------------------------
# the method in the loop


@pytest.fixture(scope="module")
def run():
    """One real run: pretrain with the regularizer, then remove 2 blocks (never rejected)."""
    torch.manual_seed(0)
    dense = tiny_resnet()
    trained = tiny_resnet()
    res = reduce(trained, image_data(128, 0), image_data(48, 1), method="lacoot",
                 pretrain=FineTune(batch_size=32, max_steps=4), finetune=FineTune(batch_size=32),
                 stop=StopRule(delta=100.0, max_removals=2))
    return dense, res


def test_removes_the_lowest_distance_whole_blocks(run):
    _, res = run
    first, second = res.history[1], res.history[2]
    s = first["scores"]
    assert set(s) == {"layer1.1", "layer2.1", "layer3.1", "layer4.1"}
    assert first["chosen"] == [min(s, key=s.get)]
    rest = {k: v for k, v in s.items() if k not in first["chosen"]}
    assert second["scores"] == rest  # ranked once (paper), reused for the next removal
    assert second["chosen"] == [min(rest, key=rest.get)]
    assert res.linearized == first["chosen"] + second["chosen"]
    assert first["finetune_steps"] == 0 and second["finetune_steps"] == 0


def test_removal_is_exactly_block_to_identity(run):
    _, res = run
    model, removed = res.model.eval(), res.linearized
    assert {n for n, m in model.named_modules() if isinstance(m, nn.Identity)} == set(removed)
    assert edits_of(model) == [{"op": "identity", "modules": [n]} for n in removed]
    # rebuild the pre-removal network from the reduced one's weights: the blocks never moved
    before = tiny_resnet()
    under = {
        k
        for k in before.state_dict()
        if any(k.startswith(n + ".") for n in removed) and not k.endswith("num_batches_tracked")
    }  # never reported missing
    kept = before.load_state_dict(model.state_dict(), strict=False)
    assert not kept.unexpected_keys and set(kept.missing_keys) == under and under
    # ... and skipping those blocks by hooks computes the reduced network's function
    hooks = [before.get_submodule(n).register_forward_hook(lambda _m, a, _o: a[0]) for n in removed]
    before.eval()
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(before(x), model(x))
    for h in hooks:
        h.remove()
    # every activation site outside the removed blocks is still there
    sites = [s.name for s in find_sites(tiny_resnet(), x[:1])]
    outside = [s for s in sites if not any(s.startswith(n + ".") for n in removed)]
    assert [s.name for s in find_sites(model, x[:1])] == outside
    assert len(outside) == len(sites) - 2 * len(removed)


def test_output_folds_and_verifies(run):
    _, res = run
    x = torch.randn(2, 3, 8, 8)
    model = res.model.eval()
    folded = fold(model, x, plan="all")
    torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)


def scripted(monkeypatch, accuracies):
    calls = []
    seq = iter(accuracies)

    def fake_fine_tune(*a, **k):
        calls.append(k)
        return TrainResult(epochs=1, steps=1, loss=0.1, accuracy=50.0)

    monkeypatch.setattr(reduce_mod, "fine_tune", fake_fine_tune)
    monkeypatch.setattr("easier.pipeline.scores.evaluate", lambda *a, **k: (0.5, next(seq)))
    return calls


@pytest.mark.slow
def test_delta_rule_stops_at_first_drop_and_keeps_last_good(monkeypatch):
    calls = scripted(monkeypatch, [90.0, 89.5, 89.0, 88.5])  # floor 89.0
    res = reduce(tiny_resnet(), image_data(64, 0), image_data(32, 1), method="lacoot",
                 finetune=FineTune(batch_size=32), stop=StopRule(delta=1.0))
    assert [h["accepted"] for h in res.history] == [True, True, True, False]
    assert res.linearized == res.history[2]["removed"] and len(res.linearized) == 2
    assert "88.50 < baseline 90.00" in res.stop_reason
    assert calls == []  # no fine-tuning after removal (the paper)
    assert sum(isinstance(m, nn.Identity) for m in res.model.modules()) == 2


@pytest.mark.slow
def test_finetune_after_fine_tunes_with_the_regularizer(monkeypatch):
    calls = scripted(monkeypatch, [90.0, 90.0, 90.0, 90.0, 90.0])
    res = reduce(tiny_resnet(), image_data(64, 0), image_data(32, 1),
                 method=Lacoot(finetune_after=True), finetune=FineTune(batch_size=32),
                 stop=StopRule(delta=1.0))
    assert res.stop_reason == "no block left" and len(res.linearized) == 4
    assert len(calls) == 4 and all(isinstance(k["regularizer"], MSWRegularizer) for k in calls)
    assert all(h["reason"].endswith("(re-measured)") for h in res.history[1:])


@pytest.mark.slow
@pytest.mark.parametrize("finetune_after", [False, True])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, finetune_after):
    monkeypatch.setattr("easier.report.files.plot_history", lambda *a, **k: None)  # speed only

    def go(out, resume=False):
        torch.manual_seed(0)
        return reduce(tiny_resnet(), image_data(96, 0), image_data(40, 1),
                      method=Lacoot(finetune_after=finetune_after, score_batches=1), out=out,
                      resume=resume, pretrain=FineTune(batch_size=32, max_steps=3),
                      finetune=FineTune(batch_size=32, max_steps=2),
                      stop=StopRule(delta=100.0, max_removals=3), run=RunConfig(seed=5))

    full = go(tmp_path / "full")
    real_step = Lacoot.step

    def crash(self, ctx):
        if ctx.iteration == 2:
            raise KeyboardInterrupt("killed")
        return real_step(self, ctx)

    monkeypatch.setattr(Lacoot, "step", crash)
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "cut")
    monkeypatch.setattr(Lacoot, "step", real_step)
    resumed = go(tmp_path / "cut", resume=True)

    def rows(d):
        out = [json.loads(x) for x in (tmp_path / d / "history.jsonl").read_text().splitlines()]
        for r in out:
            r.pop("seconds")
        return out

    assert len(rows("full")) == 4 and rows("cut") == rows("full")
    assert resumed.linearized == full.linearized
    a = load_model(tmp_path / "full" / "model.pt", tiny_resnet()).state_dict()
    b = load_model(tmp_path / "cut" / "model.pt", tiny_resnet()).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_step_removes_the_k_lowest_and_never_a_block_inside_a_chosen_one():
    import random

    from easier.methods import Context

    torch.manual_seed(0)
    net = ResMLP()
    val = TensorDataset(torch.randn(40, 4), torch.zeros(40, dtype=torch.long))
    units = ["stage", "stage.0", "stage.1"]
    method = Lacoot(blocks=units, score_batches=2, lam=0)  # rank as given: no warm-up

    def ctx(removed):
        return Context(
            model=net,
            remaining=units,
            removed=removed,
            k=2,
            iteration=1,
            rng=random.Random(0),
            val=val,
            batch_size=16,
        )

    step = method.step(ctx([]))
    # the scores are the batch-size-weighted mean MSW over the first 2 validation batches
    gen = torch.Generator().manual_seed(random.Random(0).getrandbits(63))
    batches = [val.tensors[0][:16], val.tensors[0][16:32]]
    assert step.scores == pytest.approx(block_distances(net, batches, units, 50, generator=gen))
    # a stored ranking (as after a resume) is reused; nested names are skipped
    method.load_state_dict({"scores": {"stage": 0.3, "stage.0": 0.1, "stage.1": 0.2}})
    step = method.step(ctx(["elsewhere"]))
    assert step.chosen == ["stage.0", "stage.1"]
    method.load_state_dict({"scores": {"stage": 0.1, "stage.0": 0.2, "stage.1": 0.3}})
    step = method.step(ctx(["elsewhere"]))
    assert step.chosen == ["stage"]  # its sub-blocks go with it
    assert isinstance(step.model.stage, nn.Identity)


# ---------------------------------------------------------------------------------------------
# from a trained checkpoint: the regularised training must happen before the ranking


class Stage3(nn.Module):
    """Stem, three residual blocks, head."""

    def __init__(self, d=6):
        super().__init__()
        self.stem = nn.Linear(4, d)
        self.stage = nn.Sequential(Residual(d), Residual(d), Residual(d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.stage(self.stem(x)))


def vector_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def msw_numpy(net, x, names, n_dir=400):
    """Block in/out MSW in float64 numpy with fixed directions: sort, squared gap, max, sqrt."""
    feats = {}
    hooks = [net.get_submodule(n).register_forward_hook(
        lambda _m, a, o, n=n: feats.__setitem__(n, (a[0].detach().double().numpy(),
                                                    o.detach().double().numpy())))
        for n in names]
    net.eval()
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    rng = np.random.default_rng(0)
    out = {}
    for n, (a, b) in feats.items():
        d = rng.standard_normal((a.shape[1], n_dir))
        d /= np.linalg.norm(d, axis=0)
        gaps = ((np.sort(a @ d, axis=0) - np.sort(b @ d, axis=0)) ** 2).mean(axis=0)
        out[n] = float(np.sqrt(gaps.max()))
    return out


def checkpoint_ctx(net, blocks, removed=()):
    import random

    from easier.methods import Context

    return Context(model=net, remaining=list(blocks), removed=list(removed), k=1, iteration=1,
                   rng=random.Random(0), train_eval=vector_data(128, 0), val=vector_data(48, 1),
                   batch_size=32)


def test_from_a_checkpoint_the_msw_term_is_trained_before_the_ranking():
    torch.manual_seed(0)
    net = Stage3()
    blocks = ["stage.0", "stage.1", "stage.2"]
    x = vector_data(128, 0).tensors[0]
    before = msw_numpy(net, x, blocks)
    params = {k: v.clone() for k, v in net.state_dict().items()}

    method = Lacoot(lam=5.0, blocks=blocks, warmup_epochs=3, warmup_lr=0.05)
    step = method.step(checkpoint_ctx(net, blocks))
    assert step.info["warmup"]["steps"] == 3 * 4  # 128 images / 32 per batch, 3 epochs
    assert method.trained_steps == 12
    assert all(torch.equal(v, params[k]) for k, v in net.state_dict().items())  # a copy trained
    kept = [b for b in blocks if b not in step.chosen]
    after = msw_numpy(step.model, x, kept)
    # the regularizer pulled every surviving block's output distribution towards its input
    assert all(after[b] < 0.5 * before[b] for b in kept), (before, after)
    # the ranking is of the trained network: the chosen block is its lowest-MSW one
    assert step.scores[step.chosen[0]] <= min(step.scores[b] for b in kept)

    # a weak regularizer trains the same budget but moves the distances far less: it is the
    # MSW term, not the task loss, that shrank them
    weak = Lacoot(lam=1e-4, blocks=blocks, warmup_epochs=3, warmup_lr=0.05)
    weak_step = weak.step(checkpoint_ctx(net, blocks))
    weak_kept = [b for b in blocks if b not in weak_step.chosen]
    weak_after = msw_numpy(weak_step.model, x, weak_kept)
    assert min(weak_after.values()) > max(after.values())


def test_no_warm_up_after_regularised_pretraining_and_a_clear_refusal_without_either():
    torch.manual_seed(0)
    blocks = ["stage.0", "stage.1", "stage.2"]
    kw = {"stop": StopRule(delta=100.0, max_removals=1), "finetune": FineTune(batch_size=32)}
    pre = reduce(Stage3(), vector_data(64, 0), vector_data(32, 1),
                 method=Lacoot(blocks=blocks), pretrain=FineTune(batch_size=32, max_steps=2), **kw)
    assert "warmup" not in pre.history[1]
    ckpt = reduce(Stage3(), vector_data(64, 0), vector_data(32, 1),
                  method=Lacoot(blocks=blocks), **kw)
    assert ckpt.history[1]["warmup"]["steps"] == 2  # 1 epoch of 64 images at batch 32
    with pytest.raises(ConfigError, match="warmup_epochs"):
        reduce(Stage3(), vector_data(64, 0), vector_data(32, 1),
               method=Lacoot(blocks=blocks, warmup_epochs=0), **kw)
    # lam=0 asks for the network as it is: ranked without training
    plain = reduce(Stage3(), vector_data(64, 0), vector_data(32, 1),
                   method=Lacoot(blocks=blocks, lam=0, warmup_epochs=0), **kw)
    assert "warmup" not in plain.history[1]
