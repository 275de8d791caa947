"""A real multi-label data set, built offline: 2-4 of scikit-learn's handwritten digits composed
into one 32x32 image, labelled with the set of digits present.

Each image is a 2 x 2 grid of 16 px cells; 2, 3 or 4 random cells hold a digit (8x8 -> 16 px,
bilinear), the others stay black. The digits of a split come only from the same split of
:func:`imgcls_core.data.digits.digit_splits` (no handwritten digit is in two splits), and a digit
drawn twice counts once in the label set. Written as a multi-label image folder::

    <root>/{train,val,test}/<n>.png
    <root>/labels.csv      path,labels   e.g.  train/00012.png,1 4 7
    <root>/classes.json    the ten digits, "0".."9"
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from imgcls_core.data.digits import MARKER, build_once, digit_splits

SIZE = 32
CELL = SIZE // 2
COUNTS = {"train": 2000, "val": 300, "test": 300}
CLASSES = [str(d) for d in range(10)]


def materialize_multi_digits(root: str | Path, seed: int = 0) -> Path:
    """Write the composed data set under ``root`` (see the module docstring) and return ``root``.

    Built once (:func:`~imgcls_core.data.digits.build_once`); a finished tree is returned as it is."""
    root = Path(root)
    if root.exists() and not (root / MARKER).is_file() and any(root.iterdir()):
        raise ValueError(f"{root} exists and is not a multi_digits folder (no {MARKER}); choose another data.root")
    return build_once(root, lambda tmp: _build(tmp, seed))


def compose_images(digits: np.ndarray, classes: np.ndarray, rng: np.random.Generator,
                   count: int) -> tuple[np.ndarray, list[list[int]]]:
    """``count`` images (``N x 32 x 32 x 3`` uint8) composed from ``digits`` (``M x 16 x 16`` uint8) of
    ``classes`` (``M``), and the sorted set of classes in each."""
    images = np.zeros((count, SIZE, SIZE, 3), dtype=np.uint8)
    labels: list[list[int]] = []
    for n in range(count):
        k = int(rng.integers(2, 5))
        cells = rng.choice(4, size=k, replace=False)
        picks = rng.integers(0, len(digits), size=k)
        for cell, pick in zip(cells, picks):
            top, left = (cell // 2) * CELL, (cell % 2) * CELL
            images[n, top:top + CELL, left:left + CELL] = digits[pick][..., None]
        labels.append(sorted({int(classes[p]) for p in picks}))
    return images, labels


def _cells() -> tuple[np.ndarray, np.ndarray]:
    """Every digit of ``load_digits()`` at 16 x 16 (uint8, 0..255) and its class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32))[:, None] * (255.0 / 16.0)
    x = F.interpolate(x, size=(CELL, CELL), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy(), d.target.astype(np.int64)


def _build(tmp: Path, seed: int) -> None:
    digits, classes = _cells()
    rows = ["path,labels"]
    for offset, (split, indices) in enumerate(digit_splits(seed).items()):
        rng = np.random.default_rng([seed, offset])
        images, labels = compose_images(digits[indices], classes[indices], rng, COUNTS[split])
        (tmp / split).mkdir(parents=True)
        for n, (image, label) in enumerate(zip(images, labels)):
            name = f"{split}/{n:05d}.png"
            Image.fromarray(image, "RGB").save(tmp / name)
            rows.append(f"{name},{' '.join(CLASSES[c] for c in label)}")
    (tmp / "labels.csv").write_text("\n".join(rows) + "\n")
    (tmp / "classes.json").write_text(json.dumps({"classes": CLASSES,
                                                  "class_to_idx": {c: i for i, c in enumerate(CLASSES)}}))
    marker = {"seed": seed, "counts": COUNTS, "size": SIZE,
              "source": "sklearn.datasets.load_digits, 2-4 digits per image"}
    (tmp / MARKER).write_text(json.dumps(marker, indent=1))
