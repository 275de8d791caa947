"""Image decoding and in-memory split records (paths, encoded bytes or raw arrays plus labels).

Every path that reads image bytes (prepare, the data sets, Ray Data's decode, ``Predictor``,
the Serve app) goes through :func:`decode_image`, and :func:`decode_image` decodes with Pillow
alone. torchvision's native decoders (``torchvision.io``, 0.29.1) crash the process with a
segmentation fault on any libpng error, e.g. one flipped bit in IDAT (a CRC or zlib checksum):
there is nothing to catch. Pillow decodes with the same libraries (libjpeg-turbo, zlib, libwebp)
but raises on bad data, gives bit-identical pixels on good images, and costs 1.1-1.2x the time
per photo (docs/decoding.md; ``python -m bench.decode``). Untrusted bytes never reach
``torchvision.io``: validating them with Pillow first is not enough (some PNGs that pass
Pillow's ``verify()`` and ``load()`` still crash libpng) and costs a second decode.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    JpegImagePlugin,
    PngImagePlugin,
    PpmImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)
from torch.utils.data import Dataset

Transform = Callable[[torch.Tensor], torch.Tensor]

# The Pillow plugins decode_image may use: the formats the fuzz test covers
# (tests/unit/data/test_decode_fuzz.py) and PPM/PGM (an ImageFolder extension of
# torchvision's). JPEG includes MPO (a JPEG with a second picture; format "MPO"). Pillow's
# other plugins (EPS, PSD, ICO, ...) are less exercised decoders no image folder of ours needs.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM")
# Importing a plugin registers its decoder; without these imports the first Image.open of a
# WebP or TIFF file would import all ~45 of Pillow's plugins (~0.2 s).
_PLUGINS = (BmpImagePlugin, GifImagePlugin, JpegImagePlugin, PngImagePlugin, PpmImagePlugin,
            TiffImagePlugin, WebPImagePlugin)
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
# torchvision applied the EXIF orientation to JPEG and PNG only; so does decode_image.
_EXIF_FORMATS = frozenset({"JPEG", "MPO", "PNG"})
_ORIENTATION = 0x0112  # EXIF tag
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# A progressive JPEG's decoder runs once per scan over the whole image, and libjpeg accepts a
# scan repeated any number of times (with a warning): a 300 KB file of 4,000 repeated scans of a
# 25 M pixel image costs ~9 s of CPU. Encoders write 1 (baseline) to ~10 (libjpeg's progressive
# script) scans; libjpeg-turbo's djpeg and TurboJPEG offer a limit for untrusted input too.
MAX_JPEG_SCANS = 100
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_OTHER_SOF = frozenset({0xC0, 0xC1, 0xC3, 0xC5, 0xC7, 0xC9, 0xCB, 0xCD, 0xCF})
IMBALANCE_RATIO = 3.0
MAX_SUBSTITUTES = 32  # RecordDataset: corrupt records in a row before it gives up


class CorruptImageError(ValueError):
    """The bytes are not a decodable image; the message says why."""


class ImageTooLargeError(CorruptImageError):
    """The image has more pixels than allowed (a decompression-bomb guard)."""


def decode_image(
    src: bytes | bytearray | memoryview | str | Path,
    *,
    max_pixels: int | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """Decode encoded image bytes or an image file to a uint8 ``3 x H x W`` RGB tensor.

    JPEG, PNG, GIF, WebP, BMP, TIFF and PPM are decoded by Pillow. Grey, grey+alpha, RGBA,
    palette and CMYK images become RGB (alpha is dropped), 16-bit grey is scaled to 8 bits
    (the high byte, as torchvision does), the EXIF orientation of a JPEG or PNG is applied,
    and an animated image gives its first frame. The tensor is a channels-first view of
    channels-last memory, as torchvision's decoders return it.

    Raises :class:`CorruptImageError` for empty, truncated, corrupt or non-image data and for
    32-bit integer or float pixels (no defined 8-bit range), and :class:`ImageTooLargeError`
    when the header declares more than ``max_pixels`` pixels (default: Pillow's limit of about
    179 M) or a progressive JPEG has more than :data:`MAX_JPEG_SCANS` scans, before the pixels
    are decoded. The message
    starts with ``name`` (default: the path, for a path) so a log line names the file.
    """
    if isinstance(src, (str, Path)):
        data = Path(src).read_bytes()
        name = str(src) if name is None else name
    else:
        data = bytes(src)
    try:
        return _decode(data, max_pixels)
    except CorruptImageError as exc:
        if name is None:
            raise
        raise type(exc)(f"{name}: {exc}") from None


def _decode(data: bytes, max_pixels: int | None) -> torch.Tensor:
    if not data:
        raise CorruptImageError("empty file")
    with _open(data, max_pixels) as im:
        if max_pixels is not None:
            _check_pixels(*im.size, max_pixels)
        if im.format == "PNG":
            _check_png_crcs(data)
        elif im.format in ("JPEG", "MPO"):
            _check_jpeg_scans(data)
        try:
            rgb = _to_rgb_array(im)
        except Image.DecompressionBombError as exc:  # a later frame or tile can be too large
            raise _too_large(exc, max_pixels) from None
        except CorruptImageError:
            raise
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad data
            raise CorruptImageError(f"truncated or corrupt image: {_reason(exc)}") from None
    return torch.from_numpy(rgb).permute(2, 0, 1)


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height:,} pixels, "
            f"more than the limit of {max_pixels:,}"
        )


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    """The image, opened lazily (header only); CorruptImageError if the header is bad."""
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise _too_large(exc, max_pixels) from None
    except UnidentifiedImageError:
        fmt = _sniff(data)
        if fmt is not None:
            raise CorruptImageError(
                f"truncated or corrupt image: the {fmt} header cannot be read"
            ) from None
        raise CorruptImageError("not a recognised image format") from None  # nor one of FORMATS
    except Exception as exc:
        raise CorruptImageError(f"truncated or corrupt image: {_reason(exc)}") from None


def _too_large(exc: Image.DecompressionBombError, max_pixels: int | None) -> ImageTooLargeError:
    """Pillow's own guard (over 2 x Image.MAX_IMAGE_PIXELS) in our words."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    if found is None:
        return ImageTooLargeError(str(exc))
    limit = max_pixels if max_pixels is not None else 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return ImageTooLargeError(
        f"image is {int(found[1]):,} pixels, more than the limit of {limit:,}"
    )


