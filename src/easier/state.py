"""Run state on disk: atomic writes, checksums, a writer lock, model checkpoints, run directories.

Every file is written to a temporary name in the same directory (created with the user's umask),
flushed, fsynced and renamed into place, so a process killed at any moment (SIGKILL included)
leaves either the old or the new file, never a torn one; a temporary left by a kill is removed by
the next writer that locks the directory. The sha256 of every file written is recorded in the
directory's ``checksums.json`` *before* the rename, and every load (``--resume``,
:func:`load_model`) checks it, so bit rot or a damaged copy raises :class:`StateError` instead of
loading silently. A run directory has one writer at a time: :func:`lock_run_dir` takes an
OS-level lock (``fcntl.flock``) that the kernel drops when the process dies. Checkpoints hold
tensors and plain data only and load with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from .errors import ConfigError, StateError
from .linearize import apply_edits, edits_of

try:  # POSIX; elsewhere run directories are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CHECKSUMS",
    "LOCK_FILE",
    "RunDir",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_model",
    "lock_run_dir",
    "remove_stale_temporaries",
    "save_model",
    "verify_file",
]

MODEL_FORMAT = "easier.model/2"
STATE_FORMAT = "easier.state/1"
CHECKSUMS = "checksums.json"  # {"format", "files": {name: [sha256 of accepted versions]}}
CHECKSUMS_FORMAT = "easier.checksums/1"
LOCK_FILE = ".easier.lock"
_TMP_SUFFIX = ".tmp"
_KEEP = 3  # digests kept per file: the newest, and those a crash mid-write may leave on disk


# ---------------------------------------------------------------------------------------------
# checksums


def _sha256_file(path: Path) -> str:
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


def _read_checksums(d: Path, *, strict: bool) -> dict[str, list[str]]:
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


def _record(d: Path, digests: dict[str, list[str]]) -> None:
    """Put ``digests[name]`` first in ``name``'s accepted list (atomically, under a lock)."""
    with _dir_locked(d):
        files = _read_checksums(d, strict=False)
        for name, new in digests.items():
            files[name] = list(dict.fromkeys([*new, *files.get(name, [])]))[:_KEEP]
        doc = {"format": CHECKSUMS_FORMAT, "algorithm": "sha256",
               "files": dict(sorted(files.items()))}
        text = json.dumps(doc, indent=1) + "\n"
        _write_tmp_and_rename(d / CHECKSUMS, lambda f: f.write(text.encode()))


def _backup_advice(path: Path) -> str:
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
    accepted = _read_checksums(path.parent, strict=True).get(path.name)
    if not accepted:
        return False
    got = hashlib.sha256(data).hexdigest() if data is not None else _sha256_file(path)
    if got not in accepted:
        raise StateError(
            f"{path} is corrupt or truncated: its sha256 ({got[:16]}...) differs from the one "
            f"recorded in {path.parent / CHECKSUMS} when easier wrote it "
            f"({accepted[0][:16]}...); the file changed on disk since (bit rot, a damaged copy "
            "or an edit) and was not loaded."
            f"{_backup_advice(path)}"
        )
    return True


def _read_verified(path: Path) -> bytes:
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


