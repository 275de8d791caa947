"""scikit-learn's digits materialized as an ImageFolder tree: split sizes, pixels, idempotency."""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from imgcls_core.config import DataConfig
from imgcls_core.data import load_dataset, materialize_digits
from imgcls_core.data.digits import upscale_digits


def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_split_sizes_are_fixed_disjoint_and_balanced(digits_root):
    counts = {
        split: Counter(p.parent.name for p in (digits_root / split).rglob("*.png"))
        for split in ("train", "val", "test")
    }
    assert {s: sum(c.values()) for s, c in counts.items()} == {
        "train": 1259,
        "val": 179,
        "test": 359,
    }
    for split, c in counts.items():
        assert sorted(c) == [str(d) for d in range(10)]
        assert max(c.values()) / min(c.values()) < 1.1, (split, c)
    indices = [int(p.stem) for p in digits_root.rglob("*.png")]
    assert sorted(indices) == list(range(1797))
    marker = json.loads((digits_root / ".complete.json").read_text())
    assert marker["seed"] == 0 and marker["counts"] == {"train": 1259, "val": 179, "test": 359}


def test_images_are_the_upscaled_digits(digits_root):
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index in (0, 500, 1796):
        path = next(digits_root.glob(f"*/*/{index}.png"))
        assert path.parent.name == str(digits.target[index])
        image = np.asarray(Image.open(path))
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert np.array_equal(image, upscale_digits(digits.images[index : index + 1])[0])
        assert image[..., 0].max() > 200 and image[..., 0].min() == 0
        assert np.array_equal(image[..., 0], image[..., 2])


def test_second_call_is_fast_and_changes_nothing(digits_root):
    before = {p: p.stat().st_mtime_ns for p in _files(digits_root)}
    start = time.perf_counter()
    assert materialize_digits(digits_root, seed=0) == digits_root
    assert time.perf_counter() - start < 0.2
    assert {p: p.stat().st_mtime_ns for p in _files(digits_root)} == before
    assert materialize_digits(digits_root, seed=1) == digits_root  # a finished tree is kept as is
    assert {p: p.stat().st_mtime_ns for p in _files(digits_root)} == before


def test_load_dataset_reads_digits(digits_root):
    splits = load_dataset(DataConfig(format="digits", root=str(digits_root)))
    assert splits.classes == [str(d) for d in range(10)]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1259, 179, 359)
    image, label = splits.test.dataset()[0]
    assert image.shape == (3, 32, 32) and splits.test.paths[0].endswith(
        f"/test/{label}/{splits.test.paths[0].rsplit('/', 1)[1]}"
    )


def test_interrupted_tree_is_rebuilt_and_foreign_folders_are_refused(tmp_path, digits_root):
    partial = tmp_path / "partial"
    (partial / "train" / "3").mkdir(parents=True)
    (partial / "train" / "3" / "99999.png").write_bytes(b"half a file")
    assert materialize_digits(partial, seed=0) == partial
    assert not (partial / "train" / "3" / "99999.png").exists()
    assert [p.relative_to(partial) for p in _files(partial)] == [
        p.relative_to(digits_root) for p in _files(digits_root)
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ValueError, match="not a digits folder"):
        materialize_digits(foreign)
    assert (foreign / "holiday.jpg").read_bytes() == b"precious"
