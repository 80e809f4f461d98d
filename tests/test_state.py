"""Run-directory reliability: checksums, atomic writes, file modes and the writer lock.

Every expected value is computed independently (hashlib, os.stat, a real second process); the
function under test is never on both sides.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from easier.errors import StateError
from easier.io.records import (
    CHECKSUMS,
    RunDir,
    atomic_write_text,
    load_model,
    lock_run_dir,
    save_model,
)

MARK = torch.full((256,), 1.5)  # float32 1.5 = 00 00 c0 3f: easy to find in the file


def flip_tensor_byte(path: Path) -> None:
    """Flip one bit inside the stored data of MARK (not in the zip headers)."""
    raw = bytearray(path.read_bytes())
    pattern = bytes.fromhex("0000c03f") * 64
    at = raw.find(pattern)
    assert at >= 0, "tensor data not found"
    raw[at + 130] ^= 0x01
    path.write_bytes(bytes(raw))


def write_two_states(run: RunDir) -> None:
    run.start({"a": 1}, resume=False)
    run.write_state({"history": [1], "w": MARK.clone()})
    run.write_state({"history": [1, 2], "w": MARK.clone() * 1})


def test_bit_flip_in_state_is_a_state_error_offering_the_backup(tmp_path):
    run = RunDir(tmp_path / "run")
    write_two_states(run)
    flip_tensor_byte(run.state_path)
    # the fault is real: torch's zip reader loads the damaged file without complaint
    silently = torch.load(run.state_path, weights_only=True)
    assert not torch.equal(silently["w"], MARK)
    with pytest.raises(StateError) as err:
        run.start({"a": 1}, resume=True)
    msg = str(err.value)
    assert str(run.state_path) in msg and "state.prev.pt" in msg and "intact" in msg
    # following the advice resumes from the previous iteration
    os.replace(run.prev_state_path, run.state_path)
    state = run.start({"a": 1}, resume=True)
    assert state is not None and state["history"] == [1]
    assert torch.equal(state["w"], MARK)


def test_bit_flip_in_model_is_a_state_error(tmp_path):
    model = nn.Linear(256, 1)
    with torch.no_grad():
        model.weight.copy_(MARK)
    path = tmp_path / "model.pt"
    save_model(model, path)
    flip_tensor_byte(path)
    with pytest.raises(StateError, match=r"model\.pt is corrupt"):
        load_model(path, nn.Linear(256, 1))


def test_checksums_match_an_independent_sha256_of_every_file(tmp_path):
    run = RunDir(tmp_path / "run")
    write_two_states(run)
    run.write_json("summary.json", {"x": 1})
    save_model(nn.Linear(2, 2), run.file("model.pt"))
    files = json.loads((run.path / CHECKSUMS).read_text())["files"]
    for name in ("config.json", "state.pt", "state.prev.pt", "summary.json", "model.pt"):
        digest = hashlib.sha256((run.path / name).read_bytes()).hexdigest()
        assert files[name][0] == digest, name


def test_a_file_without_a_recorded_checksum_still_loads(tmp_path):
    # a model.pt copied from elsewhere (or written by an older easier) is not refused
    src = tmp_path / "a" / "model.pt"
    save_model(nn.Linear(2, 2), src)
    dst = tmp_path / "b" / "model.pt"
    dst.parent.mkdir()
    dst.write_bytes(src.read_bytes())
    assert isinstance(load_model(dst, nn.Linear(2, 2)), nn.Linear)


def test_kill_between_checksum_and_rename_keeps_the_old_file_loadable(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    write_two_states(run)
    real = os.replace

    def killed(src, dst):  # the process dies after recording the new checksum
        if str(dst).endswith("state.pt"):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run.write_state({"history": [1, 2, 3], "w": MARK.clone()})
    monkeypatch.setattr(os, "replace", real)
    assert run.read_state()["history"] == [1, 2]
    assert not list(run.path.glob(".*.tmp"))


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_are_created_with_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "x.txt", "hi")
        save_model(nn.Linear(1, 1), tmp_path / "model.pt")
    finally:
        os.umask(old)
    for name in ("x.txt", "model.pt", CHECKSUMS):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


HOLDER = textwrap.dedent("""
    import sys
    from easier.io.records import lock_run_dir
    with lock_run_dir(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()  # hold until the parent closes stdin (or kills us)
""")


def hold_lock(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"  # synchronised on its output, not time
    return proc


def test_second_writer_is_refused_naming_the_holder_pid(tmp_path):
    run = tmp_path / "run"
    proc = hold_lock(run)
    try:
        with pytest.raises(StateError, match=rf"in use.*PID {proc.pid}"), lock_run_dir(run):
            pass
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    with lock_run_dir(run):  # released at the holder's exit
        pass


def test_sigkill_leaves_no_stale_lock_and_stale_temporaries_are_removed(tmp_path):
    run = tmp_path / "run"
    proc = hold_lock(run)
    torn = run / ".state.pt.12345-abcd.tmp"  # what a kill during a write leaves behind
    torn.write_bytes(b"half")
    keep = run / "notes.tmp"  # not one of ours (no leading dot): left alone
    keep.write_text("mine")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    with lock_run_dir(run):
        assert not torn.exists() and keep.exists()


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    with lock_run_dir(tmp_path / "r"), lock_run_dir(tmp_path / "r"):
        pass
    with lock_run_dir(tmp_path / "r"):
        pass
