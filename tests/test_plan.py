import json
import random

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import easier
from _harness import InvertedResidual, rand_bn
from easier.edit.padding import fold_ready
from easier.errors import ConfigError, FoldError
from easier.merge import (
    MODES,
    FoldPlan,
    LatencyConfig,
    apply_merges,
    chain_flops,
    chain_is_exact,
    find_chains,
    fold,
    layer_flops,
    merge_chain,
    plan_fold,
    prepare,
    register_mode,
    verify_fold,
)
from easier.merge import plan as plan_mod

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def conv_pair(c: int = 64) -> nn.Module:
    """3x3 ∘ 3x3 (C->C->C) with the activation between them removed."""
    return nn.Sequential(
        nn.Conv2d(c, c, 3, padding=1, bias=False),
        rand_bn(c),
        nn.Identity(),
        nn.Conv2d(c, c, 3, padding=1, bias=False),
        rand_bn(c),
        nn.ReLU(),
    )


def test_flops_mode_refuses_3x3_pair_with_hand_counted_flops():
    x = torch.randn(1, 64, 8, 8)
    ready = fold_ready(conv_pair(64).eval(), x)
    (d,) = plan_fold(ready, x, "flops").chains
    # relocated: conv1 pads 2 and yields 10x10, conv2 pads 0 and yields 8x8
    assert d.flops_before == 2 * 64 * 64 * 9 * (10 * 10 + 8 * 8)
    assert d.flops_after == 2 * 64 * 64 * 25 * 8 * 8
    assert d.decision == "keep" and "adds FLOPs" in d.reason
    assert d.kernel == [5, 5] and d.padding == [2, 2] and d.stride == [1, 1]


def test_flops_mode_accepts_inverted_residual():
    x = torch.randn(1, 24, 8, 8)
    ready = fold_ready(InvertedResidual(24).eval(), x)
    (d,) = plan_fold(ready, x, "flops").chains
    assert d.flops_before == 2 * (24 * 144 * 10 * 10 + 144 * 9 * 8 * 8 + 144 * 24 * 8 * 8)
    assert d.flops_after == 2 * 24 * 24 * 9 * 8 * 8
    assert d.decision == "merge" and d.residual == "identity" and d.groups == 1
    folded = fold(ready, x, "flops")
    assert sum(isinstance(m, nn.Conv2d) for m in folded.modules()) == 1


def test_mode_none_folds_only_batchnorm():
    x = torch.randn(2, 24, 6, 6, dtype=D)
    ready = fold_ready(InvertedResidual(24).to(D).eval(), x)
    plan = plan_fold(ready, x, "none")
    assert [c.decision for c in plan.chains] == ["keep"]
    assert plan.bn_folded == ["conv.0<-conv.1", "conv.3<-conv.4", "conv.6<-conv.7"]
    folded = fold(ready, x, "none", rtol=0, atol=1e-10)
    assert sum(isinstance(m, nn.Conv2d) for m in folded.modules()) == 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_latency_mode_times_each_chain_at_its_shape():
    x = torch.randn(1, 8, 6, 6)
    model = nn.Sequential(InvertedResidual(8), nn.ReLU(), conv_pair(8)).eval()
    plan = plan_fold(fold_ready(model, x), x, "latency", min_run_time=0.01)
    assert len(plan.chains) == 2
    for d in plan.chains:
        assert d.decision in ("merge", "keep")
        assert d.latency_before_ms > 0 and d.latency_after_ms > 0
        assert d.input_shape == [1, 8, 6, 6]
    assert plan.num_threads == 1


class NoisyTimer:
    """A deterministic fake timer: per-round ms = base x (1 + uniform noise), seeded.

    ``ratio(job)`` is the true after/before ratio of a job (chain or whole model, batch size);
    ``noise`` the relative half-width of each sample's noise. Every job it gets is recorded.
    """

    def __init__(self, ratio, noise: float, seed: int = 0):
        self.ratio, self.noise = ratio, noise
        self.rng = random.Random(seed)
        self.jobs = []

    def __call__(self, job, fns):
        self.jobs.append(job)
        r = self.ratio(job)

        def draw(base):
            return [base * (1 + self.rng.uniform(-self.noise, self.noise))
                    for _ in range(job.rounds)]

        return [draw(2.0), draw(2.0 * r)]


def ir_then_pair() -> nn.Module:
    """Chain 0 (inverted residual) loses FLOPs when merged, chain 1 (3x3 pair) gains them."""
    return nn.Sequential(InvertedResidual(8), nn.ReLU(), conv_pair(8)).eval()


