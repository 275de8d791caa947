"""load_dataset for ImageFolder and CIFAR layouts, stratified splits, class weights and sampling."""

from __future__ import annotations

import io
import os
import pickle
import struct
from collections import Counter

import numpy as np
import pytest
import torch
from imgdata import encode, random_rgb
from PIL import Image
from torchvision.datasets import ImageFolder

from imgcls_core.config import DataConfig
from imgcls_core.data import (
    UnsafePickleError,
    build_weighted_sampler,
    class_weights,
    load_dataset,
    stratified_split,
    write_shards,
)


def cfg(root, **kwargs) -> DataConfig:
    return DataConfig(**{"format": "imagefolder", "root": str(root), **kwargs})


# ------------------------------------------------------------------------- imagefolder

# Upper case sorts before lower case, as in torchvision.
LAYOUT = {
    "train": {"b_cat": 6, "a_dog": 5, "C_upper": 4},
    "val": {"b_cat": 2, "a_dog": 2, "C_upper": 1},
    "test": {"b_cat": 3, "a_dog": 1},
}


def test_imagefolder_matches_torchvision(image_folder):
    root = image_folder(LAYOUT)
    (root / "train" / "a_dog" / "notes.txt").write_text("not an image")  # ignored by both
    splits = load_dataset(cfg(root))
    for split in ("train", "val", "test"):
        reference = ImageFolder(str(root / split)) if split == "train" else None
        records = getattr(splits, split)
        if reference is not None:
            assert reference.classes == splits.classes == ["C_upper", "a_dog", "b_cat"]
            assert list(zip(records.paths, records.labels)) == reference.samples
            for i in (0, 7, len(reference) - 1):
                expected = np.asarray(reference[i][0])
                got = records.dataset()[i][0].permute(1, 2, 0).numpy().astype(int)
                assert np.abs(got - expected).mean() < 1.5  # JPEG decoders may differ by a level
    assert len(splits.val) == 5 and len(splits.test) == 4
    assert Counter(splits.test.labels) == {2: 3, 1: 1}  # class indices of train
    assert all(p.endswith((".png", ".jpg")) for p in splits.train.paths)


def test_imagefolder_pixels_are_exact_for_png(image_folder):
    root = image_folder({"train": {"x": 2, "y": 2}, "val": {"x": 1, "y": 1}})
    splits = load_dataset(cfg(root))
    png = [i for i, p in enumerate(splits.train.paths) if p.endswith(".png")]
    assert png
    for i in png:
        expected = np.asarray(Image.open(splits.train.paths[i]).convert("RGB"))
        assert np.array_equal(splits.train.load(i).permute(1, 2, 0).numpy(), expected)


def test_missing_test_split_is_none_and_missing_val_comes_from_train(image_folder):
    root = image_folder({"train": {"a": 20, "b": 10}})
    splits = load_dataset(cfg(root, val_fraction=0.2, seed=3))
    assert splits.test is None
    assert len(splits.train) == 24 and len(splits.val) == 6
    assert Counter(splits.val.labels) == {0: 4, 1: 2}
    assert not set(splits.train.paths) & set(splits.val.paths)
    assert sorted(splits.train.paths + splits.val.paths) == [
        p for p, _ in ImageFolder(str(root / "train")).imgs
    ]
    again = load_dataset(cfg(root, val_fraction=0.2, seed=3))
    assert again.val.paths == splits.val.paths
    other = load_dataset(cfg(root, val_fraction=0.2, seed=4))
    assert other.val.paths != splits.val.paths


def test_no_val_and_zero_fraction_is_an_error(image_folder):
    root = image_folder({"train": {"a": 4, "b": 4}})
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset(cfg(root, val_fraction=0.0))


def test_unknown_class_in_val_is_named(image_folder):
    root = image_folder({"train": {"a": 3, "b": 3}, "val": {"a": 1, "zebra": 1, "yak": 1}})
    with pytest.raises(ValueError, match=r"not in the train split: \['yak', 'zebra'\]"):
        load_dataset(cfg(root))


