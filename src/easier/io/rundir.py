"""A run directory: its writer lock, config, saved state and report files.

A run directory has one writer at a time: :func:`lock_run_dir` takes an OS-level lock
(``fcntl.flock``) that the kernel drops when the process dies. Every file goes through
:mod:`easier.atomic` (atomic rename, recorded sha256); state.pt keeps the previous iteration as
state.prev.pt. Checkpoints hold tensors and plain data only and load with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from easier.errors import ConfigError, EasierError, StateError
from easier.io.atomic import (
    _write_tmp_and_rename,
    atomic_write,
    atomic_write_text,
    backup_advice,
    read_checksums,
    read_verified,
    record_checksums,
    remove_stale_temporaries,
    sha256_file,
)

try:  # POSIX; elsewhere run directories are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["ITERATIONS", "LOCK_FILE", "STATE_FORMAT", "RunDir", "lock_run_dir",
           "lock_run_dir_ranks"]

STATE_FORMAT = "easier.io.records/1"
LOCK_FILE = ".easier.lock"


_HELD: dict[str, list[int]] = {}  # realpath -> [fd, depth]: the locks this process holds


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(path.read_text().split()[0])
        return f"PID {pid}"
    return "an unknown process"


@contextlib.contextmanager
def lock_run_dir(path: str | Path) -> Iterator[Path]:
    """Hold the writer lock of run directory ``path`` (created if needed) for the block.

    The lock is ``fcntl.flock`` on ``path/.easier.lock``: the kernel releases it when the
    process exits, however it dies, so no stale lock survives a SIGKILL. A second writer is
    refused at once with a :class:`StateError` naming the holder's PID. Once locked, the
    temporaries a killed writer left are removed. Re-entrant within one process.
    """
    d = Path(path)
    created = not d.exists()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file where the directory should be
        raise ConfigError(f"{d} is not a directory (a file is in the way): choose another "
                          "output directory (--out); nothing was written") from None
    key = os.path.realpath(d)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield d
        finally:
            _HELD[key][1] -= 1
        return
    lock = d / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise StateError(
                    f"{d} is in use: another easier process ({_holder(lock)}) is writing this "
                    "run directory. Wait for it to finish (or stop it), or choose another "
                    "directory; nothing was written."
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        remove_stale_temporaries(d)
        _HELD[key] = [fd, 1]
        try:
            yield d
        finally:
            del _HELD[key]
            if created:
                _remove_if_unused(d)
    finally:
        os.close(fd)  # drops the flock


def _remove_if_unused(d: Path) -> None:
    """Remove a directory this lock created when nothing but the lock was written in it (the
    command failed before writing): a failed command leaves no empty run directory behind."""
    with contextlib.suppress(OSError):
        if os.listdir(d) == [LOCK_FILE]:
            (d / LOCK_FILE).unlink()  # still locked: no other writer is inside
            d.rmdir()


@contextlib.contextmanager
def lock_run_dir_ranks(path: str | Path, info: Any) -> Iterator[None]:
    """:func:`lock_run_dir` for a job of ``info.world_size`` ranks: rank 0 takes the lock and
    every rank learns whether it got it, so a refusal stops the whole job at once."""
    from easier.parallel.collectives import any_failed

    with contextlib.ExitStack() as stack:
        failure: EasierError | None = None
        if info.is_main:
            try:
                stack.enter_context(lock_run_dir(path))
            except EasierError as exc:
                failure = exc
        if info.enabled and any_failed(failure is not None, info) and failure is None:
            raise StateError(f"rank 0 could not lock {path} (its log says why); stopping too")
        if failure is not None:
            raise failure
        yield


ITERATIONS = "iterations"  # the per-iteration models of a run that keeps them
# written only once state.pt exists (the loop saves the state first): their presence without
# state.pt means it was removed, not that the run was killed before its first iteration
_AFTER_STATE = ("state.prev.pt", "model.pt", "summary.json", "history.jsonl")


class RunDir:
    """A run directory: config.json, history.jsonl, state.pt (+ state.prev.pt), summary, model.

    ``open`` refuses to reuse a directory that holds another run, and ``resume`` refuses a
    directory whose config differs from the current one, naming the keys that differ.
    ``keep_iterations``: the run also keeps every evaluated iteration's model in
    ``iterations/`` (see :func:`easier.io.records.save_iteration`).
    """

    def __init__(self, path: str | Path, *, keep_iterations: bool = False):
        self.path = Path(path)
        self.keep_iterations = keep_iterations

    # paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def state_path(self) -> Path:
        return self.path / "state.pt"

    @property
    def prev_state_path(self) -> Path:
        return self.path / "state.prev.pt"

    def file(self, name: str) -> Path:
        return self.path / name

    def iteration_file(self, iteration: int) -> Path:
        """Where iteration ``iteration``'s model is kept (``iterations/iter_007.pt``)."""
        return self.path / ITERATIONS / f"iter_{iteration:03d}.pt"

    def exists(self) -> bool:
        return self.config_path.exists() or self.state_path.exists()

    def start(self, config: dict[str, Any], *, resume: bool,
              mutable: tuple[str, ...] = (), write: bool = True) -> dict[str, Any] | None:
        """Prepare the directory; return the saved state when resuming (None for a new run).

        Keys in ``mutable`` (budgets such as max_removals) may change on resume; the new values
        are written to config.json. ``write=False`` only checks and reads (distributed ranks
        other than 0 do that, before rank 0 writes).
        """
        if self.exists():
            if not resume:
                raise StateError(
                    f"{self.path} already holds a run; pass resume=True (--resume) to continue it, "
                    "or choose another output directory (nothing was overwritten)"
                )
            saved = self.read_config()
            diff = [k for k in _diff_keys(saved, config) if k not in mutable]
            if diff:
                lines = "; ".join(f"{k}: saved {saved.get(k)!r} != now {config.get(k)!r}"
                                  for k in diff)
                raise ConfigError(
                    f"cannot resume {self.path}: its config differs in {diff} ({lines}). Run with "
                    "the original settings, or start a new run in another directory."
                )
            state = self.read_state()
            if write and _diff_keys(saved, config):
                atomic_write_text(self.config_path,
                                  json.dumps(config, indent=2, sort_keys=True) + "\n")
            return state
        if not write:
            return None
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
        return None

    def read_config(self) -> dict[str, Any]:
        try:
            text = read_verified(self.config_path).decode()
            cfg = json.loads(text)
        except FileNotFoundError:
            raise StateError(f"{self.path} has a state but no config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StateError(f"{self.config_path} is corrupt: {exc}") from exc
        if not isinstance(cfg, dict):
            raise StateError(f"{self.config_path} holds a {type(cfg).__name__}, not a JSON object "
                             "of settings; it is not an easier run's config")
        shape = cfg.get("input_shape")
        if shape is not None and not _is_shape(shape):
            raise StateError(
                f"{self.config_path}: input_shape is {shape!r}, not a list of positive integers "
                "(e.g. [3, 32, 32]); restore the file written by `easier reduce`"
            )
        return cfg

    def read_state(self) -> dict[str, Any] | None:
        """The saved state (None when killed before the first iteration was saved).

        The file is verified against its recorded sha256 first (StateError naming the file and
        the intact backup if it changed on disk)."""
        if not self.state_path.exists():
            left = [n for n in _AFTER_STATE if self.file(n).exists()]
            if left:  # state.pt is written before these, and never removed: it was deleted
                raise StateError(
                    f"{self.state_path} is missing, yet the run holds {', '.join(left)}, which "
                    "easier writes only after it: it was deleted or moved (a kill never removes "
                    f"it), so the run was not restarted and nothing was overwritten."
                    f"{backup_advice(self.state_path)}")
            return None  # killed before the first iteration finished: start over cleanly
        data = read_verified(self.state_path)
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
                got = state.get("format") if isinstance(state, dict) else type(state).__name__
                raise ValueError(f"format is {got!r}")
        except Exception as exc:
            raise StateError(
                f"{self.state_path} is corrupt or truncated ({type(exc).__name__}: {exc}); it was "
                f"left untouched.{backup_advice(self.state_path)}"
            ) from exc
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        """Replace state.pt atomically, keeping the one before as state.prev.pt.

        The backup is a hard link made before the rename, so at every instant state.pt exists
        and is complete. Both checksums are recorded before either name changes.
        """
        state = {"format": STATE_FORMAT, **state}
        cur, prev = self.state_path, self.prev_state_path

        def before_rename(digest: str) -> None:
            if cur.exists():
                # the backup's digest is the one state.pt really has: the newest recorded one
                # may be of a write killed before its rename; a state.pt changed since it was
                # written keeps only its recorded digests, so the backup does not verify
                accepted = read_checksums(self.path, strict=False).get(cur.name)
                actual = sha256_file(cur)
                record_checksums(self.path, {cur.name: [digest], prev.name: (
                    [actual] if not accepted or actual in accepted else accepted)})
                prev.unlink(missing_ok=True)
                _link_or_copy(cur, prev)
            else:
                record_checksums(self.path, {cur.name: [digest]})

        atomic_write(cur, lambda f: torch.save(state, f), before_rename)

    def lock(self) -> contextlib.AbstractContextManager[Path]:
        """The directory's writer lock (:func:`lock_run_dir`), for a ``with`` block."""
        return lock_run_dir(self.path)

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.file(name), json.dumps(obj, indent=2, default=_json_default) + "\n")

    def write_jsonl(self, name: str, rows: Iterable[dict[str, Any]]) -> None:
        atomic_write_text(self.file(name),
                          "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` as ``dst``; copy it (atomically) where the filesystem has no hard links
    (FAT, exFAT, some network and FUSE mounts refuse them with EPERM or ENOTSUP)."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                             errno.EMLINK, errno.ENOSYS):
            raise
        with open(src, "rb") as f:  # the checksum is already recorded (state.prev.pt's)
            _write_tmp_and_rename(dst, lambda out: shutil.copyfileobj(f, out, 1 << 20))


def _is_shape(shape: Any) -> bool:
    """A list of positive ints (or of such lists, for models with several inputs)."""
    return isinstance(shape, list) and all(
        _is_shape(d) if isinstance(d, list) else
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def _diff_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ, compared through JSON (tuples == lists)."""
    norm = json.loads(json.dumps(b, default=_json_default))
    return sorted(k for k in set(a) | set(norm) if a.get(k) != norm.get(k))
