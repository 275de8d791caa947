"""Held-out splits: a source without val/ or test/ gets them from its train files, each file's split a
seeded hash of its path."""

from __future__ import annotations

import json

import pytest

from imgcls_core.config import DataConfig
from imgcls_core.data import convert_image_folder, load_dataset, read_shard_table
from jobs.prepare import main as prepare


def split_paths(out, split: str) -> set[str]:
    return set(read_shard_table(out, split).column("path").to_pylist())


def test_flat_source_gets_val_and_test_by_a_seeded_hash_of_each_path(image_folder, tmp_path):
    src = image_folder({"flat": {"x": 60, "y": 40}}) / "flat"
    report = convert_image_folder(src, tmp_path / "a", num_workers=0, val_fraction=0.1, test_fraction=0.2)
    assert list(report.splits) == ["train", "val", "test"]
    n = {s: report.splits[s].images for s in ("train", "val", "test")}
    # of all 100 files: test 20% and val 10% in expectation (binomial: within 3 standard deviations)
    assert sum(n.values()) == 100 and 8 <= n["test"] <= 32 and 1 <= n["val"] <= 19, n
    assert all(count > 0 for split in ("val", "test") for count in report.splits[split].class_counts.values())
    assert report.held_out == {
        "val": {"from": "train", "fraction": 0.1, "seed": 0, "files": n["val"], "method": "path-hash"},
        "test": {"from": "train", "fraction": 0.2, "seed": 0, "files": n["test"], "method": "path-hash"},
    }
    assert (f"the source has no val/ or test/: held out val 10% ({n['val']} files), test 20% ({n['test']} files) "
            f"of its train files, by a hash of each file's path (seed 0)") in report.summary()
    assert json.loads((tmp_path / "a" / "report.json").read_text())["held_out"] == report.held_out

    parts = {s: split_paths(tmp_path / "a", s) for s in ("train", "val", "test")}
    assert sum(map(len, parts.values())) == 100 and len(set().union(*parts.values())) == 100  # disjoint, complete
    splits = load_dataset(DataConfig(format="parquet", root=str(tmp_path / "a")))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (n["train"], n["val"], n["test"])

    again = convert_image_folder(src, tmp_path / "b", num_workers=0, val_fraction=0.1, test_fraction=0.2)
    assert {s: split_paths(tmp_path / "b", s) for s in parts} == parts  # seeded: the same files
    assert again.held_out == report.held_out
    convert_image_folder(src, tmp_path / "c", num_workers=0, val_fraction=0.1, test_fraction=0.2, seed=1)
    assert split_paths(tmp_path / "c", "test") != parts["test"]


def test_images_added_later_move_no_earlier_image_between_train_and_a_held_out_split(image_folder, tmp_path):
    """A model trained on the first conversion's train split is promoted on the second's test split:
    that split must not hold images it trained on (nor may its old test images move into train)."""
    src = image_folder({"flat": {"x": 40, "y": 40}}) / "flat"
    convert_image_folder(src, tmp_path / "a", num_workers=0, val_fraction=0.1, test_fraction=0.2)
    before = {s: split_paths(tmp_path / "a", s) for s in ("train", "val", "test")}
    for folder in (src / "x", src / "y"):
        for i, file in enumerate(sorted(folder.iterdir())):
            (folder / f"added_{i:03d}{file.suffix}").write_bytes(file.read_bytes())
    convert_image_folder(src, tmp_path / "b", num_workers=0, val_fraction=0.1, test_fraction=0.2)
    after = {s: split_paths(tmp_path / "b", s) for s in before}
    assert all(before[s] <= after[s] for s in before), {s: before[s] - after[s] for s in before}
    assert sum(map(len, after.values())) == 160


def test_only_the_missing_split_is_held_out(image_folder, tmp_path):
    src = image_folder({"train": {"a": 20, "b": 20}, "test": {"a": 2, "b": 2}})
    report = convert_image_folder(src, tmp_path / "out", num_workers=0, val_fraction=0.2, test_fraction=0.2)
    n = report.splits["val"].images
    assert report.held_out == {"val": {"from": "train", "fraction": 0.2, "seed": 0, "files": n, "method": "path-hash"}} and 0 < n < 20
    assert report.splits["test"].images == 4 and report.splits["train"].images == 40 - n
    assert all(p.startswith("test/") for p in split_paths(tmp_path / "out", "test"))
    assert f"the source has no val/: held out val 20% ({n} files)" in report.summary()


def test_zero_fractions_keep_a_flat_source_all_train(image_folder, tmp_path):
    src = image_folder({"flat": {"x": 4, "y": 4}}) / "flat"
    report = convert_image_folder(src, tmp_path / "out", num_workers=0)
    assert list(report.splits) == ["train"] and report.held_out == {}
    assert "held out" not in report.summary()


def test_a_hold_out_no_file_falls_in_names_the_fix(image_folder, tmp_path):
    src = image_folder({"flat": {"x": 1, "y": 2}}) / "flat"
    with pytest.raises(ValueError, match=r"cannot hold out a test split: none of the 3 train files fell in its 1%"
                                         r".* give the source a test/ folder"):
        convert_image_folder(src, tmp_path / "out", num_workers=0, test_fraction=0.01)
    tiny = image_folder({"flat": {"x": 30, "y": 1}}, name="tiny") / "flat"  # y's one file falls in test
    with pytest.raises(ValueError, match=r"class\(es\) \['y'\] have so few files that all were held out"):
        convert_image_folder(tiny, tmp_path / "out", num_workers=0, test_fraction=0.5)
    with pytest.raises(ValueError, match="leave no training files"):
        convert_image_folder(src, tmp_path / "out", num_workers=0, val_fraction=0.5, test_fraction=0.5)


def test_prepare_job_holds_out_10_percent_each_by_default_and_says_so(image_folder, tmp_path, capsys):
    src = image_folder({"flat": {"x": 10, "y": 10}}) / "flat"
    out = tmp_path / "shards"
    assert prepare(["--source", str(src), "--out", str(out), "--workers", "0"]) == 0
    text = capsys.readouterr().out
    n = {s: len(split_paths(out, s)) for s in ("train", "val", "test")}
    assert (f"the source has no val/ or test/: held out val 10% ({n['val']} files), test 10% ({n['test']} files)"
            in text), text
    assert "by a hash of each file's path (seed 0)" in text
    assert f"--set data.format=parquet --set data.root={out}" in text
    assert sum(n.values()) == 20 and n["val"] > 0 and n["test"] > 0

    assert prepare(["--source", str(src), "--out", str(tmp_path / "none"), "--workers", "0",
                    "--val-fraction", "0", "--test-fraction", "0"]) == 0
    assert not (tmp_path / "none" / "val").exists() and not (tmp_path / "none" / "test").exists()
    with pytest.raises(SystemExit) as exc:
        prepare(["--source", str(src), "--out", str(out), "--test-fraction", "1.5"])
    assert exc.value.code == 2 and "--test-fraction must be in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        prepare(["--source", str(src), "--out", str(out), "--workers", "-2"])
    assert exc.value.code == 2 and "--workers must be >= 0, got -2" in capsys.readouterr().err
