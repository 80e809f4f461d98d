"""Tests of easier.parallel.

Fast tests check sharding and the single-process fallbacks in this process. The slow ones run
this file under ``torchrun --nproc_per_node 2`` (gloo, 127.0.0.1, a free port): each rank
measures entropy on its shard, evaluates, and takes a DDP step; rank 0 writes the results to a
JSON file that the parent compares with single-process computations.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import easier
from easier import ConfigError, DataError
from easier.parallel import (
    DistInfo,
    all_reduce_counters,
    evaluate_distributed,
    init_from_env,
    is_main,
    main_only,
    measure_entropy_distributed,
    reduce_accuracy,
    shard_indices_exact,
    shard_loader,
    unwrap,
    wrap_ddp,
)
from easier.train.finetune import evaluate, make_loader

# Branchy is untraceable on purpose; its hook-fallback warning is expected
pytestmark = pytest.mark.filterwarnings("ignore:torch.fx could not trace Branchy")

# ---------------------------------------------------------------------------------------------
# shared between the parent and the ranks: the same models and data on both sides


class ConvNet(nn.Module):
    """Traceable: conv/ReLU, GELU and a linear ReLU site."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.r1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 6)
        self.r3 = nn.ReLU()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = F.gelu(self.conv2(self.r1(self.conv(x))))
        return self.head(self.r3(self.fc(x.flatten(1))))


