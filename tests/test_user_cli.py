"""A user's own code, checkpoints and data as real training scripts leave them: torch.compile and
Lightning prefixes, safetensors, damaged files, ``**kwargs`` builders, files importing siblings,
dict items, float labels, and what a failed command leaves on disk."""

import json
import textwrap
import types

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from easier.cli import main
from easier.cli.user import build_model, load_data
from easier.data.checks import check_datasets
from easier.errors import ConfigError, DataError, StateError, UserCodeError
from easier.io.checkpoints import load_checkpoint, strip_prefix
from easier.io.rundir import lock_run_dir
from easier.report.outcome import nonzero_params, returned_nonzero


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def _fresh() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def _same(a: nn.Module, b: nn.Module) -> None:
    x = torch.randn(6, 4)
    torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("form", ["compiled", "dp_compiled", "lightning", "torchvision_ref"])
def test_wrapped_and_prefixed_state_dicts_load_exactly(tmp_path, form):
    net = _net()
    sd = net.state_dict()
    obj = {
        "compiled": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "dp_compiled": {f"module._orig_mod.{k}": v for k, v in sd.items()},
        # a LightningModule holding the net as self.model, plus a weighted loss of its own
        "lightning": {"state_dict": {**{f"model.{k}": v for k, v in sd.items()},
                                     "loss.weight": torch.ones(3)},
                      "epoch": 3, "global_step": 9, "pytorch-lightning_version": "2.4.0"},
        "torchvision_ref": {"model": sd, "optimizer": {"state": {}, "param_groups": []},
                            "epoch": 3, "args": {"lr": 0.1}},
    }[form]
    torch.save(obj, tmp_path / "w.ckpt")
    _same(load_checkpoint(tmp_path / "w.ckpt", _fresh()), net)


def test_prefix_is_stripped_only_when_it_matches_more_keys():
    keys = {"model.weight", "model.bias"}  # a model whose own attribute is called "model"
    sd = {k: torch.zeros(1) for k in keys}
    assert strip_prefix(sd, keys) == (sd, "")
    got, prefix = strip_prefix({f"module.{k}": v for k, v in sd.items()}, keys)
    assert prefix == "module." and set(got) == keys


