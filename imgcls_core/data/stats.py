"""Normalization statistics: ImageNet's, or per-channel mean/std of a training split."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from imgcls_core.data.records import CorruptImageError, SplitRecords

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_STD = 1e-3


def compute_mean_std(
    records: SplitRecords, image_size: int, seed: int = 0, max_images: int = 5000
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixel values in [0, 1] after resizing to ``image_size`` square.

    Uses a seeded sample of at most ``max_images`` records; std is floored at 1e-3
    so constant channels normalize safely. Records that do not decode are left out, as
    training skips them.
    """
    n = len(records)
    if n == 0:
        raise ValueError("cannot compute mean/std of an empty split")
    indices = np.arange(n)
    if n > max_images:
        indices = np.sort(np.random.default_rng(seed).choice(n, size=max_images, replace=False))
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for i in indices:
        try:
            image = records.load(int(i))
        except CorruptImageError:
            continue
        if image.shape[-2:] != (image_size, image_size):
            image = TF.resize(image, [image_size, image_size], antialias=True)
        x = image.reshape(3, -1).double() / 255.0
        total += x.sum(dim=1)
        total_sq += (x * x).sum(dim=1)
        count += x.shape[1]
    if count == 0:
        raise CorruptImageError(f"none of the {len(indices)} images sampled for mean/std decodes")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0.0).sqrt().clamp_min(MIN_STD)
    return mean.tolist(), std.tolist()
