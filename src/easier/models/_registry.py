"""Name -> builder registry, so any paper model can be built, saved and rebuilt from a dict."""

from __future__ import annotations

import importlib
import inspect
import json
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from easier.errors import ConfigError

Builder = Callable[..., nn.Module]

SPEC_ATTR = "easier_spec"
BASE_ARGS = ("num_classes", "in_channels", "width", "image_size")
THIRD_PARTY = ("torchvision", "timm")

_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Return a decorator that files a builder under `name` for `create`.

    A builder takes the keyword arguments num_classes, in_channels, width and image_size plus its
    own named options (no **kwargs: options are checked by name, so typos fail loudly).
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ConfigError(
            f"model name {name!r} is invalid: use a non-empty string without ':' "
            "(':' is reserved for 'torchvision:NAME' and 'timm:NAME')."
        )

    def decorator(fn: Builder) -> Builder:
        params = inspect.signature(fn).parameters
        missing = [a for a in BASE_ARGS if a not in params]
        if missing:
            raise ConfigError(
                f"builder {fn.__qualname__} for {name!r} lacks parameter(s) {missing}; every "
                f"builder must accept {list(BASE_ARGS)} as keyword arguments."
            )
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            raise ConfigError(
                f"builder {fn.__qualname__} for {name!r} takes **kwargs; name every option "
                "explicitly so that create() can reject misspelt ones."
            )
        old = _REGISTRY.get(name)
        if old is not None and _qualname(old) != _qualname(fn):
            raise ConfigError(
                f"model name {name!r} is already registered by {_qualname(old)}; pick another name."
            )
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """Return the registered model names, sorted (third-party 'torchvision:'/'timm:' not listed)."""
    return sorted(_REGISTRY)


def create(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    image_size: int = 32,
    **kwargs: Any,
) -> nn.Module:
    """Return a freshly initialised model, with `model.easier_spec` recording how to rebuild it.

    `name` is a registered name (see `list_models()`), or 'torchvision:NAME' / 'timm:NAME' to
    build a third-party model (imported only then). `width` multiplies every channel count.
    """
    if not isinstance(name, str):
        raise ConfigError(f"model name must be a string, got {type(name).__name__}.")
    base = {
        "num_classes": _positive_int("num_classes", num_classes),
        "in_channels": _positive_int("in_channels", in_channels),
        "width": _positive_float("width", width),
        "image_size": _positive_int("image_size", image_size),
    }
    source, sep, arch = name.partition(":")
    if sep:
        spec = {"name": name, **base, **kwargs}
        _check_json(spec)
        model = _create_third_party(source, arch, base, kwargs)
    else:
        builder = _REGISTRY.get(name)
        if builder is None:
            raise ConfigError(
                f"unknown model {name!r}; valid names: {', '.join(list_models())} "
                "(or 'torchvision:NAME' / 'timm:NAME', or pass any nn.Module to easier directly)."
            )
        options = _bind_options(name, builder, kwargs)
        spec = {"name": name, **base, **options}
        _check_json(spec)
        model = builder(**base, **options)
    setattr(model, SPEC_ATTR, spec)
    return model


def spec_of(model: Any) -> dict[str, Any] | None:
    """Return a copy of the spec `create` stored on `model`, or None if it was not built by it."""
    spec = getattr(model, SPEC_ATTR, None)
    if not isinstance(spec, dict):
        return None
    return json.loads(json.dumps(spec))


def create_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """Return a new model built from a spec (as given by `spec_of`), ready for `load_state_dict`."""
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"a model spec must be a dict like spec_of(model) returns, got {type(spec).__name__}."
        )
    rest = dict(spec)
    name = rest.pop("name", None)
    if name is None:
        raise ConfigError(
            f"model spec has no 'name' key (keys: {sorted(rest)}); "
            "use the dict returned by spec_of(model)."
        )
    return create(name, **rest)


def _qualname(fn: Builder) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _positive_int(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}.")
    return int(value)


def _positive_float(what: str, value: Any) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or float(value) <= 0:
        raise ConfigError(f"{what} must be a finite number > 0, got {value!r}.")
    return float(value)


def _bind_options(name: str, builder: Builder, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Return every option of `builder`, defaults filled in, so a spec survives default changes."""
    params = {n: p for n, p in inspect.signature(builder).parameters.items() if n not in BASE_ARGS}
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        valid = ", ".join(params) if params else "none"
        raise ConfigError(
            f"model {name!r} has no option(s) {', '.join(unknown)}; its options are: {valid} "
            f"(besides {', '.join(BASE_ARGS)})."
        )
    options: dict[str, Any] = {}
    for n, p in params.items():
        if n in kwargs:
            options[n] = kwargs[n]
        elif p.default is inspect.Parameter.empty:
            raise ConfigError(f"model {name!r} needs the option {n!r}; pass {n}=... to create().")
        else:
            options[n] = p.default
    return options


def _check_json(spec: dict[str, Any]) -> None:
    try:
        json.dumps(spec, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"model options must be plain JSON values (numbers, strings, lists, dicts) so the "
            f"model can be rebuilt from its saved spec; got {spec!r} ({exc})."
        ) from exc


def _create_third_party(
    source: str, arch: str, base: dict[str, Any], kwargs: dict[str, Any]
) -> nn.Module:
    """Build 'torchvision:NAME' or 'timm:NAME', importing the package only now."""
    if source not in THIRD_PARTY or not arch:
        raise ConfigError(
            f"model name '{source}:{arch}' is not understood; third-party models are written "
            "'torchvision:NAME' or 'timm:NAME'."
        )
    if base["width"] != 1.0:
        raise ConfigError(
            f"width={base['width']} applies only to easier's own models; build "
            f"'{source}:{arch}' at width 1.0 or pass your own nn.Module."
        )
    try:
        package = importlib.import_module(source)
    except (ImportError, RuntimeError) as exc:
        raise ConfigError(
            f"'{source}:{arch}' needs the {source} package, which cannot be imported here "
            f"({type(exc).__name__}: {exc}). Install a {source} build that matches your torch, "
            "or build the model yourself: any nn.Module can be passed to easier's functions "
            "directly."
        ) from exc
    if source == "torchvision":
        if base["in_channels"] != 3:
            raise ConfigError(
                f"torchvision models take 3 input channels, not {base['in_channels']}; use one "
                "of easier's own models (see list_models()) or adapt the first layer yourself."
            )
        kwargs = {"weights": None, **kwargs}
        try:
            return package.models.get_model(arch, num_classes=base["num_classes"], **kwargs)
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"torchvision could not build {arch!r} with {kwargs}: {exc}. See "
                "torchvision.models.list_models() for the names."
            ) from exc
    if not package.is_model(arch):
        raise ConfigError(f"timm has no model {arch!r}; see timm.list_models() for the names.")
    try:
        return package.create_model(
            arch,
            pretrained=False,
            num_classes=base["num_classes"],
            in_chans=base["in_channels"],
            **kwargs,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"timm could not build {arch!r} with {kwargs}: {exc}.") from exc
