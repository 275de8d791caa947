"""Real image bytes (written with PIL) and ImageFolder trees for the data tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **kwargs) -> bytes:
    """``H x W x 3`` uint8 -> encoded bytes (optionally converted to ``mode`` first)."""
    image = Image.fromarray(array, "RGB")
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def random_rgb(
    rng: np.random.Generator, height: int = 12, width: int = 10, base: int | None = None
) -> np.ndarray:
    """Smooth-ish random colour image; ``base`` shifts the mean colour (to make classes differ)."""
    noise = rng.integers(0, 64, (height, width, 3))
    offset = (
        rng.integers(0, 192, 3) if base is None else np.array([base, 255 - base, base // 2]) * 0.75
    )
    return (noise + offset).clip(0, 255).astype(np.uint8)


def make_image_folder(root: Path, layout: dict[str, dict[str, int]], seed: int = 0) -> Path:
    """Write ``layout[split][class]`` real images to ``root/split/class/``; PNG/JPEG alternate."""
    rng = np.random.default_rng(seed)
    for split, classes in layout.items():
        for k, (name, n) in enumerate(sorted(classes.items())):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                array = random_rgb(rng, 10 + i % 5, 8 + i % 3, base=40 * k)
                if i % 2:
                    (folder / f"{split}_{i:03d}.jpg").write_bytes(encode(array, "JPEG", quality=95))
                else:
                    (folder / f"{split}_{i:03d}.png").write_bytes(encode(array, "PNG"))
    return root
