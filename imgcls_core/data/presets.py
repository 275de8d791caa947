"""Train and eval transforms, with training augmentation driven by one ``strength`` knob.

``strength_params(strength, policy)`` is the only place where a strength in [0, 1]
becomes numbers; ``TrainPreset`` builds its pipeline from that dict. The mapping,
the pipeline order and measured effects are documented in ``docs/augmentation.md``::

    TrainPreset: ToImage -> crop (or Resize at s=0) -> [hflip] -> auto-augment -> GrayAwareColorJitter
                 -> ToDtype(float32, scale) -> Normalize -> RandomErasing -> ToPureTensor
    EvalPreset:  ToImage -> Resize((size, size))                              (crop_ratio = 1)
                         or Resize(int(size / crop_ratio)) -> CenterCrop(size)        (< 1)
                 -> ToDtype(float32, scale) -> Normalize -> ToPureTensor

At strength 0 without flip the train transform is exactly the eval transform with
``crop_ratio = 1``. Everything here is a module-level class (torchvision v2
transforms are ``nn.Module``\\ s), so presets and the collate function pickle into
DataLoader worker processes. Pure PyTorch + torchvision: no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import get_size

__all__ = [
    "POLICIES",
    "AspectRelativeResizedCrop",
    "BatchAugment",
    "EvalPreset",
    "GrayAwareColorJitter",
    "MixCollate",
    "ScaledTrivialAugmentWide",
    "TrainPreset",
    "build_batch_augment",
    "build_batch_mix",
    "build_eval_transform",
    "build_train_transform",
    "mix_collate",
    "strength_params",
]

POLICIES: tuple[str, ...] = ("trivialaugment", "randaugment", "none")

# Values at strength 1 (see docs/augmentation.md for why these numbers).
_MIN_CROP_SCALE = 0.35  # crop area (1 - 0.65 s, 1)
_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # relative aspect ratio ((3/4)^s, (4/3)^s)
_JITTER = 0.4  # brightness = contrast = saturation
_HUE = 0.05  # fraction of the hue circle (+-18 degrees)
_TRIVIAL_MAX_BIN = 30  # TrivialAugmentWide bins 0 .. round(30 s) of 31
_RANDAUG_MAGNITUDE = 15  # RandAugment bin round(15 s) of 31
_RANDAUG_OPS = 2
_NUM_BINS = 31
_ERASING_P = 0.25

_INTERPOLATION = v2.InterpolationMode.BILINEAR


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(
            f"unknown augment policy {policy!r}; expected one of: {', '.join(POLICIES)}"
        )


def _check_strength(strength: float) -> float:
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"augment strength must be a number in [0, 1], got {strength!r}") from None
    if not 0.0 <= s <= 1.0:  # also rejects NaN
        raise ValueError(f"augment strength must be in [0, 1], got {strength!r}")
    return s


def _round_half_up(x: float) -> int:
    """Round to nearest, halves up (Python's ``round`` goes to even: 4.5 -> 4, 22.5 -> 22)."""
    return math.floor(x + 0.5)


def strength_params(strength: float, policy: str = "trivialaugment") -> dict[str, Any]:
    """The augmentation numbers for ``strength`` in [0, 1] and an auto-augment ``policy``.

    Every number grows (crop ranges widen) monotonically with strength; at 0 the
    pipeline is a plain resize: no random crop, no policy, no jitter, no erasing.
    """
    s = _check_strength(strength)
    _check_policy(policy)
    effective = policy if s > 0 else "none"
    if effective == "trivialaugment":
        magnitude = _round_half_up(_TRIVIAL_MAX_BIN * s)  # highest bin TrivialAugmentWide draws
    elif effective == "randaugment":
        magnitude = _round_half_up(_RANDAUG_MAGNITUDE * s)  # RandAugment's fixed bin
    else:
        magnitude = 0
    return {
        "strength": s,
        "policy": effective,
        "random_crop": s > 0,
        "crop_scale": (1.0 - (1.0 - _MIN_CROP_SCALE) * s, 1.0),
        "crop_ratio": (_CROP_RATIO[0] ** s, _CROP_RATIO[1] ** s),
        "brightness": _JITTER * s,
        "contrast": _JITTER * s,
        "saturation": _JITTER * s,
        "hue": _HUE * s,
        "magnitude": magnitude,
        "erasing_p": _ERASING_P * s,
    }


class ScaledTrivialAugmentWide(v2.TrivialAugmentWide):
    """TrivialAugmentWide that draws magnitude bins only from ``0 .. max_bin``.

    torchvision's tables are ``linspace(0, op_max, num_bins)`` (Posterize 8 -> 2 bits,
    Solarize threshold 1 -> 0), so fewer bins do not lower the maximum; capping the
    bin *index* does, and walks the non-linear tables from their mild end. With
    ``max_bin = num_magnitude_bins - 1`` (30, the default) it is the stock transform,
    random draws included.
    """

    def __init__(
        self,
        max_bin: int = _NUM_BINS - 1,
        num_magnitude_bins: int = _NUM_BINS,
        interpolation: v2.InterpolationMode | str | int = v2.InterpolationMode.NEAREST,
        fill: Any = None,
    ):
        super().__init__(
            num_magnitude_bins=num_magnitude_bins, interpolation=interpolation, fill=fill
        )
        if not 0 <= int(max_bin) < num_magnitude_bins:
            raise ValueError(f"max_bin must be in [0, {num_magnitude_bins - 1}], got {max_bin!r}")
        self.max_bin = int(max_bin)

    def forward(self, *inputs: Any) -> Any:
        flat_inputs_with_spec, image_or_video = self._flatten_and_extract_image_or_video(inputs)
        height, width = get_size(image_or_video)

        transform_id, (magnitudes_fn, signed) = self._get_random_item(self._AUGMENTATION_SPACE)

        magnitudes = magnitudes_fn(self.num_magnitude_bins, height, width)
        if magnitudes is not None:
            magnitude = float(magnitudes[int(torch.randint(self.max_bin + 1, ()))])
            if signed and torch.rand(()) <= 0.5:
                magnitude *= -1
        else:
            magnitude = 0.0

        image_or_video = self._apply_image_or_video_transform(
            image_or_video,
            transform_id,
            magnitude,
            interpolation=self.interpolation,
            fill=self._fill,
        )
        return self._unflatten_and_insert_image_or_video(flat_inputs_with_spec, image_or_video)

    def extra_repr(self) -> str:
        return f"max_bin={self.max_bin}, num_magnitude_bins={self.num_magnitude_bins}"


class AspectRelativeResizedCrop(v2.RandomResizedCrop):
    """RandomResizedCrop whose aspect-ratio range is relative to the input's aspect ratio.

    A crop's width / height is drawn log-uniformly from ``input_aspect * ratio``, so the
    full-area crop is the whole image squashed to ``size``: the same view as the
    default eval transform. On square inputs it behaves exactly like RandomResizedCrop.
    """

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        area = height * width
        in_ratio = width / height
        low, high = in_ratio * self.ratio[0], in_ratio * self.ratio[1]
        log_low, log_high = math.log(low), math.log(high)

        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect_ratio = math.exp(torch.empty(1).uniform_(log_low, log_high).item())

            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))

            if 0 < w <= width and 0 < h <= height:
                i = int(torch.randint(0, height - h + 1, size=(1,)).item())
                j = int(torch.randint(0, width - w + 1, size=(1,)).item())
                return dict(top=i, left=j, height=h, width=w)

        # Fallback: a central crop with the nearest allowed aspect (the whole image
        # whenever the relative range contains 1, as it always does here).
        if in_ratio < low:
            w, h = width, max(1, int(round(width / low)))
        elif in_ratio > high:
            w, h = max(1, int(round(height * high))), height
        else:
            w, h = width, height
        return dict(top=(height - h) // 2, left=(width - w) // 2, height=h, width=w)


def _to_float(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


MAX_ASPECT = 8  # EvalPreset: longer side / shorter side beyond which the long side is reduced first


class BoundAspect(torch.nn.Module):
    """Bring an image's long side down to ``max_ratio`` x its short side, so that what follows costs
    no more than the image's pixels whatever its geometry; images within the ratio pass untouched.

    Without it a valid few-KB PNG of 1 x 25,000,000 pixels (within any pixel cap) asks a resize of
    the short side to S for S x 25 M x S pixels (centre-crop mode) or a separable pass's S x 25 M
    intermediate (squash mode): gigabytes. ``crop=True`` (centre-crop mode: only the centre of the
    long side is ever used) centre-crops the long side; ``crop=False`` (squash mode: all of it is)
    resizes the long side alone, antialiased, which costs one pass over the pixels."""

    def __init__(self, max_ratio: int = MAX_ASPECT, crop: bool = False):
        super().__init__()
        self.max_ratio, self.crop = int(max_ratio), crop

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = get_size(image)
        short = min(h, w)
        target = self.max_ratio * short
        if max(h, w) <= target:
            return image
        size = [target, w] if h > w else [h, target]
        if self.crop:
            return v2.functional.center_crop(image, size)
        return v2.functional.resize(image, size, interpolation=_INTERPOLATION, antialias=True)


class EvalPreset(v2.Compose):
    """Deterministic eval/serving transform: uint8 image (any size) -> float32 ``3 x size x size``.

    ``crop_ratio = 1`` squashes the image to ``size x size``; ``crop_ratio < 1`` resizes the
    short side to ``int(size / crop_ratio)`` and centre-crops ``size`` (ImageNet style). An image
    more than :data:`MAX_ASPECT` times longer than wide (or the reverse) has its long side
    reduced first (:class:`BoundAspect`), so its cost is bounded by its pixel count.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_ratio: float = 1.0,
    ):
        crop_ratio = float(crop_ratio)
        if not 0.0 < crop_ratio <= 1.0:
            raise ValueError(f"eval crop_ratio must be in (0, 1], got {crop_ratio!r}")
        if crop_ratio == 1.0:
            geometry: list[v2.Transform] = [
                v2.Resize((size, size), interpolation=_INTERPOLATION, antialias=True)
            ]
        else:
            geometry = [
                v2.Resize(int(size / crop_ratio), interpolation=_INTERPOLATION, antialias=True),
                v2.CenterCrop(size),
            ]
        bound = BoundAspect(MAX_ASPECT, crop=crop_ratio < 1.0)
        super().__init__([v2.ToImage(), bound, *geometry, *_to_float(mean, std), v2.ToPureTensor()])
        self.size, self.crop_ratio = size, crop_ratio


class GrayAwareColorJitter(v2.ColorJitter):
    """ColorJitter that skips saturation and hue on grey images (three equal channels).

    Both are no-ops on grey pixels (no saturation to scale, no hue to turn) up to uint8
    rounding, yet hue alone is most of the pipeline's cost at small sizes (an RGB -> HSV -> RGB
    round trip per image): on the digits at 16 px the whole train transform drops from 0.76 to
    0.40 CPU-ms per image (one thread, 2026-12-06). Colour images are jittered exactly as by ``v2.ColorJitter``.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, torch.Tensor) and inpt.ndim >= 3 and inpt.shape[-3] == 3 \
                and torch.equal(inpt[..., 0, :, :], inpt[..., 1, :, :]) \
                and torch.equal(inpt[..., 1, :, :], inpt[..., 2, :, :]):
            params = {**params, "saturation_factor": None, "hue_factor": None}
        return super().transform(inpt, params)


