"""fashion-mnist / idx:DIR: IDX files written byte by byte here, independent of the reader."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from easier import data
from easier.errors import ConfigError, DataError

FASHION = Path("/usr/share/datasets/fashion-mnist")
NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte")


def images_bytes(pixels: list[list[list[int]]]) -> bytes:
    n, h, w = len(pixels), len(pixels[0]), len(pixels[0][0])
    body = bytes(v for img in pixels for row in img for v in row)
    return struct.pack(">BBBBIII", 0, 0, 8, 3, n, h, w) + body


def labels_bytes(labels: list[int]) -> bytes:
    return struct.pack(">BBBBI", 0, 0, 8, 1, len(labels)) + bytes(labels)


def write(d: Path, name: str, raw: bytes, *, gz: bool = True) -> Path:
    path = d / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def image(i: int, h: int = 4, w: int = 4) -> list[list[int]]:
    # distinct, known pixels per image: value (i * 16 + r * w + c) % 256
    return [[(i * 16 + r * w + c) % 256 for c in range(w)] for r in range(h)]


def make_set(d: Path, n_train: int = 24, n_test: int = 10, *, gz: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    write(d, NAMES[0], images_bytes([image(i) for i in range(n_train)]), gz=gz)
    write(d, NAMES[1], labels_bytes([i % 3 for i in range(n_train)]), gz=gz)
    write(d, NAMES[2], images_bytes([image(100 + i) for i in range(n_test)]), gz=gz)
    write(d, NAMES[3], labels_bytes([(i + 1) % 3 for i in range(n_test)]), gz=gz)
    return d


def raw_pixels(s, ds, i: int) -> torch.Tensor:
    """Undo the normalisation (the split set's stated mean/std) of item i: the uint8 pixels."""
    x, _ = ds[i]
    return (x * s.std[0] + s.mean[0]) * 255.0


@pytest.mark.parametrize("gz", [True, False])
def test_round_trip_pixels_and_labels(tmp_path: Path, gz: bool) -> None:
    d = make_set(tmp_path / "set", gz=gz)
    s = data.load(f"idx:{d}", seed=0, augment=False)
    assert s.num_classes == 3 and s.in_channels == 1 and s.image_size == 4
    assert s.sizes() == {"train": 22, "val": 2, "test": 10}  # 24 / 12 = 2 val images
    for split in (s.train, s.val):
        for k in range(len(split)):
            j = int(split.indices[k])
            want = torch.tensor(image(j), dtype=torch.float32)[None]
            assert torch.allclose(raw_pixels(s, split, k), want, atol=1e-3)
            assert split[k][1] == j % 3
    for k in range(10):  # test = the t10k files, in file order
        want = torch.tensor(image(100 + k), dtype=torch.float32)[None]
        assert torch.allclose(raw_pixels(s, s.test, k), want, atol=1e-3)
        assert s.test[k][1] == (k + 1) % 3


def test_idx_mean_std_from_train_pixels(tmp_path: Path) -> None:
    d = make_set(tmp_path / "set")
    px = np.array([image(i) for i in range(24)], dtype=np.float64) / 255.0
    s = data.load(f"idx:{d}", seed=0)
    assert s.mean[0] == pytest.approx(px.mean(), abs=1e-4)
    assert s.std[0] == pytest.approx(px.std(), abs=1e-4)


def test_split_sizes_disjoint_and_seeded(tmp_path: Path) -> None:
    d = make_set(tmp_path / "set", n_train=120)
    a, b, c = (data.load(f"idx:{d}", seed=s) for s in (0, 0, 1))
    assert a.sizes() == {"train": 110, "val": 10, "test": 10}
    ta, va = set(a.train.indices.tolist()), set(a.val.indices.tolist())
    assert not ta & va and ta | va == set(range(120))
    assert np.array_equal(a.val.indices, b.val.indices)  # same seed, same split
    assert not np.array_equal(np.sort(a.val.indices), np.sort(c.val.indices))
    assert sorted(np.bincount(a.val.targets, minlength=3).tolist()) == [3, 3, 4]  # stratified
    assert np.array_equal(a.train_eval.indices, a.train.indices)
    assert a.train.transform is not None and a.train_eval.transform is None


def test_fashion_dir_form_and_flip(tmp_path: Path) -> None:
    d = make_set(tmp_path / "fm")
    s = data.load(f"fashion-mnist:{d}", seed=0)
    assert s.name == "fashion-mnist" and s.mean == (0.2860,) and s.std == (0.3530,)
    assert "Flip" in repr(s.train.transform)
    assert "Flip" not in repr(data.load(f"idx:{d}").train.transform)  # digits: no mirror
    assert data.parse_spec("fmnist") == ("fashion-mnist", None)
    assert any(f.startswith("fashion-mnist") for f, _ in data.dataset_forms())


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        data.load(f"fashion-mnist:{tmp_path / 'nope'}")
    msg = one_line(e)
    assert "apt-get install dataset-fashion-mnist" in msg and "fashion-mnist:DIR" in msg


def test_missing_file(tmp_path: Path) -> None:
    d = make_set(tmp_path / "set")
    (d / f"{NAMES[3]}.gz").unlink()
    with pytest.raises(DataError) as e:
        data.load(f"fashion-mnist:{d}")
    msg = one_line(e)
    assert f"{NAMES[3]}.gz" in msg and "apt-get install dataset-fashion-mnist" in msg


def test_bad_gzip(tmp_path: Path) -> None:
    d = make_set(tmp_path / "set")
    p = d / f"{NAMES[0]}.gz"
    p.write_bytes(gzip.compress(images_bytes([image(i) for i in range(24)]))[:40])
    with pytest.raises(DataError) as e:
        data.load(f"idx:{d}")
    assert str(p) in one_line(e)


def test_bad_magic(tmp_path: Path) -> None:
    d = make_set(tmp_path / "set")
    # labels header where the images belong: magic 0x00000801, not 0x00000803
    p = write(d, NAMES[0], labels_bytes([0] * 24))
    with pytest.raises(DataError) as e:
        data.load(f"idx:{d}")
    msg = one_line(e)
    assert str(p) in msg and "0x00000801" in msg and "0x00000803" in msg


def test_truncated(tmp_path: Path) -> None:
    d = make_set(tmp_path / "set")
    p = write(d, NAMES[2], images_bytes([image(i) for i in range(10)])[:-5])
    with pytest.raises(DataError) as e:
        data.load(f"idx:{d}")
    msg = one_line(e)
    assert str(p) in msg and "truncated" in msg


def test_count_mismatch(tmp_path: Path) -> None:
    d = make_set(tmp_path / "set")
    write(d, NAMES[1], labels_bytes([0, 1, 2] * 7))  # 21 labels for 24 images
    with pytest.raises(DataError) as e:
        data.load(f"idx:{d}")
    msg = one_line(e)
    assert "24 images" in msg and "21 labels" in msg


def test_label_out_of_range(tmp_path: Path) -> None:
    d = make_set(tmp_path / "set")
    write(d, NAMES[3], labels_bytes([0] * 9 + [10]))  # fashion-mnist has classes 0..9
    with pytest.raises(DataError) as e:
        data.load(f"fashion-mnist:{d}")
    msg = one_line(e)
    assert "label 10" in msg and NAMES[3] in msg


def test_idx_needs_a_path() -> None:
    with pytest.raises(ConfigError):
        data.load("idx")


@pytest.mark.skipif(not FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_installed_fashion_mnist() -> None:
    s = data.load("fashion-mnist", seed=0, augment=False)
    assert s.sizes() == {"train": 55000, "val": 5000, "test": 10000}
    assert s.num_classes == 10 and s.image_size == 28 and s.in_channels == 1
    assert s.train[0][0].shape == (1, 28, 28)
    train_labels = np.concatenate([s.train.targets, s.val.targets])
    assert np.bincount(train_labels).tolist() == [6000] * 10
    assert np.bincount(s.test.targets).tolist() == [1000] * 10
    assert np.bincount(s.val.targets).tolist() == [500] * 10
    # the published normalisation constants match the pixels (independent numpy read)
    with gzip.open(FASHION / f"{NAMES[0]}.gz") as f:
        px = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    assert px.size == 60000 * 784
    assert abs(px.mean() / 255 - s.mean[0]) < 1e-3