class Branchy(nn.Module):
    """Data-dependent control flow: fx cannot trace it, so the hook path runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.r1 = nn.Linear(8, 5), nn.ReLU()
        self.fc2, self.r2 = nn.Linear(5, 3), nn.ReLU()

    def forward(self, x):
        h = self.r1(self.fc1(x))
        if h.sum() > 0:
            h = h * 1.0
        return self.r2(self.fc2(h))


def conv_model() -> nn.Module:
    torch.manual_seed(1)
    return ConvNet()


def branchy_model() -> nn.Module:
    torch.manual_seed(2)
    return Branchy()


def images(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 4, 4, generator=g) + 0.2
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=g))


def vectors(n: int, seed: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


class Ragged(Dataset):
    """16 samples; those from ``cut`` on have 5 features instead of 4."""

    def __init__(self, cut: int) -> None:
        self.cut = cut

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.ones(5 if i >= self.cut else 4) * (i - 7.5)


# (name, model, dataset, batch_size, options): n not divisible by the world size or the batch
CASES = {
    "conv_exact": (conv_model, lambda: images(23), 4, {}),
    "conv_element": (conv_model, lambda: images(23), 4, {"neuron": "element"}),
    "conv_reference": (conv_model, lambda: images(23), 4, {"estimator": "reference"}),
    "conv_max_batches": (conv_model, lambda: images(23), 4, {"max_batches": 3}),
    "conv_empty_rank": (conv_model, lambda: images(3), 4, {}),  # rank 1 gets no sample
    "branchy_hooks": (branchy_model, lambda: vectors(19), 5, {}),
}


def single_process_report(case: str) -> easier.EntropyReport:
    build, data, bs, opts = CASES[case]
    return easier.measure_entropy(build(), make_loader(data(), bs, shuffle=False), **opts)


# ---------------------------------------------------------------------------------------------
# fast tests: this process, no process group


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("block", [1, 3, 4])
def test_exact_shards_cover_every_index_once_in_order(world, block):
    for n in range(0, 30):
        shards = [shard_indices_exact(n, r, world, block=block) for r in range(world)]
        assert [i for s in shards for i in s] == list(range(n))  # disjoint, complete, in order
        for s in shards:
            if len(s):
                assert s.start % block == 0  # batches never straddle two ranks
        nblocks = [-(-len(s) // block) for s in shards]
        assert max(nblocks) - min(nblocks) <= 1


def test_exact_shards_odd_n_by_hand():
    assert [list(shard_indices_exact(7, r, 2)) for r in range(2)] == [[0, 1, 2], [3, 4, 5, 6]]
    # 10 samples in blocks of 4 -> blocks [0-3], [4-7], [8-9]; one block per rank
    assert [list(shard_indices_exact(10, r, 3, block=4)) for r in range(3)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]
    assert [list(shard_indices_exact(3, r, 2, block=4)) for r in range(2)] == [[], [0, 1, 2]]


@pytest.mark.parametrize(
    "args", [(5, 2, 2, 1), (5, -1, 2, 1), (5, 0, 0, 1), (-1, 0, 1, 1), (5, 0, 1, 0)]
)
def test_exact_shards_reject_bad_arguments(args):
    n, rank, world, block = args
    with pytest.raises(ConfigError, match="need"):
        shard_indices_exact(n, rank, world, block=block)


def order(loader) -> list[int]:
    return [int(v) for b in loader for v in b[1]]


def indexed(n: int) -> TensorDataset:
    return TensorDataset(torch.randn(n, 2), torch.arange(n))


def test_single_process_loader_is_make_loader_of_seed_plus_epoch():
    ds = indexed(13)
    for epoch in (0, 1, 2):
        got = order(shard_loader(ds, 4, shuffle=True, seed=7, epoch=epoch))
        assert got == order(make_loader(ds, 4, shuffle=True, seed=7 + epoch))
        assert sorted(got) == list(range(13))
    assert order(shard_loader(ds, 4, shuffle=True, seed=7, epoch=0)) != order(
        shard_loader(ds, 4, shuffle=True, seed=7, epoch=1)
    )
    loader = make_loader(ds, 4, shuffle=False)
    assert shard_loader(loader, 4, shuffle=False, seed=0, epoch=0) is loader


def test_distributed_loader_takes_padded_strided_share_of_the_epoch_permutation():
    ds, n, world = indexed(11), 11, 3
    for epoch in (0, 4):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        perm += perm[: (-n) % world]  # DistributedSampler pads by repeating the start
        for rank in range(world):
            info = DistInfo(rank, world, rank, True)
            got = order(shard_loader(ds, 2, shuffle=True, seed=5, epoch=epoch, info=info))
            assert got == perm[rank::world]
    dropped = [
        order(
            shard_loader(
                ds,
                2,
                shuffle=False,
                seed=0,
                epoch=0,
                drop_last=True,
                info=DistInfo(r, world, r, True),
            )
        )
        for r in range(world)
    ]
    assert dropped == [[0, 3], [1, 4], [2, 5]]  # 9 kept samples, 3 per rank, full batches only


def test_exact_loader_batches_concatenate_to_the_sequential_batches():
    ds = indexed(23)
    want = [b[1].tolist() for b in make_loader(ds, 4, shuffle=False)]
    for world in (2, 3, 7):
        got = [
            b[1].tolist()
            for r in range(world)
            for b in shard_loader(
                ds, 4, shuffle=False, seed=0, epoch=0, exact=True, info=DistInfo(r, world, r, True)
            )
        ]
        assert got == want


def test_shard_loader_rejects_shuffled_exact_shards_and_loaders_under_ddp():
    ds = indexed(6)
    with pytest.raises(ConfigError, match="shuffle=False"):
        shard_loader(ds, 2, shuffle=True, seed=0, epoch=0, exact=True)
    with pytest.raises(ConfigError, match=r"loader\.dataset"):
        shard_loader(
            make_loader(ds, 2, shuffle=False),
            2,
            shuffle=False,
            seed=0,
            epoch=0,
            info=DistInfo(0, 2, 0, True),
        )


def test_init_from_env_without_launcher_is_a_single_process(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("MASTER_PORT", "1234")  # a stray variable alone is not a launch
    info = init_from_env()
    assert info == DistInfo(0, 1, 0, False, torch.device("cpu"))
    assert info.is_main and info.device == torch.device("cpu") and is_main()
    assert init_from_env() == info
    assert not torch.distributed.is_initialized()


def test_init_from_env_with_partial_environment_says_what_is_missing(monkeypatch):
    for v in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"LOCAL_RANK.*torchrun"):
        init_from_env()
    monkeypatch.setenv("LOCAL_RANK", "x")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ConfigError, match="LOCAL_RANK='x' is not an integer"):
        init_from_env()


def test_dist_info_validates_ranks():
    with pytest.raises(ConfigError, match="rank < world_size"):
        DistInfo(2, 2, 0, True)
    assert not DistInfo(1, 2, 1, True).is_main


def test_single_process_fallbacks_are_identities():
    model = ConvNet()
    assert wrap_ddp(model) is model and unwrap(model) is model
    calls = []
    assert main_only(lambda v: calls.append(v) or v * 2)(3) == 6 and calls == [3]
    assert reduce_accuracy(6.0, 3, 4) == (1.5, 75.0)
    with pytest.raises(ConfigError, match="empty"):
        reduce_accuracy(0.0, 0, 0)
    counters = {}
    all_reduce_counters(counters)  # nothing to do, no process group needed
    assert counters == {}


@pytest.mark.parametrize("case", list(CASES))
def test_single_process_measure_equals_measure_entropy(case):
    build, data, bs, opts = CASES[case]
    rep = measure_entropy_distributed(build(), data(), bs, DistInfo(), **opts)
    assert rep == single_process_report(case)


def test_single_process_evaluate_equals_train_evaluate():
    model, ds = conv_model(), images(23)
    loss, acc = evaluate_distributed(model, ds, DistInfo(), batch_size=4)
    want = evaluate(model, ds, batch_size=4)
    assert acc == want[1] and loss == pytest.approx(want[0], rel=1e-12)


def test_measure_rejects_empty_and_loader_inputs():
    with pytest.raises(DataError, match="empty"):
        measure_entropy_distributed(conv_model(), images(0), 4, DistInfo())
    with pytest.raises(ConfigError, match="Dataset"):
        measure_entropy_distributed(
            conv_model(), make_loader(images(4), 2, shuffle=False), 2, DistInfo()
        )


# ---------------------------------------------------------------------------------------------
# slow tests: two ranks under torchrun


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run this file under torchrun with 2 ranks once; return rank 0's results."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        __file__,
        str(out),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    res = json.loads((out / "results.json").read_text())
    res["wall"] = time.perf_counter() - t0
    res["out"] = out
    return res


@pytest.mark.slow
def test_two_ranks_joined_torchrun_group(ranks):
    assert ranks["infos"] == [[0, 2, 0, True, "cpu"], [1, 2, 1, True, "cpu"]]
    assert ranks["idempotent"] == [True, True]
    assert ranks["main_only"] == ["rank0", None]
    assert (ranks["out"] / "main_only.txt").read_text() == "0"
    assert ranks["cleaned_up"] is True


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c != "conv_reference"])
def test_two_rank_entropy_counts_equal_single_process_bit_for_bit(ranks, case):
    got = easier.EntropyReport.from_dict(ranks["reports"][case])
    want = single_process_report(case)
    assert got == want  # on/off/seen counts, batches, samples and entropies all identical
    assert ranks["same_on_all_ranks"][case]
    if case == "conv_empty_rank":
        assert ranks["shard_sizes"][case] == [0, 3]


@pytest.mark.slow
def test_two_rank_reference_estimator_equals_single_process(ranks):
    got = easier.EntropyReport.from_dict(ranks["reports"]["conv_reference"])
    want = single_process_report("conv_reference")
    assert got.batches == want.batches and got.samples == want.samples
    for name in want.names:
        assert got[name] == pytest.approx(want[name], rel=1e-12, abs=1e-15)
        assert torch.allclose(got.neurons(name).p_on, want.neurons(name).p_on, rtol=1e-12)


@pytest.mark.slow
def test_two_rank_accuracy_equals_single_process(ranks):
    loss, acc = evaluate(conv_model(), images(23), batch_size=4)
    for got_loss, got_acc in (ranks["reduce_accuracy"], ranks["evaluate"]):
        assert got_acc == acc
        assert got_loss == pytest.approx(loss, rel=1e-12)


@pytest.mark.slow
def test_error_on_one_rank_raises_on_every_rank(ranks):
    # a NaN only in rank 1's shard: both ranks see the summed bad count
    assert ranks["nan"] == ["NonFiniteError", "NonFiniteError"]
    # rank 1 fails in its own loop (shape change); rank 0 must stop instead of waiting
    assert ranks["ragged"] == ["EasierError", "DataError"]
    # shapes agree within each rank but not across ranks
    assert ranks["mismatch"] == ["DataError", "DataError"]


@pytest.mark.slow
def test_ddp_step_equals_single_process_step_on_the_union_batch(ranks):
    model = conv_model()
    x = torch.tensor(ranks["ddp_x"])
    y = torch.tensor(ranks["ddp_y"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(x), y).backward()  # mean over both ranks' equal-size batches
    opt.step()
    assert ranks["ddp_params_equal_across_ranks"]
    for name, p in model.state_dict().items():
        assert torch.allclose(torch.tensor(ranks["ddp_state"][name]), p, atol=1e-6), name


# ---------------------------------------------------------------------------------------------
# the rank side (run by torchrun: `python -m torch.distributed.run ... test_distributed.py OUT`)


def _rank_main(out: Path) -> None:
    import torch.distributed as dist

    from easier.parallel import barrier, cleanup

    info = init_from_env("cpu", timeout_s=60)
    res: dict = {}

    def everyone(value):
        got = [None] * info.world_size
        dist.all_gather_object(got, value)
        return got

    res["infos"] = everyone(
        [info.rank, info.world_size, info.local_rank, info.enabled, str(info.device)]
    )
    res["idempotent"] = everyone(init_from_env("cpu") == info)

    @main_only
    def write(path: Path) -> str:
        path.write_text(str(info.rank))
        return f"rank{info.rank}"

    res["main_only"] = everyone(write(out / "main_only.txt"))
    barrier()

    res["reports"], res["same_on_all_ranks"], res["shard_sizes"] = {}, {}, {}
    for case, (build, data, bs, opts) in CASES.items():
        ds = data()
        rep = measure_entropy_distributed(build(), ds, bs, info, **opts).to_dict()
        res["reports"][case] = rep
        res["same_on_all_ranks"][case] = all(r == rep for r in everyone(rep))
        res["shard_sizes"][case] = everyone(
            len(shard_indices_exact(len(ds), info.rank, 2, block=bs))
        )

    model, ds = conv_model(), images(23)
    total, correct, seen = 0.0, 0, 0
    for x, y in shard_loader(ds, 4, shuffle=False, seed=0, epoch=0, exact=True, info=info):
        logits = model(x)
        total += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        seen += len(y)
    res["reduce_accuracy"] = list(reduce_accuracy(total, correct, seen, info))
    res["evaluate"] = list(evaluate_distributed(model, ds, info, batch_size=4))

    def outcome(fn):
        try:
            fn()
            return "ok"
        except Exception as exc:
            return type(exc).__name__

    nan = images(23)
    nan.tensors[0][20, 0, 0, 0] = float("nan")  # index 20: rank 1's shard (batches of 4)
    res["nan"] = everyone(outcome(lambda: measure_entropy_distributed(conv_model(), nan, 4, info)))
    lin = nn.Sequential(nn.ReLU())
    # rank 1 holds samples 8..15: with cut=12 its own batches change shape
    res["ragged"] = everyone(
        outcome(lambda: measure_entropy_distributed(lin, Ragged(12), 2, info, neuron="element"))
    )
    res["mismatch"] = everyone(
        outcome(lambda: measure_entropy_distributed(lin, Ragged(8), 4, info, neuron="element"))
    )

    ddp = wrap_ddp(conv_model(), info)
    assert unwrap(ddp) is ddp.module and ddp is not unwrap(ddp)
    x, y = next(iter(shard_loader(ds, 4, shuffle=True, seed=3, epoch=1, info=info)))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    F.cross_entropy(ddp(x), y).backward()
    opt.step()
    xs, ys = everyone(x.tolist()), everyone(y.tolist())
    res["ddp_x"], res["ddp_y"] = xs[0] + xs[1], ys[0] + ys[1]
    state = {k: v.tolist() for k, v in unwrap(ddp).state_dict().items()}
    res["ddp_params_equal_across_ranks"] = all(s == state for s in everyone(state))
    res["ddp_state"] = state

    del ddp, opt  # a DDP wrapper alive at exit can abort the process (see cleanup())
    barrier()
    cleanup()
    res["cleaned_up"] = not dist.is_initialized()
    if info.is_main:
        (out / "results.json").write_text(json.dumps(res))


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))


class _DictSamples(Dataset):
    """Hugging Face-style samples: a dict of model inputs and 'labels'."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 5, generator=g)
        self.mask = (torch.rand(n, 5, generator=g) > 0.2).float()
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "mask": self.mask[i], "labels": self.y[i]}


