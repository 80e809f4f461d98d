"""A run directory: its writer lock, config, saved state and report files.

A run directory has one writer at a time: :func:`lock_run_dir` takes an OS-level lock
(``fcntl.flock``) that the kernel drops when the process dies. Every file goes through
:mod:`easier.atomic` (atomic rename, recorded sha256); state.pt keeps the previous iteration as
state.prev.pt. Checkpoints hold tensors and plain data only and load with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from easier.errors import ConfigError, StateError
from easier.io.atomic import (
    atomic_write,
    atomic_write_text,
    backup_advice,
    read_checksums,
    read_verified,
    record_checksums,
    sha256_file,
    write_tmp_and_rename,
)
from easier.io.lock import LOCK_FILE, lock_run_dir, lock_run_dir_ranks
from easier.io.pickles import load_bytes

__all__ = ["EXAMPLE", "ITERATIONS", "LOCK_FILE", "STATE_FORMAT", "RunDir",
           "check_resume_environment",
           "lock_run_dir", "lock_run_dir_ranks", "resume_environment"]

STATE_FORMAT = "easier.io.records/1"
ITERATIONS = "iterations"  # the per-iteration models of a run that keeps them
EXAMPLE = "example.pt"  # the example input of a run whose input is not one tensor
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
                old, new = _flatten(saved), _flatten(config)
                lines = "; ".join(f"{k}: saved {old.get(k)!r} != now {new.get(k)!r}"
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
        def check(state: Any) -> None:
            if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
                got = state.get("format") if isinstance(state, dict) else type(state).__name__
                raise ValueError(f"format is {got!r}")

        backup = backup_advice(self.state_path)
        state = load_bytes(
            self.state_path, read_verified(self.state_path), check=check,
            refused=lambda line: f"{line}; easier's state.pt holds tensors and plain data "
                                 f"only.{backup}",
            unreadable=lambda why: f"{self.state_path} is corrupt or truncated ({why}); it was "
                                   f"left untouched.{backup}")
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        """Replace state.pt atomically, keeping the one before as state.prev.pt.

        The backup is a hard link made before the rename, so at every instant state.pt exists
        and is complete. Both checksums are recorded before either name changes.
        """
        state = {"format": STATE_FORMAT, **resume_environment(), **state}
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

    def write_example(self, example: Any) -> None:
        """Keep the input the run was captured on when it is not one tensor (a dict of token
        ids and masks...): a fold of the run needs a real one, while an image tensor is
        rebuilt from config.json's input_shape. Tensors and plain containers only."""
        data = torch.utils._pytree.tree_map(
            lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t, example)
        atomic_write(self.file(EXAMPLE), lambda f: torch.save(data, f),
                     lambda digest: record_checksums(self.path, {EXAMPLE: [digest]}))

    def read_example(self) -> Any:
        """The example saved by :meth:`write_example` (None when the run has none), verified
        against its sha256 and loaded with ``weights_only=True``."""
        path = self.file(EXAMPLE)
        if not path.exists():
            return None
        return load_bytes(path, read_verified(path), refused=lambda line: line,
                          unreadable=lambda why: f"{path} is corrupt or truncated ({why}); run "
                                                 "`easier reduce` again to write it")

    def lock(self) -> contextlib.AbstractContextManager[Path]:
        """The directory's writer lock (:func:`lock_run_dir`), for a ``with`` block."""
        return lock_run_dir(self.path)

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.file(name), json.dumps(obj, indent=2, default=_json_default) + "\n")

    def write_jsonl(self, name: str, rows: Iterable[dict[str, Any]]) -> None:
        atomic_write_text(self.file(name),
                          "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def resume_environment() -> dict[str, int]:
    """What a resumed run must match to repeat an uninterrupted one bit for bit: the thread
    count (float sums round by it) and the number of ranks (each rank's batches and the
    all-reduced sums follow it). Saved in every state.pt by :meth:`RunDir.write_state`."""
    from easier.parallel import get_info

    return {"threads": torch.get_num_threads(), "world_size": get_info().world_size}


def check_resume_environment(saved: dict[str, Any], info: Any) -> list[str]:
    """Warning lines for a resume whose thread count or number of ranks (``info.world_size``)
    differs from the saved state's: the run continues, but its result can differ from an
    uninterrupted run's, so the user is told how to reproduce it. States saved before a key
    was recorded warn about nothing for it."""
    lines = []
    threads = torch.get_num_threads()
    if saved.get("threads", threads) != threads:
        lines.append(f"warning: saved with {saved['threads']} threads, resumed with {threads}: "
                     "float sums round differently, so the result can differ from an "
                     f"uninterrupted run (--threads {saved['threads']} reproduces it)")
    ranks = int(getattr(info, "world_size", 1))
    if saved.get("world_size", ranks) != ranks:
        n = saved["world_size"]
        how = (f"torchrun --nproc-per-node {n} reproduces it" if n > 1
               else "run it without torchrun to reproduce it")
        lines.append(f"warning: saved with {n} rank(s), resumed with {ranks}: each rank's "
                     "batches and the summed statistics change, so the result can differ from "
                     f"an uninterrupted run ({how})")
    return lines


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
            write_tmp_and_rename(dst, lambda out: shutil.copyfileobj(f, out, 1 << 20))


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
    """Keys whose values differ, compared through JSON (tuples == lists); a settings group
    (a nested dict such as ``stop``) is compared field by field as ``stop.max_removals``."""
    flat_a, flat_b = _flatten(a), _flatten(json.loads(json.dumps(b, default=_json_default)))
    return sorted(k for k in set(flat_a) | set(flat_b) if flat_a.get(k) != flat_b.get(k))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in _OPAQUE:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_OPAQUE = ("model_spec", "model_kwargs")  # facts compared whole
