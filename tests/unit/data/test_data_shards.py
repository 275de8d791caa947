"""Parquet shards: the converter round trip, skipped files, atomic writes and the parquet source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from imgdata import encode, random_rgb

from imgcls_core.config import DataConfig
from imgcls_core.data import (
    convert_image_folder,
    load_class_index,
    load_dataset,
    read_shard_table,
    write_shards,
)

LAYOUT = {
    "train": {"cat": 7, "dog": 6, "eel": 5},
    "val": {"cat": 2, "dog": 2, "eel": 1},
    "test": {"cat": 2, "eel": 2},
}


def test_round_trip_equals_imagefolder(image_folder, tmp_path):
    src = image_folder(LAYOUT)
    report = convert_image_folder(src, tmp_path / "shards", num_workers=2, shard_size=4)
    assert report.skipped == [] and report.layout == "splits"
    assert {k: v.images for k, v in report.splits.items()} == {"train": 18, "val": 5, "test": 4}
    assert len(report.splits["train"].shards) == 5  # 18 images, 4 per shard
    assert sorted(p.name for p in (tmp_path / "shards" / "train").iterdir()) == [
        f"part-0000{i}.parquet" for i in range(5)
    ]

    folder = load_dataset(DataConfig(format="imagefolder", root=str(src)))
    shards = load_dataset(DataConfig(format="parquet", root=str(tmp_path / "shards")))
    assert shards.classes == folder.classes == ["cat", "dog", "eel"]
    for split in ("train", "val", "test"):
        a, b = getattr(folder, split), getattr(shards, split)
        position = {Path(p).resolve(): i for i, p in enumerate(a.paths)}
        perm = [position[(src / p).resolve()] for p in b.paths]  # shards hold the files in shuffled order
        assert sorted(perm) == list(range(len(a)))
        assert b.labels == [a.labels[i] for i in perm]
        for j, i in enumerate(perm):
            assert torch.equal(a.dataset()[i][0], b.dataset()[j][0])
    train = shards.train
    assert train.labels != sorted(train.labels), "rows must not be written class by class"
    assert len(set(train.labels[:6])) > 1

    table = read_shard_table(tmp_path / "shards", "train")
    assert table.schema.equals(
        pa.schema([("image", pa.binary()), ("label", pa.int64()), ("path", pa.string())])
    )
    stored = dict(zip(table.column("path").to_pylist(), table.column("image").to_pylist()))
    assert "train/cat/train_000.png" in stored
    original = (src / "train" / "cat" / "train_001.jpg").read_bytes()
    assert stored["train/cat/train_001.jpg"] == original  # stored as is, not re-encoded
    assert load_class_index(tmp_path / "shards") == ["cat", "dog", "eel"]
    index = json.loads((tmp_path / "shards" / "classes.json").read_text())
    assert index["class_to_idx"] == {"cat": 0, "dog": 1, "eel": 2}


def test_converter_skips_and_reports_bad_files(image_folder, tmp_path):
    src = image_folder({"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}})
    good = encode(random_rgb(np.random.default_rng(5), 64, 64), "JPEG")
    (src / "train" / "a" / "broken.jpg").write_bytes(good[: len(good) // 2])
    (src / "train" / "b" / "empty.png").write_bytes(b"")
    (src / "val" / "a" / "notes.txt").write_text("these are cats")
    (src / "train" / "a" / ".DS_Store").write_bytes(b"\x00\x01")  # hidden files are not looked at

    out = tmp_path / "out"
    report = convert_image_folder(src, out, num_workers=0)
    reasons = {item["path"]: item["reason"] for item in report.skipped}
    assert set(reasons) == {"train/a/broken.jpg", "train/b/empty.png", "val/a/notes.txt"}
    assert reasons["train/a/broken.jpg"].startswith("truncated or corrupt image")
    assert reasons["train/b/empty.png"] == "empty file"
    assert reasons["val/a/notes.txt"] == "not a recognised image format"
    assert report.splits["train"].images == 6 and report.splits["val"].images == 2
    assert report.splits["train"].class_counts == {"a": 3, "b": 3}

    text = report.summary()
    assert "train/b/empty.png: empty file" in text and "skipped 3 file(s)" in text
    assert any(line.split()[:3] == ["train", "6", "images"] for line in text.splitlines())
    saved = json.loads((out / "report.json").read_text())
    assert {s["path"] for s in saved["skipped"]} == set(reasons)
    assert saved["splits"]["val"]["images"] == 2

    splits = load_dataset(DataConfig(format="parquet", root=str(out)))
    assert len(splits.train) == 6 and "train/a/broken.jpg" not in splits.train.paths


def test_flat_layout_becomes_train_and_val_is_split_off(image_folder, tmp_path):
    src = image_folder({"flat": {"x": 10, "y": 10}}) / "flat"
    report = convert_image_folder(src, tmp_path / "out", num_workers=0)
    assert report.layout == "flat" and list(report.splits) == ["train"]
    assert report.splits["train"].images == 20
    assert "x/flat_000.png" in read_shard_table(tmp_path / "out", "train").column("path").to_pylist()
    splits = load_dataset(
        DataConfig(format="parquet", root=str(tmp_path / "out"), val_fraction=0.2)
    )
    assert (len(splits.train), len(splits.val), splits.test) == (16, 4, None)
    assert sorted(splits.val.labels) == [0, 0, 1, 1]


def test_reconversion_replaces_stale_splits(image_folder, tmp_path):
    out = tmp_path / "out"
    convert_image_folder(image_folder(LAYOUT, name="first"), out, num_workers=0)
    convert_image_folder(
        image_folder({"train": {"cat": 4, "dog": 4}}, name="second"), out, num_workers=0
    )
    assert not (out / "val").exists() and not (out / "test").exists()
    assert load_class_index(out) == ["cat", "dog"]
    assert read_shard_table(out, "train").num_rows == 8


def test_converter_refuses_unknown_val_class_and_bad_sources(image_folder, tmp_path):
    src = image_folder({"train": {"a": 2, "b": 2}, "val": {"a": 1, "zzz": 1}})
    with pytest.raises(ValueError, match=r"\['zzz'\]"):
        convert_image_folder(src, tmp_path / "out", num_workers=0)
    one = image_folder({"train": {"a": 3}, "val": {"a": 1}, "test": {"a": 1}}, name="one")
    with pytest.raises(ValueError, match=r"one class folder \('a'\); a classifier needs at least 2"):
        convert_image_folder(one, tmp_path / "out1", num_workers=0)
    with pytest.raises(ValueError, match=r"none of the 18 train file\(s\) could be used; e\.g\. .*limit of 1"):
        convert_image_folder(image_folder(LAYOUT, name="all"), tmp_path / "out2", num_workers=0, max_pixels=1)
    with pytest.raises(FileNotFoundError, match="missing"):
        convert_image_folder(tmp_path / "missing", tmp_path / "out", num_workers=0)
    with pytest.raises(ValueError, match="inside the source"):
        convert_image_folder(src, src / "shards", num_workers=0)


def test_converter_never_writes_over_its_source(image_folder, tmp_path):
    """--source data/train --out data: writing out/train would replace the source folder itself."""
    root = image_folder({"train": {"a": 3, "b": 3}})
    with pytest.raises(ValueError, match=r"is the output's train split"):
        convert_image_folder(root / "train", root, num_workers=0)
    assert len([p for p in (root / "train").rglob("*") if p.is_file()]) == 6


def test_a_failed_or_interrupted_reconversion_leaves_the_data_set_that_was_there(image_folder, tmp_path, monkeypatch):
    """Splits are staged and moved into place together: a failure while writing val leaves the first data
    set's class index and splits, not new train shards beside old val shards."""
    import imgcls_core.data.shards as shards

    out = tmp_path / "out"
    convert_image_folder(image_folder(LAYOUT, name="first"), out, num_workers=0)
    before = {s: read_shard_table(out, s).column("path").to_pylist() for s in ("train", "val", "test")}
    write = shards.write_shards

    def interrupted(rows, root, split, *args, **kwargs):
        if split == "val":
            raise KeyboardInterrupt
        return write(rows, root, split, *args, **kwargs)

    monkeypatch.setattr(shards, "write_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_image_folder(image_folder({"train": {"ant": 3, "bee": 3}, "val": {"ant": 1, "bee": 1}}, name="second"),
                             out, num_workers=0)
    assert load_class_index(out) == ["cat", "dog", "eel"]
    assert {s: read_shard_table(out, s).column("path").to_pylist() for s in before} == before
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "report.json", "test", "train", "val"]


