"""Atomic, checksummed file writes: a file is either the old one or the new one, never torn.

Every file is written to a temporary name in the same directory (created with the user's umask),
flushed, fsynced and renamed into place, so a process killed at any moment (SIGKILL included)
leaves either the old or the new file; a temporary left by a kill is removed by the next writer
that locks the directory (:func:`easier.io.rundir.lock_run_dir`). The sha256 of every file written
is recorded in the directory's ``checksums.json`` *before* the rename, and every load checks it,
so bit rot or a damaged copy raises :class:`StateError` instead of loading silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from easier.errors import StateError

try:  # POSIX; elsewhere checksum updates are not serialised between processes
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CHECKSUMS",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "backup_advice",
    "read_checksums",
    "read_verified",
    "record_checksums",
    "remove_stale_temporaries",
    "sha256_file",
    "verify_file",
]

CHECKSUMS = "checksums.json"  # {"format", "files": {name: [sha256 of accepted versions]}}
CHECKSUMS_FORMAT = "easier.checksums/1"
_TMP_SUFFIX = ".tmp"
_KEEP = 3  # digests kept per file: the newest, and those a crash mid-write may leave on disk


# ---------------------------------------------------------------------------------------------
# checksums


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _dir_locked(d: Path) -> Iterator[None]:
    """Serialise read-modify-write of ``d``'s checksums.json between processes (flock on the
    directory itself, so no extra file)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(d, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def read_checksums(d: Path, *, strict: bool) -> dict[str, list[str]]:
    """The accepted digests of the files in ``d``, by name; ``strict`` raises on a corrupt file
    (a reader must), otherwise a corrupt record reads as empty (a writer starts afresh)."""
    path = d / CHECKSUMS
    try:
        doc = json.loads(path.read_text())
        files = doc["files"] if doc.get("format") == CHECKSUMS_FORMAT else None
        if not isinstance(files, dict):
            raise ValueError(f"format is {doc.get('format')!r}")
        return {str(k): [str(x) for x in v] for k, v in files.items()}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        if strict:
            raise StateError(
                f"{path} is corrupt ({type(exc).__name__}: {exc}), so the files beside it cannot "
                f"be verified; restore it from a backup, or delete it to load them unverified"
            ) from exc
        return {}  # a writer starts a fresh record


def record_checksums(d: Path, digests: dict[str, list[str]]) -> None:
    """Put ``digests[name]`` first in ``name``'s accepted list (atomically, under a lock)."""
    with _dir_locked(d):
        files = read_checksums(d, strict=False)
        for name, new in digests.items():
            files[name] = list(dict.fromkeys([*new, *files.get(name, [])]))[:_KEEP]
        doc = {"format": CHECKSUMS_FORMAT, "algorithm": "sha256",
               "files": dict(sorted(files.items()))}
        text = json.dumps(doc, indent=1) + "\n"
        _write_tmp_and_rename(d / CHECKSUMS, lambda f: f.write(text.encode()))


def backup_advice(path: Path) -> str:
    """What to do about a corrupt ``path``: the intact backup to use, or how to write it again."""
    if path.name in ("state.pt", "state.prev.pt"):
        prev = path.with_name("state.prev.pt")
        if path.name == "state.pt" and prev.is_file() and _intact(prev):
            return (f" The previous iteration's state is intact in {prev.name}: move it to "
                    f"{path.name} (mv {prev} {path}) and rerun with --resume to continue from "
                    "there.")
        return " No intact backup is left: start the run again in a new directory."
    if path.name == "model.pt" and path.with_name("state.pt").is_file():
        return (" The run's state.pt holds the same model: rerun the same `easier reduce` "
                "command with --resume to write model.pt again, or restore it from a backup.")
    return " Restore it from a backup, or write it again."


def _intact(path: Path) -> bool:
    try:
        verify_file(path)
        return True
    except StateError:
        return False


def verify_file(path: str | Path, data: bytes | None = None) -> bool:
    """Check ``path`` (or its bytes ``data``) against the sha256 recorded when it was written.

    Returns True when verified, False when its directory records no checksum for it (a file
    written by hand or by an older easier); raises :class:`StateError`, naming the file and the
    backup to use, when the content differs from every recorded version.
    """
    path = Path(path)
    accepted = read_checksums(path.parent, strict=True).get(path.name)
    if not accepted:
        return False
    got = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
    if got not in accepted:
        raise StateError(
            f"{path} is corrupt or truncated: its sha256 ({got[:16]}...) differs from the one "
            f"recorded in {path.parent / CHECKSUMS} when easier wrote it "
            f"({accepted[0][:16]}...); the file changed on disk since (bit rot, a damaged copy "
            "or an edit) and was not loaded."
            f"{backup_advice(path)}"
        )
    return True


def read_verified(path: Path) -> bytes:
    """The bytes of ``path``, checked against its recorded sha256 (StateError if changed)."""
    data = path.read_bytes()
    verify_file(path, data)
    return data


# ---------------------------------------------------------------------------------------------
# atomic writes


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Recorder:
    """A binary file that remembers the first OSError of a write: torch.save turns a full disk
    into a RuntimeError ("enforce fail at inline_container.cc"), which hides the real cause."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _named(exc: OSError, path: Path) -> OSError:
    """``exc`` with ``path`` as its filename when it has none (a write or fsync has none), so
    the message says which file could not be written."""
    if exc.filename is None and exc.errno is not None:
        return type(exc)(exc.errno, os.strerror(exc.errno), str(path))
    return exc


def _write_tmp(path: Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Write a complete, fsynced temporary beside ``path`` (mode 0666 minus the umask).

    An OSError of the write (a full disk, EIO) is raised as that OSError naming ``path``,
    whatever the writer turned it into; the temporary is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{_TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    rec = None
    try:
        with os.fdopen(fd, "wb") as f:
            rec = _Recorder(f)
            write(rec)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        cause = rec.error if rec is not None and rec.error is not None else exc
        named = _named(cause, path) if isinstance(cause, OSError) else exc
        if named is exc:
            raise
        raise named from exc
    return tmp


def _write_tmp_and_rename(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    tmp = _write_tmp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any],
                 before_rename: Callable[[str], None] | None = None) -> None:
    """Call ``write(f)`` on a temporary file and rename it to ``path`` once complete.

    ``write`` gets a binary file object, e.g. ``atomic_write(p, lambda f: torch.jit.save(m, f))``.
    The checksum is recorded in ``checksums.json`` before the rename; ``before_rename(digest)``
    replaces that step for callers that record more than one file at once.
    """
    path = Path(path)
    tmp = _write_tmp(path, write)
    try:
        digest = sha256_file(tmp)
        if before_rename is not None:
            before_rename(digest)
        else:
            record_checksums(path.parent, {path.name: [digest]})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(Path(path), lambda f: torch.save(obj, f))


def remove_stale_temporaries(d: str | Path) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files a killed writer left in ``d``; return them.

    Only call it while holding ``d``'s lock (:func:`lock_run_dir`), when no writer is live.
    """
    d = Path(d)
    gone = []
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith(".") and p.name.endswith(_TMP_SUFFIX) and p.is_file():
                p.unlink(missing_ok=True)
                gone.append(p)
    return gone
