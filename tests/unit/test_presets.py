"""Augmentation presets: strength visibly changes real images, strength 0 equals eval."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from imgcls_core.config import AugmentConfig
from imgcls_core.data.presets import (
    AspectRelativeResizedCrop,
    EvalPreset,
    ScaledTrivialAugmentWide,
    TrainPreset,
    build_batch_mix,
    build_eval_transform,
    build_train_transform,
    mix_collate,
    strength_params,
)

# 0.5 is never k/255, so after normalization an exact 0 in all channels can only be erasing's fill.
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SIZE = 32
DRAWS = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Per-image transforms on 32 px tensors gain nothing from intra-op threads, and on a busy
    2-core machine two spinning OpenMP threads made these tests 5-20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """64 real handwritten digits, 0..255, upscaled 8 -> 32 px, as 64 x 3 x 32 x 32 uint8."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images[:64]).float()[:, None] * (255.0 / 16.0)
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return images.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def draw(transform, images: torch.Tensor, seed: int = 0, draws: int = DRAWS) -> torch.Tensor:
    """``draws`` passes of every image through ``transform``: draws x N x 3 x H x W."""
    torch.manual_seed(seed)
    return torch.stack([torch.stack([transform(img) for img in images]) for _ in range(draws)])


def variance_across_draws(batches: torch.Tensor) -> float:
    return batches.var(dim=0).mean().item()


def erased_fraction(batches: torch.Tensor) -> float:
    """Fraction of outputs holding an erased patch (pixels exactly 0 in every channel)."""
    erased = (batches == 0).all(dim=2).flatten(2).any(dim=2)
    return erased.float().mean().item()


def test_strength_zero_without_flip_is_deterministic_and_equals_eval(digits):
    train = draw(TrainPreset(SIZE, MEAN, STD, strength=0.0), digits)
    evaluated = torch.stack([EvalPreset(SIZE, MEAN, STD)(img) for img in digits])
    assert variance_across_draws(train) == 0.0
    assert torch.equal(train[0], evaluated)


def test_strength_one_varies_much_more_than_small_strength(digits):
    variances = {
        s: variance_across_draws(draw(TrainPreset(SIZE, MEAN, STD, strength=s), digits))
        for s in (0.25, 1.0)
    }
    # The eval images have variance ~1.7 after normalization; measured: 0.38 at 0.25, 1.3 at 1.
    assert variances[1.0] > 0.8
    assert variances[1.0] > 2 * variances[0.25] > 0.1


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment", "none"])
def test_every_policy_augments_at_strength_one(digits, policy):
    batches = draw(TrainPreset(SIZE, MEAN, STD, strength=1.0, policy=policy), digits, draws=3)
    assert variance_across_draws(batches) > 0.4  # measured 0.8 (none) .. 1.3 (trivialaugment)


def test_random_erasing_scales_with_strength(digits):
    assert erased_fraction(draw(TrainPreset(SIZE, MEAN, STD, 0.0), digits)) == 0.0
    strong = erased_fraction(draw(TrainPreset(SIZE, MEAN, STD, 1.0, policy="none"), digits))
    assert 0.15 < strong < 0.35  # p = 0.25 over 256 draws


def test_flip_at_strength_zero_only_mirrors(digits):
    plain = torch.stack([EvalPreset(SIZE, MEAN, STD)(img) for img in digits])
    flipped = draw(TrainPreset(SIZE, MEAN, STD, 0.0, hflip=True), digits)
    is_plain = (flipped == plain).flatten(2).all(dim=2)
    is_mirror = (flipped == plain.flip(-1)).flatten(2).all(dim=2)
    assert bool((is_plain | is_mirror).all())
    assert 0.3 < is_mirror.float().mean().item() < 0.7


def test_scaled_trivialaugment_magnitude_grows_with_max_bin(digits):
    def mean_change(max_bin: int) -> float:
        out = draw(ScaledTrivialAugmentWide(max_bin=max_bin), digits, draws=6)
        return (out.float() - digits.float()).abs().mean().item()

    mild, strong = mean_change(3), mean_change(30)
    assert strong > 2 * mild > 0


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment", "none"])
def test_train_output_is_float_square_for_non_square_input(strength, policy):
    image = torch.randint(0, 256, (3, 45, 70), dtype=torch.uint8)
    for inp in (image, tv_tensors.Image(image)):
        out = TrainPreset(SIZE, MEAN, STD, strength, policy, hflip=True)(inp)
        assert type(out) is torch.Tensor
        assert out.dtype == torch.float32
        assert out.shape == (3, SIZE, SIZE)


