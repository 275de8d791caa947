"""Draw docs/augmentation_grid.png: what each augmentation strength does to real images.

    python docs/make_augmentation_grid.py [--policy trivialaugment] [--draws 6] [--out PATH]

Rows are strengths 0, 0.25, 0.5, 0.75 and 1; columns are independent random
draws of the same four images through ``TrainPreset``: three of scikit-learn's
handwritten digits (8x8, upscaled to 32x32 RGB, at the 32 px training size) and
one colour photo shipped with scikit-learn (``china.jpg``, 427x640, at 64 px so
it stays legible). Grey patches are random erasing (it fills with the mean).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from imgcls_core.data.presets import POLICIES, TrainPreset  # noqa: E402

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # display only: any values undo exactly
DIGIT_SIZE, PHOTO_SIZE = 32, 64


def sample_images() -> tuple[list[torch.Tensor], torch.Tensor]:
    """Three real digits (uint8 3 x 32 x 32) and a real photo (uint8 3 x H x W, not square)."""
    from sklearn.datasets import load_digits, load_sample_image

    digits = load_digits()
    picks = [int((digits.target == d).nonzero()[0][0]) for d in (2, 5, 7)]
    raw = torch.from_numpy(digits.images[picks]).float()[:, None] * (255.0 / 16.0)
    up = F.interpolate(raw, size=(DIGIT_SIZE, DIGIT_SIZE), mode="bilinear", align_corners=False)
    up = up.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    photo = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1).contiguous()
    return list(up), photo


def to_display(x: torch.Tensor, size: int) -> torch.Tensor:
    """Undo Normalize, clip, upscale (nearest) to ``size``: an H x W x 3 tile in [0, 1]."""
    img = (x * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]).clamp(0, 1)
    return F.interpolate(img[None], size=(size, size), mode="nearest")[0].permute(1, 2, 0)


def mosaic(digits: list[torch.Tensor], photo: torch.Tensor) -> torch.Tensor:
    """2 x 2 tiles: three digits and the photo, each PHOTO_SIZE px."""
    tiles = [to_display(t, PHOTO_SIZE) for t in [*digits, photo]]
    line = torch.ones(PHOTO_SIZE, 2, 3)
    top = torch.cat([tiles[0], line, tiles[1]], dim=1)
    bottom = torch.cat([tiles[2], line, tiles[3]], dim=1)
    return torch.cat([top, torch.ones(2, top.shape[1], 3), bottom], dim=0)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policy", choices=POLICIES, default="trivialaugment")
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "augmentation_grid.png"
    )
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    digits, photo = sample_images()
    torch.manual_seed(args.seed)
    fig, axes = plt.subplots(
        len(STRENGTHS), args.draws, figsize=(1.6 * args.draws + 0.6, 1.6 * len(STRENGTHS))
    )
    for row, strength in enumerate(STRENGTHS):
        digit_tf = TrainPreset(DIGIT_SIZE, MEAN, STD, strength, args.policy)
        photo_tf = TrainPreset(PHOTO_SIZE, MEAN, STD, strength, args.policy)
        for col in range(args.draws):
            ax = axes[row, col]
            ax.imshow(mosaic([digit_tf(d) for d in digits], photo_tf(photo)).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"strength {strength:g}")
            if row == 0:
                ax.set_title(f"draw {col + 1}", fontsize=9)
    fig.suptitle(
        f"TrainPreset, policy={args.policy}, hflip off "
        f"(digits at {DIGIT_SIZE} px, photo at {PHOTO_SIZE} px)"
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=66)
    plt.close(fig)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