def _check_png_crcs(data: bytes) -> None:
    """Refuse a PNG chunk whose CRC is wrong, as libpng does: Pillow checks the chunks before
    the image data only, and would decode an IDAT with a bad CRC. Chunks cut short are left
    to Pillow, which reports the truncation. zlib.crc32 runs at over 1 GB/s: ~1% of a decode."""
    view = memoryview(data)
    pos = 8
    while pos + 12 <= len(data):
        length = int.from_bytes(view[pos:pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(data):
            return
        if zlib.crc32(view[pos + 4:end]) != int.from_bytes(view[end:end + 4], "big"):
            ctype = bytes(view[pos + 4:pos + 8]).decode("latin-1")
            raise CorruptImageError(
                f"truncated or corrupt image: PNG chunk {ctype!r} at byte {pos} "
                f"fails its CRC check"
            )
        if view[pos + 4:pos + 8] == b"IEND":
            return
        pos = end + 4


def _check_jpeg_scans(data: bytes) -> None:
    """Refuse a progressive JPEG of more than :data:`MAX_JPEG_SCANS` scans, counted by walking
    its markers (a few µs for a baseline JPEG, which stops at its frame header; ~1 ms per MB of
    a progressive one). Malformed structure is left to Pillow, which reports it."""
    n, pos, scans, progressive = len(data), 2, 0, False
    while pos + 1 < n:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= n:
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x00 or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # stuffed 0xFF, TEM, RSTn
            pos += 2
            continue
        if marker == 0xD9:  # end of image
            return
        if marker in _OTHER_SOF:
            return  # sequential: each component's scan can come once only
        progressive = progressive or marker in _PROGRESSIVE_SOF
        if marker == 0xDA and progressive:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise ImageTooLargeError(
                    f"progressive JPEG with more than {MAX_JPEG_SCANS} scans: each scan decodes the "
                    f"whole image again (encoders write about 10)"
                )
        if pos + 4 > n:
            return
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")  # the segment; a scan's data follows


def _sniff(data: bytes) -> str | None:
    """The format a file claims by its magic bytes."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _reason(exc: Exception) -> str:
    """Pillow's message; the exception type too when it is not one of Pillow's usual ones."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if text and isinstance(exc, (OSError, SyntaxError, ValueError, EOFError)):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Decode the (first) frame to an ``H x W x 3`` uint8 array."""
    im.load()
    fmt = im.format
    if fmt in _EXIF_FORMATS:
        method = _TRANSPOSE.get(_orientation(im))
        if method is not None:
            im = im.transpose(method)
    if im.mode.startswith("I;16") or (im.mode == "I" and fmt in ("PNG", "PPM")):
        # 16-bit grey (Pillow scales a PGM's maxval to 65535): the high byte, 16 -> 8 bits
        grey = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode in ("I", "F") or im.mode.startswith(("I;32", "F;")):
        kind = "float" if im.mode.startswith("F") else "32-bit integer"
        raise CorruptImageError(
            f"unsupported pixels: {kind} grey ({fmt} mode {im.mode}) has no defined 8-bit range; "
            f"save it as 8- or 16-bit"
        )
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # the same colours; P -> RGB directly would warn about the alpha
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.array(im)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8); 1 when there is none or the EXIF block is unreadable,
    as with torchvision, which decoded such images as stored."""
    raw = im.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = int(exif.get(_ORIENTATION, 1))
    except Exception:
        return 1
    return value if value in _TRANSPOSE else 1


@dataclass
class SplitRecords:
    """The images of one split and their labels.

    Each record is read from exactly one of: ``arrays`` (uint8 ``N x 3 x H x W``, e.g.
    CIFAR), ``images`` (encoded bytes, e.g. Parquet shards) or ``paths`` (files on
    disk). ``paths`` is always filled: a file path, the source path stored in a
    shard, or an id such as ``"cifar10/train/123"``.

    ``multi_label``: each label is a set of class indices (a sorted tuple, possibly empty) and
    the dataset yields it as a multi-hot float vector; otherwise one class index per record.
    """

    classes: list[str]
    labels: list[int] | list[tuple[int, ...]]
    paths: list[str]
    images: Sequence[bytes] | None = None
    arrays: np.ndarray | None = field(default=None, repr=False)
    multi_label: bool = False

    def __post_init__(self) -> None:
        if self.multi_label:
            self.labels = [tuple(sorted({int(c) for c in label})) for label in self.labels]
        else:
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
        bad = sorted({c for c in self._flat_labels() if not 0 <= c < len(self.classes)})
        if bad:
            raise ValueError(f"labels {bad} out of range for {len(self.classes)} classes")

    def __len__(self) -> int:
        return len(self.labels)

    def _flat_labels(self) -> list[int]:
        return [c for label in self.labels for c in label] if self.multi_label else list(self.labels)

    def target(self, index: int) -> int | torch.Tensor:
        """Record ``index``'s training target: its class index, or a multi-hot float32 vector."""
        if not self.multi_label:
            return self.labels[index]
        hot = torch.zeros(len(self.classes), dtype=torch.float32)
        hot[list(self.labels[index])] = 1.0
        return hot

    def load(self, index: int) -> torch.Tensor:
        """Record ``index`` as a uint8 ``3 x H x W`` RGB tensor.

        Raises :class:`CorruptImageError` naming the record when it does not decode or, for a
        file on disk, when the file cannot be read."""
        if self.arrays is not None:
            return torch.from_numpy(self.arrays[index].copy())
        if self.images is not None:
            return decode_image(self.images[index], name=self.paths[index])
        path = self.paths[index]
        try:
            data = Path(path).read_bytes()
        except OSError as exc:  # removed, unreadable, an I/O error: the file is lost to this run
            raise CorruptImageError(f"{path}: cannot be read: {exc.strerror or exc}") from None
        return decode_image(data, name=path)

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
            multi_label=self.multi_label,
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
        """Number of records per class index (multi-label: records carrying each class)."""
        return np.bincount(
            np.asarray(self._flat_labels(), dtype=np.int64), minlength=len(self.classes)
        ).tolist()


class SkippedImageWarning(UserWarning):
    """A corrupt record was skipped; the message names the file and why."""


class RecordDataset(Dataset):
    """``(transform(image), label)`` pairs over :class:`SplitRecords`.

    A record that does not decode (:class:`CorruptImageError`; for a file on disk, also one
    that can no longer be read) is skipped, not fatal: its place is taken by the next record
    that decodes (index + 1, + 2, ... wrapping around), with that record's label. The length,
    every batch size and the number of steps per epoch stay as planned, so samplers,
    ``drop_last``, the LR schedule and mid-epoch resume are unaffected. After
    ``MAX_SUBSTITUTES`` corrupt records in a row it raises: the split is broken, not noisy.

    Each skipped file is warned about (SkippedImageWarning, naming it) and not decoded again.
    Two counts: :attr:`skipped` (``{index: reason}``) holds what this process skipped; a
    DataLoader worker fills its own copy, which the main process never sees.
    :attr:`skipped_count` counts the distinct records skipped by this dataset *and* every
    DataLoader worker copy of it (forked or spawned), read from one flag per record in shared
    memory; the flags also keep later epochs' fresh workers from decoding and warning again.
    A copy made with ``pickle`` or ``copy`` counts on its own.
    """

    def __init__(self, records: SplitRecords, transform: Transform | None = None):
        self.records = records
        self.transform = transform
        self.skipped: dict[int, str] = {}
        flags = torch.zeros(len(records), dtype=torch.bool)
        try:
            flags.share_memory_()  # inherited by forked workers, passed by handle to spawned ones
        except RuntimeError:  # no shared memory here: skipped_count then covers this process only
            pass
        self._skipped_flags = flags

    @property
    def skipped_count(self) -> int:
        """Distinct records skipped so far by this dataset and its DataLoader workers."""
        return int(self._skipped_flags.sum())

    @property
    def skipped_mask(self) -> torch.Tensor:
        """A bool per record: skipped so far (here or in a DataLoader worker). An evaluation drops
        these rows: each holds the record that took its place, which would be counted twice."""
        return self._skipped_flags.clone()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        n = len(self.records)
        for k in range(min(n, MAX_SUBSTITUTES + 1)):
            i = (index + k) % n
            if self._skipped_flags[i]:  # skipped here or in another worker
                continue
            try:
                image = self.records.load(i)
            except CorruptImageError as exc:
                self._skip(i, exc)
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, self.records.target(i)
        tries = min(n, MAX_SUBSTITUTES + 1)
        raise CorruptImageError(
            f"{tries} records in a row from index {index} ({self.records.paths[index]}) do not "
            f"decode; check the data (python -m jobs.prepare lists and drops corrupt files)"
        )

    def _skip(self, index: int, exc: CorruptImageError) -> None:
        self.skipped[index] = str(exc)
        self._skipped_flags[index] = True
        warnings.warn(f"skipping a corrupt image: {exc}", SkippedImageWarning, stacklevel=3)


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
                    if name == "train" and not self.train.multi_label
                    else ""
                )
                lines.append(
                    f"warning: {name} is imbalanced: '{self.classes[hi]}' has {cc[hi]:,} images, "
                    f"'{self.classes[lo]}' {cc[lo]:,} ({cc[hi] / cc[lo]:.1f}x){hint}"
                )
        return "\n".join(lines)