def test_inconclusive_timing_falls_back_to_the_flops_choice():
    x = torch.randn(1, 8, 8, 8)
    ready = fold_ready(ir_then_pair(), x)
    timer = NoisyTimer(lambda job: 1.0, noise=0.3, seed=1)  # no real difference, much noise
    plan = plan_fold(ready, x, "latency", latency=LatencyConfig(timer=timer))
    by_flops = [c.flops_after <= c.flops_before for c in plan.chains]
    assert by_flops == [True, False]  # hand-counted in the two tests above
    assert [c.decision == "merge" for c in plan.chains] == by_flops
    for c in plan.chains:
        assert c.inconclusive and "timing inconclusive" in c.reason and "FLOPs choice" in c.reason
        lo, hi = c.timing["1"]["ratio_lo"], c.timing["1"]["ratio_hi"]
        assert lo <= 1 - 0.03 <= hi or lo <= 1 <= hi  # the band really straddles
    assert plan.batch_sizes == [1] and "inconclusive" in str(plan)
    # the whole-model check was inconclusive too: it notes so and keeps the merge
    assert any("whole-model check" in n for n in plan.notes)


def test_consistently_faster_merge_is_merged_and_slower_whole_model_drops_it():
    x = torch.randn(1, 8, 8, 8)
    ready = fold_ready(ir_then_pair(), x)
    fast = NoisyTimer(lambda job: 0.5 if job.what == "chain" else 0.8, noise=0.1)
    plan = plan_fold(ready, x, "latency", latency=LatencyConfig(timer=fast, rounds=5))
    assert [c.decision for c in plan.chains] == ["merge", "merge"]
    assert not any(c.inconclusive for c in plan.chains)
    assert all(c.timing["1"]["runs"] == 5 and c.timing["1"]["ratio_hi"] < 0.97
               for c in plan.chains)
    assert sum(isinstance(m, nn.Conv2d) for m in fold(ready, x, plan).modules()) == 2
    assert plan.whole_model_ms["folded"] < plan.whole_model_ms["bn_folded"]
    # chains faster, but the whole folded model slower beyond the noise: every merge dropped
    slow = NoisyTimer(lambda job: 0.5 if job.what == "chain" else 1.3, noise=0.05)
    plan = plan_fold(ready, x, "latency", latency=LatencyConfig(timer=slow))
    assert [c.decision for c in plan.chains] == ["keep", "keep"]
    assert all(c.reason.startswith("dropped") for c in plan.chains) and plan.notes
    assert sum(isinstance(m, nn.Conv2d) for m in fold(ready, x, plan).modules()) == 5


def test_identical_chains_are_timed_once_and_get_identical_decisions():
    x = torch.randn(1, 8, 8, 8)
    ready = fold_ready(nn.Sequential(conv_pair(8), conv_pair(8)).eval(), x)
    flips = iter([0.5, 1.5, 0.5, 1.5])  # the machine's load flips between calls

    def ratio(job):
        return next(flips) if job.what == "chain" else 0.9

    timer = NoisyTimer(ratio, noise=0.02)
    plan = plan_fold(ready, x, "latency", latency=LatencyConfig(timer=timer))
    first, second = plan.chains
    assert first.modules != second.modules
    assert (first.decision, first.timing) == (second.decision, second.timing)
    assert first.decision == "merge" and second.same_as == first.chain_id
    assert [j.chain_id for j in timer.jobs if j.what == "chain"] == [first.chain_id]


def test_memo_carries_chain_decisions_to_a_later_plan():
    """Folding every iteration of a run: a chain decided in an earlier plan is not re-timed."""
    x = torch.randn(1, 8, 8, 8)
    one = fold_ready(nn.Sequential(conv_pair(8)).eval(), x)
    two = fold_ready(nn.Sequential(conv_pair(8), conv_pair(8)).eval(), x)
    flips = iter([0.5, 1.5, 0.5, 1.5])

    def ratio(job):
        return next(flips) if job.what == "chain" else 0.9

    timer, memo = NoisyTimer(ratio, noise=0.02), {}
    first = plan_fold(one, x, "latency", latency=LatencyConfig(timer=timer), memo=memo)
    later = plan_fold(two, x, "latency", latency=LatencyConfig(timer=timer), memo=memo)
    assert len([j for j in timer.jobs if j.what == "chain"]) == 1  # timed in the first plan only
    assert first.chains[0].decision == "merge"
    assert [c.decision for c in later.chains] == ["merge", "merge"]
    assert len(memo) == 1


