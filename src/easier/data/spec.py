"""Dataset specs (``NAME`` or ``NAME:PATH``), the registry of sources, and ``load``."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch.utils.data import Dataset

from easier.errors import ConfigError

__all__ = ["DataSplits", "LoadOptions", "list_datasets", "load", "parse_spec", "register"]

# Common spellings accepted for the registered names.
_ALIASES = {
    "cifar-10": "cifar10",
    "tinyimagenet": "tiny-imagenet",
    "image-folder": "imagefolder",
    "fashion": "fashion-mnist",
    "fmnist": "fashion-mnist",
}


@dataclass(frozen=True)
class DataSplits:
    """The splits of one dataset plus what a model needs to know about its inputs.

    ``train`` carries the training augmentation; ``train_eval`` holds the same samples in the
    same order without it (for the entropy pass). Items are ``(float32 CxHxW normalised, int)``.
    """

    name: str
    train: Dataset
    train_eval: Dataset
    val: Dataset
    test: Dataset | None
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = field(default=())

    def sizes(self) -> dict[str, int]:
        """Return the number of samples per split; ``test`` is 0 when there is no test split."""
        return {
            "train": len(self.train),  # type: ignore[arg-type]
            "val": len(self.val),  # type: ignore[arg-type]
            "test": 0 if self.test is None else len(self.test),  # type: ignore[arg-type]
        }

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready description (not the data) to store beside a run."""
        return {
            "name": self.name,
            "sizes": self.sizes(),
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "classes": list(self.classes),
        }


@dataclass(frozen=True)
class LoadOptions:
    """What ``load`` passes on to a source's loader."""

    path: Path | None
    seed: int
    image_size: int | None
    augment: bool
    cache_dir: Path


class Loader(Protocol):
    def __call__(self, opts: LoadOptions) -> DataSplits: ...


@dataclass(frozen=True)
class _Source:
    loader: Loader
    needs_path: bool
    help: str
    default_path: str | None = None


_REGISTRY: dict[str, _Source] = {}


def register(
    name: str, *, needs_path: bool, help: str, default_path: str | None = None
) -> Callable[[Loader], Loader]:
    """Return a decorator that makes ``loader`` loadable as ``name`` (or ``name:PATH``).

    ``default_path`` (with ``needs_path=True``): the directory used when the spec gives none,
    so plain ``name`` works too (e.g. a dataset installed by a system package).
    """

    def deco(loader: Loader) -> Loader:
        if name in _REGISTRY:
            raise ConfigError(f"dataset {name!r} is registered twice; pick another name")
        _REGISTRY[name] = _Source(loader, needs_path, help, default_path)
        return loader

    return deco


def list_datasets() -> list[str]:
    """Return the registered dataset names, in registration order."""
    return list(_REGISTRY)


def dataset_forms() -> list[tuple[str, str]]:
    """Return ``(form, help)`` per registered source, the form as typed: ``NAME`` or
    ``NAME:PATH`` for sources read from a directory."""
    return [(_form(n, s), s.help) for n, s in _REGISTRY.items()]


def _form(name: str, s: _Source) -> str:
    if s.default_path is not None:
        return f"{name}[:PATH]"
    return f"{name}:PATH" if s.needs_path else name


def _syntax() -> str:
    forms = [_form(n, s) for n, s in _REGISTRY.items()]
    return f"valid datasets: {', '.join(forms)} (spec syntax: NAME or NAME:PATH)"


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Return ``(name, path or None)`` from ``NAME`` / ``NAME:PATH``, the name canonicalised."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty dataset spec {spec!r}; {_syntax()}")
    name, sep, path = spec.strip().partition(":")
    name = name.strip().lower().replace("_", "-")
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown dataset {spec.partition(':')[0]!r}; {_syntax()}")
    return name, (path.strip() or None) if sep else None


def cache_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """Return where parsed arrays are cached: ``root``, else $EASIER_CACHE, else ~/.cache/easier."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("EASIER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "easier"


def load(
    spec: str,
    *,
    seed: int = 0,
    image_size: int | None = None,
    augment: bool = True,
    root: str | os.PathLike[str] | None = None,
) -> DataSplits:
    """Return the train/train_eval/val/test splits named by ``spec``.

    ``seed`` fixes the train/val split (test splits never move with it). ``image_size`` resizes
    (default: the source's native size). ``root`` is the data directory for a spec given without
    ``:PATH``; for the built-in sources (mnist5k, digits) it is the cache directory instead.
    """
    name, path = parse_spec(spec)
    source = _REGISTRY[name]
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0
    ):
        raise ConfigError(f"image_size must be a positive integer or None, got {image_size!r}")
    if source.needs_path:
        if path is None and root is not None:
            path = os.fspath(root)
        elif path is not None and root is not None and Path(path) != Path(root):
            raise ConfigError(
                f"{name}: spec path {path!r} and root={os.fspath(root)!r} disagree; give one"
            )
        if path is None and source.default_path is not None:
            path = source.default_path
        if path is None:
            raise ConfigError(
                f"{name} needs a directory: use '{name}:PATH' (or root=PATH); {source.help}"
            )
        opts = LoadOptions(Path(path).expanduser(), seed, image_size, augment, cache_dir())
    else:
        if path is not None:
            raise ConfigError(
                f"{name} is built in and takes no path, got {spec!r}; use plain '{name}' "
                "(root= sets its cache directory)"
            )
        opts = LoadOptions(None, seed, image_size, augment, cache_dir(root))
    return source.loader(opts)
