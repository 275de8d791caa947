"""Malformed image files derived from real ones, and a way to decode them that survives a crash.

    corpus = build_corpus()               # ~3,900 Variants, byte-for-byte the same every run
    results = run_isolated(corpus)        # each decoded in a child process: one Outcome each
    print(summarize(results))             # counts by format and outcome

The seeds are real pixels: scikit-learn's handwritten digits and its two sample photos
(china.jpg, flower.jpg), encoded by Pillow as PNG, JPEG, GIF, WebP, BMP, TIFF and PPM in
several flavours (palette, grey, 16-bit, alpha, progressive, CMYK, EXIF, animated, LZW,
deflate, packbits, ...). Each seed is parsed into its structures (PNG chunks, JPEG marker
segments, GIF blocks, RIFF chunks, BMP headers, TIFF IFD entries, PPM header fields) and
every structure gets: bit flips (in its data, type, length and checksum; PNG also with the
CRC recomputed so the corrupt data reaches the decoder), truncations at and around its
boundaries, its length field set to extremes, removal, duplication and a swap with its
neighbour, and header fields (dimensions, bit depth, components, compression, ...) set to
extremes, e.g. a 65535 x 65535 header over a 200-byte body. Seeded random flips and
overwrites come on top. No randomness is unseeded, so a failure names a variant that the
next run rebuilds identically.

``run_isolated`` keeps a few worker processes (``python -m tests.fuzz_corpus worker``), hands
each one variant at a time and reads back one JSON line per variant. A worker that dies is
recorded as a crash (with its signal and stderr) and restarted; one that does not answer
within ``timeout_s`` is killed and recorded as a hang. So a segfault in a native decoder
is a test failure naming the input, not a dead test run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp",
              "TIFF": "tif", "PPM": "ppm"}
EXTREME_U32 = (0, 1, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF)
EXTREME_U16 = (0, 1, 0x7FFF, 0xFFFF)
# "Huge declared dimensions": over Pillow's 179 M pixel bomb limit, and big but allowed.
HUGE_DIMS = ((0, 0), (0, 32), (32, 0), (65535, 65535), (0x7FFF_FFFF, 1), (1, 0x7FFF_FFFF),
             (40000, 40000), (4096, 4096), (30000, 1))


@dataclass(frozen=True)
class Variant:
    name: str  # <seed>/<structure>/<mutation>, unique
    fmt: str  # the seed's format: PNG, JPEG, GIF, WEBP, BMP, TIFF, PPM
    data: bytes


@dataclass
class Outcome:
    name: str
    fmt: str
    outcome: str  # decoded | CorruptImageError | ImageTooLargeError | crash | hang | other
    detail: str = ""  # the exception message, the tensor shape, or the signal and stderr tail
    cpu_s: float = 0.0  # CPU time of the decode in the worker (not affected by machine load)
    wall_s: float = 0.0


# --------------------------------------------------------------------------- seeds (real pixels)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def real_images(photo_size: tuple[int, int] = (72, 48)) -> dict[str, Image.Image]:
    """Two handwritten digits (32x32, as materialize_digits writes them) and the two photos
    scikit-learn ships, scaled down to ``photo_size`` so a decode takes well under 1 ms."""
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits()
    out = {}
    for index in (0, 7):
        grey = Image.fromarray((digits.images[index] * (255 / 16)).astype(np.uint8), "L")
        out[f"digit{digits.target[index]}"] = grey.resize((32, 32), Image.BILINEAR).convert("RGB")
    for name, array in zip(("china", "flower"), load_sample_images().images):
        out[name] = Image.fromarray(array).resize(photo_size, Image.BILINEAR)
    return out


def seed_files(images: dict[str, Image.Image] | None = None) -> dict[str, tuple[str, bytes]]:
    """name -> (format, bytes): the real images in the flavours each format's decoder has."""
    im = images or real_images()
    digit, digit2, china, flower = im["digit0"], im["digit7"], im["china"], im["flower"]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    grey16 = Image.fromarray(np.asarray(flower.convert("L"), np.uint16) * 257)
    rgba = china.copy()
    rgba.putalpha(Image.fromarray(np.asarray(flower.convert("L"))))
    palette = flower.convert("P", palette=Image.ADAPTIVE, colors=64)
    frames = [digit.convert("P"), digit2.convert("P")]
    seeds = {
        "png_rgb_digit": ("PNG", _encode(digit, "PNG")),
        "png_grey_digit": ("PNG", _encode(digit.convert("L"), "PNG")),
        "png_palette_trns": ("PNG", _encode(palette, "PNG", transparency=0)),
        "png_rgba_photo": ("PNG", _encode(rgba, "PNG")),
        "png_grey16_photo": ("PNG", _encode(grey16, "PNG")),
        "png_exif_text_photo": ("PNG", _encode(china, "PNG", exif=exif.tobytes(),
                                                pnginfo=_png_text())),
        "png_multi_idat_photo": ("PNG", _split_idat(_encode(flower, "PNG"), 4)),
        "jpeg_digit": ("JPEG", _encode(digit, "JPEG", quality=90)),
        "jpeg_grey_digit": ("JPEG", _encode(digit2.convert("L"), "JPEG", quality=90)),
        "jpeg_420_photo": ("JPEG", _encode(china, "JPEG", quality=75, subsampling=2)),
        "jpeg_progressive_photo": ("JPEG", _encode(flower, "JPEG", quality=85, progressive=True)),
        "jpeg_exif_photo": ("JPEG", _encode(flower, "JPEG", exif=exif.tobytes())),
        "jpeg_cmyk_photo": ("JPEG", _encode(china.convert("CMYK"), "JPEG")),
        "jpeg_restart_photo": ("JPEG", _encode(china, "JPEG", restart_marker_blocks=2)),
        "gif_digit": ("GIF", _encode(digit.convert("P"), "GIF")),
        "gif_photo": ("GIF", _encode(palette, "GIF")),
        "gif_animated_digits": ("GIF", _encode(frames[0], "GIF", save_all=True,
                                               append_images=frames[1:], duration=50)),
        "webp_lossy_photo": ("WEBP", _encode(china, "WEBP", quality=80)),
        "webp_lossless_digit": ("WEBP", _encode(digit, "WEBP", lossless=True)),
        "webp_alpha_photo": ("WEBP", _encode(rgba, "WEBP", quality=80)),
        "bmp_rgb_photo": ("BMP", _encode(flower, "BMP")),
        "bmp_palette_digit": ("BMP", _encode(digit.convert("P"), "BMP")),
        "bmp_1bit_digit": ("BMP", _encode(digit.convert("1"), "BMP")),
        "tiff_raw_photo": ("TIFF", _encode(china, "TIFF")),
        "tiff_lzw_photo": ("TIFF", _encode(flower, "TIFF", compression="tiff_lzw")),
        "tiff_deflate_digit": ("TIFF", _encode(digit, "TIFF", compression="tiff_deflate")),
        "tiff_packbits_grey": ("TIFF", _encode(digit2.convert("L"), "TIFF", compression="packbits")),
        "tiff_jpeg_photo": ("TIFF", _encode(china, "TIFF", compression="jpeg")),
        "ppm_rgb_photo": ("PPM", _encode(flower, "PPM")),
        "pgm_grey_digit": ("PPM", _encode(digit.convert("L"), "PPM")),
    }
    return seeds


