"""scikit-learn's digits (1,797 real 8x8 handwritten digits) as a 32x32 RGB ImageFolder tree."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MARKER = ".complete.json"
SIZE = 32
COUNTS = {"train": 1259, "val": 179, "test": 359}


def materialize_digits(root: str | Path, seed: int = 0) -> Path:
    """Write the digits to ``<root>/{train,val,test}/<digit>/<index>.png`` and return ``root``.

    Images are upscaled 8 -> 32 px (bilinear), scaled 0..16 -> 0..255 and saved as RGB
    PNGs; ``index`` is the position in ``load_digits()``. The split is stratified and
    fixed by ``seed``: 1259 train / 179 val / 359 test. A finished tree carries
    ``<root>/.complete.json`` (counts and seed) and is returned at once, as it is, whatever
    ``seed`` it was written with; the tree is built in a temporary folder and renamed into
    place, so an interrupted run leaves nothing half-written.
    """
    root = Path(root)
    if root.exists() and not (root / MARKER).is_file() and not _is_partial_digits_tree(root):
        raise ValueError(
            f"{root} exists and is not a digits folder (no {MARKER}); choose another data.root"
        )
    return build_once(root, lambda tmp: _build(tmp, seed))


def build_once(root: Path, build: Callable[[Path], None]) -> Path:
    """``root`` as ``build`` writes it (a tree with ``<root>/.complete.json``), built once: in a
    temporary folder renamed into place, so an interrupted build leaves nothing half-written and a
    finished tree (another process's included) is returned as it is. What is at ``root`` before
    (an interrupted tree) is replaced."""
    if (root / MARKER).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        build(tmp)
        if root.exists():
            shutil.rmtree(root)
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (root / MARKER).is_file():  # another process finished first
            return root
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def digit_splits(seed: int = 0) -> dict[str, np.ndarray]:
    """Sorted ``load_digits()`` indices of each split (1259/179/359, stratified by digit)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=COUNTS["test"], stratify=y, random_state=seed)
    train, val = train_test_split(
        rest, test_size=COUNTS["val"], stratify=y[rest], random_state=seed
    )
    splits = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
    assert {k: len(v) for k, v in splits.items()} == COUNTS, {k: len(v) for k, v in splits.items()}
    return splits


def upscale_digits(images: np.ndarray) -> np.ndarray:
    """``N x 8 x 8`` values 0..16 -> ``N x 32 x 32 x 3`` uint8 RGB (bilinear)."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None] * (255.0 / 16.0)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    grey = x.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    return np.repeat(grey[..., None], 3, axis=-1)


def _build(tmp: Path, seed: int) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = upscale_digits(digits.images)
    for split, indices in digit_splits(seed).items():
        for digit in range(10):
            (tmp / split / str(digit)).mkdir(parents=True)
        for i in indices:
            Image.fromarray(pixels[i], "RGB").save(
                tmp / split / str(int(digits.target[i])) / f"{i}.png"
            )
    marker = {
        "seed": seed,
        "counts": COUNTS,
        "size": SIZE,
        "source": "sklearn.datasets.load_digits",
    }
    (tmp / MARKER).write_text(json.dumps(marker, indent=1))


def _is_partial_digits_tree(root: Path) -> bool:
    """True for an empty folder or one holding only split/digit folders of PNGs (interrupted)."""
    if not root.is_dir():
        return False
    for split in root.iterdir():
        if split.name not in COUNTS or not split.is_dir():
            return False
        for digit in split.iterdir():
            if digit.name not in {str(d) for d in range(10)} or not digit.is_dir():
                return False
            if any(f.suffix != ".png" for f in digit.iterdir()):
                return False
    return True