class _KeywordNet(nn.Module):
    """Keyword inputs and a ``ModelOutput`` result, as a Hugging Face classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)

    def forward(self, pixel_values, mask):
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=self.fc2(self.act(self.fc1(pixel_values * mask))))


def test_single_process_passes_take_dict_batches_and_model_outputs():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, ds = _KeywordNet(), _DictSamples(23)
    loss, acc = evaluate_distributed(model, ds, DistInfo(), batch_size=4)
    # by hand, in float64 on the whole set at once
    model.requires_grad_(False)
    w1, b1 = model.fc1.weight.double(), model.fc1.bias.double()
    w2, b2 = model.fc2.weight.double(), model.fc2.bias.double()
    z = (ds.x * ds.mask).double() @ w1.T + b1
    logits = z.clamp(min=0) @ w2.T + b2
    assert acc == 100.0 * int((logits.argmax(-1) == ds.y).sum()) / 23
    assert loss == pytest.approx(float(F.cross_entropy(logits, ds.y)), rel=1e-5)
    rep = measure_entropy_distributed(model, ds, 4, DistInfo())
    z32 = model.fc1(ds.x * ds.mask)  # signs as the float32 model computes them
    on, off = (z32 > 0).sum(0), (z32 < 0).sum(0)
    assert torch.equal(rep.neurons("act").on, on) and torch.equal(rep.neurons("act").off, off)
    p = on.double() / (on + off).double()
    h = -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)) / torch.log(torch.tensor(2.0)).double()
    assert list(rep.as_dict()) == ["act"] and rep["act"] == pytest.approx(float(h.mean()), rel=1e-6)