def test_an_empty_split_is_refused_at_prepare_not_at_training(image_folder, tmp_path):
    src = image_folder({"train": {"a": 3, "b": 3}, "val": {"a": 0, "b": 0}})
    (src / "val" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"none of the 1 val file\(s\) could be used; e\.g\. val/a/broken\.png.*"
                                         r"remove the empty val folder"):
        convert_image_folder(src, tmp_path / "out", num_workers=0)
    assert not (tmp_path / "out" / "train").exists()


def test_hidden_and_os_folders_are_not_classes_and_resource_forks_not_images(image_folder, tmp_path):
    """A tree unzipped on macOS: __MACOSX/ and ._<name> files; .ipynb_checkpoints from a notebook."""
    src = image_folder({"train": {"cat": 3, "dog": 3}, "val": {"cat": 1, "dog": 1}})
    for extra in ("__MACOSX", ".ipynb_checkpoints"):
        (src / "train" / extra).mkdir()
        (src / "train" / extra / "x.png").write_bytes((src / "train" / "cat").iterdir().__next__().read_bytes())
    (src / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    report = convert_image_folder(src, tmp_path / "out", num_workers=0)
    assert report.classes == ["cat", "dog"] and report.splits["train"].images == 6
    splits = load_dataset(DataConfig(format="imagefolder", root=str(src)))
    assert splits.train.classes == ["cat", "dog"] and len(splits.train) == 6
    assert not any("/._" in p for p in splits.train.paths)


def test_write_shards_is_atomic(tmp_path):
    png = encode(random_rgb(np.random.default_rng(0)), "PNG")
    out = tmp_path / "out"
    first = write_shards(
        ((png, i % 2, f"{i}.png") for i in range(5)), out, "train", ["a", "b"], shard_size=2
    )
    assert first.images == 5 and first.shards == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]

    def crashing():
        for i in range(5):
            if i == 3:
                raise RuntimeError("disk on fire")
            yield png, 0, f"new{i}.png"

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_shards(crashing(), out, "train", ["a", "b"], shard_size=2)
    assert sorted(p.name for p in out.iterdir()) == [
        "classes.json",
        "train",
    ]  # no temporary folder left
    assert read_shard_table(out, "train").column("path").to_pylist() == [
        f"{i}.png" for i in range(5)
    ]

    with pytest.raises(RuntimeError):
        write_shards(crashing(), out, "val", ["a", "b"], shard_size=2)
    assert not (out / "val").exists()
    with pytest.raises(ValueError, match="other classes"):
        write_shards([(png, 0, "x.png")], out, "val", ["a", "b", "c"])
    with pytest.raises(ValueError, match="out of range"):
        write_shards([(png, 2, "x.png")], out, "val", ["a", "b"])
    assert not (out / "val").exists()


def test_parquet_source_errors(tmp_path):
    root = tmp_path / "p"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(DataConfig(format="parquet", root=str(root)))
    root.mkdir()
    with pytest.raises(FileNotFoundError, match="classes.json"):
        load_dataset(DataConfig(format="parquet", root=str(root)))
    png = encode(random_rgb(np.random.default_rng(0)), "PNG")
    write_shards([(png, i % 2, f"{i}.png") for i in range(6)], root, "train", ["a", "b"])
    (root / "val").mkdir()
    bad = pa.table({"image": [png], "label": [7], "path": ["v.png"]})
    pq.write_table(bad, root / "val" / "part-00000.parquet")
    with pytest.raises(ValueError, match=r"label\(s\) \[7\]"):
        load_dataset(DataConfig(format="parquet", root=str(root)))
    pq.write_table(pa.table({"image": [png], "label": [0]}), root / "val" / "part-00000.parquet")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['path'\]"):
        read_shard_table(root, "val")
    (root / "classes.json").write_text(json.dumps({"classes": "ab"}))
    with pytest.raises(ValueError, match="list of strings"):
        load_class_index(root)


def test_without_train_images_the_train_records_read_their_images_on_demand(image_folder, tmp_path):
    """Ray Data streams the train images itself: a Train worker, and the driver, load only the labels
    (the image bytes of a large split would be held once per process); a record's bytes are read
    from its row group when it is loaded (the normalization's sample), one row group at a time."""
    import pickle

    from imgcls_core.data.shards import ShardImages
    from imgcls_core.data.stats import compute_mean_std

    convert_image_folder(image_folder(LAYOUT), tmp_path / "out", num_workers=0)
    cfg = DataConfig(format="parquet", root=str(tmp_path / "out"))
    full, light = load_dataset(cfg), load_dataset(cfg, train_images=False)
    assert isinstance(light.train.images, ShardImages) and light.train.images._cached is None
    assert list(light.train.images) == list(full.train.images)  # every row, in the same order
    assert light.train.images[-1] == full.train.images[-1] and light.train.images[1:3] == full.train.images[1:3]
    assert pickle.loads(pickle.dumps(light.train.images))._cached is None  # no bytes travel with it
    assert compute_mean_std(light.train, 16) == compute_mean_std(full.train, 16)
    assert (light.train.labels, light.train.paths) == (full.train.labels, full.train.paths)
    assert light.val.images == full.val.images and light.test.images == full.test.images
    table = read_shard_table(tmp_path / "out", "train", images=False)
    assert table.column_names == ["label", "path"] and table.num_rows == 18


def test_shard_images_cross_files_and_row_groups_in_read_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from imgcls_core.data.shards import SCHEMA, ShardImages

    (tmp_path / "train").mkdir()
    rows = [bytes([i]) * (i + 1) for i in range(11)]
    for part, chunk in enumerate((rows[:7], rows[7:])):
        table = pa.table({"image": chunk, "label": [0] * len(chunk), "path": [f"p{i}" for i in range(len(chunk))]},
                         schema=SCHEMA)
        pq.write_table(table, tmp_path / "train" / f"part-{part}.parquet", row_group_size=3)
    images = ShardImages(tmp_path, "train")
    assert len(images) == 11 and len(images._groups) == 5  # 3 + 3 + 1 and 3 + 1 rows
    assert [images[i] for i in (10, 0, 6, 7, 3)] == [rows[i] for i in (10, 0, 6, 7, 3)]
    assert list(images) == rows == read_shard_table(tmp_path, "train").column("image").to_pylist()
    with pytest.raises(IndexError):
        images[11]