def test_safetensors_file_loads(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    net = _net()
    st.save_file({k: v.contiguous() for k, v in net.state_dict().items()},
                 str(tmp_path / "model.safetensors"))
    _same(load_checkpoint(tmp_path / "model.safetensors", _fresh()), net)


def test_shape_mismatch_names_keys_and_shapes(tmp_path):
    torch.save(_net().state_dict(), tmp_path / "w.pt")
    other = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 10))
    with pytest.raises(StateError) as err:
        load_checkpoint(tmp_path / "w.pt", other)
    msg = str(err.value)
    assert "\n" not in msg and "2 of another shape" in msg
    assert "3.weight (3, 5) in the file, (10, 5) in the model" in msg and "--width" in msg


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_file_says_corrupt_not_allow_pickle(tmp_path, damage):
    torch.save(_net().state_dict(), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    bad = {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"not a checkpoint"}
    (tmp_path / "w.pt").write_bytes(bad[damage])
    with pytest.raises(StateError, match="truncated, corrupt or not a PyTorch checkpoint") as e:
        load_checkpoint(tmp_path / "w.pt", _fresh())
    assert "allow-pickle" not in str(e.value)


def test_whole_model_names_its_class_and_paths_are_argument_errors(tmp_path):
    torch.save(_net(), tmp_path / "whole.pt")
    with pytest.raises(StateError, match=r"such as torch\.nn\..*--allow-pickle") as e:
        load_checkpoint(tmp_path / "whole.pt", None)
    assert "\x1b" not in str(e.value)  # torch's ANSI bold is not copied into the message
    with pytest.raises(ConfigError, match=r"is a directory.*whole\.pt"):
        load_checkpoint(tmp_path, None)
    with pytest.raises(ConfigError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt", None)


def test_cli_error_for_a_damaged_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "w.pt").write_bytes(b"PK\x03\x04 half a zip")
    assert main(["entropy", str(tmp_path / "w.pt"), "--model", "convnet", "--data", "digits",
                 "--quiet", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("easier: error: cannot read")
    assert "Traceback" not in err and "please report" not in err


USER_CODE = textwrap.dedent('''
    from torch import nn
    from blocks import Block  # a sibling file, imported as `python nets.py` would

    class Net(nn.Module):  # takes no in_channels: a torchvision-style class
        def __init__(self, num_classes=1000):
            super().__init__()
            self.body, self.head = Block(), nn.Linear(4, num_classes)
        def forward(self, x):
            return self.head(self.body(x))

    def build(num_classes=1000, pretrained=False, **kwargs):  # forwards kwargs, as torchvision
        return Net(num_classes=num_classes, **kwargs)

    def broken(num_classes):
        raise ValueError("bad config in my builder")
''')


@pytest.fixture
def user_dir(tmp_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "blocks.py").write_text(
        "from torch import nn\n\nclass Block(nn.Sequential):\n"
        "    def __init__(self):\n        super().__init__(nn.Linear(4, 4), nn.ReLU())\n")
    (tmp_path / "code" / "nets.py").write_text(USER_CODE)
    return tmp_path / "code"


def test_kwargs_builder_and_sibling_import_from_another_directory(user_dir, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the file's directory
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    kw = {"num_classes": 7, "in_channels": 3, "image_size": 2, "width": 0.5}
    m = build_model(f"{user_dir}/nets.py:build", **kw)
    assert m.head.out_features == 7  # in_channels, image_size, width were dropped, not fatal
    again = build_model(f"{user_dir}/nets.py:build", **kw)
    assert type(again) is type(m)  # imported once: the same class for every build
    with pytest.raises(UserCodeError, match=r"--model .*broken: the callable raised "
                                            r"ValueError: bad config in my builder"):
        build_model(f"{user_dir}/nets.py:broken", **kw)


def test_failed_command_leaves_no_run_directory(user_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["reduce", "--model", f"{user_dir}/nets.py:broken", "--data", "digits",
                 "--device", "cpu", "--quiet", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "your code" in err and "please report" not in err and err.count("\n") == 1
    assert not out.exists()
    with lock_run_dir(tmp_path / "kept"):
        (tmp_path / "kept" / "config.json").write_text("{}")
    assert (tmp_path / "kept" / "config.json").is_file()  # a directory with a file stays


DICT_DATA = textwrap.dedent('''
    import torch
    from torch.utils.data import Dataset

    class DictItems(Dataset):
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.x, self.y = torch.randn(n, 1, 4, 4, generator=g), torch.arange(n) % 3
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            return {"image": self.x[i], "label": self.y[i]}

    def splits():
        return DictItems(24, 0), DictItems(12, 1)
''')


def test_dict_items_need_an_input_key_for_a_positional_model(tmp_path):
    (tmp_path / "dd.py").write_text(DICT_DATA)
    splits = load_data(f"{tmp_path}/dd.py:splits", seed=0, image_size=None)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (3, 1, 4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(DataError, match=r"keys \['image', 'label'\].*--input-key"):
        check_datasets(splits.train, splits.val, model=model)
    check_datasets(splits.train, splits.val, model=model, input_key="image")


def test_float_labels_are_a_data_error():
    x = torch.randn(8, 4)
    floats = TensorDataset(x, (torch.arange(8) % 2).float())
    with pytest.raises(DataError, match=r"'train'.*floating-point.*y\.long\(\)"):
        check_datasets(floats, TensorDataset(x, torch.arange(8) % 2))


def test_bad_data_returns_say_what_came_back(tmp_path):
    (tmp_path / "bad.py").write_text("def four():\n    return 1, 2, 3, 4\n"
                                     "def none():\n    return None\n")
    with pytest.raises(ConfigError, match="got a tuple of 4"):
        load_data(f"{tmp_path}/bad.py:four", seed=0, image_size=None)
    with pytest.raises(ConfigError, match="got a NoneType"):
        load_data(f"{tmp_path}/bad.py:none", seed=0, image_size=None)


def test_returned_nonzero_counts_the_folded_program(tmp_path):
    folded = nn.Linear(3, 2)
    with torch.no_grad():
        folded.weight[0].zero_()
    torch.export.save(torch.export.export(folded, (torch.randn(1, 3),)),
                      str(tmp_path / "folded.pt2"))
    kept = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))  # unfolded: more parameters
    result = types.SimpleNamespace(out=tmp_path, extras={"fold": {}}, model=kept)
    assert returned_nonzero(result) == 3 + 2 != nonzero_params(kept)


@pytest.mark.slow
def test_fold_rebuilds_a_file_model_from_another_directory(user_dir, tmp_path, monkeypatch,
                                                          capsys):
    (user_dir / "mlp.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn
        from torch.utils.data import TensorDataset

        def build(num_classes, in_channels, image_size):
            return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, 8),
                                 nn.ReLU(), nn.Linear(8, num_classes))

        def splits(seed):
            g = torch.Generator().manual_seed(seed)
            x, y = torch.randn(48, 1, 2, 2, generator=g), torch.arange(48) % 2
            return TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:])
    '''))
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    monkeypatch.chdir(user_dir)
    out = tmp_path / "run"
    assert main(["reduce", "--model", "mlp.py:build", "--data", "mlp.py:splits",
                 "--pretrain-epochs", "0", "--max-steps", "1", "--max-removals", "1",
                 "--delta", "100", "--no-fold", "--device", "cpu", "--quiet",
                 "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "mlp.py:build"
    assert cfg["model_file"] == f"{(user_dir / 'mlp.py').resolve()}:build"
    monkeypatch.chdir(tmp_path)  # mlp.py is not here
    capsys.readouterr()
    assert main(["fold", str(out), "--plan", "none"]) == 2  # the user must name the code again
    assert main(["fold", str(out), "--plan", "none", "--model",
                 f"{user_dir / 'mlp.py'}:build"]) == 0, capsys.readouterr().err
    assert (out / "folded.pt2").is_file()
