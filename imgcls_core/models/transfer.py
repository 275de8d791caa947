"""Transfer learning: load a local backbone checkpoint, freeze leading stages, split the head.

Models describe themselves with two class attributes (see ``ResNet``):

* ``head_name``: the classifier submodule (``"fc"``): replaced when the
  number of classes differs, and given its own LR by the optimizer;
* ``stage_names``: groups of submodule names, earliest first, that
  ``freeze_stages(model, n)`` freezes the first ``n`` of.

Frozen BatchNorm layers must also stop updating their running statistics;
``model.train()`` would switch them back on, so the engine calls
:func:`keep_frozen_bn_eval` right after every ``model.train()``.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DataParallel, DistributedDataParallel

from imgcls_core.config import TORCHVISION_PREFIX, ConfigError

_log = logging.getLogger(__name__)

NamedParams = list[tuple[str, nn.Parameter]]
Log = Callable[[str], None]


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did; the dropped/missing head keys keep their fresh init."""

    path: str
    loaded: list[str] = field(default_factory=list)
    # In the file but shaped for another number of classes.
    dropped_head: list[str] = field(default_factory=list)
    # Not in the file at all (a headless backbone).
    missing_head: list[str] = field(default_factory=list)
    # Missing/unexpected backbone keys tolerated by strict_backbone=False.
    ignored: list[str] = field(default_factory=list)
    head: str = "fc"  # the model's head_name

    def describe(self) -> str:
        """One line for the run's log: what was loaded, and whether the head is the file's or new."""
        if self.dropped_head:
            head = f"head {self.head} is new (the file's is shaped for another number of classes)"
        elif self.missing_head:
            head = f"head {self.head} is new (the file has none)"
        else:
            head = f"head {self.head} loaded too (the file's has this run's number of classes)"
        ignored = f"; {len(self.ignored)} keys ignored ({_preview(self.ignored, 3)})" if self.ignored else ""
        return f"pretrained weights: loaded {len(self.loaded)} tensors from {self.path}; {head}{ignored}"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DDP/DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def head_name(model: nn.Module) -> str:
    return getattr(unwrap_model(model), "head_name", "fc")


def split_head_parameters(model: nn.Module) -> tuple[NamedParams, NamedParams]:
    """``(backbone, head)`` named parameters that require grad, for per-group learning rates."""
    bare = unwrap_model(model)
    name = head_name(bare)
    if not isinstance(getattr(bare, name, None), nn.Module):
        raise ValueError(f"{type(bare).__name__} has no head module {name!r} (its head_name)")
    backbone, head = [], []
    for param_name, param in bare.named_parameters():
        if param.requires_grad:
            (head if param_name.startswith(name + ".") else backbone).append((param_name, param))
    return backbone, head


def torchvision_weights(spec: str):
    """The torchvision ``WeightsEnum`` member a ``torchvision:<Enum>.<MEMBER>`` spec names, looked
    up in torchvision's own registry (``torchvision.models.get_weight``)."""
    from torchvision.models import get_weight

    name = spec.removeprefix(TORCHVISION_PREFIX)
    try:
        return get_weight(name)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"model.pretrained: {spec!r} names no torchvision weights ({exc}); use "
                         f"torchvision:<WeightsEnum>.<NAME>, e.g. torchvision:ResNet50_Weights.IMAGENET1K_V2") from None


def resolve_pretrained(spec: str | Path, log: Log | None = None) -> Path:
    """The local state_dict file for a ``model.pretrained`` value: a path as it is, or for
    ``torchvision:<Enum>.<MEMBER>`` the file in torch's hub cache (``$TORCH_HOME/hub/checkpoints``,
    where torchvision itself keeps it), downloaded there first when missing (said to ``log``,
    else to this module's logger). Loading it is :func:`load_pretrained`'s (``weights_only=True``)."""
    if not str(spec).startswith(TORCHVISION_PREFIX):
        return Path(spec)
    import re
    from urllib.parse import urlparse

    weights = torchvision_weights(str(spec))
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    file = cache / Path(urlparse(weights.url).path).name
    if file.is_file():
        return file
    match = re.search(torch.hub.HASH_REGEX, file.name)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        (log or _log.info)(f"downloading {weights.url} to {file}")
        torch.hub.download_url_to_file(weights.url, str(file), hash_prefix=match.group(1) if match else None,
                                       progress=False)
    except Exception as exc:  # offline, a proxy, a hash mismatch, a read-only cache
        raise FileNotFoundError(
            f"torchvision weights {spec.removeprefix(TORCHVISION_PREFIX)} are not in torch's cache and could "
            f"not be downloaded ({type(exc).__name__}: {exc}); put {file.name} (from {weights.url}) at {file} "
            f"(TORCH_HOME moves the cache; every node that trains needs it)") from None
    return file