@pytest.mark.parametrize("crop_ratio", [1.0, 0.875])
def test_eval_output_is_float_square_for_non_square_input(crop_ratio):
    out = build_eval_transform(SIZE, MEAN, STD, crop_ratio)(
        torch.randint(0, 256, (3, 45, 70), dtype=torch.uint8)
    )
    assert type(out) is torch.Tensor
    assert out.dtype == torch.float32
    assert out.shape == (3, SIZE, SIZE)


def test_eval_normalizes_with_mean_and_std():
    white = torch.full((3, 20, 20), 255, dtype=torch.uint8)
    out = EvalPreset(8, MEAN, STD)(white)
    assert torch.allclose(out, torch.full_like(out, (1.0 - 0.5) / 0.25))


def test_aspect_relative_crop_follows_the_input_aspect():
    # Small areas, so near-square crops would fit too and the fallback (whole image) never runs.
    crop = AspectRelativeResizedCrop(SIZE, scale=(0.1, 0.3), ratio=(3 / 4, 4 / 3))
    wide = tv_tensors.Image(torch.zeros(3, 40, 120, dtype=torch.uint8))  # aspect 3
    torch.manual_seed(0)
    aspects = [(p["width"] / p["height"]) for p in (crop.make_params([wide]) for _ in range(200))]
    # Relative: 3 * [3/4, 4/3] = [2.25, 4] (+ rounding); torchvision's absolute: [0.75, 1.33].
    assert min(aspects) > 2.1
    assert max(aspects) <= 4.3


@pytest.mark.parametrize("bad", [-0.01, 1.01, math.nan])
def test_strength_outside_unit_interval_raises(bad):
    with pytest.raises(ValueError, match="strength"):
        strength_params(bad, "trivialaugment")
    with pytest.raises(ValueError, match="strength"):
        TrainPreset(SIZE, MEAN, STD, bad)


def test_unknown_policy_raises():
    with pytest.raises(ValueError, match="autoaugment"):
        strength_params(0.5, "autoaugment")


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment", "none"])
def test_strength_params_grow_monotonically(policy):
    grid = [strength_params(i / 20, policy) for i in range(21)]
    for low, high in zip(grid, grid[1:]):
        for key in ("brightness", "contrast", "saturation", "hue", "magnitude", "erasing_p"):
            assert high[key] >= low[key], key
        assert high["crop_scale"][0] <= low["crop_scale"][0]
        assert high["crop_ratio"][0] <= low["crop_ratio"][0]
        assert high["crop_ratio"][1] >= low["crop_ratio"][1]
    zero, one = grid[0], grid[-1]
    assert not zero["random_crop"]
    assert zero["policy"] == "none"
    assert zero["erasing_p"] == 0 == zero["brightness"]
    assert one["crop_scale"] == pytest.approx((0.35, 1.0))
    assert one["crop_ratio"] == pytest.approx((3 / 4, 4 / 3))
    assert one["magnitude"] == {"trivialaugment": 30, "randaugment": 15, "none": 0}[policy]


def test_build_train_transform_reads_the_config(digits):
    cfg = AugmentConfig(strength=0.0, policy="randaugment", hflip=False)
    preset = build_train_transform(SIZE, MEAN, STD, cfg)
    assert preset.params == strength_params(0.0, "randaugment")
    assert torch.equal(preset(digits[0]), EvalPreset(SIZE, MEAN, STD)(digits[0]))


def test_batch_mix_is_none_without_alphas():
    assert build_batch_mix(AugmentConfig(mixup_alpha=0.0, cutmix_alpha=0.0), 10) is None


@pytest.mark.parametrize(
    ("mixup", "cutmix", "kind"),
    [(0.2, 0.0, v2.MixUp), (0.0, 1.0, v2.CutMix), (0.2, 1.0, v2.RandomChoice)],
)
def test_batch_mix_gives_soft_labels_summing_to_one(digits, mixup, cutmix, kind):
    mix = build_batch_mix(AugmentConfig(mixup_alpha=mixup, cutmix_alpha=cutmix), num_classes=10)
    assert isinstance(mix, kind)
    images = (
        EvalPreset(SIZE, MEAN, STD)(digits[0])[None].repeat(8, 1, 1, 1)
        + torch.arange(8.0)[:, None, None, None]
    )
    labels = torch.arange(8)
    torch.manual_seed(0)
    mixed, soft = mix(images, labels)
    assert soft.shape == (8, 10)
    assert soft.dtype == torch.float32
    assert torch.allclose(soft.sum(dim=1), torch.ones(8))
    assert (soft.max(dim=1).values < 1).all()  # every sample got some of its neighbour's label
    assert mixed.shape == images.shape
    assert not torch.equal(mixed, images)


