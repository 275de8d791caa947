"""The architecture catalog: models are built by name, never imported directly (the MLflow model
registry is imgcls_core.registry).

A model is a function ``fn(num_classes, **options) -> nn.Module`` decorated
with :func:`register_model`; its name is the function's name (timm's seam)::

    model = create_model("resnet18", num_classes=10, small_input=True, width=0.5)
    model = build_model(cfg.model, num_classes=10, image_size=32)  # from a ModelConfig

Each function's keyword arguments are the options it understands;
:func:`build_model` passes a model only the options it declares.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from imgcls_core.models.transfer import freeze_stages, load_pretrained, resolve_pretrained

if TYPE_CHECKING:
    from imgcls_core.config import ModelConfig

ModelFn = Callable[..., nn.Module]

_MODELS: dict[str, ModelFn] = {}

# ModelConfig options and the value that means "not asked for". A model that does
# not declare an option may be built only while the option holds this value, so
# e.g. zero_init_residual=True on cnn3 fails instead of being silently ignored.
# small_input is absent on purpose: None means "auto", and models without a
# stem choice (cnn3) work at any size.
_NEUTRAL_OPTIONS: dict[str, Any] = {"width": 1.0, "zero_init_residual": False, "dropout": 0.0}

SMALL_INPUT_MAX_SIZE = 64  # px; at or below this, small_input=None picks the 3x3 stem


def register_model(fn: ModelFn) -> ModelFn:
    """Register ``fn`` under its function name; duplicate names are a bug.

    ``fn(num_classes, *, option=default, ...)``: options must be named keyword
    arguments, because create_model and build_model read them from the signature.
    """
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered (by {_MODELS[name].__module__})")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_MODELS)


def model_options(name: str) -> list[str]:
    """The options (keyword arguments besides num_classes) that model ``name`` accepts."""
    params = inspect.signature(_lookup(name)).parameters.values()
    return [p.name for p in params if p.name != "num_classes" and p.kind is not p.VAR_KEYWORD]


def create_model(name: str, num_classes: int, **options: Any) -> nn.Module:
    """Build registered model ``name`` with a ``num_classes``-way head and random weights."""
    accepted = model_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        allowed = ", ".join(accepted) or "none"
        raise TypeError(f"model {name!r} has no option {unknown[0]!r}; it accepts: {allowed}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return _MODELS[name](num_classes, **options)


def build_model(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    """Build the network a :class:`ModelConfig` describes, then load weights and freeze.

    ``small_input=None`` resolves to ``image_size <= 64``: a 7x7/stride-2 stem plus
    max-pool would shrink a 32 px image to 8 px before the first residual stage.
    """
    small_input = cfg.small_input
    if small_input is None:
        small_input = image_size <= SMALL_INPUT_MAX_SIZE
    wanted = {
        "small_input": small_input,
        "width": cfg.width,
        "zero_init_residual": cfg.zero_init_residual,
        "dropout": cfg.dropout,
    }
    accepted = set(model_options(cfg.name))
    for option, value in wanted.items():
        ignorable = option not in _NEUTRAL_OPTIONS or value == _NEUTRAL_OPTIONS[option]
        if option not in accepted and not ignorable:
            raise ValueError(
                f"model {cfg.name!r} does not support model.{option}={value!r}; "
                f"it accepts: {', '.join(sorted(accepted)) or 'none'}"
            )
    options = {k: v for k, v in wanted.items() if k in accepted}
    model = create_model(cfg.name, num_classes, **options)
    if cfg.pretrained:
        load_pretrained(model, resolve_pretrained(cfg.pretrained))
    if cfg.freeze_stages:
        freeze_stages(model, cfg.freeze_stages)
    return model


def _lookup(name: str) -> ModelFn:
    try:
        return _MODELS[name]
    except KeyError:
        registered = ", ".join(list_models())
        raise ValueError(f"unknown model {name!r}; registered models: {registered}") from None
