"""decode_image on real encoded bytes, and the SplitRecords / DatasetSplits containers."""

from __future__ import annotations

import io
import pickle
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from imgdata import encode, random_rgb
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from imgcls_core.data import (
    CorruptImageError,
    DatasetSplits,
    ImageTooLargeError,
    SkippedImageWarning,
    SplitRecords,
    decode_image,
)


@pytest.fixture
def rgb() -> np.ndarray:
    return random_rgb(np.random.default_rng(0), 24, 20)


def as_hwc(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3
    return t.permute(1, 2, 0).numpy()


def pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_png_decodes_exactly(rgb):
    assert np.array_equal(as_hwc(decode_image(encode(rgb, "PNG"))), rgb)


def test_jpeg_decodes_close_to_source_and_to_pil(rgb):
    data = encode(rgb, "JPEG", quality=95, subsampling=0)
    out = as_hwc(decode_image(data)).astype(int)
    assert out.shape == rgb.shape
    assert np.abs(out - rgb).mean() < 6
    assert np.abs(out - pil_rgb(data)).mean() < 1.5


def test_grey_png_becomes_three_equal_channels(rgb):
    data = encode(rgb, "PNG", mode="L")
    out = decode_image(data)
    grey = np.asarray(Image.open(io.BytesIO(data)))
    for c in range(3):
        assert np.array_equal(out[c].numpy(), grey)


def test_rgba_png_drops_alpha(rgb):
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 77, np.uint8)])
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    assert np.array_equal(as_hwc(decode_image(buffer.getvalue())), rgb)


def test_sixteen_bit_png_is_scaled_to_eight_bits():
    grey16 = (np.arange(12 * 10, dtype=np.uint32).reshape(12, 10) * 547).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(grey16).save(buffer, format="PNG")
    out = decode_image(buffer.getvalue())
    assert out.dtype == torch.uint8 and out.shape == (3, 12, 10)
    expected = torch.from_numpy((grey16.astype(np.float64) / 65535 * 255).round()).to(torch.uint8)
    assert (out[0].int() - expected.int()).abs().max() <= 1


def test_exif_orientation_is_applied(rgb):
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(rgb, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    out = as_hwc(decode_image(data)).astype(int)
    assert out.shape == (rgb.shape[1], rgb.shape[0], 3)
    assert np.abs(out - np.rot90(rgb, k=-1)).mean() < 6


def test_cmyk_jpeg_becomes_rgb(rgb):
    data = encode(rgb, "JPEG", mode="CMYK", quality=95)
    out = as_hwc(decode_image(data)).astype(int)
    assert out.shape == rgb.shape
    assert np.abs(out - pil_rgb(data)).mean() < 3


@pytest.mark.parametrize("fmt,mode", [("GIF", "P"), ("BMP", None), ("TIFF", None), ("PNG", "P")])
def test_other_formats_and_palettes_match_pil(rgb, fmt, mode):
    data = encode(rgb, fmt, mode=mode)
    out = as_hwc(decode_image(data))
    assert np.array_equal(out, pil_rgb(data))
    if mode is None:
        assert np.array_equal(out, rgb)


def test_bytes_str_and_path_inputs_agree(rgb, tmp_path):
    data = encode(rgb, "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    for src in (data, bytearray(data), memoryview(data), str(path), path):
        assert torch.equal(decode_image(src), decode_image(data))


def _png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` (a decompression-bomb header)."""
    data = bytearray(encode(np.zeros((1, 1, 3), np.uint8), "PNG"))
    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _corrupt_cases(rgb: np.ndarray) -> dict[str, tuple[bytes, str]]:
    big = np.tile(rgb, (8, 8, 1))
    png, jpeg = encode(big, "PNG"), encode(big, "JPEG")
    assert len(jpeg) > 8000  # cut in the scan data, well past the header
    return {
        "empty": (b"", "empty file"),
        "text": (b"label,path\n3,foo.png\n" * 4, "not a recognised image format"),
        "random": (
            bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8)),
            "not a recognised image format",
        ),
        "truncated_png": (png[: len(png) // 2], "truncated or corrupt image"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "truncated or corrupt image"),
        "png_header_only": (png[:40], "truncated or corrupt image"),
        "jpeg_header_only": (jpeg[:100], "truncated or corrupt image"),
        "gif_header_only": (encode(rgb, "GIF", mode="P")[:10], "truncated or corrupt image"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "text",
        "random",
        "truncated_png",
        "truncated_jpeg",
        "png_header_only",
        "jpeg_header_only",
        "gif_header_only",
    ],
)
def test_corrupt_inputs_raise_with_their_reason(rgb, case, tmp_path):
    data, reason = _corrupt_cases(rgb)[case]
    with pytest.raises(CorruptImageError, match=reason) as info:
        decode_image(data)
    assert not isinstance(info.value, ImageTooLargeError)
    path = tmp_path / f"{case}.png"
    path.write_bytes(data)
    with pytest.raises(CorruptImageError, match=reason):
        decode_image(path)


def test_the_message_names_the_file(rgb, tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(encode(rgb, "PNG")[:60])
    with pytest.raises(CorruptImageError, match=rf"^{re.escape(str(path))}: truncated or corrupt"):
        decode_image(path)
    with pytest.raises(CorruptImageError, match=r"^upload 3: truncated or corrupt image"):
        decode_image(path.read_bytes(), name="upload 3")
    with pytest.raises(ImageTooLargeError, match=r"^a.png: image is 20x24"):
        decode_image(encode(rgb, "PNG"), max_pixels=10, name="a.png")


def test_a_png_chunk_with_a_bad_crc_is_refused_even_after_the_header(rgb):
    data = bytearray(encode(rgb, "PNG"))
    iend = data.rindex(b"IEND")
    data[iend + 4] ^= 1  # IEND's CRC: Pillow alone would decode the image
    with pytest.raises(CorruptImageError, match=r"PNG chunk 'IEND' at byte \d+ fails its CRC"):
        decode_image(bytes(data))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied_like_pillow_does(rgb, fmt, orientation):
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = orientation
    data = encode(rgb, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(as_hwc(decode_image(data)), expected)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_an_unreadable_exif_block_leaves_the_pixels_as_stored(rgb):
    data = encode(rgb, "JPEG", quality=95, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\xff")
    assert decode_image(data).shape == (3, 24, 20)


@pytest.mark.parametrize("fmt", ["ICO", "TGA", "PCX"])
def test_formats_outside_the_fuzzed_set_are_refused(rgb, fmt):
    data = encode(rgb, fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would decode it
    with pytest.raises(CorruptImageError, match="not a recognised image format"):
        decode_image(data)


def test_corrupt_image_error_is_a_value_error():
    assert issubclass(ImageTooLargeError, CorruptImageError) and issubclass(
        CorruptImageError, ValueError
    )


def test_max_pixels(rgb):
    data = encode(rgb, "PNG")  # 20 x 24 = 480 pixels
    assert decode_image(data, max_pixels=480).shape == (3, 24, 20)
    with pytest.raises(ImageTooLargeError, match=r"20x24 = 480 pixels.*limit of 479"):
        decode_image(data, max_pixels=479)
    with pytest.raises(ImageTooLargeError):
        decode_image(encode(rgb, "GIF", mode="P"), max_pixels=100)


def test_decompression_bomb_is_refused_from_the_header():
    bomb = _png_with_size(100_000, 100_000)  # decoding would need 30 GB; the data is 1 pixel
    with pytest.raises(ImageTooLargeError, match=r"10,000,000,000 pixels.*limit of 1,000,000"):
        decode_image(bomb, max_pixels=1_000_000)
    with pytest.raises(
        ImageTooLargeError, match="limit of 178,956,970"
    ):  # PIL's guard without a limit
        decode_image(bomb)
    with pytest.raises(
        ImageTooLargeError, match=r"5000x5000 = 25,000,000 pixels.*limit of 1,000,000"
    ):
        decode_image(_png_with_size(5000, 5000), max_pixels=1_000_000)


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each JPEG segment; a scan's entropy-coded data is part of its SOS."""
    pos, out = 2, []
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            return out + [(marker, pos, pos + 2)]
        end = pos + 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker == 0xDA:
            while data[end] != 0xFF or data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end = data.index(b"\xff", end + (2 if data[end] == 0xFF else 0))
        out.append((marker, pos, end))
        pos = end
    return out


def _progressive_jpeg_with_repeated_scans(side: int, repeats: int) -> bytes:
    """A valid progressive JPEG whose first AC scan is repeated: libjpeg decodes it (with a
    warning) once per copy, so a few hundred bytes per copy cost a pass over the whole image."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    scans = [(start, end) for marker, start, end in _jpeg_segments(data) if marker == 0xDA]
    start, end = next((s, e) for s, e in scans if data[s + 4] == 1 and data[s + 7] >= 1)  # 1 component, Ss >= 1
    return data[:scans[-1][1]] + data[start:end] * repeats + data[scans[-1][1]:]


def test_a_progressive_jpeg_of_too_many_scans_is_refused_before_decoding():
    import time

    from imgcls_core.data.records import MAX_JPEG_SCANS

    ok = _progressive_jpeg_with_repeated_scans(512, 20)  # 30 scans: decoded, as libjpeg does
    assert decode_image(ok).shape == (3, 512, 512)
    bomb = _progressive_jpeg_with_repeated_scans(512, MAX_JPEG_SCANS)
    started = time.process_time()
    with pytest.raises(ImageTooLargeError, match=f"progressive JPEG with more than {MAX_JPEG_SCANS} scans"):
        decode_image(bomb, max_pixels=25_000_000)
    assert time.process_time() - started < 0.05  # counted from the markers, nothing decoded
    buffer = io.BytesIO()  # a baseline JPEG's walk stops at its frame header
    Image.fromarray(random_rgb(np.random.default_rng(0), 64, 64)).save(buffer, "JPEG")
    assert decode_image(buffer.getvalue()).shape == (3, 64, 64)


def test_sixteen_bit_pgm_is_scaled_and_32_bit_or_float_grey_is_refused():
    pgm = b"P5 3 1 65535\n" + b"".join(v.to_bytes(2, "big") for v in (0, 1000, 40000))
    assert decode_image(pgm)[0, 0].tolist() == [0, 3, 156]  # the high byte, as for a 16-bit PNG
    for array in (np.array([[0.0, 0.5]], np.float32), np.array([[0, 70_000]], np.int32)):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "TIFF")
        with pytest.raises(CorruptImageError, match=r"unsupported pixels: .* grey \(TIFF mode [FI]\)"):
            decode_image(buffer.getvalue())


def _records(n_per_class=(3, 2, 4)) -> SplitRecords:
    rng = np.random.default_rng(0)
    labels = [c for c, n in enumerate(n_per_class) for _ in range(n)]
    images = [encode(random_rgb(rng, 8, 6), "PNG") for _ in labels]
    return SplitRecords(
        ["a", "b", "c"], labels, [f"img/{i}.png" for i in range(len(labels))], images=images
    )


def test_split_records_dataset_subset_and_pickle():
    records = _records()
    assert len(records) == 9 and records.class_counts() == [3, 2, 4]
    ds = records.dataset(lambda t: t.float() / 255)
    image, label = ds[4]
    assert image.dtype == torch.float32 and image.shape == (3, 8, 6) and label == 1
    assert torch.equal(image, decode_image(records.images[4]).float() / 255)

    sub = records.subset([8, 0, 4])
    assert sub.labels == [2, 0, 1] and sub.paths == ["img/8.png", "img/0.png", "img/4.png"]
    assert torch.equal(sub.load(2), records.load(4))

    clone = pickle.loads(pickle.dumps(records.dataset()))
    assert torch.equal(clone[3][0], records.load(3)) and clone[3][1] == records.labels[3]


def test_dataset_works_in_dataloader_workers():
    records = _records()
    loader = DataLoader(records.dataset(lambda t: t.float()), batch_size=9, num_workers=1)
    images, labels = next(iter(loader))
    assert images.shape == (9, 3, 8, 6) and labels.tolist() == records.labels
    assert torch.equal(images[5], records.load(5).float())


def _with_corrupt(bad: dict[int, bytes]) -> SplitRecords:
    records = _records()
    images = list(records.images)
    for index, data in bad.items():
        images[index] = data
    return SplitRecords(records.classes, records.labels, records.paths, images=images)


def test_the_dataset_skips_a_corrupt_record_counts_it_and_warns_once():
    records = _with_corrupt({4: b"", 8: encode(random_rgb(np.random.default_rng(1)), "PNG")[:50]})
    ds = records.dataset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image, label = ds[4]  # record 5 takes its place
        assert torch.equal(image, records.load(5)) and label == records.labels[5]
        image, label = ds[8]  # the last one: wraps around to record 0
        assert torch.equal(image, records.load(0)) and label == records.labels[0]
        ds[4]
        ds[3]
    assert sorted(ds.skipped) == [4, 8]
    assert ds.skipped[4] == "img/4.png: empty file"
    assert ds.skipped[8].startswith("img/8.png: truncated or corrupt image")
    messages = [str(w.message) for w in caught if issubclass(w.category, SkippedImageWarning)]
    assert messages == ["skipping a corrupt image: img/4.png: empty file",
                        f"skipping a corrupt image: {ds.skipped[8]}"]  # once per file


def test_a_loader_over_corrupt_records_still_gives_full_batches():
    records = _with_corrupt({1: b"not an image", 2: b"", 7: b"\x89PNG\r\n\x1a\n"})
    loader = DataLoader(records.dataset(lambda t: t.float()), batch_size=3, num_workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImageWarning)
        batches = list(loader)
    assert [len(labels) for _, labels in batches] == [3, 3, 3]
    labels = torch.cat([labels for _, labels in batches]).tolist()
    assert labels == [records.labels[i] for i in (0, 3, 3, 3, 4, 5, 6, 8, 8)]


def test_a_split_of_corrupt_records_is_an_error_not_an_endless_search():
    records = _with_corrupt({i: b"" for i in range(9)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImageWarning)
        with pytest.raises(CorruptImageError, match=r"9 records in a row from index 2 \(img/2"):
            records.dataset()[2]


def _crop(image: torch.Tensor) -> torch.Tensor:
    """The images of make_image_folder differ in size; a module-level function pickles for spawn."""
    return image[:, :8, :6].float()


def _corrupt_image_folder(image_folder):
    """An ImageFolder (read from disk every epoch, not Parquet) with three bad train files."""
    from imgcls_core.config import DataConfig
    from imgcls_core.data import load_dataset

    root = image_folder({"train": {"a": 8, "b": 8}, "val": {"a": 2, "b": 2}})
    bad = {
        root / "train" / "a" / "train_002.png": b"",  # empty
        root / "train" / "b" / "train_003.jpg": b"\xff\xd8\xff\xe0 not really a JPEG",
        root / "train" / "b" / "train_004.png": encode(random_rgb(np.random.default_rng(1)), "PNG")[:60],
    }
    for path, data in bad.items():
        assert path.is_file()
        path.write_bytes(data)
    splits = load_dataset(DataConfig(format="imagefolder", root=str(root)))
    return splits.train, {splits.train.paths.index(str(path)) for path in bad}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_files_in_an_image_folder_do_not_stop_training_and_are_counted(image_folder, num_workers):
    """Two epochs through a real DataLoader, as the runner builds it: every batch full, and the
    main process knows how many files were skipped even when DataLoader workers skipped them."""
    records, bad = _corrupt_image_folder(image_folder)
    dataset = records.dataset(_crop)
    loader = DataLoader(dataset, batch_size=4, shuffle=True, num_workers=num_workers, drop_last=False,
                        generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedImageWarning)
        for epoch in range(2):
            sizes = [len(labels) for _, labels in loader]
            assert sizes == [4, 4, 4, 4], f"epoch {epoch}: {sizes}"
            assert dataset.skipped_count == 3, f"epoch {epoch}"
    warned = [str(w.message) for w in caught if issubclass(w.category, SkippedImageWarning)]
    if num_workers == 0:
        assert sorted(dataset.skipped) == sorted(bad)
        assert sorted(warned) == sorted(f"skipping a corrupt image: {dataset.skipped[i]}" for i in bad)
        assert all(records.paths[i] in dataset.skipped[i] for i in bad)
    else:
        assert dataset.skipped == {} and warned == []  # workers warn on their own stderr, in their copies


def test_workers_started_with_spawn_count_their_skips_too(image_folder):
    records, bad = _corrupt_image_folder(image_folder)
    dataset = records.dataset(_crop)
    loader = DataLoader(dataset, batch_size=16, num_workers=1, multiprocessing_context="spawn")
    (images, labels), = list(loader)
    assert len(labels) == 16 and dataset.skipped_count == len(bad) == 3


def test_a_file_removed_during_training_is_skipped_not_fatal(image_folder):
    records, _ = _corrupt_image_folder(image_folder)
    Path(records.paths[5]).unlink()  # after the split was listed
    dataset = records.dataset(_crop)
    with pytest.warns(SkippedImageWarning, match=rf"{re.escape(records.paths[5])}: cannot be read: No such file"):
        image, label = dataset[5]
    assert torch.equal(image, _crop(records.load(6))) and label == records.labels[6]
    assert dataset.skipped_count == 1 and list(dataset.skipped) == [5]


def test_copies_of_a_dataset_count_on_their_own():
    records = _with_corrupt({4: b""})
    dataset = records.dataset()
    clone = pickle.loads(pickle.dumps(dataset))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImageWarning)
        clone[4]
    assert (clone.skipped_count, dataset.skipped_count) == (1, 0)


def test_split_records_from_arrays_and_paths(tmp_path, rgb):
    arrays = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    records = SplitRecords(
        ["x", "y"], [1, 0], ["cifar10/train/0", "cifar10/train/1"], arrays=arrays
    )
    assert torch.equal(records.load(1), torch.from_numpy(arrays[1]))
    assert records.subset([1]).arrays.shape == (1, 3, 4, 5)

    (tmp_path / "f.png").write_bytes(encode(rgb))
    on_disk = SplitRecords(["x"], [0], [tmp_path / "f.png"])
    assert on_disk.paths == [str(tmp_path / "f.png")]
    assert np.array_equal(as_hwc(on_disk.load(0)), rgb)


def test_split_records_validate():
    with pytest.raises(ValueError, match="out of range"):
        SplitRecords(["a"], [0, 1], ["p", "q"])
    with pytest.raises(ValueError, match="paths"):
        SplitRecords(["a"], [0, 0], ["p"])
    with pytest.raises(ValueError, match="images"):
        SplitRecords(["a"], [0], ["p"], images=[])


def _plain(classes, counts) -> SplitRecords:
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    return SplitRecords(classes, labels, [str(i) for i in range(len(labels))])


def test_summary_counts_per_class_and_split():
    classes = ["cat", "dog", "zebra"]
    splits = DatasetSplits(_plain(classes, [10, 12, 8]), _plain(classes, [2, 3, 1]), None, classes)
    text = splits.summary()
    lines = text.splitlines()
    assert lines[1].split() == ["class", "train", "val"]
    assert lines[2].split() == ["cat", "10", "2"] and lines[4].split() == ["zebra", "8", "1"]
    assert lines[5].split() == ["total", "30", "6"]
    assert "warning" not in text


def test_summary_warns_about_imbalance_and_missing_classes():
    classes = ["common", "rare"]
    splits = DatasetSplits(
        _plain(classes, [31, 10]), _plain(classes, [3, 1]), _plain(classes, [5, 0]), classes
    )
    text = splits.summary()
    assert "test" in text.splitlines()[1]
    assert "warning: train is imbalanced: 'common' has 31 images, 'rare' 10 (3.1x)" in text
    assert "warning: test has no images of 1 class(es): rare" in text
    assert "val is imbalanced" not in text  # 3 / 1 is not more than 3x
    balanced = DatasetSplits(_plain(classes, [30, 10]), _plain(classes, [1, 1]), None, classes)
    assert "warning" not in balanced.summary()


def test_an_evaluation_scores_each_record_that_decodes_once_and_the_corrupt_ones_not_at_all():
    """The dataset fills a corrupt record's place with the next one, for training's batch sizes; an
    evaluation drops those places again: n counts the good images, each once."""
    from imgcls_core.evaluation import predict, without_skipped

    records = _with_corrupt({1: b"", 4: b"not an image"})
    dataset = records.dataset(lambda t: t.float().mean((1, 2)))
    model = torch.nn.Linear(3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImageWarning)
        preds = predict(model, DataLoader(dataset, batch_size=4, num_workers=1), "cpu")
    kept_preds, kept = without_skipped(preds, dataset)
    assert len(preds.labels) == 9 and kept == [0, 2, 3, 5, 6, 7, 8]
    assert kept_preds.labels.tolist() == [records.labels[i] for i in kept]
    clean = records.subset(kept).dataset(lambda t: t.float().mean((1, 2)))
    assert torch.allclose(kept_preds.logits, predict(model, DataLoader(clean, batch_size=4), "cpu").logits)
    assert without_skipped(preds, records.dataset()) == (preds, None)  # nothing skipped: as it is