def test_mix_collate_pickles_and_mixes(digits):
    collate = mix_collate(build_batch_mix(AugmentConfig(mixup_alpha=0.4), num_classes=10))
    restored = pickle.loads(pickle.dumps(collate))
    samples = [(EvalPreset(SIZE, MEAN, STD)(img), i % 10) for i, img in enumerate(digits[:6])]
    images, soft = restored(samples)
    assert images.shape == (6, 3, SIZE, SIZE)
    assert soft.shape == (6, 10)
    assert torch.allclose(soft.sum(dim=1), torch.ones(6))
    plain_images, plain_labels = mix_collate(None)(samples)
    assert plain_labels.tolist() == [0, 1, 2, 3, 4, 5]


def test_presets_pickle_for_dataloader_workers(digits):
    preset = pickle.loads(pickle.dumps(TrainPreset(SIZE, MEAN, STD, 1.0)))
    assert preset(digits[0]).shape == (3, SIZE, SIZE)


def test_gray_aware_color_jitter_skips_hue_and_saturation_on_grey_images_only():
    """Grey images: the same output as ColorJitter up to uint8 rounding (saturation and hue are no-ops
    on grey); colour images: exactly ColorJitter's output for the same random draws."""
    from imgcls_core.data.presets import GrayAwareColorJitter

    ours, stock = GrayAwareColorJitter(0.5, 0.5, 0.5, 0.2), v2.ColorJitter(0.5, 0.5, 0.5, 0.2)
    grey = torch.randint(0, 256, (1, 16, 16), dtype=torch.uint8).expand(3, 16, 16).contiguous()
    colour = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    for seed in range(20):
        torch.manual_seed(seed)
        a = ours(grey)
        torch.manual_seed(seed)
        b = stock(grey)
        assert (a.int() - b.int()).abs().max() <= 2
        assert torch.equal(a[0], a[1]) and torch.equal(a[1], a[2])  # still grey
        torch.manual_seed(seed)
        c = ours(colour)
        torch.manual_seed(seed)
        assert torch.equal(c, stock(colour))


def test_train_preset_uses_the_gray_aware_jitter():
    from imgcls_core.data.presets import GrayAwareColorJitter

    preset = TrainPreset(16, (0.5,) * 3, (0.25,) * 3, strength=0.2)
    assert any(isinstance(t, GrayAwareColorJitter) for t in preset.transforms)


@pytest.mark.parametrize("crop_ratio", [1.0, 0.875])
@pytest.mark.parametrize("shape", [(3, 1, 2_000_000), (3, 2_000_000, 1), (3, 40, 9_000)])
def test_eval_cost_is_bounded_by_the_pixels_whatever_the_aspect_ratio(crop_ratio, shape):
    """A valid image of extreme shape (a few-KB PNG can be 1 x 2,000,000) reaches the resize with its
    long side at most MAX_ASPECT x its short side; before, the centre-crop preset asked a 32 x 64 M
    resize of it (about 20 GB) and the squash preset a 32 x 2 M intermediate."""
    from imgcls_core.data.presets import MAX_ASPECT, BoundAspect

    preset = build_eval_transform(32, [128 / 255] * 3, [0.25] * 3, crop_ratio)
    seen = []

    def check(module, args):
        h, w = args[0].shape[-2:]
        assert max(h, w) <= MAX_ASPECT * min(h, w), f"{type(module).__name__} got {h} x {w}"
        seen.append(type(module).__name__)

    for step in preset.transforms:  # every step after the bound, before it runs
        if isinstance(step, (v2.Resize, v2.CenterCrop)):
            step.register_forward_pre_hook(check)
    out = preset(torch.full(shape, 128, dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and "Resize" in seen
    assert torch.allclose(out, torch.zeros_like(out), atol=1e-5)  # uniform grey 128 at the mean: zeros
    assert any(isinstance(step, BoundAspect) for step in preset.transforms)


def test_images_within_the_aspect_bound_are_transformed_exactly_as_before():
    from imgcls_core.data.presets import MAX_ASPECT, BoundAspect

    image = torch.randint(0, 256, (3, 40, 40 * MAX_ASPECT), dtype=torch.uint8)
    assert BoundAspect()(image) is image
    wide = torch.randint(0, 256, (3, 10, 1000), dtype=torch.uint8)
    assert BoundAspect(crop=True)(wide).shape == (3, 10, 10 * MAX_ASPECT)
    assert torch.equal(BoundAspect(crop=True)(wide), wide[:, :, 460:540])  # the centre
    assert BoundAspect()(wide).shape == (3, 10, 10 * MAX_ASPECT)  # squash mode: resized, all of it kept
