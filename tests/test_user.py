"""Your own model, checkpoint and data: module:callable and file.py:callable, every checkpoint
form, and the whole command line (reduce, fold, entropy) on a model and data from a file."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from easier.cli import main
from easier.cli.user import (
    build_model,
    is_callable_spec,
    load_callable,
    load_checkpoint,
    load_data,
    short_name,
)
from easier.errors import ConfigError, StateError

USER_FILE = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    def build(num_classes, in_channels, image_size):
        net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, 12), nn.ReLU(),
                            nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, num_classes))
        nn.init.zeros_(net[-1].weight)  # every logit equal: the dense model predicts class 0
        nn.init.zeros_(net[-1].bias)
        return net

    def build_plain():
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))

    def build_any(**kwargs):
        net = nn.Linear(1, 1)
        net.seen = kwargs
        return net

    def build_needs(depth):
        return nn.Linear(1, 1)

    def splits(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(96, 1, 4, 4, generator=g)
        y = torch.arange(96) % 2  # balanced: a model that always says 0 is at chance, 50 %
        return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])
''')


@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "mynets.py"
    path.write_text(USER_FILE)
    return path


@pytest.mark.parametrize("spec,expected", [
    ("pkg.nets:build", True), ("nets.py:build", True), ("dir/sub/nets.py:make_net", True),
    ("resnet18", False), ("timm:resnet50", False), ("torchvision:resnet18", False),
    ("cifar10:/data/cifar", False), ("pkg.nets:", False), ("pkg-x:build", False)])
def test_callable_spec_forms(spec, expected):
    assert is_callable_spec(spec) is expected


def test_short_names_for_run_directories():
    assert short_name("pkg.nets:build") == "nets"
    assert short_name("some/dir/mynets.py:build") == "mynets"
    assert short_name("cifar10:/data/x") == "cifar10"


def test_model_callable_gets_only_the_arguments_it_takes(user_file):
    m = build_model(f"{user_file}:build", num_classes=3, in_channels=2, image_size=5, width=0.5)
    assert m[1].in_features == 2 * 5 * 5 and m[-1].out_features == 3
    plain = build_model(f"{user_file}:build_plain", num_classes=3, in_channels=1, image_size=4,
                        width=1.0)
    assert plain[1].out_features == 3
    assert callable(load_callable(f"{user_file}:build_any", "--model"))
    got = build_model(f"{user_file}:build_any", num_classes=7, in_channels=1, image_size=4,
                      width=2.0)
    assert got.seen == {"num_classes": 7, "in_channels": 1, "image_size": 4, "width": 2.0}
    with pytest.raises(ConfigError, match="needs depth"):
        build_model(f"{user_file}:build_needs", num_classes=2, in_channels=1, image_size=4,
                    width=1.0)


def test_model_from_an_importable_module(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    m = build_model("mynets:build", num_classes=4, in_channels=1, image_size=4, width=1.0)
    assert m[-1].out_features == 4
    with pytest.raises(ConfigError, match=r"has no callable 'nope'.*build"):
        build_model("mynets:nope", num_classes=4, in_channels=1, image_size=4, width=1.0)
    with pytest.raises(ConfigError, match="cannot import"):
        build_model("no_such_module_xyz:build", num_classes=4, in_channels=1, image_size=4,
                    width=1.0)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))


def _fresh() -> nn.Module:
    torch.manual_seed(1)  # different weights from _net()
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module_prefix"])
def test_plain_state_dicts_load_into_the_given_architecture(tmp_path, wrap):
    net = _net()
    sd = net.state_dict()
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3},
           "module_prefix": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    torch.save(obj, tmp_path / "w.pt")
    loaded = load_checkpoint(tmp_path / "w.pt", _fresh())
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_plain_state_dict_without_architecture_says_pass_model(tmp_path):
    torch.save(_net().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"plain state_dict.*--model"):
        load_checkpoint(tmp_path / "w.pt", None)


def test_state_dict_of_another_architecture_names_the_keys(tmp_path):
    torch.save(_net().state_dict(), tmp_path / "w.pt")
    with pytest.raises(StateError, match=r"2 missing .*'3\.weight'.*2 unexpected"):
        load_checkpoint(tmp_path / "w.pt", nn.Sequential(nn.Linear(4, 5), nn.ReLU(),
                                                         nn.Identity(), nn.Linear(5, 2)))


def test_whole_pickled_model_needs_allow_pickle(tmp_path):
    net = _net()
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(StateError, match="--allow-pickle"):
        load_checkpoint(tmp_path / "whole.pt", None)
    loaded = load_checkpoint(tmp_path / "whole.pt", None, allow_pickle=True)
    x = torch.randn(2, 4)
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_data_callable_gives_splits_with_inferred_shapes(user_file):
    splits = load_data(f"{user_file}:splits", seed=3, image_size=None)
    assert splits.sizes() == {"train": 64, "val": 32, "test": 0}
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (2, 1, 4)
    assert splits.name == "mynets"
    with pytest.raises(ConfigError, match="--image-size"):
        load_data(f"{user_file}:splits", seed=3, image_size=8)
    assert load_data("digits", seed=0, image_size=None).num_classes == 10  # registry untouched


def test_entropy_of_a_plain_state_dict_needs_model_and_works_with_it(tmp_path, capsys):
    import easier
    from easier import data, models

    net = models.create("convnet", num_classes=10, in_channels=1, width=0.25, image_size=8)
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    assert main(["entropy", str(tmp_path / "sd.pt"), "--data", "digits", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "plain state_dict" in err and "--model" in err and "format=None" not in err
    assert main(["entropy", str(tmp_path / "sd.pt"), "--data", "digits", "--model", "convnet",
                 "--width", "0.25", "--json", "--quiet", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)["entropy"]
    splits = data.load("digits", seed=0)
    loader = torch.utils.data.DataLoader(splits.train_eval, batch_size=256)
    want = easier.measure_entropy(net, loader).as_dict()  # the in-memory model, not the file
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12)


@pytest.fixture(scope="module")
def user_run(user_file, tmp_path_factory):
    """`easier reduce` on a model and data from a file, output to files (not a terminal)."""
    out = tmp_path_factory.mktemp("userrun") / "run"
    log = out.parent / "stdout.txt"
    err = out.parent / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("EASIER_PROGRESS_SECONDS", None)
    with open(log, "w") as so, open(err, "w") as se:
        proc = subprocess.run(
            [sys.executable, "-m", "easier", "reduce", "--model", f"{user_file}:build",
             "--data", f"{user_file}:splits", "--pretrain-epochs", "0", "--epochs", "1",
             "--max-removals", "1", "--delta", "100", "--plan", "all", "--threads", "1",
             "--device", "cpu", "--out", str(out)], stdout=so, stderr=se, env=env,
            timeout=300, check=False)
    assert proc.returncode == 0, err.read_text()
    return out, log.read_text(), err.read_text()


def test_reduce_runs_a_model_and_data_from_a_file(user_run):
    out, stdout, _ = user_run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_kwargs"] == {"num_classes": 2, "in_channels": 1, "image_size": 4}
    hist = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    kept = next(h for h in reversed(hist) if h["accepted"])
    fold = json.loads((out / "fold_measure.json").read_text())
    # the summary line, recomputed from the files the run wrote
    removed = hist[0]["activations"] - fold["after"]["activations"]
    want = (f"{removed}/{hist[0]['activations']} activations removed, depth "
            f"{hist[0]['depth']} → {fold['after']['depth']}")
    assert want in stdout
    assert (removed, hist[0]["depth"], fold["after"]["depth"]) == (1, 3, 2)  # by hand: 2 ReLUs
    diff = kept["val_acc"] - hist[0]["val_acc"]
    assert f"val {diff:+.1f} pts".replace("-", "−") in stdout
    assert "| non-zero params |" in stdout and "dense (given)" in stdout


def test_dense_model_at_chance_gets_a_warning(user_run):
    _, stdout, _ = user_run
    assert "near chance (50.0% for 2 classes)" in stdout and "--pretrain-epochs" in stdout


def test_progress_written_to_a_file_is_a_few_plain_lines(user_run):
    _, stdout, stderr = user_run
    assert "\r" not in stdout + stderr  # no bar redraws
    assert len((stdout + stderr).splitlines()) < 60 and len(stderr) < 2000


def test_fold_and_entropy_commands_rebuild_the_users_model(user_run, user_file, capsys):
    out, _, _ = user_run
    assert main(["fold", str(out), "--plan", "all"]) == 0
    assert "max |error|" in capsys.readouterr().out
    assert main(["entropy", str(out / "model.pt"), "--model", f"{user_file}:build", "--data",
                 f"{user_file}:splits", "--json", "--quiet", "--device", "cpu"]) == 0
    rep = json.loads(capsys.readouterr().out)
    removed = json.loads((out / "summary.json").read_text())["linearized"]
    assert len(rep["entropy"]) == 1 and removed[0] not in rep["entropy"]
