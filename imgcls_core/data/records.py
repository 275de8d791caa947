"""Image decoding and in-memory split records (paths, encoded bytes or raw arrays plus labels)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as _tv_decode_image
from torchvision.transforms.v2.functional import to_dtype

Transform = Callable[[torch.Tensor], torch.Tensor]

# Formats torchvision's native decoders handle; everything else goes through PIL.
_TORCHVISION_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
IMBALANCE_RATIO = 3.0


class CorruptImageError(ValueError):
    """The bytes are not a decodable image; the message says why."""


class ImageTooLargeError(CorruptImageError):
    """The image has more pixels than allowed (a decompression-bomb guard)."""


def decode_image(
    src: bytes | bytearray | memoryview | str | Path, *, max_pixels: int | None = None
) -> torch.Tensor:
    """Decode encoded image bytes or an image file to a uint8 ``3 x H x W`` RGB tensor.

    JPEG, PNG and WebP use torchvision's decoders; other formats (GIF, BMP, TIFF, ...)
    fall back to PIL. Grey, grey+alpha, RGBA, palette and CMYK images become RGB (alpha
    is dropped), 16-bit PNGs are scaled to 8 bits, the EXIF orientation of a photo is
    applied, and an animated image gives its first frame. Raises :class:`CorruptImageError` for empty, truncated or non-image
    data and :class:`ImageTooLargeError` when the header declares more than
    ``max_pixels`` pixels, before the pixels are decoded.
    """
    data = Path(src).read_bytes() if isinstance(src, (str, Path)) else bytes(src)
    if not data:
        raise CorruptImageError("empty file")
    fmt, size = _probe(data, max_pixels)
    if fmt in _TORCHVISION_FORMATS or fmt is None:
        image = _decode_torchvision(data, known_format=fmt is not None)
    else:
        image = _decode_pil(data)
    if max_pixels is not None and size is None:
        _check_pixels(image.shape[-1], image.shape[-2], max_pixels)
    return image


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height:,} pixels, "
            f"more than the limit of {max_pixels:,}"
        )


def _probe(data: bytes, max_pixels: int | None) -> tuple[str | None, tuple[int, int] | None]:
    """Format and size from the header alone (PIL opens lazily); (None, None) if PIL can't tell."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt, size = im.format, im.size
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        if found is None:
            raise ImageTooLargeError(str(exc)) from None
        limit = max_pixels if max_pixels is not None else 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ImageTooLargeError(
            f"image is {int(found[1]):,} pixels, more than the limit of {limit:,}"
        ) from None
    except UnidentifiedImageError:
        fmt = _sniff(data)
        if fmt is not None:
            raise CorruptImageError(
                f"truncated or corrupt image: the {fmt} header cannot be read"
            ) from None
        return None, None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImageError(f"truncated or corrupt image: {exc}") from None
    if max_pixels is not None:
        _check_pixels(*size, max_pixels)
    return fmt, size


def _sniff(data: bytes) -> str | None:
    """The format a file claims by its magic bytes."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _decode_torchvision(data: bytes, *, known_format: bool) -> torch.Tensor:
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        image = _tv_decode_image(buffer, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError) as exc:
        if not known_format:
            raise CorruptImageError("not a recognised image format") from None
        raise CorruptImageError(f"truncated or corrupt image: {_native_reason(exc)}") from None
    if image.ndim == 4:  # animated image: keep the first frame
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNG: scale to 8 bits like every other input
        image = to_dtype(image, torch.uint8, scale=True)
    return image


def _native_reason(exc: Exception) -> str:
    """The message of a torchvision C++ error without its source location."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if ".cpp:" in msg:
        msg = msg.split(".cpp:", 1)[1].partition(", ")[2] or msg
    return msg


def _decode_pil(data: bytes) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)
            rgb = im.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImageError(f"truncated or corrupt image: {exc}") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


