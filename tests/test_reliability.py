"""Bad data given to the Python API: one DataError naming the dataset and the sample.

Before these checks, a label of 3 for a 3-class model surfaced as an IndexError (or a CUDA
assert) inside the loss, an empty validation set as StopIteration, and a NaN input as "pretraining
failed ... lower the learning rate". Each case below builds the bad sample by hand and names
the index it expects.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from easier import DataError, EasierError, FineTune, StopRule, reduce
from easier.data.checks import check_datasets

FT = FineTune(epochs=1, lr=0.05, batch_size=16)


def net(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                         nn.Linear(12, classes))


def data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, torch.arange(n) % 3


class Items(Dataset):
    """A plain map-style dataset (no tensors to inspect): the check reads every sample."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("label,index", [(3, 7), (-1, 12), (99, 0)])
@pytest.mark.parametrize("wrap", [TensorDataset, Items])
def test_label_outside_the_classes_names_dataset_and_index(label, index, wrap):
    x, y = data()
    y[index] = label
    val = TensorDataset(*data(12, seed=1))
    with pytest.raises(DataError) as err:
        reduce(net(), wrap(x, y), val, finetune=FT, stop=StopRule(max_removals=1))
    msg = str(err.value)
    assert "'train'" in msg and f"sample {index} " in msg and f"label {label}," in msg
    assert "0..2" in msg  # the model has 3 outputs


def test_label_error_in_a_subset_counts_subset_indices():
    x, y = data()
    y[30] = 5
    train = Subset(TensorDataset(x, y), list(range(20, 40)))  # base index 30 = subset index 10
    with pytest.raises(DataError, match=r"'train'.*sample 10 has label 5"):
        reduce(net(), train, TensorDataset(*data(12, seed=1)), finetune=FT,
               stop=StopRule(max_removals=1))


def test_empty_validation_set_is_a_data_error_not_stop_iteration():
    empty = TensorDataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match=r"'val'.*empty"):
        reduce(net(), TensorDataset(*data()), empty, finetune=FT, stop=StopRule(max_removals=1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("wrap", [TensorDataset, Items])
def test_non_finite_input_names_dataset_and_sample(bad, wrap):
    x, y = data(12, seed=1)
    x[5, 2] = bad
    with pytest.raises(DataError, match=r"'val'.*sample 5 holds NaN or Inf"):
        reduce(net(), TensorDataset(*data()), wrap(x, y), finetune=FT,
               stop=StopRule(max_removals=1))


def test_wrong_input_shape_is_a_data_error():
    x, y = data()
    five = TensorDataset(x[:, :5], y)  # the model takes 6 features
    with pytest.raises(DataError, match=r"cannot run on sample 0 of dataset 'val'.*\(5,\)"):
        reduce(net(), five, five, finetune=FT, stop=StopRule(max_removals=1))


def test_single_class_warns_and_good_data_is_silent():
    x, _ = data()
    one = TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    with pytest.warns(UserWarning, match=r"'train'.*single class \(label 0\)"):
        check_datasets(one, TensorDataset(*data(12, seed=1)), model=net())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_datasets(TensorDataset(*data()), TensorDataset(*data(12, seed=1)), model=net())


def test_checks_leave_the_random_streams_alone():
    train, val, model = Items(*data()), Items(*data(12, seed=1)), net()
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    check_datasets(train, val, model=model)
    assert torch.equal(torch.rand(3), want)


def test_a_data_error_reaches_the_cli_user_as_one_line_and_exit_1(tmp_path, monkeypatch,
                                                                    capsys):
    from easier.cli import main

    (tmp_path / "user.py").write_text(
        "import torch\nfrom torch import nn\nfrom torch.utils.data import TensorDataset\n"
        "def build(num_classes=2, **kw):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), "
        "nn.Linear(4, num_classes))\n"
        "def splits(seed=0):\n"
        "    x = torch.randn(8, 1, 2, 2)\n"
        "    return {'train': TensorDataset(x[:0], torch.zeros(0).long()),\n"
        "            'val': TensorDataset(x, torch.arange(8) % 2), 'num_classes': 2}\n")
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    monkeypatch.chdir(tmp_path)
    code = main(["reduce", "--model", "user.py:build", "--data", "user.py:splits",
                 "--device", "cpu", "--quiet", "--no-fold", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1, err  # a runtime failure, not a bad option (2)
    lines = [ln for ln in err.splitlines() if ln.startswith("easier: error:")]
    assert len(lines) == 1 and "training set is empty" in lines[0], err
    assert "Traceback" not in err
    with pytest.raises(EasierError, match="training set is empty"):  # the API's base class
        from easier.cli.user import load_data
        load_data("user.py:splits", seed=0, image_size=None)