def _png_text():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Title", "china")
    info.add_text("Comment", "compressed text chunk " * 4, zip=True)
    return info


def _split_idat(png: bytes, parts: int) -> bytes:
    """The same PNG with its zlib stream spread over ``parts`` IDAT chunks."""
    chunks = png_chunks(png)
    stream = b"".join(png[c.data:c.end] for c in chunks if c.type == b"IDAT")
    step = -(-len(stream) // parts)
    idats = b"".join(_png_chunk(b"IDAT", stream[i:i + step]) for i in range(0, len(stream), step))
    first = next(c for c in chunks if c.type == b"IDAT")
    return png[:first.start] + idats + _png_chunk(b"IEND", b"")


# --------------------------------------------------------------------------- byte-level edits


def _u16x2(order: str, a: int, b: int) -> bytes:
    """Two 16-bit fields (a larger value keeps its low 16 bits)."""
    return struct.pack(order + "HH", a & 0xFFFF, b & 0xFFFF)


def flip(data: bytes, pos: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[pos % len(b)] ^= 1 << bit
    return bytes(b)


def put(data: bytes, pos: int, raw: bytes) -> bytes:
    return data[:pos] + raw + data[pos + len(raw):]


def positions(start: int, end: int, rng: np.random.Generator, n_random: int = 3) -> list[int]:
    """First, second, middle and last two bytes of [start, end), plus seeded random ones."""
    if end <= start:
        return []
    fixed = {start, start + 1, (start + end) // 2, end - 2, end - 1}
    fixed |= {int(p) for p in rng.integers(start, end, n_random)}
    return sorted(p for p in fixed if start <= p < end)


def generic_variants(data: bytes, rng: np.random.Generator, flips: int = 24) -> Iterator[tuple[str, bytes]]:
    """Edits that need no knowledge of the format."""
    for k in range(1, 16):
        yield f"cut:{k}/16", data[: len(data) * k // 16]
    for pos in (0, 1, 2, 3, 4, 7, 8, 11, 12, 15, 16):
        if pos < len(data):
            yield f"cut@{pos}", data[:pos]
    for i, pos in enumerate(rng.integers(0, len(data), flips)):
        yield f"flip#{i}", flip(data, int(pos), int(rng.integers(8)))
    for i, pos in enumerate(rng.integers(0, len(data), 6)):
        yield f"ff4#{i}", put(data, int(pos), b"\xff" * 4)
        yield f"zero4#{i}", put(data, int(pos), b"\x00" * 4)
    mid = len(data) // 2
    yield "insert-byte", data[:mid] + b"\x00" + data[mid:]
    yield "delete-byte", data[:mid] + data[mid + 1:]
    yield "doubled", data + data
    yield "junk-prefix", b"\x00" * 16 + data
    yield "junk-suffix", data + bytes(rng.integers(0, 256, 64, dtype=np.uint8))


# --------------------------------------------------------------------------- PNG


@dataclass
class Chunk:
    start: int  # offset of the length field
    length: int
    type: bytes

    @property
    def data(self) -> int:
        return self.start + 8

    @property
    def end(self) -> int:  # offset of the CRC
        return self.data + self.length


def png_chunks(data: bytes) -> list[Chunk]:
    chunks, pos = [], 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append(Chunk(pos, length, data[pos + 4:pos + 8]))
        pos += 12 + length
    return chunks


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _fix_crc(data: bytes, c: Chunk) -> bytes:
    return put(data, c.end, struct.pack(">I", zlib.crc32(data[c.start + 4:c.end])))


def _replace_chunk(data: bytes, c: Chunk, body: bytes, ctype: bytes | None = None) -> bytes:
    return data[:c.start] + _png_chunk(ctype or c.type, body) + data[c.end + 4:]


def png_variants(data: bytes, rng: np.random.Generator) -> Iterator[tuple[str, bytes]]:
    chunks = png_chunks(data)
    for i in range(8):
        yield f"signature@{i}", flip(data, i, 1)
    for k, c in enumerate(chunks):
        tag = f"{c.type.decode('latin-1')}.{k}"
        for pos in positions(c.data, c.end, rng):
            bad = flip(data, pos, int(rng.integers(8)))
            yield f"{tag}:flip@{pos - c.data}", bad
            yield f"{tag}:flip+crc@{pos - c.data}", _fix_crc(bad, c)  # the decoder sees the bad data
        for i in range(4):
            yield f"{tag}:crc@{i}", flip(data, c.end + i, 3)
            yield f"{tag}:type-case@{i}", _fix_crc(flip(data, c.start + 4 + i, 5), c)
        for value in sorted({*EXTREME_U32, c.length + 1, max(c.length - 1, 0), 0x10000}):
            yield f"{tag}:length={value}", put(data, c.start, struct.pack(">I", value))
        for name, at in (("start", c.start), ("type", c.start + 4), ("data", c.data),
                         ("mid", (c.data + c.end) // 2), ("crc", c.end), ("end", c.end + 4)):
            yield f"{tag}:cut@{name}", data[:at]
        whole = data[c.start:c.end + 4]
        yield f"{tag}:removed", data[:c.start] + data[c.end + 4:]
        yield f"{tag}:doubled", data[:c.end + 4] + whole + data[c.end + 4:]
        if k + 1 < len(chunks):
            nxt = chunks[k + 1]
            yield f"{tag}:swapped", data[:c.start] + data[nxt.start:nxt.end + 4] + whole + data[nxt.end + 4:]
    yield from _png_ihdr(data, chunks[0])
    yield from _png_idat(data, chunks, rng)
    yield "after-IEND", data + _png_chunk(b"IDAT", b"\x78\x9c\x03\x00\x00\x00\x00\x01")
    yield "no-IEND", data[:chunks[-1].start]


def _png_ihdr(data: bytes, ihdr: Chunk) -> Iterator[tuple[str, bytes]]:
    body = data[ihdr.data:ihdr.end]
    for width, height in HUGE_DIMS:
        size = struct.pack(">II", width, height)
        yield f"IHDR:size={width}x{height}", _replace_chunk(data, ihdr, size + body[8:])
    fields = {"depth": (8, (0, 1, 2, 3, 4, 5, 16, 32, 255)), "colour": (9, (1, 2, 3, 4, 5, 6, 7, 255)),
              "compression": (10, (1, 255)), "filter": (11, (1, 255)), "interlace": (12, (1, 2, 255))}
    for name, (offset, values) in fields.items():
        for value in values:
            if value != body[offset]:
                yield f"IHDR:{name}={value}", _replace_chunk(data, ihdr, put(body, offset, bytes([value])))


def _png_idat(data: bytes, chunks: list[Chunk], rng: np.random.Generator) -> Iterator[tuple[str, bytes]]:
    """zlib-level damage with every CRC right: only the decompressor and unfilter can object."""
    idats = [c for c in chunks if c.type == b"IDAT"]
    stream = b"".join(data[c.data:c.end] for c in idats)
    head, tail = data[:idats[0].start], data[idats[-1].end + 4:]

    def rebuilt(new_stream: bytes) -> bytes:
        return head + _png_chunk(b"IDAT", new_stream) + tail

    for i in range(1, 5):  # the adler32 checksum: libpng's "IDAT: incorrect data check"
        yield f"IDAT:adler32@{i}", rebuilt(flip(stream, len(stream) - i, 2))
    yield "IDAT:zlib-header", rebuilt(put(stream, 0, b"\x78\x00"))
    yield "IDAT:zlib-dict", rebuilt(put(stream, 1, bytes([stream[1] | 0x20])))
    yield "IDAT:btype=3", rebuilt(put(stream, 2, bytes([stream[2] | 0x06])))
    for i, pos in enumerate(rng.integers(2, len(stream) - 4, 8)):
        yield f"IDAT:deflate#{i}", rebuilt(flip(stream, int(pos), int(rng.integers(8))))
    for k in (1, 2, 3):
        yield f"IDAT:zlib-cut{k}/4", rebuilt(stream[: len(stream) * k // 4])
    raw = zlib.decompress(stream)
    yield "IDAT:extra-rows", rebuilt(zlib.compress(raw + raw[: len(raw) // 3]))
    yield "IDAT:missing-rows", rebuilt(zlib.compress(raw[: len(raw) * 2 // 3]))
    yield "IDAT:empty-stream", rebuilt(zlib.compress(b""))
    yield "IDAT:stored-block", rebuilt(zlib.compress(raw, 0)[:-9] + b"\x00\x00" + zlib.compress(raw, 0)[-7:])
    for value in (5, 6, 128, 255):  # the filter type byte of the first row
        yield f"IDAT:row-filter={value}", rebuilt(zlib.compress(bytes([value]) + raw[1:]))
    yield "IDAT:empty-chunk", head + _png_chunk(b"IDAT", b"") + data[idats[0].start:]
    yield "IDAT:removed-all", head + tail


# --------------------------------------------------------------------------- JPEG


@dataclass
class Segment:
    start: int  # offset of the 0xFF marker
    marker: int
    end: int  # offset after the segment (and after the scan data for SOS)
    length: int | None  # the length field, None for SOI/EOI/RSTn


_IN_SCAN = (0x00, *range(0xD0, 0xD8))  # FF00 (a stuffed FF) and RST0-7 belong to the scan


def jpeg_segments(data: bytes) -> list[Segment]:
    segments, pos = [], 0
    while pos + 1 < len(data):
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker in (0xD8, 0xD9) or 0xD0 <= marker <= 0xD7:
            segments.append(Segment(pos, marker, pos + 2, None))
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        end = pos + 2 + length
        if marker == 0xDA:  # entropy-coded data runs to the next marker that is not RSTn or FF00
            while end + 1 < len(data) and not (data[end] == 0xFF and data[end + 1] not in _IN_SCAN):
                end += 1
        segments.append(Segment(pos, marker, end, length))
        pos = end
    return segments


def jpeg_variants(data: bytes, rng: np.random.Generator) -> Iterator[tuple[str, bytes]]:
    segments = jpeg_segments(data)
    for k, s in enumerate(segments):
        tag = f"{_marker_name(s.marker)}.{k}"
        yield f"{tag}:marker", flip(data, s.start + 1, 0)
        yield f"{tag}:cut@start", data[:s.start]
        yield f"{tag}:cut@marker", data[:s.start + 2]
        yield f"{tag}:removed", data[:s.start] + data[s.end:]
        if s.length is not None:
            for value in sorted({*EXTREME_U16, 2, s.length - 1, s.length + 1}):
                yield f"{tag}:length={value}", put(data, s.start + 2, struct.pack(">H", value))
            for pos in positions(s.start + 4, min(s.end, s.start + 2 + s.length), rng):
                yield f"{tag}:flip@{pos - s.start}", flip(data, pos, int(rng.integers(8)))
            yield f"{tag}:cut@mid", data[:(s.start + s.end) // 2]
            yield f"{tag}:doubled", data[:s.end] + data[s.start:s.end] + data[s.end:]
        if 0 < k < len(segments) - 1:
            nxt = segments[k + 1]
            pair = data[nxt.start:nxt.end] + data[s.start:s.end]
            yield f"{tag}:swapped", data[:s.start] + pair + data[nxt.end:]
        if s.marker in (0xC0, 0xC1, 0xC2):
            yield from _jpeg_sof(data, s, tag)
        if s.marker == 0xDA:
            yield from _jpeg_scan(data, s, tag, rng)
        if s.marker == 0xE1 and data[s.start + 4:s.start + 10] == b"Exif\x00\x00":
            yield from _jpeg_exif(data, s, tag)
    yield "EOI:early", data[:len(data) // 2] + b"\xff\xd9"
    yield "SOI:twice", b"\xff\xd8" + data


def _marker_name(marker: int) -> str:
    names = {0xD8: "SOI", 0xD9: "EOI", 0xDA: "SOS", 0xDB: "DQT", 0xC4: "DHT", 0xDD: "DRI", 0xFE: "COM",
             0xC0: "SOF0", 0xC1: "SOF1", 0xC2: "SOF2", 0xEE: "APP14"}
    if 0xE0 <= marker <= 0xEF and marker not in names:
        return f"APP{marker - 0xE0}"
    return names.get(marker, f"M{marker:02X}")


def _jpeg_sof(data: bytes, s: Segment, tag: str) -> Iterator[tuple[str, bytes]]:
    base = s.start + 4  # precision(1) height(2) width(2) ncomp(1) then 3 bytes per component
    for value in (0, 1, 12, 16, 255):
        yield f"{tag}:precision={value}", put(data, base, bytes([value]))
    for width, height in HUGE_DIMS:
        yield f"{tag}:size={width}x{height}", put(data, base + 1, _u16x2(">", height, width))
    for value in (0, 2, 4, 5, 255):
        yield f"{tag}:components={value}", put(data, base + 5, bytes([value]))
    for value in (0x00, 0x44, 0x5F, 0xFF, 0x13):
        yield f"{tag}:sampling={value:02x}", put(data, base + 7, bytes([value]))
    for value in (3, 4, 255):
        yield f"{tag}:qtable={value}", put(data, base + 8, bytes([value]))


def _jpeg_scan(data: bytes, s: Segment, tag: str, rng: np.random.Generator) -> Iterator[tuple[str, bytes]]:
    header_end = s.start + 2 + s.length
    ncomp = data[s.start + 4]
    yield f"{tag}:components=0", put(data, s.start + 4, b"\x00")
    yield f"{tag}:component-id=99", put(data, s.start + 5, b"\x63")
    yield f"{tag}:huffman-ids=ff", put(data, s.start + 6, b"\xff")
    spectral = s.start + 5 + 2 * ncomp
    edits = (("Ss=63", b"\x3f"), ("Se=0", b"\x3f\x00"), ("Se=255", b"\x00\xff"), ("AhAl=ff", b"\x00\x3f\xff"))
    for name, raw in edits:
        yield f"{tag}:{name}", put(data, spectral, raw)
    for i, pos in enumerate(rng.integers(header_end, s.end, 12)):
        yield f"{tag}:entropy#{i}", flip(data, int(pos), int(rng.integers(8)))
    for k in (1, 2, 3):
        yield f"{tag}:entropy-cut{k}/4", data[: header_end + (s.end - header_end) * k // 4]
    mid = (header_end + s.end) // 2
    yield f"{tag}:rst-inserted", data[:mid] + b"\xff\xd3" + data[mid:]
    yield f"{tag}:ff-inserted", data[:mid] + b"\xff" + data[mid:]


def _jpeg_exif(data: bytes, s: Segment, tag: str) -> Iterator[tuple[str, bytes]]:
    tiff = s.start + 10  # the TIFF header inside APP1
    order = "<" if data[tiff:tiff + 2] == b"II" else ">"
    yield f"{tag}:exif-ifd-offset", put(data, tiff + 4, struct.pack(order + "I", 0xFFFF_FFF0))
    yield f"{tag}:exif-byte-order", put(data, tiff, b"XX")
    entry = tiff + 8 + 2  # first IFD entry: the orientation tag in our seeds
    for value in (0, 9, 0xFFFF):
        yield f"{tag}:orientation={value}", put(data, entry + 8, struct.pack(order + "H", value))
    yield f"{tag}:entry-count=ffff", put(data, tiff + 8, b"\xff\xff")
    yield f"{tag}:entry-type=0", put(data, entry + 2, struct.pack(order + "H", 0))
    yield f"{tag}:entry-count-huge", put(data, entry + 4, struct.pack(order + "I", 0x7FFF_FFFF))


# --------------------------------------------------------------------------- GIF


def gif_blocks(data: bytes) -> list[tuple[str, int, int]]:
    """(kind, start, end) of the header, logical screen, colour table and every block."""
    blocks = [("header", 0, 6), ("screen", 6, 13)]
    flags, pos = data[10], 13
    if flags & 0x80:
        size = 3 << ((flags & 7) + 1)
        blocks.append(("palette", pos, pos + size))
        pos += size
    while pos < len(data):
        start, label = pos, data[pos]
        if label == 0x3B:
            blocks.append(("trailer", pos, pos + 1))
            break
        if label == 0x21:
            pos += 2
            kind = f"ext{data[start + 1]:02x}"
        elif label == 0x2C:
            local = data[pos + 9]
            pos += 10 + ((3 << ((local & 7) + 1)) if local & 0x80 else 0) + 1  # + LZW code size
            kind = "image"
        else:
            break
        while pos < len(data) and data[pos]:
            pos += data[pos] + 1
        pos += 1
        blocks.append((kind, start, min(pos, len(data))))
    return blocks


def gif_variants(data: bytes, rng: np.random.Generator) -> Iterator[tuple[str, bytes]]:
    blocks = gif_blocks(data)
    for width, height in HUGE_DIMS:
        yield f"screen:size={width}x{height}", put(data, 6, _u16x2("<", width, height))
    for value in (0x00, 0x80, 0x87, 0xF7, 0xFF):
        yield f"screen:flags={value:02x}", put(data, 10, bytes([value]))
    for k, (kind, start, end) in enumerate(blocks):
        tag = f"{kind}.{k}"
        for pos in positions(start, end, rng):
            yield f"{tag}:flip@{pos - start}", flip(data, pos, int(rng.integers(8)))
        for name, at in (("start", start), ("start+1", start + 1), ("mid", (start + end) // 2), ("end", end)):
            yield f"{tag}:cut@{name}", data[:at]
        if kind not in ("header", "screen"):
            yield f"{tag}:removed", data[:start] + data[end:]
        if kind == "image":
            for width, height in HUGE_DIMS:
                yield f"{tag}:size={width}x{height}", put(data, start + 5, _u16x2("<", width, height))
            yield f"{tag}:offset=ffff", put(data, start + 1, b"\xff\xff\xff\xff")
            yield f"{tag}:local-table", put(data, start + 9, b"\x87")
            yield f"{tag}:interlaced", put(data, start + 9, bytes([data[start + 9] | 0x40]))
            code_at = start + 10 + ((3 << ((data[start + 9] & 7) + 1)) if data[start + 9] & 0x80 else 0)
            for value in (0, 1, 9, 11, 12, 13, 255):
                yield f"{tag}:lzw-size={value}", put(data, code_at, bytes([value]))
            for value in (0, 1, 255):
                yield f"{tag}:subblock={value}", put(data, code_at + 1, bytes([value]))
            yield f"{tag}:doubled", data[:end] + data[start:end] + data[end:]


# --------------------------------------------------------------------------- WebP (RIFF)


def riff_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(fourcc, start, size) of each chunk after the 12-byte RIFF/WEBP header."""
    chunks, pos = [], 12
    while pos + 8 <= len(data):
        (size,) = struct.unpack("<I", data[pos + 4:pos + 8])
        chunks.append((data[pos:pos + 4], pos, size))
        pos += 8 + size + (size & 1)
    return chunks


def webp_variants(data: bytes, rng: np.random.Generator) -> Iterator[tuple[str, bytes]]:
    for value in sorted({*EXTREME_U32, len(data) - 8 + 1, len(data) - 8 - 1}):
        yield f"RIFF:size={value}", put(data, 4, struct.pack("<I", value))
    yield "RIFF:tag", put(data, 8, b"WEBQ")
    chunks = riff_chunks(data)
    for k, (fourcc, start, size) in enumerate(chunks):
        tag = f"{fourcc.decode('latin-1').strip()}.{k}"
        for value in sorted({*EXTREME_U32, size + 1, max(size - 1, 0)}):
            yield f"{tag}:size={value}", put(data, start + 4, struct.pack("<I", value))
        for other in (b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANMF"):
            if other != fourcc:
                yield f"{tag}:fourcc={other.decode().strip()}", put(data, start, other)
        for pos in positions(start + 8, start + 8 + size, rng, n_random=8):
            yield f"{tag}:flip@{pos - start}", flip(data, pos, int(rng.integers(8)))
        for name, at in (("start", start), ("data", start + 8), ("data+10", start + 18),
                         ("mid", start + 8 + size // 2)):
            yield f"{tag}:cut@{name}", data[:at]
        body = start + 8
        if fourcc == b"VP8 ":  # 3-byte frame tag, start code 9d 01 2a, 14-bit width and height
            yield f"{tag}:start-code", put(data, body + 3, b"\x9d\x01\x2b")
            yield f"{tag}:not-keyframe", put(data, body, bytes([data[body] | 1]))
            for width, height in HUGE_DIMS:
                size = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)  # 14-bit fields
                yield f"{tag}:size={width}x{height}", put(data, body + 6, size)
            yield f"{tag}:partition-size", put(data, body, b"\xf0\xff\xff")
        if fourcc == b"VP8L":  # signature 0x2f, then 14-bit width-1 and height-1
            yield f"{tag}:signature", put(data, body, b"\x2e")
            yield f"{tag}:size-max", put(data, body + 1, b"\xff\xff\xff\x0f")
            yield f"{tag}:version", put(data, body + 4, bytes([data[body + 4] | 0xE0]))
        if fourcc == b"VP8X":  # flags, then 24-bit canvas width-1 and height-1
            yield f"{tag}:flags=ff", put(data, body, b"\xff")
            yield f"{tag}:canvas-max", put(data, body + 4, b"\xff" * 6)
            yield f"{tag}:canvas-zero", put(data, body + 4, b"\x00" * 6)


# --------------------------------------------------------------------------- BMP


def bmp_variants(data: bytes, rng: np.random.Generator) -> Iterator[tuple[str, bytes]]:
    (offset,) = struct.unpack("<I", data[10:14])
    (dib,) = struct.unpack("<I", data[14:18])
    i32 = (0, 1, 14, 54, len(data), 0x7FFF_FFFF, 0xFFFF_FFFF)
    for value in i32:
        yield f"file:size={value}", put(data, 2, struct.pack("<I", value))
        yield f"file:offset={value}", put(data, 10, struct.pack("<I", value))
    for value in (0, 12, 16, 52, 56, 64, 108, 124, 1000, 0xFFFF_FFFF):
        if value != dib:
            yield f"dib:size={value}", put(data, 14, struct.pack("<I", value))
    for width, height in HUGE_DIMS:
        yield f"dib:size={width}x{height}", put(data, 18, struct.pack("<II", width, height))
    for width, height in ((32, -32), (-32, 32), (32, -0x8000_0000), (-0x8000_0000, 1)):
        yield f"dib:signed={width}x{height}", put(data, 18, struct.pack("<ii", width, height))
    yield "dib:planes=0", put(data, 26, struct.pack("<H", 0))
    for value in (0, 1, 2, 4, 8, 16, 24, 32, 64, 255):
        yield f"dib:bpp={value}", put(data, 28, struct.pack("<H", value))
    for value in (1, 2, 3, 4, 5, 6, 0xFFFF_FFFF):
        yield f"dib:compression={value}", put(data, 30, struct.pack("<I", value))
    for value in (0, 0x7FFF_FFFF):
        yield f"dib:image-size={value}", put(data, 34, struct.pack("<I", value))
    for value in (1, 256, 257, 0x7FFF_FFFF, 0xFFFF_FFFF):
        yield f"dib:colours={value}", put(data, 46, struct.pack("<I", value))
    for name, start, end in (("file", 0, 14), ("dib", 14, 14 + dib), ("palette", 14 + dib, offset),
                             ("pixels", offset, len(data))):
        for pos in positions(start, end, rng):
            yield f"{name}:flip@{pos}", flip(data, pos, int(rng.integers(8)))
        for at in (start, start + 2, (start + end) // 2, end - 1):
            if 0 < at < len(data):
                yield f"{name}:cut@{at}", data[:at]


# --------------------------------------------------------------------------- TIFF


TIFF_TAG_VALUES = {
    256: (0, 65535, 0xFFFF_FFFF),  # ImageWidth
    257: (0, 65535, 0xFFFF_FFFF),  # ImageLength
    258: (0, 1, 7, 12, 16, 32, 255),  # BitsPerSample
    259: (0, 2, 3, 5, 6, 7, 8, 32773, 34712, 65535),  # Compression
    262: (0, 1, 3, 4, 5, 6, 8, 9, 255),  # PhotometricInterpretation
    273: (0, 8, 0x7FFF_FFFF, 0xFFFF_FFFF),  # StripOffsets
    277: (0, 1, 2, 4, 255),  # SamplesPerPixel
    278: (0, 1, 0xFFFF_FFFF),  # RowsPerStrip
    279: (0, 1, 0x7FFF_FFFF),  # StripByteCounts
    284: (0, 2, 3),  # PlanarConfiguration
    317: (0, 2, 3, 255),  # Predictor
}


def tiff_variants(data: bytes, rng: np.random.Generator) -> Iterator[tuple[str, bytes]]:
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    for value in (0, 8, len(data), 0x7FFF_FFFF, 0xFFFF_FFFF):
        yield f"header:ifd={value}", put(data, 4, struct.pack(order + "I", value))
    yield "header:magic", put(data, 2, struct.pack(order + "H", 43))
    (count,) = struct.unpack(order + "H", data[ifd:ifd + 2])
    for value in (0, 1, count + 1, 0xFFFF):
        yield f"ifd:count={value}", put(data, ifd, struct.pack(order + "H", value))
    for k in range(count):
        at = ifd + 2 + 12 * k
        tag, ftype, n = struct.unpack(order + "HHI", data[at:at + 8])
        name = f"tag{tag}"
        for value in (0, 13, 0xFFFF):
            yield f"{name}:type={value}", put(data, at + 2, struct.pack(order + "H", value))
        for value in (0, 0x7FFF_FFFF, 0xFFFF_FFFF):
            yield f"{name}:count={value}", put(data, at + 4, struct.pack(order + "I", value))
        yield f"{name}:offset=huge", put(data, at + 8, struct.pack(order + "I", 0xFFFF_FFF0))
        for value in TIFF_TAG_VALUES.get(tag, ()):
            raw = struct.pack(order + ("H" if ftype == 3 and value <= 0xFFFF else "I"), value)
            yield f"{name}:value={value}", put(data, at + 8, raw)
        yield f"{name}:flip", flip(data, at + int(rng.integers(12)), int(rng.integers(8)))
    for name, at in (("header", 4), ("ifd", ifd), ("ifd+2", ifd + 2), ("ifd-end", ifd + 2 + 12 * count)):
        yield f"cut@{name}", data[:at]
    for i, pos in enumerate(rng.integers(8, max(ifd, 9), 12)):
        yield f"strips:flip#{i}", flip(data, int(pos), int(rng.integers(8)))


# --------------------------------------------------------------------------- PPM


def ppm_variants(data: bytes, rng: np.random.Generator) -> Iterator[tuple[str, bytes]]:
    magic, width, height, maxval, pixels = data.split(maxsplit=4)
    for new_magic in (b"P1", b"P2", b"P3", b"P4", b"P7", b"P0", b"P9"):
        yield f"magic={new_magic.decode()}", b"\n".join([new_magic, width, height, maxval, pixels])
    for w, h in ((b"0", height), (width, b"0"), (b"65535", b"65535"), (b"99999999999", b"1"),
                 (b"-1", height), (b"x", height)):
        yield f"size={w.decode()}x{h.decode()}", b"\n".join([magic, w, h, maxval, pixels])
    for value in (b"0", b"1", b"256", b"65535", b"65536", b"99999"):
        yield f"maxval={value.decode()}", b"\n".join([magic, width, height, value, pixels])
    header = len(data) - len(pixels)
    yield "comment", data[:2] + b"\n# " + b"c" * 1000 + data[2:]
    for at in (2, header - 1, header, header + 1):
        yield f"cut@{at}", data[:at]


# --------------------------------------------------------------------------- corpus

MUTATORS: dict[str, Callable[[bytes, np.random.Generator], Iterator[tuple[str, bytes]]]] = {
    "PNG": png_variants, "JPEG": jpeg_variants, "GIF": gif_variants, "WEBP": webp_variants,
    "BMP": bmp_variants, "TIFF": tiff_variants, "PPM": ppm_variants,
}


def build_corpus(seeds: dict[str, tuple[str, bytes]] | None = None, *, random_flips: int = 24,
                 include_seeds: bool = False) -> list[Variant]:
    """Every structured and generic variant of every seed, duplicates (same bytes) dropped.

    ``random_flips``: seeded random bit flips per seed on top (the benchmark raises it)."""
    seeds = seeds or seed_files()
    seen: set[bytes] = set()
    corpus: list[Variant] = []
    for seed_name, (fmt, data) in seeds.items():
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed_name.encode()).digest()[:8], "little"))
        made = [("seed", data)] if include_seeds else []
        made += [*MUTATORS[fmt](data, rng), *generic_variants(data, rng, random_flips)]
        for mutation, variant in made:
            digest = hashlib.sha256(variant).digest()
            if variant == data and mutation != "seed" or digest in seen:
                continue
            seen.add(digest)
            corpus.append(Variant(f"{seed_name}/{mutation}", fmt, variant))
    return corpus


def corpus_digest(corpus: list[Variant]) -> str:
    digest = hashlib.sha256()
    for v in corpus:
        digest.update(v.name.encode() + b"\0" + hashlib.sha256(v.data).digest())
    return digest.hexdigest()


def write_folder(corpus: list[Variant], root: Path) -> dict[str, Variant]:
    """Write each variant to ``root/<format>/<index>.<ext>`` (a flat ImageFolder tree);
    returns relative path -> variant."""
    written = {}
    for i, v in enumerate(corpus):
        rel = f"{v.fmt.lower()}/{i:05d}.{EXTENSIONS[v.fmt]}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(v.data)
        written[rel] = v
    return written


# --------------------------------------------------------------------------- isolated decoding


def run_isolated(corpus: list[Variant], *, workers: int = 2, timeout_s: float = 10.0,
                 max_pixels: int | None = None, decoder: str = "imgcls") -> list[Outcome]:
    """Decode every variant in worker processes; an Outcome per variant, in corpus order.

    ``decoder``: "imgcls" (``decode_image``), "torchvision" (``torchvision.io.decode_image``, for
    the crash reproducer) or "sleep" (never answers: tests the hang detection)."""
    with tempfile.TemporaryDirectory(prefix="imgcls-fuzz-") as tmp:
        blobs = Path(tmp) / "corpus.pkl"
        blobs.write_bytes(pickle.dumps([v.data for v in corpus], protocol=5))
        results: list[Outcome | None] = [None] * len(corpus)
        todo = iter(range(len(corpus)))
        lock = threading.Lock()

        def next_index() -> int | None:
            with lock:
                return next(todo, None)

        errors: list[BaseException] = []

        def drive(slot: int) -> None:
            worker = _Worker(blobs, Path(tmp) / f"stderr{slot}", max_pixels, decoder)
            try:
                while (i := next_index()) is not None:
                    results[i] = worker.decode(i, corpus[i], timeout_s)
            except BaseException as exc:  # e.g. a worker that cannot start: the caller must see it
                errors.append(exc)
            finally:
                worker.close()

        threads = [threading.Thread(target=drive, args=(slot,)) for slot in range(max(1, workers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]


class _Worker:
    """One ``python -m tests.fuzz_corpus worker`` process, restarted after a crash or hang."""

    def __init__(self, blobs: Path, stderr: Path, max_pixels: int | None, decoder: str):
        self.args = [sys.executable, "-m", "tests.fuzz_corpus", "worker", str(blobs), str(max_pixels or 0),
                     decoder]
        self.stderr_path = stderr
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
        self.stderr = self.stderr_path.open("wb")
        proc = subprocess.Popen(self.args, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=self.stderr)
        if _read_line(proc, 120.0) != b"ready\n":
            printed = self.stderr_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"fuzz worker did not start: {printed}")
        return proc

    def decode(self, index: int, variant: Variant, timeout_s: float) -> Outcome:
        if self.proc is None:
            self.proc = self._start()
        started = time.perf_counter()
        try:
            self.proc.stdin.write(f"{index}\n".encode())
            self.proc.stdin.flush()
            line = _read_line(self.proc, timeout_s)
        except BrokenPipeError:  # it died after its last answer
            line = b""
        if line:
            reply = json.loads(line)
            return Outcome(variant.name, variant.fmt, reply["outcome"], reply["detail"], reply["cpu_s"],
                           reply["wall_s"])
        wall = time.perf_counter() - started
        if line is None:  # no answer in time
            self.close()
            return Outcome(variant.name, variant.fmt, "hang", f"no answer within {timeout_s} s", wall_s=wall)
        code = self.proc.wait()
        self.stderr.close()
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        self.proc = None
        return Outcome(variant.name, variant.fmt, "crash", f"{how}; {_crash_report(self.stderr_path)}",
                       wall_s=wall)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.stderr.close()
            self.proc = None


def _crash_report(stderr: Path) -> str:
    """What the decoder printed (e.g. "libpng error: ..."), then where Python was (faulthandler)."""
    text = stderr.read_text(errors="replace")
    printed, _, dump = text.partition("Fatal Python error")
    frames = [line.strip() for line in dump.splitlines() if line.strip().startswith("File ")][:4]
    return f"stderr: {printed.strip()[-300:]!r}; at: {' <- '.join(frames)}"


def _read_line(proc: subprocess.Popen, timeout_s: float) -> bytes | None:
    """One line from the worker; b"" when it died, None when it did not answer in time."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        return None
    return proc.stdout.readline()


def _worker_main(blobs: str, max_pixels: str, decoder: str) -> None:
    """The child: decode the variants whose index arrives on stdin, one JSON line each."""
    corpus = pickle.loads(Path(blobs).read_bytes())
    decode, expected = _decoder(decoder, int(max_pixels) or None)
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        data = corpus[int(line)]
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            image = decode(data)
            ok = str(image.dtype) == "torch.uint8" and image.ndim == 3 and image.shape[0] == 3
            ok = ok and min(image.shape[1:]) > 0
            outcome, detail = ("decoded" if ok else "other"), f"{image.dtype} {tuple(image.shape)}"
        except expected as exc:
            outcome, detail = type(exc).__name__, str(exc)
        except BaseException as exc:  # anything else is a failure of the decoding contract
            outcome, detail = "other", f"{type(exc).__name__}: {exc}"
        reply = {"outcome": outcome, "detail": detail[:300], "cpu_s": time.process_time() - cpu,
                 "wall_s": time.perf_counter() - wall}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()


def _decoder(name: str, max_pixels: int | None):
    if name == "sleep":
        return (lambda data: time.sleep(3600)), ()
    import torch

    torch.set_num_threads(1)
    if name == "torchvision":
        from torchvision.io import decode_image as native

        return (lambda data: native(torch.frombuffer(bytearray(data), dtype=torch.uint8))), (RuntimeError,)
    from imgcls_core.data import CorruptImageError, decode_image

    return (lambda data: decode_image(data, max_pixels=max_pixels)), (CorruptImageError,)


# --------------------------------------------------------------------------- reporting


def summarize(results: list[Outcome]) -> str:
    """A table: variants by format and outcome, and the slowest decode."""
    outcomes = sorted({r.outcome for r in results})
    by_format = Counter((r.fmt, r.outcome) for r in results)
    formats = sorted({r.fmt for r in results})
    width = max(len(o) for o in [*outcomes, "format"])
    lines = ["  ".join(["format".ljust(6), *(o.rjust(width) for o in outcomes), "total".rjust(6)])]
    for fmt in formats:
        row = [by_format[fmt, o] for o in outcomes]
        lines.append("  ".join([fmt.ljust(6), *(f"{n:>{width}}" for n in row), f"{sum(row):>6}"]))
    totals = [sum(by_format[f, o] for f in formats) for o in outcomes]
    lines.append("  ".join(["all".ljust(6), *(f"{n:>{width}}" for n in totals), f"{len(results):>6}"]))
    slowest = max(results, key=lambda r: r.cpu_s)
    lines.append(f"slowest decode: {slowest.cpu_s * 1000:.0f} ms CPU ({slowest.name}: {slowest.outcome})")
    return "\n".join(lines)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker_main(*sys.argv[2:5])
