"""Checkpoints in the forms training scripts write them, loaded into the model you name.

A checkpoint is an easier model record (``model.pt``), a plain ``state_dict``, one wrapped the
way common scripts wrap it (``{"state_dict": ...}``, torchvision's ``{"model": ...,
"optimizer": ..., "epoch": ...}``, ``{"model_state_dict": ...}``, PyTorch Lightning's
``{"state_dict": {"model.conv.weight": ...}}``), with the keys under a prefix (DataParallel's
``module.``, ``torch.compile``'s ``_orig_mod.``, a Lightning attribute such as ``model.``), a
``.safetensors`` file (needs the ``safetensors`` package), or a whole pickled model, which is
loaded only when the user allows pickles (loading one runs code from the file). Every other file
is read with ``torch.load(weights_only=True)``.

A prefix is stripped when the keys under it match more of the model's keys than the keys as
saved do; keys outside it (a Lightning module's loss or teacher) are then ignored. Weights that
do not fit (missing, unexpected or of another shape) are one error naming the keys.
"""

from __future__ import annotations

import io
import pickle
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from easier.errors import ConfigError, StateError
from easier.io.records import MODEL_FORMAT, load_weights, rebuild, verify_file

__all__ = ["load_checkpoint", "strip_prefix"]

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
"""Where common training scripts put the weights in a checkpoint dict (the first one found)."""

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _is_safetensors(data: bytes) -> bool:
    """The safetensors layout: an 8-byte little-endian header length, then a JSON header."""
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


def _load_safetensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load
    except ImportError:
        raise ConfigError(f"{path} is a safetensors file: install the safetensors package "
                          "(pip install safetensors) to read it") from None
    try:
        return load(data)
    except Exception as exc:  # a damaged header or data
        raise StateError(f"cannot read {path}: a safetensors file that is truncated or corrupt "
                         f"({_first_line(exc)})") from exc


def _torch_load(path: Path, data: bytes, allow_pickle: bool) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        text = _ANSI.sub("", str(exc))
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found and not allow_pickle:  # a class or function: a pickle, not damage
            raise StateError(
                f"{path} holds pickled Python objects such as {found.group(1)} (e.g. a whole "
                "model, not only weights). Loading it runs code from the file: if you trust "
                "it, pass --allow-pickle; or save model.state_dict() instead") from exc
        why = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        raise _unreadable(path, pickle.UnpicklingError(why.group(1)) if why else exc) from exc
    except (ModuleNotFoundError, AttributeError) as exc:  # only when unpickling classes
        raise StateError(
            f"cannot read {path}: the pickled model needs Python code that cannot be imported "
            f"here ({_first_line(exc)}): run from the directory of the code that saved it, or "
            "put that code on PYTHONPATH") from exc
    except Exception as exc:
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: BaseException) -> StateError:
    why = _first_line(exc)
    why = type(exc).__name__ if why == type(exc).__name__ else f"{type(exc).__name__}: {why}"
    return StateError(f"cannot read {path}: it is truncated, corrupt or not a PyTorch "
                      f"checkpoint ({why}); check the file "
                      "(its size, a complete download or copy)")


def _weights(obj: dict[str, Any]) -> dict[str, torch.Tensor] | nn.Module | None:
    """The state_dict (or pickled module) inside a checkpoint dict, or None."""
    for key in STATE_DICT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, nn.Module):  # {"model": <whole model>}: only with allow_pickle
            return inner
        if isinstance(inner, dict) and inner:
            obj = inner
            break
    if not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                          for k, v in obj.items()):
        return None
    return obj


def strip_prefix(state: dict[str, torch.Tensor],
                 model_keys: set[str]) -> tuple[dict[str, torch.Tensor], str]:
    """``state`` with the dotted prefix stripped under which its keys match the model's best
    (``module.``, ``_orig_mod.``, ``model.``, ``module._orig_mod.``; ``""`` when none helps),
    keeping only the keys under it; and the prefix."""
    hits: Counter[str] = Counter()
    for k in state:
        for i, ch in enumerate(k):
            if ch == "." and k[i + 1:] in model_keys:
                hits[k[:i + 1]] += 1
    as_saved = len(model_keys & set(state))
    prefix, n = max(hits.items(), key=lambda kv: (kv[1], -len(kv[0])), default=("", 0))
    if n <= as_saved:
        return state, ""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, prefix


def _not_a_checkpoint(path: Path) -> ConfigError:
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir()
                        if p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES))[:5]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        return ConfigError(f"checkpoint {path} is a directory, not a file{hint}: give the "
                           "checkpoint file itself")
    return ConfigError(f"checkpoint {path}: no such file; check the path")


def load_checkpoint(path: str | Path, base: nn.Module | None, *,
                    allow_pickle: bool = False) -> nn.Module:
    """A model from ``path`` (see the module docstring): an easier record, a state_dict loaded
    into ``base``, or (only with ``allow_pickle``) a whole pickled model."""
    path = Path(path)
    if not path.is_file():
        raise _not_a_checkpoint(path)
    data = path.read_bytes()
    verify_file(path, data)  # raises when easier wrote it and it changed since
    obj = (_load_safetensors(path, data) if _is_safetensors(data)
           else _torch_load(path, data, allow_pickle))
    if isinstance(obj, nn.Module):  # reachable only with allow_pickle
        return obj
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        return rebuild(obj, base)
    state = _weights(obj) if isinstance(obj, dict) else None
    if isinstance(state, nn.Module):
        return state
    if state is None:
        keys = sorted(map(str, obj))[:6] if isinstance(obj, dict) else []
        raise StateError(f"{path} is neither an easier model record nor a state_dict (a "
                         f"{type(obj).__name__}{f' with keys {keys}' if keys else ''}); save "
                         "model.state_dict(), or a dict holding it under 'state_dict' or "
                         "'model'")
    if base is None:
        raise ConfigError(f"{path} is a plain state_dict (weights without the architecture): "
                          "name the architecture with --model NAME (see `easier models`) or "
                          "--model module:callable, with the --width it was trained at")
    model_keys = set(base.state_dict())
    state, prefix = strip_prefix(state, model_keys)
    problem = load_weights(base, state)
    if problem:
        stripped = f" (after stripping the prefix {prefix!r})" if prefix else ""
        raise StateError(f"{path}: the weights do not fit the model{stripped}: {problem}; "
                         "check --model and --width, and that the data has the classes and "
                         "input channels the checkpoint was trained with")
    return base