def test_missing_root_names_it_and_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*<root>/<split>/<class>/<image>"):
        load_dataset(cfg(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train"):
        load_dataset(cfg(tmp_path / "empty"))


def test_empty_split_is_an_error(image_folder):
    root = image_folder({"train": {"a": 3, "b": 3}})
    (root / "val" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="val split .* has no images"):
        load_dataset(cfg(root))


def test_train_class_without_images_is_an_error(image_folder):
    root = image_folder({"train": {"a": 3, "b": 3}})
    (root / "train" / "c").mkdir()
    (root / "train" / "c" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no images.*\['c'\]"):
        load_dataset(cfg(root))


# ------------------------------------------------------------------------------- CIFAR


def _write_pickle(path, payload: dict) -> None:
    with path.open("wb") as fh:
        pickle.dump(payload, fh, protocol=2)


def _cifar_batch(rng, n: int, num_classes: int) -> tuple[np.ndarray, list[int]]:
    labels = [i % num_classes for i in range(n)]
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), labels


def test_cifar10_loader(tmp_path):
    """Python-2-style pickles with bytes keys, in the nested cifar-10-batches-py folder."""
    folder = tmp_path / "c10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    _write_pickle(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 20})
    train_data, train_labels = [], []
    for i in range(1, 6):
        data, labels = _cifar_batch(rng, 20, 10)
        _write_pickle(
            folder / f"data_batch_{i}", {b"batch_label": b"x", b"data": data, b"labels": labels}
        )
        train_data.append(data)
        train_labels += labels
    test_data, test_labels = _cifar_batch(rng, 10, 10)
    _write_pickle(folder / "test_batch", {b"data": test_data, b"labels": test_labels})

    splits = load_dataset(
        DataConfig(format="cifar10", root=str(tmp_path / "c10"), val_fraction=0.2)
    )
    assert splits.classes == names
    assert (len(splits.train), len(splits.val), len(splits.test)) == (80, 20, 10)
    assert Counter(splits.val.labels) == dict.fromkeys(range(10), 2)
    all_train = np.concatenate(train_data).reshape(-1, 3, 32, 32)
    for records in (splits.train, splits.val):
        for k in (0, 5, len(records) - 1):
            i = int(records.paths[k].rsplit("/", 1)[1])
            assert records.paths[k] == f"cifar10/train/{i}"
            assert records.labels[k] == train_labels[i]
            image, label = records.dataset()[k]
            assert image.dtype == torch.uint8 and torch.equal(image, torch.from_numpy(all_train[i]))
    assert splits.test.paths[3] == "cifar10/test/3"
    assert torch.equal(splits.test.load(3), torch.from_numpy(test_data[3].reshape(3, 32, 32)))
    # channel planes: the first 1024 values are red
    assert torch.equal(splits.test.load(0)[0].flatten(), torch.from_numpy(test_data[0][:1024]))


def test_cifar100_loader_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    names = [f"class{i:03d}" for i in range(100)]
    _write_pickle(
        tmp_path / "meta",
        {"fine_label_names": names, "coarse_label_names": [f"c{i}" for i in range(20)]},
    )
    data, fine = _cifar_batch(rng, 400, 100)
    _write_pickle(
        tmp_path / "train",
        {"data": data, "fine_labels": fine, "coarse_labels": [f % 20 for f in fine]},
    )
    test_data, test_fine = _cifar_batch(rng, 50, 100)
    _write_pickle(
        tmp_path / "test", {"data": test_data, "fine_labels": test_fine, "coarse_labels": [0] * 50}
    )

    splits = load_dataset(DataConfig(format="cifar100", root=str(tmp_path), val_fraction=0.25))
    assert splits.classes == names
    assert (len(splits.train), len(splits.val), len(splits.test)) == (300, 100, 50)
    assert splits.test.labels == test_fine and max(splits.train.labels) == 99
    k = 17
    i = int(splits.train.paths[k].rsplit("/", 1)[1])
    assert splits.train.labels[k] == fine[i]
    assert torch.equal(splits.train.load(k), torch.from_numpy(data[i].reshape(3, 32, 32)))


def test_cifar_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_dataset(DataConfig(format="cifar10", root=str(tmp_path)))


class _Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the real CIFAR-10 python batches (protocol 2):
    ``str`` and ``bytes`` as Python 2 byte strings (SHORT_BINSTRING / BINSTRING, which Python 3
    reads with ``encoding="latin1"``) and numpy's globals under numpy 1's module names."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        module = {"numpy._core.multiarray": "numpy.core.multiarray"}.get(obj.__module__, obj.__module__)
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def _python2_pickle(path, payload: dict) -> None:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(payload)
    path.write_bytes(buffer.getvalue())


def _globals_of(path) -> set[str]:
    import pickletools

    return {arg for op, arg, _ in pickletools.genops(path.read_bytes()) if op.name == "GLOBAL"}


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar10_folder(folder, write, rng, n: int = 20, labels=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / "batches.meta", {"label_names": CIFAR10_NAMES, "num_cases_per_batch": n, "num_vis": 3072})
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data, default = _cifar_batch(rng, n, 10)
        write(folder / name, {"batch_label": f"batch {name}", "data": data,
                              "labels": default if labels is None else labels(name, n),
                              "filenames": [f"img_{i}.png" for i in range(n)]})


def test_cifar10_batches_in_python2_format_load(tmp_path):
    """The real files: Python 2 byte strings everywhere and numpy.core.multiarray._reconstruct."""
    _cifar10_folder(tmp_path / "cifar-10-batches-py", _python2_pickle, np.random.default_rng(2))
    assert _globals_of(tmp_path / "cifar-10-batches-py" / "data_batch_1") == {
        "numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as fh:
        reference = pickle.load(fh, encoding="latin1")  # what the loader used to call
    splits = load_dataset(DataConfig(format="cifar10", root=str(tmp_path), val_fraction=0.2))
    assert splits.classes == CIFAR10_NAMES and len(splits.test) == 20
    assert np.array_equal(splits.test.arrays.reshape(20, -1), reference["data"])
    assert splits.test.labels == reference["labels"]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("keys", ["str", "bytes"])
def test_cifar_batches_pickled_by_python3_load(tmp_path, protocol, keys):
    """numpy 2 module names; protocol 2 rebuilds bytes with _codecs.encode, 5 arrays with _frombuffer."""

    def write(path, payload: dict) -> None:
        if keys == "bytes":
            payload = {k.encode(): v for k, v in payload.items()}
        with path.open("wb") as fh:
            pickle.dump(payload, fh, protocol=protocol)

    rng = np.random.default_rng(3)
    _cifar10_folder(tmp_path, write, rng)
    splits = load_dataset(DataConfig(format="cifar10", root=str(tmp_path), val_fraction=0.2))
    with open(tmp_path / "test_batch", "rb") as fh:
        reference = pickle.load(fh, encoding="latin1")
    data = reference["data" if keys == "str" else b"data"]
    assert np.array_equal(splits.test.arrays.reshape(20, -1), data)


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["batches.meta", "data_batch_3", "test_batch"])
def test_a_cifar_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, where):
    rng = np.random.default_rng(4)
    _cifar10_folder(tmp_path, _write_pickle, rng)
    marker = tmp_path / "pwned"
    payload = {b"data": _cifar_batch(rng, 20, 10)[0], b"labels": _RunsACommand(marker),
               b"label_names": CIFAR10_NAMES}
    _write_pickle(tmp_path / where, payload)
    assert os.system.__module__ + " system" in _globals_of(tmp_path / where)  # plain pickle.load would run it
    with pytest.raises(UnsafePickleError, match=rf"{tmp_path / where}: refusing to load: the pickle calls "
                                                rf"{os.system.__module__}.system\b.*only lists, numbers"):
        load_dataset(DataConfig(format="cifar10", root=str(tmp_path)))
    assert not marker.exists()


def _object_array_pickle() -> bytes:
    return pickle.dumps({b"data": np.array([len], dtype=object)}, protocol=2)


# _codecs.encode("x", "rot13"), as a protocol 2 pickle: allowed for "latin1" (bytes) only
_OTHER_CODEC = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R."


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_object_array_pickle, r"a numpy array of Python objects \(dtype object\)"),
        (lambda: _OTHER_CODEC, "_codecs.encode with str and 'rot13'"),
    ],
    ids=["object-array", "other-codec"],
)
def test_numpy_objects_and_other_codecs_are_refused(tmp_path, make, message):
    path = tmp_path / "batches.meta"
    path.write_bytes(make())
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(UnsafePickleError, match=rf"{path}: refusing to load: {message}"):
        load_dataset(DataConfig(format="cifar10", root=str(tmp_path)))


