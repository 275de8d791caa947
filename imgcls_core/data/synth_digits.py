"""A larger digits data set built offline from the real ones: scaled, placed and composed.

    compose_digits(...)        -> N x S x S x 3 uint8 images, labels, source indices (in memory)
    write_synth_digits(out, .) -> Parquet shards <out>/{train,val,test}/part-NNNNN.parquet

Every image holds exactly ONE real handwritten digit of ``sklearn.datasets.load_digits()``
(1,797 8x8 digits), upscaled to a random height of 40-85% of the canvas (bilinear, with a
random aspect of 0.8-1.2 and a random stroke intensity), placed at a random position
(entirely inside the canvas) on a tinted background with a faint brightness gradient. A
few faint distractor strokes (straight segments at <= 30% of the digit's contrast) and
low Gaussian noise are added under it; none of them is a digit, so the label is the
source digit's class and stays true. Images are greyscale content in a random colour
(foreground and background tints), saved as RGB PNG.

The splits never share a source digit: train images are built from the digits of
:func:`imgcls_core.data.digits.digit_splits`' train split only, val from its val split,
test from its test split (the same stratified split the 32x32 digit tree uses). Each
image's source index (into ``load_digits()``) is its ``path`` column,
``digits/<index>/<n>.png``, so provenance can be checked.

Everything is a function of ``seed``: the same arguments write the same bytes (chunks of
images are drawn from ``np.random.default_rng((seed, split, chunk))``, so the result does
not depend on how many processes compose them).
"""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imgcls_core.data.digits import digit_splits
from imgcls_core.data.shards import SplitShards, write_shards

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
DEFAULT_COUNTS = {"train": 50_000, "val": 5_000, "test": 5_000}
DEFAULT_SIZE = 48
#: Rows per Parquet file. A 48 px image is ~3 KB of PNG, so 4,096 rows are ~12 MB: 13 shards
#: for 50k train images. That is enough files for Ray Data to read in parallel and to give each
#: of a few train workers several shards, while every shard still holds hundreds of images of
#: each class (a seeded shuffle of the whole split decides what goes where).
DEFAULT_SHARD_ROWS = 4096
MARKER = "synth.json"
_CHUNK = 512  # images per rng stream / per process task


