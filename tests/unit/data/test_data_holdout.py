"""Held-out splits: a source without val/ or test/ gets them from its train files, stratified and seeded."""

from __future__ import annotations

import json

import pytest

from imgcls_core.config import DataConfig
from imgcls_core.data import convert_image_folder, load_dataset, read_shard_table
from jobs.prepare import main as prepare


def split_paths(out, split: str) -> set[str]:
    return set(read_shard_table(out, split).column("path").to_pylist())


def test_flat_source_gets_stratified_val_and_test(image_folder, tmp_path):
    src = image_folder({"flat": {"x": 20, "y": 10}}) / "flat"
    report = convert_image_folder(src, tmp_path / "a", num_workers=0, val_fraction=0.1, test_fraction=0.2)
    assert list(report.splits) == ["train", "val", "test"]
    # of all 30 files: test 20% (6), val 10% (3), each in the classes' 2:1 proportion
    assert report.splits["test"].class_counts == {"x": 4, "y": 2}
    assert report.splits["val"].class_counts == {"x": 2, "y": 1}
    assert report.splits["train"].class_counts == {"x": 14, "y": 7}
    assert report.held_out == {
        "val": {"from": "train", "fraction": 0.1, "seed": 0, "files": 3},
        "test": {"from": "train", "fraction": 0.2, "seed": 0, "files": 6},
    }
    assert "the source has no val/ or test/: held out val 10% (3 files), test 20% (6 files)" in report.summary()
    assert json.loads((tmp_path / "a" / "report.json").read_text())["held_out"] == report.held_out

    parts = {s: split_paths(tmp_path / "a", s) for s in ("train", "val", "test")}
    assert sum(map(len, parts.values())) == 30 and len(set().union(*parts.values())) == 30  # disjoint, complete
    splits = load_dataset(DataConfig(format="parquet", root=str(tmp_path / "a")))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (21, 3, 6)

    again = convert_image_folder(src, tmp_path / "b", num_workers=0, val_fraction=0.1, test_fraction=0.2)
    assert {s: split_paths(tmp_path / "b", s) for s in parts} == parts  # seeded: the same files
    assert again.held_out == report.held_out
    convert_image_folder(src, tmp_path / "c", num_workers=0, val_fraction=0.1, test_fraction=0.2, seed=1)
    assert split_paths(tmp_path / "c", "test") != parts["test"]


def test_only_the_missing_split_is_held_out(image_folder, tmp_path):
    src = image_folder({"train": {"a": 10, "b": 10}, "test": {"a": 2, "b": 2}})
    report = convert_image_folder(src, tmp_path / "out", num_workers=0, val_fraction=0.2, test_fraction=0.2)
    assert report.held_out == {"val": {"from": "train", "fraction": 0.2, "seed": 0, "files": 4}}
    assert report.splits["test"].images == 4 and report.splits["val"].class_counts == {"a": 2, "b": 2}
    assert all(p.startswith("test/") for p in split_paths(tmp_path / "out", "test"))
    assert "the source has no val/: held out val 20% (4 files)" in report.summary()


def test_zero_fractions_keep_a_flat_source_all_train(image_folder, tmp_path):
    src = image_folder({"flat": {"x": 4, "y": 4}}) / "flat"
    report = convert_image_folder(src, tmp_path / "out", num_workers=0)
    assert list(report.splits) == ["train"] and report.held_out == {}
    assert "held out" not in report.summary()


def test_too_few_images_for_a_stratified_hold_out_name_the_fix(image_folder, tmp_path):
    src = image_folder({"flat": {"x": 1, "y": 5}}) / "flat"
    with pytest.raises(ValueError, match=r"cannot hold out a test split: .* give the source a test/ folder"):
        convert_image_folder(src, tmp_path / "out", num_workers=0, test_fraction=0.3)
    with pytest.raises(ValueError, match="leave no training files"):
        convert_image_folder(src, tmp_path / "out", num_workers=0, val_fraction=0.5, test_fraction=0.5)


def test_prepare_job_holds_out_10_percent_each_by_default_and_says_so(image_folder, tmp_path, capsys):
    src = image_folder({"flat": {"x": 10, "y": 10}}) / "flat"
    out = tmp_path / "shards"
    assert prepare(["--source", str(src), "--out", str(out), "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert "the source has no val/ or test/: held out val 10% (2 files), test 10% (2 files)" in text
    assert "stratified by class (seed 0)" in text
    assert f"--set data.format=parquet --set data.root={out}" in text
    assert {s: len(split_paths(out, s)) for s in ("train", "val", "test")} == {"train": 16, "val": 2, "test": 2}

    assert prepare(["--source", str(src), "--out", str(tmp_path / "none"), "--workers", "0",
                    "--val-fraction", "0", "--test-fraction", "0"]) == 0
    assert not (tmp_path / "none" / "val").exists() and not (tmp_path / "none" / "test").exists()
    with pytest.raises(SystemExit) as exc:
        prepare(["--source", str(src), "--out", str(out), "--test-fraction", "1.5"])
    assert exc.value.code == 2 and "--test-fraction must be in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        prepare(["--source", str(src), "--out", str(out), "--workers", "-2"])
    assert exc.value.code == 2 and "--workers must be >= 0, got -2" in capsys.readouterr().err