class TrainPreset(v2.Compose):
    """Training transform built from ``strength_params(strength, policy)``.

    uint8 image (tensor, ``tv_tensors.Image`` or PIL, any size) -> float32 ``3 x size x size``.
    Auto-augment and colour jitter run on uint8; random erasing runs after Normalize, so
    its fill 0 is the data set's mean colour. ``hflip`` (p = 0.5) is independent of strength.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        strength: float = 0.3,
        policy: str = "trivialaugment",
        hflip: bool = False,
    ):
        params = strength_params(strength, policy)
        steps: list[v2.Transform] = [v2.ToImage()]
        if params["random_crop"]:
            steps.append(
                AspectRelativeResizedCrop(
                    size,
                    scale=params["crop_scale"],
                    ratio=params["crop_ratio"],
                    interpolation=_INTERPOLATION,
                    antialias=True,
                )
            )
        else:
            steps.append(v2.Resize((size, size), interpolation=_INTERPOLATION, antialias=True))
        if hflip:
            steps.append(v2.RandomHorizontalFlip(p=0.5))
        if params["policy"] == "trivialaugment":
            steps.append(
                ScaledTrivialAugmentWide(max_bin=params["magnitude"], num_magnitude_bins=_NUM_BINS)
            )
        elif params["policy"] == "randaugment":
            steps.append(
                v2.RandAugment(
                    num_ops=_RANDAUG_OPS,
                    magnitude=params["magnitude"],
                    num_magnitude_bins=_NUM_BINS,
                )
            )
        if params["strength"] > 0:
            steps.append(
                GrayAwareColorJitter(
                    brightness=params["brightness"],
                    contrast=params["contrast"],
                    saturation=params["saturation"],
                    hue=params["hue"],
                )
            )
        steps.extend(_to_float(mean, std))
        if params["erasing_p"] > 0:
            steps.append(v2.RandomErasing(p=params["erasing_p"], value=0))
        steps.append(v2.ToPureTensor())
        super().__init__(steps)
        self.size, self.hflip, self.params = size, bool(hflip), params


def build_train_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], augment: Any
) -> TrainPreset:
    """``TrainPreset`` from an ``AugmentConfig`` (strength, policy, hflip)."""
    return TrainPreset(image_size, mean, std, augment.strength, augment.policy, augment.hflip)


def build_eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], crop_ratio: float = 1.0
) -> EvalPreset:
    """The eval/serving transform (also used by ``imgcls_core.predict``)."""
    return EvalPreset(image_size, mean, std, crop_ratio)


def build_batch_mix(augment: Any, num_classes: int) -> v2.Transform | None:
    """MixUp, CutMix, a 50/50 choice of both, or None, from ``AugmentConfig`` alphas.

    The result maps a batch ``(images N x C x H x W, labels N int64)`` to
    ``(images, soft labels N x num_classes float32)``, on any device.
    """
    mixup_alpha, cutmix_alpha = float(augment.mixup_alpha), float(augment.cutmix_alpha)
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(
            f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}"
        )
    mixes: list[v2.Transform] = []
    if mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    if len(mixes) == 1:
        return mixes[0]
    return v2.RandomChoice(mixes)


class MixCollate:
    """Picklable DataLoader ``collate_fn``: ``default_collate``, then the batch mix (if any)."""

    def __init__(self, mix: Any = None):
        self.mix = mix

    def __call__(self, samples: list[Any]) -> Any:
        batch = default_collate(samples)
        if self.mix is None:
            return batch
        images, labels = batch
        return self.mix(images, labels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mix!r})"


def mix_collate(mix: Any = None) -> MixCollate:
    """``collate_fn`` that mixes in DataLoader workers; ``default_collate`` when ``mix`` is None."""
    return MixCollate(mix)


class BatchAugment(torch.nn.Module):
    """Training augmentation of a whole uint8 batch at once (``augment.batched``).

    ``N x 3 x H x W`` uint8 (any size, any device) -> normalized float32 ``N x 3 x size x size``.
    The same knobs as :class:`TrainPreset` at the same strength (:func:`strength_params`), drawn
    per sample but applied as batch tensor operations: the random-resized crop (area, relative
    aspect ratio, position) and the optional flip as one ``affine_grid`` + ``grid_sample``;
    brightness and contrast jitter; random erasing with the mean colour. Without an auto-augment
    policy, saturation or hue. Per image this costs a few microseconds instead of about a
    millisecond of per-image transforms, so on small images the model, not the data, sets the
    pace (the recipe of fast small-data trainers such as cifar10-airbench).
    Random draws come from torch's global RNG (or ``generator``).
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], strength: float = 0.3,
                 hflip: bool = False):
        super().__init__()
        self.size, self.hflip = int(size), bool(hflip)
        self.params = strength_params(strength, "none")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a N x 3 x H x W batch, got shape {tuple(images.shape)}")
        p, n, device = self.params, images.shape[0], images.device

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return torch.rand(n, *shape, generator=generator, device=device) * (high - low) + low

        x = images.float().div_(255.0)
        if p["random_crop"] or self.hflip:
            theta = torch.zeros(n, 2, 3, device=device)
            if p["random_crop"]:
                area = uniform(*p["crop_scale"])
                log_ratio = uniform(math.log(p["crop_ratio"][0]), math.log(p["crop_ratio"][1]))
                w = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)  # crop side / image side
                h = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
                theta[:, 0, 0], theta[:, 1, 1] = w, h
                theta[:, 0, 2] = (torch.rand(n, generator=generator, device=device) * 2 - 1) * (1 - w)
                theta[:, 1, 2] = (torch.rand(n, generator=generator, device=device) * 2 - 1) * (1 - h)
            else:
                theta[:, 0, 0] = theta[:, 1, 1] = 1.0
            if self.hflip:
                flip = torch.rand(n, generator=generator, device=device) < 0.5
                theta[:, 0, 0] = torch.where(flip, -theta[:, 0, 0], theta[:, 0, 0])
            if x.shape[-2:] != (self.size, self.size):  # antialiased resize first: grid_sample does not filter
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
            grid = F.affine_grid(theta, [n, 3, self.size, self.size], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        elif x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        if p["brightness"] > 0:
            x = x * uniform(1 - p["brightness"], 1 + p["brightness"], 1, 1, 1)
        if p["contrast"] > 0:
            grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean(dim=(1, 2)).view(n, 1, 1, 1)
            x = (x - grey) * uniform(1 - p["contrast"], 1 + p["contrast"], 1, 1, 1) + grey
        x = (x.clamp_(0.0, 1.0) - self.mean) / self.std
        if p["erasing_p"] > 0:
            x = x * (1 - self._erase_mask(n, p["erasing_p"], generator, device))
        return x

    def _erase_mask(self, n: int, prob: float, generator, device) -> torch.Tensor:
        """1 inside one random rectangle per erased sample (RandomErasing's area 2-33%, aspect 0.3-3.3)."""
        s = self.size
        area = torch.rand(n, generator=generator, device=device) * (0.33 - 0.02) + 0.02
        log_r = torch.rand(n, generator=generator, device=device) * (math.log(3.3) - math.log(0.3)) + math.log(0.3)
        h = (torch.sqrt(area * log_r.exp()) * s).round().clamp(1, s)
        w = (torch.sqrt(area / log_r.exp()) * s).round().clamp(1, s)
        top = (torch.rand(n, generator=generator, device=device) * (s - h + 1)).floor()
        left = (torch.rand(n, generator=generator, device=device) * (s - w + 1)).floor()
        rows = torch.arange(s, device=device).view(1, s, 1)
        cols = torch.arange(s, device=device).view(1, 1, s)
        inside = ((rows >= top.view(n, 1, 1)) & (rows < (top + h).view(n, 1, 1))
                  & (cols >= left.view(n, 1, 1)) & (cols < (left + w).view(n, 1, 1)))
        chosen = torch.rand(n, generator=generator, device=device) < prob
        return (inside & chosen.view(n, 1, 1)).unsqueeze(1).float()


def build_batch_augment(image_size: int, mean: Sequence[float], std: Sequence[float], augment: Any) -> BatchAugment:
    """``BatchAugment`` from an ``AugmentConfig`` (strength, hflip; the policy must be ``none``)."""
    return BatchAugment(image_size, mean, std, augment.strength, augment.hflip)