def test_plan_holds_for_every_named_batch_size():
    x = torch.randn(1, 8, 8, 8)
    ready = fold_ready(conv_pair(8).eval(), x)

    def ratio(job):  # merged: faster at batch 1, slower at 64
        return {1: 0.6, 64: 1.4}[job.batch_size] if job.what == "chain" else 0.9

    both = plan_fold(ready, x, "latency", batch_sizes=(1, 64),
                     latency=LatencyConfig(timer=NoisyTimer(ratio, noise=0.05)))
    (d,) = both.chains
    assert d.decision == "keep" and "slower at batch 64" in d.reason
    assert both.batch_sizes == [1, 64] and set(d.timing) == {"1", "64"}
    assert "batch sizes 1, 64" in str(both)
    timer = NoisyTimer(ratio, noise=0.05)
    one = plan_fold(ready, x, "latency", batch_sizes=(1,), latency=LatencyConfig(timer=timer))
    assert one.chains[0].decision == "merge" and one.batch_sizes == [1]
    assert {j.batch_size for j in timer.jobs} == {1}
    # fold() takes the sizes too, and a plan saved to JSON keeps them
    folded = fold(ready, x, "latency", batch_sizes=(1, 64),
                  latency=LatencyConfig(timer=NoisyTimer(ratio, noise=0.05)))
    back = FoldPlan.from_dict(json.loads(json.dumps(folded.fold_plan.to_dict())))
    assert back.batch_sizes == [1, 64] and back.chains[0].decision == "keep"


def test_each_named_batch_size_is_timed_at_its_real_shape():
    x = torch.randn(1, 5, 6)  # one sample of 5 tokens: the capture pins batch 1
    m = nn.Sequential(nn.Linear(6, 24), nn.Identity(), nn.Linear(24, 6)).eval()
    seen = []

    def ratio(job):
        return 0.5

    class Spy(NoisyTimer):
        def __call__(self, job, fns):
            with torch.no_grad():
                seen.append((job.what, job.batch_size, [tuple(fn().shape) for fn in fns]))
            return super().__call__(job, fns)

    plan = plan_fold(m, x, "latency", batch_sizes=(1, 3), latency=LatencyConfig(timer=Spy(
        ratio, noise=0.01)))
    assert plan.chains[0].decision == "merge"
    assert seen == [("chain", 1, [(1, 5, 6)] * 2), ("chain", 3, [(3, 5, 6)] * 2),
                    ("model", 1, [(1, 5, 6)] * 2), ("model", 3, [(3, 5, 6)] * 2)]


@pytest.mark.parametrize("bad", [{"batch_sizes": (0,)}, {"batch_sizes": ()}, {"rounds": 4},
                                 {"margin": 1.5}, {"min_run_time": 0}])
def test_latency_config_rejects_nonsense(bad):
    with pytest.raises(ConfigError):
        LatencyConfig(**bad)


def test_old_plan_json_without_timing_fields_still_loads():
    x = torch.randn(1, 8, 6, 6)
    d = plan_fold(fold_ready(conv_pair(8).eval(), x), x, "flops").to_dict()
    for key in ("batch_sizes", "whole_model"):
        del d[key]
    for c in d["chains"]:
        for key in ("timing", "inconclusive", "same_as"):
            del c[key]
    back = FoldPlan.from_dict(d)
    assert back.batch_sizes is None and back.chains[0].inconclusive is False


def test_plan_json_round_trip_and_reapply():
    x = torch.randn(2, 8, 10, 10, dtype=D)
    model = nn.Sequential(InvertedResidual(8), nn.ReLU(), conv_pair(8)).to(D).eval()
    ready = fold_ready(model, x)
    folded = fold(ready, x, "flops")
    plan = folded.fold_plan
    back = FoldPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan and back.max_abs_error is not None
    again = fold(ready, x, back)
    assert [c.decision for c in again.fold_plan.chains] == ["merge", "keep"]
    assert str(again.graph) == str(folded.graph)
    text = str(plan)
    assert "1/2 chains merged" in text and "0.conv.0>0.conv.3>0.conv.6" in text
    assert "adds FLOPs" in text


