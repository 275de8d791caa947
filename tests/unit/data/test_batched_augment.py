"""augment.batched: BatchAugment on whole uint8 batches and MemoryTrainBatches (images decoded once)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imgcls_core.config import ConfigError, load_config
from imgcls_core.data import load_dataset
from imgcls_core.data.loaders import MemoryTrainBatches, train_loader
from imgcls_core.data.preprocessing import build_preprocessing
from imgcls_core.data.presets import BatchAugment

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def normalized(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_strength_zero_is_a_plain_normalize_and_any_input_size_comes_out_at_size():
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    assert torch.allclose(BatchAugment(16, MEAN, STD, strength=0.0)(images), normalized(images), atol=1e-5)
    for h, w in ((8, 8), (40, 24)):
        out = BatchAugment(16, MEAN, STD, strength=0.5)(torch.randint(0, 256, (3, 3, h, w), dtype=torch.uint8))
        assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32


def test_hflip_alone_mirrors_about_half_of_the_samples_exactly():
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    out = BatchAugment(16, MEAN, STD, strength=0.0, hflip=True)(images)
    plain, mirrored = normalized(images), normalized(images.flip(-1))
    same = [torch.allclose(o, p, atol=1e-4) for o, p in zip(out, plain)]
    flipped = [torch.allclose(o, m, atol=1e-4) for o, m in zip(out, mirrored)]
    assert all(s or f for s, f in zip(same, flipped))
    assert 16 <= sum(flipped) <= 48


def test_augmentation_is_random_per_sample_and_reproducible_from_a_generator():
    one = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8).expand(32, 3, 16, 16)
    augment = BatchAugment(16, MEAN, STD, strength=0.8)
    out = augment(one, generator=torch.Generator().manual_seed(3))
    assert len({tuple(o.flatten()[:64].tolist()) for o in out}) == 32  # every copy of the image differs
    assert torch.equal(out, augment(one, generator=torch.Generator().manual_seed(3)))
    assert out.abs().max() < 10  # clamped to [0, 1] before normalizing


def test_crop_scale_zooms_in_and_erasing_fills_with_the_mean_colour():
    ramp = torch.arange(32, dtype=torch.uint8).mul(8).view(1, 1, 1, 32).expand(16, 3, 32, 32).contiguous()
    augment = BatchAugment(32, MEAN, STD, strength=1.0)
    augment.params = {**augment.params, "brightness": 0.0, "contrast": 0.0, "erasing_p": 0.0}
    out = augment(ramp, generator=torch.Generator().manual_seed(0))
    full_range = normalized(ramp)[0, 0, 0].max() - normalized(ramp)[0, 0, 0].min()
    ranges = out[:, 0, 16].max(dim=1).values - out[:, 0, 16].min(dim=1).values
    assert (ranges < full_range - 0.05).sum() >= 8  # a crop narrower than the image spans less of the ramp
    augment.params = {**augment.params, "random_crop": False, "erasing_p": 1.0}
    erased = augment(ramp, generator=torch.Generator().manual_seed(0))
    assert all((e == 0).all(dim=0).sum() >= 1 for e in erased)  # a rectangle at the (normalized) mean, 0


def test_a_batch_that_is_not_n_x_3_x_h_x_w_is_refused():
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        BatchAugment(16, MEAN, STD)(torch.zeros(3, 16, 16, dtype=torch.uint8))


def test_batched_needs_policy_none_and_no_weighted_sampler():
    with pytest.raises(ConfigError, match="augment.policy=none"):
        load_config(None, ["augment.batched=true"])
    with pytest.raises(ConfigError, match="weighted_sampler"):
        load_config(None, ["augment.batched=true", "augment.policy=none", "data.balance=weighted_sampler"])


@pytest.fixture
def folder_cfg(image_folder):
    root = image_folder({"train": {"a": 13, "b": 12}, "test": {"a": 2, "b": 2}})
    return load_config(None, [f"data.root={root}", "data.format=imagefolder", "data.image_size=8",
                              "data.batch_size=4", "data.val_fraction=0.2", "augment.batched=true",
                              "augment.policy=none", "augment.strength=0.3"])


def test_memory_batches_decode_once_and_cover_the_split_every_epoch(folder_cfg):
    splits = load_dataset(folder_cfg.data)
    pre = build_preprocessing(folder_cfg, splits)
    batches = train_loader(folder_cfg, splits.train, pre)
    assert isinstance(batches, MemoryTrainBatches)
    n = len(splits.train)
    assert batches.images.shape == (n, 3, 8, 8) and batches.images.dtype == torch.uint8
    assert len(batches) == n // 4  # drop_last
    # the uint8 images are the eval geometry of the decoded files, before normalization
    first = splits.train.load(0)
    expected = F.interpolate(first.float()[None] / 255, size=(8, 8), mode="bilinear", antialias=True)
    assert (batches.images[0].float() / 255 - expected[0]).abs().max() < 2 / 255

    def epoch(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(seed)  # the engine reseeds the global RNG every epoch
        pairs = list(batches)
        return [p[0] for p in pairs], [p[1] for p in pairs]

    images_a, labels_a = epoch(1)
    images_b, labels_b = epoch(1)
    assert all(torch.equal(x, y) for x, y in zip(images_a, images_b))  # a resumed epoch repeats exactly
    assert all(x.shape == (4, 3, 8, 8) for x in images_a)
    assert sorted(torch.cat(labels_a).tolist()) != [] and len(torch.cat(labels_a)) == (n // 4) * 4
    _, labels_c = epoch(2)
    assert [t.tolist() for t in labels_a] != [t.tolist() for t in labels_c]  # a new order per epoch


def test_ranks_take_disjoint_equal_shares_of_one_permutation_per_epoch(folder_cfg):
    splits = load_dataset(folder_cfg.data)
    pre = build_preprocessing(folder_cfg, splits)
    ranks = [train_loader(folder_cfg, splits.train, pre, rank=r, world=2) for r in (0, 1)]
    with pytest.raises(RuntimeError, match="set_epoch"):
        next(iter(ranks[0]))
    seen = []
    for epoch in (0, 1):
        shares = []
        for loader in ranks:
            loader.set_epoch(epoch)
            torch.manual_seed(10 + loader.rank)  # per-rank augmentation streams, as the engine seeds them
            order = torch.randperm(len(loader.images), generator=torch.Generator().manual_seed(
                loader.seed * 100_003 + epoch))
            mine = order[loader.rank::2][: loader.per_rank]
            labels = torch.cat([y for _, y in loader])
            assert torch.equal(labels, loader.labels[mine[: len(labels)]])
            shares.append(set(mine[: len(labels)].tolist()))
        assert not shares[0] & shares[1] and len(ranks[0]) == len(ranks[1])
        seen.append(shares[0])
    assert seen[0] != seen[1]
