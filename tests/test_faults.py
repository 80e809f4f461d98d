"""Fault injection on a run directory: full disks, deleted files, signals at every kind of write.

Each fault is built for real (a file that fails to write, a deleted file, a process that kills
itself at the N-th rename of a given file) and the outcome is checked against an independent
computation (hashlib, torch.equal on the weights of an uninterrupted run), never against the
function under test.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from easier.cli import main
from easier.errors import StateError
from easier.io.records import RunDir, atomic_torch_save, atomic_write_text

TINY = ["--model", "convnet", "--width", "0.25", "--data", "digits", "--quiet",
        "--pretrain-epochs", "1", "--epochs", "1", "--plan", "flops", "--threads", "1",
        "--max-removals", "2", "--delta", "100"]
# resuming the finished reference with the same budget does nothing (it says so); one more
# removal makes the resumed run load, train and write again
MORE = ["--max-removals", "3"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and ln.startswith("easier:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.iterdir()) if p.is_file()}


def assert_sound(d: Path) -> None:
    """No temporary left; every recorded file exists and is its newest recorded version."""
    assert not list(d.rglob(".*.tmp"))
    files = json.loads((d / "checksums.json").read_text())["files"]
    for name, accepted in files.items():
        assert hashlib.sha256((d / name).read_bytes()).hexdigest() == accepted[0], name


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


@pytest.fixture
def full_disk(monkeypatch):
    """After ``full_disk(room)``, files that easier opens for writing have ``room`` bytes."""
    import easier.io.atomic

    real = os.fdopen

    def arm(room: int = 100) -> None:
        monkeypatch.setattr(easier.io.atomic.os, "fdopen",
                            lambda fd, *a, **k: _FullDisk(real(fd, *a, **k), room))
    return arm


# --- full disk, at the level of one file -----------------------------------------------------


def test_torch_save_on_a_full_disk_is_enospc_naming_the_file(tmp_path, full_disk):
    path = tmp_path / "state.pt"
    atomic_torch_save({"w": torch.arange(4.0)}, path)
    before = path.read_bytes()
    full_disk(100)
    with pytest.raises(OSError) as info:  # torch.save alone says "enforce fail at ..."
        atomic_torch_save({"w": torch.randn(10_000)}, path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == before  # the previous good file, untouched and verified
    assert_sound(tmp_path)


def test_text_write_on_a_full_disk_names_the_file(tmp_path, full_disk):
    path = tmp_path / "history.csv"
    atomic_write_text(path, "old\n")
    full_disk(3)
    with pytest.raises(OSError) as info:
        atomic_write_text(path, "new contents\n")
    assert info.value.filename == str(path) and path.read_text() == "old\n"
    assert_sound(tmp_path)


def test_state_backup_without_hard_links_is_a_copy(tmp_path, monkeypatch):
    def no_links(*_a, **_k):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))  # FAT, exFAT, some FUSE mounts

    monkeypatch.setattr(os, "link", no_links)
    run = RunDir(tmp_path)
    run.start({"a": 1}, resume=False)
    run.write_state({"history": [1]})
    first = run.state_path.read_bytes()
    run.write_state({"history": [1, 2]})
    assert run.prev_state_path.read_bytes() == first
    assert run.read_state()["history"] == [1, 2]
    assert_sound(tmp_path)


def test_disk_errors_say_what_to_rerun():
    from easier.cli.failures import describe_failure

    msg, code = describe_failure(OSError(errno.EROFS, "Read-only file system", "/r/.easier.lock"))
    assert code == 1 and msg.startswith("cannot write /r/.easier.lock: Read-only")
    assert "`reduce`/`compare`: with --resume" in msg  # `fold` has no --resume
    msg, _ = describe_failure(PermissionError(errno.EACCES, "Permission denied", "/r/model.pt"))
    assert msg.startswith("cannot access /r/model.pt")  # a read, too


# --- the CLI on a damaged or odd run directory ------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: what every interrupted and resumed run must reproduce."""
    out = tmp_path_factory.mktemp("faults") / "run"
    assert main(["reduce", *TINY, "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_full_disk_at_state_pt_is_one_line_and_resumes(reference, tmp_path, full_disk,
                                                         monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = digests(out)
    full_disk(100)
    assert main(["reduce", *TINY, *MORE, "--out", str(out), "--resume"]) == 1
    line = one_line_error(capsys)
    # the first write of the resumed run fails: config.json (its budget grew), else state.pt
    assert "No space left on device" in line and "--resume" in line
    assert "config.json" in line or "state.pt" in line
    assert digests(out) == before  # nothing lost: every file as it was
    monkeypatch.undo()
    assert main(["reduce", *TINY, *MORE, "--out", str(out), "--resume"]) == 0
    assert_sound(out)


@pytest.mark.slow
def test_a_deleted_state_pt_is_refused_not_restarted(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "state.pt").unlink()
    before = digests(out)
    assert main(["reduce", *TINY, *MORE, "--out", str(out), "--resume"]) == 1
    line = one_line_error(capsys)
    assert "state.pt is missing" in line and "mv " in line and "state.prev.pt" in line
    assert digests(out) == before  # the backup and the reports are evidence: kept
    (out / "state.prev.pt").rename(out / "state.pt")  # the advice works
    assert main(["reduce", *TINY, *MORE, "--out", str(out), "--resume"]) == 0
    assert_sound(out)


def test_deleted_state_without_backup_says_so(tmp_path):
    run = RunDir(tmp_path)
    run.start({"a": 1}, resume=False)
    run.write_state({"history": [1]})
    atomic_write_text(run.file("model.pt"), "x")
    run.state_path.unlink()
    with pytest.raises(StateError, match="No intact backup"):
        run.start({"a": 1}, resume=True)


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_out_on_a_file_is_one_line_exit_2(tmp_path, capsys, where):
    f = tmp_path / "taken"
    f.write_text("keep me")
    out = f if where == "file" else f / "run"
    assert main(["reduce", *TINY, "--out", str(out)]) == 2
    assert "is not a directory" in one_line_error(capsys)
    assert f.read_text() == "keep me"


def test_sigterm_is_one_line_exit_143_and_the_handler_is_restored(monkeypatch, capsys):
    import easier.models

    def terminated():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000_000):  # the handler runs at the next bytecode
            pass
        raise AssertionError("SIGTERM was not delivered")

    monkeypatch.setattr(easier.models, "list_models", terminated)
    assert main(["models"]) == 143
    err = capsys.readouterr().err
    assert "terminated (SIGTERM)" in err and "--resume" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# --- a process killed at the N-th rename of a given file, then resumed ------------------------

KILLER = """
import os, signal, sys
target, nth, sig = sys.argv[1], int(sys.argv[2]), getattr(signal, sys.argv[3])
# Ctrl-C as a terminal delivers it: a suite started in the background by a non-interactive
# shell passes SIGINT down *ignored*, and Python then never raises KeyboardInterrupt
signal.signal(signal.SIGINT, signal.default_int_handler)
seen = [0]
real = os.replace
def replace(src, dst, *a, **k):
    if os.path.basename(dst) == target:
        seen[0] += 1
        if seen[0] == nth:  # the temporary is complete and fsynced: die before the rename
            os.kill(os.getpid(), sig)
    return real(src, dst, *a, **k)
os.replace = replace
from easier.cli import main
sys.exit(main(sys.argv[4:]))
"""


def _rows(d: Path) -> list[dict]:
    rows = [json.loads(x) for x in (d / "history.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return torch.load(d / "model.pt", weights_only=True)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("target,nth,sig,code", [
    # (model.pt, history.jsonl and fold.md kills were swept once by hand and resumed to the
    # same result; the suite keeps one kill per phase: an iteration's state, the fold, signals)
    ("state.pt", 2, "SIGKILL", -9),        # iteration 1's state, during the entropy/fine-tune
    ("folded.pt2", 1, "SIGKILL", -9),      # the final fold
    ("state.pt", 2, "SIGTERM", 143),
    ("report.png", 1, "SIGINT", 130),
])
def test_killed_at_a_write_resumes_to_the_uninterrupted_result(reference, tmp_path, target,
                                                                nth, sig, code):
    out = tmp_path / "run dir é"  # spaces and unicode in the path, too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run([sys.executable, "-c", KILLER, target, str(nth), sig, "reduce",
                             *TINY, "--out", str(out)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == code, killed.stderr
    if sig != "SIGKILL":  # a clean line saying how to continue, and nothing left half-written
        assert "--resume" in killed.stderr and "Traceback" not in killed.stderr
        assert not list(out.rglob(".*.tmp"))
    assert main(["reduce", *TINY, "--out", str(out), "--resume"]) == 0
    assert_sound(out)
    assert _rows(out) == _rows(reference)
    a, b = _weights(out), _weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (json.loads((out / "summary.json").read_text())["removed"]
            == json.loads((reference / "summary.json").read_text())["removed"])
    for name in ("folded.pt2", "fold_plan.json", "fold.md"):
        assert (out / name).is_file(), name


@pytest.mark.slow
def test_resume_with_another_thread_count_warns(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    assert main(["reduce", *TINY, *MORE, "--threads", "2", "--out", str(out), "--resume"]) == 0
    text = capsys.readouterr()
    assert "saved with 1 threads, resumed with 2" in text.out + text.err