def test_plan_for_another_model_and_unknown_mode_are_config_errors():
    x = torch.randn(1, 8, 6, 6)
    plan = plan_fold(fold_ready(conv_pair(8).eval(), x), x, "all")
    other = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)).eval()
    with pytest.raises(ConfigError, match="does not match"):
        fold(other, x, plan)
    with pytest.raises(ConfigError, match="unknown fold plan mode"):
        plan_fold(other, x, "fastest")


def test_register_mode_adds_a_strategy():
    @register_mode("kernel<=3")
    def small(c):
        k = c.merged.kernel_size if hasattr(c.merged, "kernel_size") else (1,)
        return max(k) <= 3, f"kernel {max(k)}"

    try:
        x = torch.randn(1, 4, 10, 10)
        m = nn.Sequential(
            nn.Conv2d(4, 4, 1),
            nn.Conv2d(4, 4, 3),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3),
            nn.Conv2d(4, 4, 3),
        ).eval()
        plan = plan_fold(m, x, "kernel<=3")
        assert [c.decision for c in plan.chains] == ["merge", "keep"]
    finally:
        del MODES["kernel<=3"]


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.Conv2d(6, 4, 3, stride=2, padding=1, dilation=1, groups=2), (2, 6, 9, 7)),
        (nn.Conv2d(4, 4, 5, dilation=2, groups=4), (1, 4, 12, 12)),
        (nn.Conv1d(3, 5, 3, stride=2), (3, 3, 11)),
        (nn.Linear(7, 5), (2, 3, 7)),
    ],
)
def test_layer_flops_matches_flop_counter(layer, shape):
    x = torch.randn(shape)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = layer(x)
    assert layer_flops(layer, tuple(out.shape)) == counter.get_total_flops()


def test_from_dict_rejects_foreign_dicts():
    with pytest.raises(ConfigError, match="not a FoldPlan"):
        FoldPlan.from_dict({"mode": "all", "chains": [{"id": 0}]})


def test_building_blocks_prepare_find_merge_apply_verify():
    x = torch.randn(2, 8, 6, 6, dtype=D)
    model = nn.Sequential(InvertedResidual(8), nn.ReLU(), conv_pair(8)).to(D).eval()
    ready = fold_ready(model, x)
    assert ready.relocated_convs == ["0.conv.0", "0.conv.3", "2.0", "2.3"]
    gm, bn_folded = prepare(ready, x)
    assert bn_folded == ["0.conv.0<-0.conv.1", "0.conv.3<-0.conv.4", "0.conv.6<-0.conv.7",
                         "2.0<-2.1", "2.3<-2.4"]
    chains = find_chains(gm)
    assert [c.modules for c in chains] == [["0.conv.0", "0.conv.3", "0.conv.6"], ["2.0", "2.3"]]
    assert [c.residual for c in chains] == ["identity", None]
    assert all(chain_is_exact(gm, c) for c in chains)
    # FLOPs by hand: relocated, the 1x1 expand pads 1 (8x8 out) and the 3x3 convs of the pair
    # give 8x8 then 6x6
    assert chain_flops(gm, chains[0]) == 2 * 2 * (8 * 48 * 8 * 8 + 48 * 9 * 6 * 6 + 48 * 8 * 6 * 6)
    assert chain_flops(gm, chains[1]) == 2 * 2 * 8 * 8 * 9 * (8 * 8 + 6 * 6)
    merged = [(c, merge_chain(gm, c)) for c in chains]
    assert [m.kernel_size for _, m in merged] == [(3, 3), (5, 5)]
    with torch.no_grad():
        want = ready(x)
    apply_merges(gm, merged)
    assert sum(isinstance(m, nn.Conv2d) for m in gm.modules()) == 2
    with torch.no_grad():
        torch.testing.assert_close(gm(x), want, rtol=0, atol=1e-10)
    assert verify_fold(ready, gm, x, rtol=0, atol=1e-10) < 1e-10
    with torch.no_grad():
        ready[2][3].weight.add_(1e-3)  # a different reference: verification must say so
    with pytest.raises(FoldError, match="max \\|err\\|"):
        verify_fold(ready, gm, x, rtol=0, atol=1e-10)


def test_fold_submodule_imports_by_dotted_path():
    """The fold's package is ``easier.merge``: no public function shadows it (``easier.fold`` is
    the function, and the documented ``easier.merge.LatencyConfig`` path works)."""
    import easier.merge.plan as by_path
    from easier.merge import LatencyConfig

    assert by_path is plan_mod
    assert callable(easier.fold) and not hasattr(easier.fold, "__path__")
    assert LatencyConfig is easier.merge.latency.LatencyConfig
