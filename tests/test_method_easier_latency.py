"""easier-latency against a hand-built model whose foldable and non-foldable sites are known.

    x -> fc1 (D->W) -> a -> fc2 (W->D) -> (+ x) -> b -> fc3 (D->H) -> c -> head (H->K)

* ``a`` foldable: without it fc1∘fc2 + the skip is one D->D linear;
* ``b`` not foldable: it follows the residual add, which ends every chain;
* ``c`` foldable: without it fc3∘head is one D->K linear.

Entropies are set by biases: ``b`` is always ON (0 bits), ``c`` mostly ON, ``a`` mixed.
"""

import math
import random

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import easier
from easier.errors import ConfigError
from easier.merge.latency import LatencyConfig
from easier.methods import Context, create_method
from easier.methods.easier import Easier
from easier.methods.easier_latency import EasierLatency

D, W, H, K, B = 8, 64, 32, 5, 2


class Known(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, W), nn.Linear(W, D)
        self.fc3, self.head = nn.Linear(D, H), nn.Linear(H, K)
        self.a, self.b, self.c = nn.ReLU(), nn.ReLU(), nn.ReLU()
        with torch.no_grad():
            self.fc2.bias.fill_(100.0)  # b's input always > 0: entropy 0
            # c's input centred at +0.8 (the +100 shift taken back out): mostly ON, not always
            self.fc3.bias.copy_(0.8 - 100.0 * self.fc3.weight.sum(1))

    def forward(self, x):
        y = self.b(self.fc2(self.a(self.fc1(x))) + x)
        return self.head(self.c(self.fc3(y)))


# forward FLOPs (2·MACs) of one batch of B, counted by hand from the layer shapes
SAVE_A = 2 * B * (D * W + W * D - D * D)  # fc1, fc2 -> one D->D linear
SAVE_C = 2 * B * (D * H + H * K - D * K)  # fc3, head -> one D->K linear


def make(seed=0):
    torch.manual_seed(seed)
    model = Known().eval()
    x = torch.randn(256, D)
    data = TensorDataset(x, torch.zeros(256, dtype=torch.long))
    return model, data, x[:B]


def context(model, data, example, remaining=("a", "b", "c"), k=1):
    return Context(model=model, remaining=list(remaining), removed=[], k=k, iteration=1,
                   rng=random.Random(0), train_eval=data, batch_size=64, example=example)


def choose(method, model, data, example, **kw):
    method.example = example
    return method.step(context(model, data, example, **kw))


def test_entropy_order_of_the_hand_built_model():
    model, data, example = make()
    step = choose(Easier(), model, data, example)
    h = step.scores
    assert h["b"] == 0.0 < h["c"] < h["a"]  # as built
    assert step.chosen == ["b"]  # EASIER removes the site that enables no fold


def test_flops_credits_equal_the_hand_count():
    model, data, example = make()
    method = EasierLatency(pool=1.0, cost="flops", lookahead=False)
    method.example = example
    gain = method.credits(context(model, data, example), ["a", "b", "c"])
    assert gain == {"a": SAVE_A, "b": 0, "c": SAVE_C}


def _folded_flops(model, sites, example):
    lin = easier.linearize(model, sites, example_input=example) if sites else model
    folded = easier.fold(lin, example, plan="flops")
    with FlopCounterMode(display=False) as counter:
        folded(example)
    return counter.get_total_flops()


def test_estimate_matches_what_the_real_fold_saves():
    """Independent route: linearize for real, fold with the FLOPs plan, count with torch."""
    model, data, example = make()
    dense = _folded_flops(model, [], example)
    method = EasierLatency(pool=1.0, cost="flops", lookahead=False)
    method.example = example
    gain = method.credits(context(model, data, example), ["a", "b", "c"])
    for site in "abc":
        assert dense - _folded_flops(model, [site], example) == gain[site], site


@pytest.mark.parametrize("pool, expected", [(1.0, "a"), (0.5, "c"), (0.2, "b")])
def test_pool_trades_entropy_for_saving(pool, expected):
    """pool=1: largest saving (a); 0.5: the 2 lowest-entropy sites {b, c} -> c, the one that
    folds; 0.2: one site, b, priced at 0 -> EASIER's choice."""
    model, data, example = make()
    step = choose(EasierLatency(pool=pool, cost="flops"), model, data, example)
    assert step.chosen == [expected]
    assert len(step.info["fold_saving"]) == math.ceil(pool * 3)
    if expected == "b":
        assert step.reason.startswith("no candidate")


def _fake_timer(slow_chain):
    """Constant per-round times: every merge is 2x faster, except chains whose signature
    contains ``slow_chain``, whose merge is 2x slower."""
    calls = []

    def timer(job, fns):
        calls.append(job.signature)
        before, after = (1.0, 2.0) if slow_chain in job.signature else (2.0, 1.0)
        return [[before] * job.rounds, [after] * job.rounds]

    return timer, calls


