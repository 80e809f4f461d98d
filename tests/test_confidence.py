"""The δ statistics against hand computations, an exact bootstrap distribution and the normal
approximation; per-sample correctness against a hand count."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from easier.errors import ConfigError
from easier.pipeline.confidence import delta_warning, paired_bootstrap, standard_error
from easier.train.correct import per_sample_correct
from easier.train.finetune import evaluate


def test_standard_error_by_hand():
    # p = 0.9, n = 500: sqrt(0.9 * 0.1 / 500) = sqrt(0.00018) = 0.0134164 -> 1.34164 points
    assert standard_error(90.0, 500) == pytest.approx(1.341640786, rel=1e-9)
    assert standard_error(50.0, 10_000) == pytest.approx(0.5)  # sqrt(.25/1e4) = 0.005
    assert standard_error(100.0, 7) == 0.0
    for bad in [(101.0, 10), (50.0, 0)]:
        with pytest.raises(ConfigError):
            standard_error(*bad)


def test_delta_warning_says_the_val_size_and_the_se():
    # 95.9 % on 500: SE = sqrt(.959 * .041 / 500) * 100 = 0.8867 points; 2 SE = 1.77
    text = delta_warning(1.0, 95.9, 500, unit="images")
    assert text is not None
    assert "δ=1" in text and "±0.89 points on 500 images" in text and "larger δ" in text
    assert delta_warning(1.8, 95.9, 500) is None  # above 2 SE
    assert delta_warning(1.0, 95.9, 50_000) is None  # SE 0.09: δ = 1 is meaningful


def test_identical_vectors_drop_exactly_zero():
    g = torch.Generator().manual_seed(3)
    c = torch.rand(300, generator=g) < 0.8
    res = paired_bootstrap(c, c.clone(), delta=0.0, rounds=500)
    assert res == (1.0, 0.0, 0.0)  # every resample: drop 0 <= δ = 0


def _exact_bootstrap(n_plus, n_minus, n, delta):
    """Exact distribution of the resampled drop: (k+, k-) ~ Multinomial(n; n+/n, n-/n, rest).

    Returns (P(drop <= delta), sorted atoms, their cumulative probabilities)."""
    p1, p2 = n_plus / n, n_minus / n
    p0 = 1.0 - p1 - p2
    probs = {}
    for a in range(n + 1):
        for b in range(n + 1 - a):
            logp = (math.lgamma(n + 1) - math.lgamma(a + 1) - math.lgamma(b + 1)
                    - math.lgamma(n - a - b + 1) + a * math.log(p1) + b * math.log(p2)
                    + (n - a - b) * math.log(p0))
            drop = (a - b) * 100.0 / n
            probs[drop] = probs.get(drop, 0.0) + math.exp(logp)
    atoms = np.array(sorted(probs))
    cdf = np.cumsum([probs[a] for a in atoms])
    return float(cdf[atoms <= delta + 1e-12][-1]), atoms, cdf


def _flips(n, n_plus, n_minus, base_right):
    """base right on the first ``base_right`` samples; new loses n_plus of them and wins
    n_minus of the others."""
    base = torch.zeros(n, dtype=torch.bool)
    base[:base_right] = True
    new = base.clone()
    new[:n_plus] = False
    new[base_right: base_right + n_minus] = True
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    return base[perm], new[perm]


def test_bootstrap_matches_the_exact_resampling_distribution():
    n, n_plus, n_minus = 40, 6, 2  # drop 10 points on the full set
    base, new = _flips(n, n_plus, n_minus, base_right=30)
    assert (base.float().mean() - new.float().mean()) * 100 == pytest.approx(10.0)
    for delta in (10.0, 15.0):
        exact, atoms, cdf = _exact_bootstrap(n_plus, n_minus, n, delta)
        res = paired_bootstrap(base, new, delta, confidence=0.9, rounds=8000, seed=4)
        # Monte Carlo: SE of a proportion over 8000 rounds <= 0.0056
        assert res.p_within == pytest.approx(exact, abs=0.025), delta
        # the quantiles fall between the exact distribution's 0.08-0.12 / 0.88-0.92 quantiles
        lo, hi = atoms[np.searchsorted(cdf, [0.08, 0.12, 0.88, 0.92])].reshape(2, 2).T
        assert lo[0] <= res.lower <= hi[0]
        assert lo[1] <= res.upper <= hi[1]


def test_bootstrap_matches_the_normal_approximation_on_a_large_split():
    n, n_plus, n_minus = 5000, 150, 50  # drop 2 points
    base, new = _flips(n, n_plus, n_minus, base_right=4500)
    d = base.double() - new.double()
    se = float(d.std(unbiased=False)) / math.sqrt(n) * 100  # paired SE of the drop, points
    res = paired_bootstrap(base, new, delta=2.5, confidence=0.95, rounds=4000)
    z = 1.6448536269514722  # Φ^-1(0.95)
    assert res.upper == pytest.approx(2.0 + z * se, abs=0.08)
    assert res.lower == pytest.approx(2.0 - z * se, abs=0.08)
    p = 0.5 * (1 + math.erf((2.5 - 2.0) / se / math.sqrt(2)))  # P(N(2, se²) <= 2.5)
    assert res.p_within == pytest.approx(p, abs=0.03)
    # the paired SE is well below the SE of two independent accuracies
    assert se < math.sqrt(2) * standard_error(90.0, n) / 2


def test_bootstrap_is_deterministic_by_seed():
    base, new = _flips(200, 9, 4, base_right=170)
    a = paired_bootstrap(base, new, 2.0, seed=7)
    assert paired_bootstrap(base, new, 2.0, seed=7) == a
    assert paired_bootstrap(base, new, 2.0, seed=8) != a


def test_bootstrap_rejects_bad_input():
    c = torch.ones(10, dtype=torch.bool)
    with pytest.raises(ConfigError, match="same val samples"):
        paired_bootstrap(c, c[:9], 1.0)
    with pytest.raises(ConfigError, match="confidence"):
        paired_bootstrap(c, c, 1.0, confidence=1.0)
    with pytest.raises(ConfigError, match="1-D"):
        paired_bootstrap(c.reshape(2, 5), c.reshape(2, 5), 1.0)


def test_per_sample_correct_by_hand():
    model = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3, 2))  # class 0 if x0 largest, 1 if x1, 2 never (0)
    x = torch.tensor([[2.0, 1.0], [1.0, 3.0], [-1.0, -2.0], [0.5, 0.1], [0.0, 4.0]])
    y = torch.tensor([0, 0, 2, 0, 1])
    # logits (x0, x1, 0): argmax 0, 1, 2, 0, 1 -> right, wrong, right, right, right
    data = TensorDataset(x, y)
    got = per_sample_correct(model, data, batch_size=2)
    assert got.dtype == torch.bool and got.tolist() == [True, False, True, True, True]
    assert 100 * got.double().mean() == pytest.approx(evaluate(model, data)[1])


def test_per_sample_correct_refuses_token_labels():
    class Tokens(nn.Module):
        def forward(self, input_ids):
            return torch.randn(*input_ids.shape, 5)

    ids = torch.randint(0, 5, (4, 6))
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(4)]
    with pytest.raises(ConfigError, match="Per-token"):
        per_sample_correct(Tokens(), data)