def test_a_truncated_or_foreign_cifar_file_is_named(tmp_path):
    rng = np.random.default_rng(5)
    _cifar10_folder(tmp_path, _write_pickle, rng)
    whole = (tmp_path / "data_batch_2").read_bytes()
    (tmp_path / "data_batch_2").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=rf"{tmp_path / 'data_batch_2'}: not a readable CIFAR python batch"):
        load_dataset(DataConfig(format="cifar10", root=str(tmp_path)))
    _write_pickle(tmp_path / "data_batch_2", [1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"data_batch_2: not a CIFAR python batch: it holds a list"):
        load_dataset(DataConfig(format="cifar10", root=str(tmp_path)))
    _write_pickle(tmp_path / "data_batch_2", {"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 1]})
    with pytest.raises(ValueError, match=r"data_batch_2: not a CIFAR python batch: no \['labels'\] "
                                         r"\(it holds \['data', 'fine_labels'\]\)"):
        load_dataset(DataConfig(format="cifar10", root=str(tmp_path)))
    _write_pickle(tmp_path / "data_batch_2", {"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]})
    with pytest.raises(ValueError, match=r"data_batch_2: not a CIFAR python batch: cannot reshape"):
        load_dataset(DataConfig(format="cifar10", root=str(tmp_path)))


# ------------------------------------------------------------------------ class checks


def test_one_class_imagefolder_is_refused_naming_the_class_and_folder(image_folder):
    root = image_folder({"train": {"only": 6}})
    message = rf"training split in {root / 'train'} has only class 'only' \(6 images\); a classifier needs"
    with pytest.raises(ValueError, match=message):
        load_dataset(cfg(root))


def test_one_class_cifar_is_refused(tmp_path):
    _cifar10_folder(tmp_path, _write_pickle, np.random.default_rng(6), labels=lambda name, n: [3] * n)
    with pytest.raises(ValueError, match=rf"training split in {tmp_path} has only class 'cat' \(100 images\)"):
        load_dataset(DataConfig(format="cifar10", root=str(tmp_path)))


def _parquet(root, splits: dict[str, list[int]], classes=("a", "b", "c")) -> DataConfig:
    rng = np.random.default_rng(7)
    for split, labels in splits.items():
        rows = [(encode(random_rgb(rng, 8, 8)), y, f"{split}/{i}.png") for i, y in enumerate(labels)]
        write_shards(rows, root, split, list(classes))
    return DataConfig(format="parquet", root=str(root))


def test_one_class_parquet_is_refused(tmp_path):
    message = rf"training split in {tmp_path / 'train'} has only class 'b' \(5 images\)"
    with pytest.raises(ValueError, match=message):
        load_dataset(_parquet(tmp_path, {"train": [1] * 5, "val": [1, 1]}))


def test_val_or_test_classes_that_train_lacks_are_named(tmp_path):
    with pytest.raises(ValueError, match=rf"the val split of {tmp_path} has images of 1 class\(es\) that the "
                                         rf"training split in {tmp_path / 'train'} has none of: 'c'"):
        load_dataset(_parquet(tmp_path, {"train": [0, 0, 1, 1], "val": [0, 1, 2]}))

    folder = tmp_path / "cifar"
    def labels(name: str, n: int) -> list[int]:  # train: airplane and automobile; test: all ten
        return [i % (10 if name == "test_batch" else 2) for i in range(n)]

    _cifar10_folder(folder, _write_pickle, np.random.default_rng(8), labels=labels)
    with pytest.raises(ValueError, match=r"the test split of .*cifar has images of 8 class\(es\) that the training "
                                         r"split in .*cifar has none of: 'bird', 'cat', .*'truck'; a model"):
        load_dataset(DataConfig(format="cifar10", root=str(folder)))


def test_two_classes_and_a_class_only_missing_from_val_are_fine(tmp_path, image_folder):
    root = image_folder({"train": {"a": 3, "b": 3, "c": 2}, "val": {"a": 1, "b": 1}})
    assert load_dataset(cfg(root)).classes == ["a", "b", "c"]
    assert load_dataset(_parquet(tmp_path / "pq", {"train": [0, 0, 2, 2], "val": [0]})).classes == ["a", "b", "c"]


# ------------------------------------------------------------------- splits and balance


def test_stratified_split_keeps_proportions_and_is_seeded():
    labels = [0] * 60 + [1] * 30 + [2] * 10
    keep, held = stratified_split(labels, 0.2, seed=0)
    assert Counter(np.asarray(labels)[held].tolist()) == {0: 12, 1: 6, 2: 2}
    assert len(keep) == 80 and sorted(np.concatenate([keep, held]).tolist()) == list(range(100))
    assert list(keep) == sorted(keep) and list(held) == sorted(held)
    again = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(again[1], held)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=1)[1], held)


def test_stratified_split_errors_are_clear():
    with pytest.raises(ValueError, match="stratified"):
        stratified_split([0, 0, 0, 1], 0.5, seed=0)  # class 1 has one image
    with pytest.raises(ValueError, match="fraction"):
        stratified_split([0, 1], 1.0)


def test_class_weights_are_inverse_frequency_with_mean_one():
    from sklearn.utils.class_weight import compute_class_weight

    labels = [0] * 10 + [1] * 30 + [2] * 60
    w = class_weights(labels, 3)
    assert w.dtype == torch.float32 and w.shape == (3,)
    assert w.mean().item() == pytest.approx(1.0)
    balanced = compute_class_weight("balanced", classes=np.arange(3), y=np.asarray(labels))
    assert np.allclose(w.numpy() / balanced, w[0].item() / balanced[0])
    assert w[0] / w[2] == pytest.approx(6.0)
    assert torch.allclose(class_weights([0, 1, 1, 3], 4), torch.tensor([1.2, 0.6, 0.0, 1.2]))
    assert torch.equal(class_weights([1, 0, 1, 0], 2), torch.ones(2))


def test_weighted_sampler_balances_classes():
    labels = [0] * 90 + [1] * 10
    sampler = build_weighted_sampler(labels)
    assert sampler.replacement and sampler.num_samples == 100 and len(sampler) == 100
    torch.manual_seed(0)
    drawn = Counter(labels[i] for _ in range(20) for i in sampler)
    assert sum(drawn.values()) == 2000
    assert 0.42 < drawn[1] / 2000 < 0.58  # 10% of the data, about half of the draws