def test_latency_cost_skips_a_merge_that_is_slower():
    model, data, example = make()
    # the fc3∘head chain's merged layer is slower on this "hardware": c saves nothing
    timer, _ = _fake_timer(slow_chain=f"[{H}, {D}]")
    cfg = LatencyConfig(timer=timer, rounds=5)
    step = choose(EasierLatency(pool=0.5, latency=cfg), model, data, example)
    assert step.chosen == ["b"]  # pool {b, c}: neither pays -> lowest entropy
    step = choose(EasierLatency(pool=1.0, latency=cfg), model, data, example)
    assert step.chosen == ["a"]
    assert step.info["fold_saving"]["a"] == pytest.approx(1.0)  # 2 ms -> 1 ms
    assert step.info["fold_saving"]["c"] == 0.0


def test_chains_are_timed_once_per_signature_across_iterations():
    model, data, example = make()
    timer, calls = _fake_timer(slow_chain="no such chain")
    method = EasierLatency(pool=1.0, latency=LatencyConfig(timer=timer, rounds=5))
    choose(method, model, data, example)
    n = len(calls)
    assert n == len(set(calls)) and n >= 2
    choose(method, model, data, example)  # the same chains again: no new timing
    assert len(calls) == n


def test_lookahead_credits_a_site_whose_merge_needs_its_neighbour():
    """conv1 -> a -> dw -> b -> conv2: without one activation the merge adds FLOPs, without
    both it saves them (an inverted residual); lookahead sees it."""

    class Inverted(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv2d(4, 32, 1)
            self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
            self.pwl = nn.Conv2d(32, 4, 1)
            self.a, self.b = nn.ReLU(), nn.ReLU()

        def forward(self, x):
            return self.pwl(self.b(self.dw(self.a(self.pw(x))))) + x

    torch.manual_seed(0)
    model = Inverted().eval()
    x = torch.randn(64, 4, 6, 6)
    data = TensorDataset(x, torch.zeros(64, dtype=torch.long))
    example = x[:2]
    plain = EasierLatency(pool=1.0, cost="flops", lookahead=False)
    plain.example = example
    ctx = context(model, data, example, remaining=("a", "b"))
    assert plain.credits(ctx, ["a", "b"]) == {"a": 0, "b": 0}
    ahead = EasierLatency(pool=1.0, cost="flops")
    ahead.example = example
    gain = ahead.credits(ctx, ["a", "b"])
    # by hand, per batch of 2 at 6x6: pw 4*32, dw 9*32, pwl 32*4 MACs/pixel vs merged 9*4*4
    pixels = 2 * 6 * 6
    expected = 2 * pixels * (4 * 32 + 9 * 32 + 32 * 4 - 9 * 4 * 4) / 2
    assert gain == {"a": expected, "b": expected}


def test_options_are_validated_and_recorded():
    with pytest.raises(ConfigError, match="pool"):
        EasierLatency(pool=0)
    with pytest.raises(ConfigError, match="cost"):
        EasierLatency(cost="energy")
    m = create_method("easier-latency", pool=0.25, cost="flops", batch_sizes=[1, 64])
    assert m.options() == {"pool": 0.25, "cost": "flops", "batch_sizes": [1, 64],
                           "lookahead": True}
    # the CLI's `--method-option batch_sizes=64` arrives as a bare int (JSON)
    from easier.cli.session import parse_options
    one = create_method("easier-latency", **parse_options(["batch_sizes=64"]))
    assert one.options()["batch_sizes"] == [64]


@pytest.mark.slow
def test_loop_runs_resumes_and_folds(tmp_path, one_thread):
    """Through reduce(): a killed run resumes to the same history; the kept model folds."""
    from _harness import crash_at, history_rows, tiny_run

    full = tiny_run(tmp_path / "full", EasierLatency(cost="flops"), max_removals=3)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path / "cut", crash_at(EasierLatency, 2, cost="flops"), max_removals=3)
    resumed = tiny_run(tmp_path / "cut", EasierLatency(cost="flops"), resume=True,
                       max_removals=3)
    assert history_rows(tmp_path / "cut") == history_rows(tmp_path / "full")
    assert resumed.linearized == full.linearized and len(full.linearized) == 3
    savings = [h["fold_saving"] for h in full.history[1:]]
    assert all(isinstance(s, dict) and s for s in savings)  # recorded per iteration
    x = torch.randn(2, 3, 8, 8)
    folded = easier.fold(full.model.eval(), x, plan="all")
    torch.testing.assert_close(folded(x), full.model(x), rtol=1e-4, atol=1e-5)
