import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import easier
from easier.errors import ConfigError
from easier.graph.sites import EasierWarning
from easier.perf.measure import Measurement, compare_table, measure, weight_depth

pytestmark = pytest.mark.usefixtures("one_thread")


class ResNet(nn.Module):
    """stem -> [3 convs (one functional) | 1x1 shortcut] -> add -> relu -> pool -> fc.

    Longest weight path by hand: stem 1 + main branch 3 + fc 1 = 5 (the shortcut has 1).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.a2 = nn.Conv2d(8, 16, 1)
        self.w3 = nn.Parameter(torch.randn(16, 16, 3, 3) * 0.1)  # a functional conv
        self.short = nn.Conv2d(8, 16, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(16, 10)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x):
        x = self.relu(self.stem(x))
        y = F.conv2d(self.a2(self.relu(self.a1(x))), self.w3, padding=1)
        y = self.relu(self.bn(y + self.short(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_params_flops_depth_activations_by_hand():
    m = ResNet()
    x = torch.randn(2, 3, 8, 8)
    got = measure(m, x, latency=False)
    params = (
        (8 * 3 * 9 + 8)
        + (8 * 4 * 9 + 8)
        + (16 * 8 + 16)
        + 16 * 16 * 9
        + 16 * 8
        + (16 * 10 + 10)
        + 2 * 16
    )
    assert got.params == params
    hw, b = 8 * 8, 2
    macs = b * hw * (8 * 3 * 9 + 8 * 4 * 9 + 16 * 8 + 16 * 16 * 9 + 16 * 8) + b * 16 * 10
    assert got.flops == 2 * macs and got.macs == macs
    assert got.flops_per_sample == 2 * macs / b and got.batch_size == 2
    assert got.depth == 5 and got.depth_exact
    assert got.activations == 3  # self.relu is called three times: three sites
    assert got.latency == () and got.num_threads == 1


def test_depth_counts_the_longest_path_not_all_layers():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.long = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
            self.short = nn.Linear(4, 4)
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return torch.matmul(self.long(x) + self.short(x), self.w)

    assert weight_depth(TwoBranches(), torch.randn(2, 4)) == (5, True)
    # the hook-free fallback (no capture) counts weight modules, and says it is not exact
    assert weight_depth(TwoBranches()) == (5, False)


def test_depth_of_a_resnet_and_its_shortcut_alone():
    class Shortcut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.c(x) + self.b(self.a(x))  # 2 on the longest path, 3 modules

    assert weight_depth(Shortcut(), torch.randn(3, 4)) == (2, True)
    assert weight_depth(ResNet(), torch.randn(2, 3, 8, 8)) == (5, True)


def test_linearized_model_has_fewer_activations_same_params_and_flops():
    m = ResNet()
    x = torch.randn(2, 3, 8, 8)
    assert [s.name for s in easier.find_sites(m, x)] == ["relu", "relu@1", "relu@2"]
    lin = easier.linearize(m, ["relu@1"], example_input=x)
    a, b = measure(m, x, latency=False), measure(lin, x, latency=False)
    assert (a.activations, b.activations) == (3, 2)
    assert (b.params, b.flops, b.depth, b.depth_exact) == (a.params, a.flops, a.depth, True)


def test_untraceable_model_falls_back_to_module_count():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.c(self.a(x) if x.sum() > 0 else self.b(x))

    m = Branchy()
    x = torch.randn(2, 3)
    with pytest.warns(EasierWarning, match="could not capture Branchy"):  # sites: hook fallback
        got = measure(m, x, latency=False)
    assert (got.depth, got.depth_exact) == (3, False)  # all three modules, although 2 run
    assert got.activations == 0
    assert got.params == 3 * (3 * 3 + 3)
    assert got.flops == 2 * 2 * 2 * 3 * 3  # two linears ran on a batch of 2


def test_training_flags_restored_and_latency_recorded():
    m = ResNet()
    m.train()
    m.bn.eval()  # mixed flags must come back as they were
    seen = []
    m.stem.register_forward_hook(lambda mod, i, o: seen.append(mod.training))
    got = measure(m, torch.randn(2, 3, 8, 8), batch_sizes=(1, 3), min_run_time=0.01)
    assert seen and not any(seen)  # measured in eval mode
    assert m.training and m.stem.training and not m.bn.training
    assert [lat.batch_size for lat in got.latency] == [1, 3]
    assert all(lat.median_ms > 0 and lat.iqr_ms >= 0 and lat.runs >= 5 for lat in got.latency)
    assert got.latency_ms(3) == got.latency[1].median_ms and got.latency_ms(64) is None
    back = Measurement.from_dict(json.loads(json.dumps(got.to_dict())))
    assert back == got


def test_bad_batch_sizes_rejected():
    with pytest.raises(ConfigError, match="batch_sizes"):
        measure(nn.Linear(2, 2), torch.randn(1, 2), batch_sizes=(0,))


def test_compare_table_ratios():
    a = Measurement(
        params=100,
        flops=800,
        macs=400,
        batch_size=2,
        flops_per_sample=400.0,
        depth=6,
        depth_exact=True,
        activations=4,
        num_threads=2,
    )
    b = Measurement(
        params=50,
        flops=200,
        macs=100,
        batch_size=2,
        flops_per_sample=100.0,
        depth=3,
        depth_exact=True,
        activations=1,
        num_threads=2,
    )
    table = compare_table(a, b)
    rows = {
        r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:5]]
        for r in table.splitlines()
        if r.startswith("| ") and "---" not in r
    }
    assert rows["depth (weight layers on longest path)"] == ["6", "3", "0.5"]
    assert rows["activations"] == ["4", "1", "0.25"]
    assert rows["FLOPs per sample (2·MACs)"] == ["400", "100", "0.25"]
    assert not any(k.startswith("latency") for k in rows)


# --- robust timing (easier.timing) -----------------------------------------------------------


def test_time_call_never_rests_on_one_run():
    from easier.perf.timing import MIN_RUNS, time_call

    a = torch.randn(256, 256)
    calls = []

    def slow():  # one call is longer than the whole min_run_time: one autorange block
        calls.append(1)
        return a @ a @ a

    med, iqr, runs = time_call(slow, min_run_time=1e-6)
    assert runs >= MIN_RUNS and len(calls) >= MIN_RUNS + 1  # + the warm-up call
    assert med > 0 and iqr >= 0


@pytest.mark.parametrize(("median", "iqr", "runs", "words"), [
    (10.0, 5.0, 7, "spread"),  # IQR 50 % of the median
    (10.0, 0.1, 2, "rests on 2"),
    (10.0, 2.0, 9, None),  # 20 %: fine
])
def test_measure_warns_about_noisy_or_thin_latencies(monkeypatch, median, iqr, runs, words):
    import warnings

    import easier.perf.measure as measurement

    monkeypatch.setattr(measurement, "time_call", lambda fn, **kw: (median, iqr, runs))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = measure(nn.Linear(2, 2), torch.randn(1, 2), batch_sizes=(1,))
    ours = [w for w in caught if issubclass(w.category, EasierWarning)]
    assert got.latency[0].noisy is (words is not None)
    if words is None:
        assert not ours
    else:
        assert len(ours) == 1 and words in str(ours[0].message)
        assert "(noisy)" in compare_table(got, got)


def _binomial_cdf(k: int, n: int) -> float:
    """P(Binomial(n, 1/2) <= k) by counting all 2**n outcomes."""
    return sum(bin(m).count("1") <= k for m in range(2**n)) / 2**n


def test_comparison_band_is_the_sign_test_interval_and_quartiles_match_numpy():
    import numpy as np

    from easier.perf.timing import compare_samples

    rng = np.random.default_rng(0)
    for n in (5, 7, 9, 12):
        before = list(rng.uniform(1, 2, n))
        after = list(rng.uniform(1, 2, n))
        c = compare_samples(before, after)
        ratios = np.sort(np.array(after) / np.array(before))
        k = max([j for j in range(n // 2) if _binomial_cdf(j, n) <= 0.025], default=0)
        assert (c.ratio_lo, c.ratio_hi) == (ratios[k], ratios[n - 1 - k])
        assert c.ratio == pytest.approx(np.median(ratios))
        assert c.before_ms == pytest.approx(np.median(before))
        q1, q3 = np.percentile(before, [25, 75])
        assert c.before_iqr_ms == pytest.approx(q3 - q1)
        assert c.runs == n


def test_verdicts_from_hand_made_rounds():
    from easier.perf.timing import compare_samples

    before = [10.0] * 7
    faster = compare_samples(before, [5.0, 5.5, 6.0, 5.2, 5.1, 5.9, 5.0])
    slower = compare_samples(before, [12.0, 11.0, 10.5, 13.0, 12.5, 11.5, 10.1])
    mixed = compare_samples(before, [5.0, 12.0, 9.0, 11.0, 8.0, 10.5, 9.5])
    assert faster.verdict(0.03) == "faster" and slower.verdict(0.03) == "slower"
    assert mixed.verdict(0.03) == "inconclusive"
    # 2 % faster in every round: faster, but not by the 3 % margin
    assert compare_samples(before, [9.8] * 7).verdict(0.03) == "inconclusive"
    with pytest.raises(ConfigError):
        compare_samples([1.0, 2.0], [1.0])


class _Sleepy(nn.Module):
    """A linear layer that also sleeps: slower by at least ``ms`` per call, whatever the load."""

    def __init__(self, ms: float):
        super().__init__()
        self.fc, self.ms = nn.Linear(8, 4), ms

    def forward(self, x):
        import time

        time.sleep(self.ms / 1e3)
        return self.fc(x)


def test_measure_pair_times_side_by_side_and_tells_a_real_slowdown():
    from easier.perf.measure import measure_pair

    fast, slow = _Sleepy(0.0), _Sleepy(3.0)
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 8)
    before, after, paired = measure_pair(fast, slow, x, batch_sizes=(1, 4), rounds=5,
                                         min_run_time=0.1)
    # the counts are measure()'s: the same architecture on both sides, FLOPs by hand 2*8*4*2
    assert before.params == after.params == 8 * 4 + 4
    assert before.flops == after.flops == 2 * 8 * 4 * 2
    for b in (1, 4):
        cmp = paired[b]
        assert cmp.runs == 5 and cmp.ratio_lo > 1.0  # every round: the sleeper was slower
        assert after.latency_ms(b) - before.latency_ms(b) >= 2.9
        assert cmp.verdict() == "slower"
    assert [lat.batch_size for lat in before.latency] == [1, 4]
    with pytest.raises(ConfigError):
        measure_pair(fast, slow, x, batch_sizes=(0,))