@dataclass(frozen=True)
class SynthSpec:
    size: int = DEFAULT_SIZE
    seed: int = 0
    distractors: bool = True

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 256:
            raise ValueError(f"size must be 16..256 px, got {self.size}")


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def compose_digits(
    sources: np.ndarray, spec: SynthSpec, rng: np.random.Generator,
    digits: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Compose one image per entry of ``sources`` (indices into ``load_digits()``).

    Returns ``(images N x S x S x 3 uint8, labels N)``; labels are the source digits' classes.
    """
    images8, targets = digits if digits is not None else _digits()
    s = spec.size
    out = np.empty((len(sources), s, s, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / max(s - 1, 1)
    for n, src in enumerate(sources):
        h = int(round(s * rng.uniform(0.40, 0.85)))
        w = int(np.clip(round(h * rng.uniform(0.8, 1.2)), 8, s))
        glyph = np.asarray(
            Image.fromarray(images8[src]).resize((w, h), Image.BILINEAR), dtype=np.float32
        ).clip(0.0, 1.0)
        top, left = int(rng.integers(0, s - h + 1)), int(rng.integers(0, s - w + 1))
        # a faint background gradient, then distractors and noise, then the digit over them
        gx, gy = rng.uniform(-0.08, 0.08, size=2)
        canvas = 0.5 + gx * (xx - 0.5) + gy * (yy - 0.5)
        canvas = canvas - canvas.mean()
        if spec.distractors:
            for _ in range(int(rng.integers(0, 4))):
                _stroke(canvas, rng, amplitude=rng.uniform(0.08, 0.3))
            canvas += rng.normal(0.0, rng.uniform(0.0, 0.04), size=canvas.shape).astype(np.float32)
        ink = rng.uniform(0.6, 1.0)
        region = canvas[top : top + h, left : left + w]
        canvas[top : top + h, left : left + w] = region * (1 - glyph) + ink * glyph
        content = canvas.clip(0.0, 1.0)  # 0 background .. 1 full ink
        bg, fg = _tints(rng)
        rgb = bg[None, None, :] + content[..., None] * (fg - bg)[None, None, :]
        out[n] = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out, targets[np.asarray(sources)]


def _stroke(canvas: np.ndarray, rng: np.random.Generator, amplitude: float) -> None:
    """A straight, thin, faint segment (never a digit shape) added to ``canvas`` in place."""
    s = canvas.shape[0]
    (x0, y0), (x1, y1) = rng.uniform(0, s - 1, size=(2, 2))
    steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.linspace(x0, x1, steps).round().astype(int)
    ys = np.linspace(y0, y1, steps).round().astype(int)
    canvas[ys, xs] += amplitude


def _tints(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background and ink colours (0..1 RGB) with enough contrast: dark ink on light or light on dark."""
    dark = rng.uniform(0.0, 0.3, size=3)
    light = rng.uniform(0.7, 1.0, size=3)
    return (dark, light) if rng.random() < 0.5 else (light, dark)


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def split_sources(count: int, pool: np.ndarray, seed: int, split: str) -> np.ndarray:
    """``count`` source indices drawn from ``pool`` as evenly as possible (every source digit used
    ``count // len(pool)`` or one more times), in a seeded random order."""
    rng = np.random.default_rng((seed, SPLIT_IDS[split], 1_000_003))
    reps = -(-count // len(pool))
    tiled = np.concatenate([rng.permutation(pool) for _ in range(reps)])[:count]
    return rng.permutation(tiled)


def _compose_chunk(args: tuple[np.ndarray, SynthSpec, str, int]) -> list[tuple[bytes, int, str]]:
    sources, spec, split, chunk = args
    rng = np.random.default_rng((spec.seed, SPLIT_IDS[split], chunk))
    images, labels = compose_digits(sources, spec, rng, _cached_digits())
    first = chunk * _CHUNK
    return [
        (encode_png(img), int(y), f"digits/{int(src)}/{first + i}.png")
        for i, (img, y, src) in enumerate(zip(images, labels, sources))
    ]


_DIGITS: tuple[np.ndarray, np.ndarray] | None = None


def _cached_digits() -> tuple[np.ndarray, np.ndarray]:
    global _DIGITS
    if _DIGITS is None:
        _DIGITS = _digits()
    return _DIGITS


def synth_rows(
    split: str, count: int, spec: SynthSpec, split_seed: int = 0, workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[bytes, int, str]]:
    """``(png bytes, label, path)`` rows of one split, in order, composed in ``workers`` processes."""
    pool = digit_splits(split_seed)[split]
    sources = split_sources(count, pool, spec.seed, split)
    tasks = [(sources[i : i + _CHUNK], spec, split, i // _CHUNK) for i in range(0, count, _CHUNK)]
    done = 0
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            for rows in ex.map(_compose_chunk, tasks):
                done += len(rows)
                if progress:
                    progress(done)
                yield from rows
    else:
        for task in tasks:
            rows = _compose_chunk(task)
            done += len(rows)
            if progress:
                progress(done)
            yield from rows


def write_synth_digits(
    out: str | Path,
    counts: dict[str, int] | None = None,
    *,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    distractors: bool = True,
    workers: int = 2,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Write the composed digits as Parquet shards (see the module doc); returns the manifest,
    also saved as ``<out>/synth.json``. A folder whose manifest matches the arguments is
    returned as it is (a second run costs nothing)."""
    out = Path(out)
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    if "train" not in counts or any(s not in SPLIT_IDS or n < 0 for s, n in counts.items()):
        raise ValueError(f"counts must give train (and optionally val/test) >= 0, got {counts}")
    spec = SynthSpec(size, seed, distractors)
    wanted = {"counts": counts, "size": size, "seed": seed, "shard_rows": shard_rows,
              "distractors": distractors, "source": "sklearn.datasets.load_digits", "version": 1}
    manifest_path = out / MARKER
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if {k: manifest.get(k) for k in wanted} == wanted:
            return manifest
    classes = [str(d) for d in range(10)]
    start = time.perf_counter()
    splits: dict[str, dict] = {}
    for split in SPLIT_IDS:  # a split not asked for now must not stay from an earlier request
        stale = out / split
        if counts.get(split, 0) == 0 and stale.is_dir() and all(p.suffix == ".parquet" for p in stale.iterdir()):
            shutil.rmtree(stale)
    for split, count in counts.items():
        if count == 0:
            continue
        t0 = time.perf_counter()

        def progress(done: int, split=split, count=count, t0=t0) -> None:
            if log and (done == count or done % (8 * _CHUNK) == 0):
                rate = done / max(time.perf_counter() - t0, 1e-9)
                log(f"{split}: {done:,}/{count:,} images ({rate:,.0f}/s)")

        written: SplitShards = write_shards(
            synth_rows(split, count, spec, workers=workers, progress=progress),
            out, split, classes, shard_size=shard_rows,
        )
        files = [out / split / f for f in written.shards]
        splits[split] = {"images": written.images, "shards": written.shards,
                         "shard_bytes": [f.stat().st_size for f in files],
                         "class_counts": written.class_counts}
    manifest = {**wanted, "splits": splits, "seconds": round(time.perf_counter() - start, 2)}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest
