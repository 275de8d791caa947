"""The composed-digits generator: true labels, no leakage between splits, determinism, shards, CLI."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgcls_core.data.digits import digit_splits
from imgcls_core.data.synth_digits import SynthSpec, synth_rows, write_synth_digits


def _source(path: str) -> int:
    return int(path.split("/")[1])  # digits/<load_digits index>/<n>.png


def _glyph_8x8(png: bytes) -> np.ndarray:
    """The composed image's digit, found without the generator's help: the pixels that differ
    most from the background, cropped to their bounding box and shrunk to 8x8."""
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    contrast = np.abs(grey - np.median(grey))
    ys, xs = np.nonzero(contrast > 0.5 * contrast.max())
    crop = contrast[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    small = np.asarray(Image.fromarray(crop).resize((8, 8), Image.BILINEAR)).ravel()
    return small / max(small.max(), 1e-6)


def test_labels_are_the_class_of_the_real_digit_in_the_image():
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = list(synth_rows("test", 300, SynthSpec(size=48, seed=3)))
    # Bookkeeping: the label is the class of the source digit, which comes from the test split.
    assert all(label == digits.target[_source(path)] for _png, label, path in rows)
    # Pixels: the digit seen in each image is nearest (5-NN over all 1,797 real 8x8 digits) to
    # digits of its label's class. Chance is 10%; shuffled or shifted labels would score that.
    refs = digits.images.reshape(len(digits.images), -1)
    refs = refs / np.maximum(refs.max(1, keepdims=True), 1e-6)
    agree = 0
    for png, label, _path in rows:
        nearest = np.argsort(((refs - _glyph_8x8(png)) ** 2).sum(1))[:5]
        agree += np.bincount(digits.target[nearest], minlength=10).argmax() == label
    assert agree / len(rows) >= 0.8, agree / len(rows)
    shuffled = np.random.default_rng(0).permutation([label for _, label, _ in rows])
    assert np.mean(shuffled == [label for _, label, _ in rows]) < 0.3  # the control is not trivial


def test_each_split_is_built_from_its_own_digits_only():
    pools = digit_splits(0)
    used = {}
    for split, count in {"train": 400, "val": 200, "test": 200}.items():
        used[split] = {_source(p) for _, _, p in synth_rows(split, count, SynthSpec(size=32, seed=1))}
        assert used[split] <= set(pools[split].tolist()), split
    assert not used["train"] & used["val"] and not used["train"] & used["test"] and not used["val"] & used["test"]
    # 400 train images from 1,259 train digits: no digit used twice
    assert len(used["train"]) == 400


def test_same_seed_same_bytes_other_seed_other_images():
    a = list(synth_rows("train", 40, SynthSpec(size=40, seed=5)))
    b = list(synth_rows("train", 40, SynthSpec(size=40, seed=5), workers=2))  # process count does not matter
    c = list(synth_rows("train", 40, SynthSpec(size=40, seed=6)))
    assert a == b
    assert [r[0] for r in a] != [r[0] for r in c]
    image = Image.open(io.BytesIO(a[0][0]))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (40, 40)
    assert len({r[0] for r in a}) == 40  # no two images alike


def test_writes_shards_of_the_asked_size_and_reuses_a_finished_folder(tmp_path):
    out = tmp_path / "synth"
    manifest = write_synth_digits(out, {"train": 600, "val": 100}, size=32, shard_rows=256, workers=1)
    files = sorted((out / "train").glob("*.parquet"))
    assert [pq.read_metadata(f).num_rows for f in files] == [256, 256, 88]
    assert [f.name for f in files] == manifest["splits"]["train"]["shards"]
    assert manifest["splits"]["val"]["images"] == 100 and not (out / "test").exists()
    assert json.loads((out / "classes.json").read_text())["classes"] == [str(d) for d in range(10)]
    table = pq.read_table(files[0])
    assert table.column_names == ["image", "label", "path"]
    counts = manifest["splits"]["train"]["class_counts"]
    assert sum(counts.values()) == 600 and min(counts.values()) >= 40  # every class, roughly balanced

    stamp = files[0].stat().st_mtime_ns
    assert write_synth_digits(out, {"train": 600, "val": 100}, size=32, shard_rows=256, workers=1) == manifest
    assert files[0].stat().st_mtime_ns == stamp  # the same request: nothing rewritten
    write_synth_digits(out, {"train": 300, "val": 100}, size=32, shard_rows=256, workers=1)
    assert [pq.read_metadata(f).num_rows for f in sorted((out / "train").glob("*.parquet"))] == [256, 44]


def test_prepare_cli_writes_a_parquet_data_set_the_trainer_reads(tmp_path, capsys):
    from imgcls_core.config import DataConfig
    from imgcls_core.data import load_dataset
    from jobs.prepare import main

    out = tmp_path / "digits300"
    assert main(["--synth-digits", str(out), "--count", "300", "--val-count", "60", "--test-count", "40",
                 "--size", "32", "--shard-size", "128", "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "train: 300/300 images" in text and "data.format=parquet" in text
    splits = load_dataset(DataConfig(format="parquet", root=str(out)))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (300, 60, 40)
    assert tuple(splits.train.load(0).shape) == (3, 32, 32)


@pytest.mark.parametrize("args", [["--size", "96"], ["--count", "0"]])
def test_prepare_cli_refuses_bad_sizes(tmp_path, args):
    from jobs.prepare import main

    with pytest.raises(SystemExit) as exc:
        main(["--synth-digits", str(tmp_path / "x"), *args])
    assert exc.value.code == 2
