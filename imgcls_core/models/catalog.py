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
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from imgcls_core.config import TORCHVISION_PREFIX
from imgcls_core.models.transfer import (
    freeze_stages,
    load_pretrained,
    resolve_pretrained,
    stages_to_freeze,
    torchvision_weights,
)

if TYPE_CHECKING:
    from imgcls_core.config import ModelConfig

ModelFn = Callable[..., nn.Module]
Log = Callable[[str], None]

_log = logging.getLogger(__name__)

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


def build_model(cfg: ModelConfig, num_classes: int, image_size: int, *, log: Log | None = None) -> nn.Module:
    """Build the network a :class:`ModelConfig` describes, then load weights and freeze.

    ``small_input=None`` resolves to ``image_size <= 64``: a 7x7/stride-2 stem plus
    max-pool would shrink a 32 px image to 8 px before the first residual stage.
    ``log`` gets one line on the ``model.pretrained`` weights loaded (how many tensors, and
    whether the head came from the file or is new); without it the line goes to this
    module's logger. A run that restores a checkpoint builds with ``pretrained=None``:
    the checkpoint holds every weight.
    """
    options = build_options(cfg, image_size)
    model = create_model(cfg.name, num_classes, **options)
    if cfg.pretrained:
        report = load_pretrained(model, resolve_pretrained(cfg.pretrained, log=log))
        (log or _log.info)(report.describe())
    if cfg.freeze_stages:
        freeze_stages(model, cfg.freeze_stages)
    return model


def build_options(cfg: ModelConfig, image_size: int) -> dict[str, Any]:
    """The options :func:`build_model` passes model ``cfg.name``: those it declares, with
    ``small_input=None`` resolved from ``image_size``. ValueError naming the setting when the
    config asks for an option the model does not have (a value other than the neutral one)."""
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
    return {k: v for k, v in wanted.items() if k in accepted}


def check_model_config(cfg: ModelConfig, image_size: int) -> None:
    """Refuse, before any data is read or weights are loaded, a model config that
    :func:`build_model` would refuse later: an option the model does not have,
    ``model.freeze_stages`` beyond its stages, and torchvision weights (``torchvision:...``)
    of another architecture than ``model.name`` or at options other than torchvision's
    (``width: 1.0``, the 7x7 stem). ValueError naming the setting; config validation calls it.

    A local ``model.pretrained`` file is checked where it is read (its existence by the jobs
    before they start, its keys and shapes when it is loaded)."""
    options = build_options(cfg, image_size)
    if cfg.freeze_stages:
        with torch.device("meta"):  # the model's structure only: no memory, no initialization
            stages_to_freeze(create_model(cfg.name, 1, **options), cfg.freeze_stages)
    if (cfg.pretrained or "").startswith(TORCHVISION_PREFIX):
        _check_torchvision_fit(cfg, options, image_size)


def _check_torchvision_fit(cfg: ModelConfig, options: dict[str, Any], image_size: int) -> None:
    """torchvision weights fit only the architecture they were trained as, at torchvision's shapes."""
    from torchvision import models as tv

    weights = torchvision_weights(cfg.pretrained)
    arch = next((n for n in tv.list_models() if tv.get_model_weights(n) is type(weights)), None)
    if arch != cfg.name:
        hint = (f"set model.name={arch}" if arch in _MODELS else
                f"imgcls has no {arch or 'such'} model; use the weights of one of {list_models()}")
        raise ValueError(f"model.pretrained: {cfg.pretrained} are weights of torchvision's {arch or 'unknown'} "
                         f"architecture, not of model.name={cfg.name}; {hint}")
    if options.get("width", 1.0) != 1.0:
        raise ValueError(f"model.width: torchvision weights ({cfg.pretrained}) are shaped for width 1.0, "
                         f"not {cfg.width}; set model.width=1.0")
    if options.get("small_input"):
        why = "" if cfg.small_input else (f" (unset, it picks the 3x3 stem for data.image_size={image_size} "
                                          f"<= {SMALL_INPUT_MAX_SIZE})")
        raise ValueError(f"model.small_input: torchvision weights ({cfg.pretrained}) have the 7x7 stem, which "
                         f"the small-input 3x3 stem cannot load{why}; set model.small_input=false")


def _lookup(name: str) -> ModelFn:
    try:
        return _MODELS[name]
    except KeyError:
        registered = ", ".join(list_models())
        raise ValueError(f"unknown model {name!r}; registered models: {registered}") from None