@dataclass
class SplitRecords:
    """The images of one split and their labels.

    Each record is read from exactly one of: ``arrays`` (uint8 ``N x 3 x H x W``, e.g.
    CIFAR), ``images`` (encoded bytes, e.g. Parquet shards) or ``paths`` (files on
    disk). ``paths`` is always filled: a file path, the source path stored in a
    shard, or an id such as ``"cifar10/train/123"``.
    """

    classes: list[str]
    labels: list[int]
    paths: list[str]
    images: Sequence[bytes] | None = None
    arrays: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.labels = [int(label) for label in self.labels]
        self.paths = [str(p) for p in self.paths]
        n = len(self.labels)
        if len(self.paths) != n:
            raise ValueError(f"{len(self.paths)} paths for {n} labels")
        if self.images is not None and len(self.images) != n:
            raise ValueError(f"{len(self.images)} images for {n} labels")
        if self.arrays is not None and (
            self.arrays.dtype != np.uint8 or self.arrays.ndim != 4 or len(self.arrays) != n
        ):
            raise ValueError(
                f"arrays must be uint8 N x 3 x H x W with N={n}, "
                f"got {self.arrays.dtype} {self.arrays.shape}"
            )
        bad = sorted({label for label in self.labels if not 0 <= label < len(self.classes)})
        if bad:
            raise ValueError(f"labels {bad} out of range for {len(self.classes)} classes")

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> torch.Tensor:
        """Record ``index`` as a uint8 ``3 x H x W`` RGB tensor."""
        if self.arrays is not None:
            return torch.from_numpy(self.arrays[index].copy())
        if self.images is not None:
            return decode_image(self.images[index])
        return decode_image(self.paths[index])

    def dataset(self, transform: Transform | None = None) -> RecordDataset:
        """A map-style Dataset of ``(transform(uint8 CHW image), label)``; picklable."""
        return RecordDataset(self, transform)

    def subset(self, indices: Sequence[int] | np.ndarray) -> SplitRecords:
        """The records at ``indices``, in that order."""
        idx = [int(i) for i in indices]
        return SplitRecords(
            classes=list(self.classes),
            labels=[self.labels[i] for i in idx],
            paths=[self.paths[i] for i in idx],
            images=None if self.images is None else [self.images[i] for i in idx],
            arrays=None if self.arrays is None else self.arrays[np.asarray(idx, dtype=np.int64)],
        )

    def fingerprint(self) -> str:
        """SHA-256 of the class names, labels and every image's bytes: the same split, the same hash."""
        digest = hashlib.sha256(json.dumps([self.classes, self.labels]).encode())
        for index in range(len(self)):
            if self.arrays is not None:
                digest.update(np.ascontiguousarray(self.arrays[index]).tobytes())
            elif self.images is not None:
                digest.update(self.images[index])
            else:
                digest.update(Path(self.paths[index]).read_bytes())
        return digest.hexdigest()

    def class_counts(self) -> list[int]:
        """Number of records per class index."""
        return np.bincount(
            np.asarray(self.labels, dtype=np.int64), minlength=len(self.classes)
        ).tolist()


class RecordDataset(Dataset):
    """``(transform(image), label)`` pairs over :class:`SplitRecords`."""

    def __init__(self, records: SplitRecords, transform: Transform | None = None):
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.records.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.records.labels[index]


@dataclass
class DatasetSplits:
    """Train, validation and (optional) test records sharing one class list."""

    train: SplitRecords
    val: SplitRecords
    test: SplitRecords | None
    classes: list[str]

    def splits(self) -> dict[str, SplitRecords]:
        named = {"train": self.train, "val": self.val}
        if self.test is not None:
            named["test"] = self.test
        return named

    def summary(self, max_classes: int = 40) -> str:
        """Images per class and split, totals, and a warning for imbalanced or missing classes."""
        named = self.splits()
        counts = {name: records.class_counts() for name, records in named.items()}
        width = max([len("class"), len("total"), *(len(c) for c in self.classes)])
        cols = [max(len(name), len(f"{len(r):,}")) for name, r in named.items()]
        lines = [f"{len(self.classes)} classes; images per class and split:"]
        lines.append(
            "  ".join([f"{'class':<{width}}", *(f"{n:>{w}}" for n, w in zip(named, cols))])
        )
        rows = list(range(len(self.classes)))
        hidden = 0
        if len(rows) > max_classes:
            hidden = len(rows) - max_classes
            rows = rows[: max_classes // 2] + rows[-(max_classes - max_classes // 2) :]
        for k, c in enumerate(rows):
            if hidden and k == max_classes // 2:
                lines.append(f"... {hidden} more classes")
            lines.append(
                "  ".join(
                    [
                        f"{self.classes[c]:<{width}}",
                        *(f"{counts[n][c]:>{w},}" for n, w in zip(named, cols)),
                    ]
                )
            )
        lines.append(
            "  ".join(
                [f"{'total':<{width}}", *(f"{len(r):>{w},}" for r, w in zip(named.values(), cols))]
            )
        )
        for name, cc in counts.items():
            missing = [self.classes[i] for i, n in enumerate(cc) if n == 0]
            if missing:
                shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
                lines.append(f"warning: {name} has no images of {len(missing)} class(es): {shown}")
                continue
            hi, lo = int(np.argmax(cc)), int(np.argmin(cc))
            if cc[hi] > IMBALANCE_RATIO * cc[lo]:
                hint = (
                    "; consider data.balance=weighted_loss or weighted_sampler"
                    if name == "train"
                    else ""
                )
                lines.append(
                    f"warning: {name} is imbalanced: '{self.classes[hi]}' has {cc[hi]:,} images, "
                    f"'{self.classes[lo]}' {cc[lo]:,} ({cc[hi] / cc[lo]:.1f}x){hint}"
                )
        return "\n".join(lines)
