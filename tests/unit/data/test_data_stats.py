"""compute_mean_std against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from imgdata import encode, random_rgb

from imgcls_core.data import IMAGENET_MEAN, IMAGENET_STD, SplitRecords, compute_mean_std


def _records(arrays: list[np.ndarray]) -> SplitRecords:
    return SplitRecords(
        ["x"],
        [0] * len(arrays),
        [f"{i}.png" for i in range(len(arrays))],
        images=[encode(a, "PNG") for a in arrays],
    )


def test_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    arrays = [random_rgb(rng, 16, 16) for _ in range(12)]
    mean, std = compute_mean_std(_records(arrays), 16)
    x = torch.from_numpy(np.stack(arrays)).double() / 255  # N H W C
    assert mean == pytest.approx(x.mean(dim=(0, 1, 2)).tolist(), abs=1e-9)
    assert std == pytest.approx(x.std(dim=(0, 1, 2), unbiased=False).tolist(), abs=1e-9)
    assert isinstance(mean, list) and len(mean) == len(std) == 3


def test_images_are_resized_before_averaging():
    """A small red image and a large blue one count equally once both are 8x8."""
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((40, 30, 3), np.uint8)
    blue[..., 2] = 255
    mean, std = compute_mean_std(_records([red, blue]), 8)
    assert mean == pytest.approx([0.5, 0.0, 0.5], abs=1e-6)
    assert std == pytest.approx([0.5, 1e-3, 0.5], abs=1e-6)  # the constant green channel is floored


def test_sample_is_seeded_and_capped():
    rng = np.random.default_rng(1)
    records = _records([random_rgb(rng, 8, 8) for _ in range(30)])
    loads = []

    class Counting(SplitRecords):
        def load(self, index):
            loads.append(index)
            return super().load(index)

    counting = Counting(records.classes, records.labels, records.paths, images=records.images)
    a = compute_mean_std(counting, 8, seed=3, max_images=10)
    assert len(loads) == 10 and len(set(loads)) == 10
    first = sorted(loads)
    loads.clear()
    assert compute_mean_std(counting, 8, seed=3, max_images=10) == a and sorted(loads) == first
    loads.clear()
    compute_mean_std(counting, 8, seed=4, max_images=10)
    assert sorted(loads) != first
    x = torch.stack([records.load(i) for i in first]).double() / 255
    assert a[0] == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-9)


def test_imagenet_constants():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