def _write_tmp(path: Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Write a complete, fsynced temporary beside ``path`` (mode 0666 minus the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{_TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _write_tmp_and_rename(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    tmp = _write_tmp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _atomic(path: Path, write: Callable[[BinaryIO], Any],
            before_rename: Callable[[str], None] | None = None) -> None:
    """Write ``path`` atomically and record its checksum before it replaces the old file."""
    tmp = _write_tmp(path, write)
    try:
        digest = _sha256_file(tmp)
        if before_rename is not None:
            before_rename(digest)
        else:
            _record(path.parent, {path.name: [digest]})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(f)`` on a temporary file and rename it to ``path`` once complete.

    The checksum is recorded in ``checksums.json``. ``write`` gets a binary file object, e.g.
    ``atomic_write(p, lambda f: torch.jit.save(module, f))``.
    """
    _atomic(Path(path), write)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    _atomic(Path(path), lambda f: torch.save(obj, f))


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


# ---------------------------------------------------------------------------------------------
# the writer lock of a run directory

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
    d.mkdir(parents=True, exist_ok=True)
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
    finally:
        os.close(fd)  # drops the flock


def _spec(model: nn.Module) -> dict[str, Any] | None:
    spec = getattr(model, "easier_spec", None)
    return dict(spec) if spec is not None else None


def model_record(model: nn.Module) -> dict[str, Any]:
    """Everything needed to rebuild ``model``: architecture spec, recorded edits, weights."""
    return {
        "format": MODEL_FORMAT,
        "spec": _spec(model),
        "edits": edits_of(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def save_model(model: nn.Module, path: str | Path) -> None:
    """Save a (linearized) model so :func:`load_model` rebuilds it with ``weights_only=True``."""
    atomic_torch_save(model_record(model), path)


def rebuild(record: dict[str, Any], base: nn.Module | None = None) -> nn.Module:
    """A model from a :func:`model_record`: rebuild the architecture, replay edits, load weights."""
    if record.get("format") != MODEL_FORMAT:
        raise StateError(f"not an easier model record (format={record.get('format')!r})")
    if base is None:
        if record.get("spec") is None:
            raise StateError(
                "this checkpoint holds a model that is not from easier.models, so its architecture "
                "is not saved: pass the untrained base model (model=...) to rebuild it"
            )
        from .models import create_from_spec

        base = create_from_spec(record["spec"])
    model = apply_edits(base, record.get("edits", []))
    try:
        model.load_state_dict(record["state_dict"], strict=True)
    except RuntimeError as exc:
        raise StateError(f"checkpoint weights do not fit the rebuilt model: {exc}") from exc
    return model


def load_model(path: str | Path, model: nn.Module | None = None, *,
               weights_only: bool = True) -> nn.Module:
    """Load a model saved by :func:`save_model` (or a run directory's ``model.pt``).

    The file is checked against the sha256 recorded when easier wrote it (StateError if it
    changed since).
    ``model`` is the base architecture for models that are not from ``easier.models``.
    ``weights_only=False`` allows full pickles: only for files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise StateError(f"no checkpoint at {path}")
    data = _read_verified(path)
    try:
        record = torch.load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)
    except Exception as exc:
        raise StateError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(record, nn.Module):  # a full pickle, only reachable with weights_only=False
        return record
    if isinstance(record, dict) and record.get("format") != MODEL_FORMAT and model is not None:
        model.load_state_dict(record, strict=True)  # a plain state_dict
        return model
    return rebuild(record, model)


class RunDir:
    """A run directory: config.json, history.jsonl, state.pt (+ state.prev.pt), summary, model.

    ``open`` refuses to reuse a directory that holds another run, and ``resume`` refuses a
    directory whose config differs from the current one, naming the keys that differ.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

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
            text = _read_verified(self.config_path).decode()
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
            return None  # killed before the first iteration finished: start over cleanly
        data = _read_verified(self.state_path)
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
                got = state.get("format") if isinstance(state, dict) else type(state).__name__
                raise ValueError(f"format is {got!r}")
        except Exception as exc:
            raise StateError(
                f"{self.state_path} is corrupt or truncated ({type(exc).__name__}: {exc}); it was "
                f"left untouched.{_backup_advice(self.state_path)}"
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
                old = _read_checksums(self.path, strict=False)
                _record(self.path, {cur.name: [digest],
                                    prev.name: old.get(cur.name, []) or [_sha256_file(cur)]})
                prev.unlink(missing_ok=True)
                os.link(cur, prev)
            else:
                _record(self.path, {cur.name: [digest]})

        _atomic(cur, lambda f: torch.save(state, f), before_rename)

    def lock(self) -> contextlib.AbstractContextManager[Path]:
        """The directory's writer lock (:func:`lock_run_dir`), for a ``with`` block."""
        return lock_run_dir(self.path)

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.file(name), json.dumps(obj, indent=2, default=_json_default) + "\n")

    def write_jsonl(self, name: str, rows: Iterable[dict[str, Any]]) -> None:
        atomic_write_text(self.file(name),
                          "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


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