def load_pretrained(model: nn.Module, path: str | Path, strict_backbone: bool = True) -> LoadReport:
    """Load a local state_dict into ``model``, keeping ``model``'s head where shapes differ.

    ``path`` holds a raw state_dict or a dict with a ``"model"`` or ``"state_dict"``
    entry; ``"module."``/``"_orig_mod."`` prefixes (DDP, torch.compile) are stripped.
    Head entries shaped for another number of classes are dropped and reported;
    every other key must match the model in name and shape, else ``ValueError``
    names the keys and the file, and nothing is loaded. ``strict_backbone=False``
    tolerates missing and unexpected backbone keys (shapes must still match).
    """
    path = Path(path)
    state = _read_state_dict(path)
    bare = unwrap_model(model)
    head = head_name(bare)
    head_prefix = head + "."
    own = bare.state_dict()
    report = LoadReport(path=str(path), head=head)

    for key in [k for k in state if k.startswith(head_prefix) and k in own]:
        if state[key].shape != own[key].shape:
            report.dropped_head.append(key)
            del state[key]
    report.missing_head = [k for k in own if k.startswith(head_prefix) and k not in state]
    missing = [k for k in own if k not in state and not k.startswith(head_prefix)]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    problems = [("shape mismatch", wrong_shape)]
    if strict_backbone:
        problems += [("missing from the file", missing), ("not in the model", unexpected)]
    else:
        report.ignored = missing + unexpected
    problems = [(what, keys) for what, keys in problems if keys]
    if problems:
        detail = "; ".join(f"{what}: {_preview(keys)}" for what, keys in problems)
        where = f"pretrained weights {path} do not fit {type(bare).__name__}"
        raise ValueError(f"{where}: {detail}{_hint(state, own)}")

    for key in unexpected:  # only reachable with strict_backbone=False
        del state[key]
    bare.load_state_dict(state, strict=False)
    report.loaded = sorted(state)
    return report


def freeze_stages(model: nn.Module, n: int) -> nn.Module:
    """Freeze the first ``n`` stages (ResNet: 1 = stem, 2 = +layer1, ..., 5 = all but fc).

    Frozen parameters get ``requires_grad=False`` and their BatchNorm layers go to
    eval mode; the engine keeps them there with :func:`keep_frozen_bn_eval`.
    """
    bare = unwrap_model(model)
    for stage in stages_to_freeze(bare, n):
        for name in stage:
            module = bare.get_submodule(name)
            module.requires_grad_(False)
    keep_frozen_bn_eval(bare)
    return model


def stages_to_freeze(model: nn.Module, n: int) -> tuple[tuple[str, ...], ...]:
    """The first ``n`` of ``model``'s ``stage_names``; ConfigError (model.freeze_stages) when it
    has fewer, ValueError when it defines none."""
    bare = unwrap_model(model)
    stages = getattr(bare, "stage_names", None)
    if stages is None:
        raise ValueError(f"model.freeze_stages={n}: {type(bare).__name__} defines no stage_names, so no stages "
                         f"to freeze")
    if not 0 <= n <= len(stages):
        raise ConfigError(  # a setting of the run's config: exit 2, as for every config mistake
            f"model.freeze_stages={n} is out of range for {type(bare).__name__}: it has {len(stages)} "
            f"stages ({', '.join('+'.join(s) for s in stages)}), so use 0..{len(stages)}"
        )
    return tuple(stages[:n])


def unfreeze_all(model: nn.Module) -> nn.Module:
    """Make every parameter trainable again; BN layers follow the next ``model.train()``."""
    unwrap_model(model).requires_grad_(True)
    return model


def keep_frozen_bn_eval(model: nn.Module) -> nn.Module:
    """Put every BatchNorm whose parameters are all frozen into eval mode.

    Call after ``model.train()``: a frozen BN that kept training mode would still
    normalize with batch statistics and overwrite the pretrained running stats.
    """
    for module in unwrap_model(model).modules():
        if isinstance(module, _BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
    return model


def check_pretrained_file(spec: str | None, missing: str = "does not exist") -> None:
    """FileNotFoundError ``model.pretrained <spec> <missing>`` when ``spec`` names a local file that
    is not there (torchvision weights by name are fetched into torch's cache when first used)."""
    if spec and not spec.startswith(TORCHVISION_PREFIX) and not Path(spec).is_file():
        raise FileNotFoundError(f"model.pretrained {spec} {missing}")


def pretrained_normalization(path: str | Path) -> tuple[list[float], list[float]] | None:
    """The mean/std an imgcls ``model.pt`` or training checkpoint records in its ``preprocessing``
    (what that model was trained on), or None for a plain state_dict, which records none."""
    payload = _read_payload(Path(path), mmap=True)  # the tensors stay on disk: only this dict is read
    pre = payload.get("preprocessing") if isinstance(payload, dict) else None
    if not isinstance(pre, dict) or "mean" not in pre or "std" not in pre:
        return None
    return [float(v) for v in pre["mean"]], [float(v) for v in pre["std"]]


def _read_payload(path: Path, mmap: bool = False):
    """What ``path`` holds, read with ``weights_only=True`` (no code runs); ``mmap``: tensors mapped
    from the file rather than read (torch's zip format, that of every torch.save since 1.6)."""
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:  # pickle errors, truncated files, non-tensor payloads
        raise ValueError(f"pretrained weights {path} could not be read: {exc}") from exc


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    payload = _read_payload(path)
    for key in ("model", "state_dict"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    if not isinstance(payload, dict) or not all(torch.is_tensor(v) for v in payload.values()):
        raise ValueError(f"pretrained weights {path} hold no state_dict (a dict of tensors)")
    for prefix in ("module.", "_orig_mod."):  # saved from under DDP or torch.compile
        if payload and all(k.startswith(prefix) for k in payload):
            payload = {k.removeprefix(prefix): v for k, v in payload.items()}
    return dict(payload)


def _hint(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> str:
    """The two ways a torchvision backbone stops fitting: the stem kernel and the width."""
    if "conv1.weight" not in state or "conv1.weight" not in own:
        return ""
    theirs, ours = state["conv1.weight"].shape, own["conv1.weight"].shape
    if theirs[2:] != ours[2:]:
        small_input = "true" if theirs[-1] == 3 else "false"
        return f" (the file's {theirs[-1]}x{theirs[-1]} stem needs model.small_input={small_input})"
    if theirs[0] != ours[0]:
        return " (the file was saved at another model.width)"
    return ""


def _preview(keys: list[str], limit: int = 8) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
