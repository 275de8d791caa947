"""How a model's input is made from an image: size, normalization, eval crop, class names.

:class:`Preprocessing` is decided once per run (from the config and the training split) and
travels with the weights in every checkpoint and ``model.pt``, so the server, the offline
predictor and the exports preprocess exactly as training evaluated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from imgcls_core.config import TORCHVISION_PREFIX, Config, is_multi_label
from imgcls_core.data.records import DatasetSplits, SplitRecords
from imgcls_core.data.stats import IMAGENET_MEAN, IMAGENET_STD, compute_mean_std


@dataclass
class Preprocessing:
    """What a server needs to turn image bytes into this model's input; travels with the weights."""

    image_size: int
    mean: list[float]
    std: list[float]
    crop_ratio: float
    classes: list[str]
    # Multi-label: probabilities are per-class sigmoids and a class is present when its probability
    # is >= threshold (chosen on the validation split at the end of training)
    multi_label: bool = False
    threshold: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(**data)


def resolve_normalization(cfg: Config, train: SplitRecords) -> tuple[list[float], list[float]]:
    """The mean/std a run normalizes with. ``data.normalization=auto`` follows ``model.pretrained``:
    torchvision weights use their own transforms' mean/std, an imgcls ``model.pt`` or checkpoint
    the mean/std it was trained with (its ``preprocessing``), any other file ImageNet's; without
    pretrained weights, the statistics of the training split."""
    from imgcls_core.models.transfer import pretrained_normalization, torchvision_weights

    mode, pretrained = cfg.data.normalization, cfg.model.pretrained
    if mode == "auto" and (pretrained or "").startswith(TORCHVISION_PREFIX):
        transform = torchvision_weights(pretrained).transforms()
        return [float(v) for v in transform.mean], [float(v) for v in transform.std]
    if mode == "auto" and pretrained and (recorded := pretrained_normalization(pretrained)) is not None:
        return recorded
    if mode == "imagenet" or (mode == "auto" and pretrained):
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return compute_mean_std(train, cfg.data.image_size, seed=cfg.data.seed)


def build_preprocessing(cfg: Config, splits: DatasetSplits, *, resumed: Preprocessing | None = None) -> Preprocessing:
    """How this run turns images into model input (input size, mean/std, eval crop, class names).

    ``resumed``: the preprocessing of the checkpoint the run resumes from. Its mean/std are kept
    (a run goes on normalizing as it trained), and ``model.pretrained`` is not read: a resumed
    run does not need that file any more."""
    mean, std = (resumed.mean, resumed.std) if resumed is not None else resolve_normalization(cfg, splits.train)
    return Preprocessing(cfg.data.image_size, mean, std, cfg.augment.eval_crop_ratio, list(splits.classes),
                         multi_label=is_multi_label(cfg))
