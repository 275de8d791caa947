"""Load a data set from its configured source into train/val/test records.

Layouts (``DataConfig.root``):

- ``imagefolder``: ``<root>/<split>/<class>/<image>``; classes are the sorted folder
  names of the train split, as in torchvision's ``ImageFolder``.
- ``parquet``: ``<root>/<split>/*.parquet`` and ``<root>/classes.json``, as written by
  :mod:`imgcls_core.data.shards`.
- ``cifar10`` / ``cifar100``: the python-pickle folder (``cifar-10-batches-py`` /
  ``cifar-100-python``, or its contents directly under root); nothing is downloaded.
- ``digits``: scikit-learn's digits, materialized under root on first use.
- ``multi_digits``: 2-4 of those digits composed into one image, labelled with the set of
  digits present (multi-label), materialized under root on first use.

Multi-label (``data.multi_label``): an image has a set of labels. ``imagefolder`` then reads the
images of ``<root>/<split>/`` (any depth) and their labels from ``data.labels_file``; ``parquet``
reads a list-of-labels ``labels`` column instead of ``label``.

Without a ``<root>/<val_split>`` (always for CIFAR) a stratified, seeded
``val_fraction`` of train becomes the validation split.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset

from imgcls_core.config import DataConfig, is_multi_label
from imgcls_core.data.digits import materialize_digits
from imgcls_core.data.records import DatasetSplits, SplitRecords
from imgcls_core.data.shards import (CLASS_INDEX, ShardImages, find_image_classes, load_class_index, not_hidden,
                                     read_shard_table)

_LAYOUTS = {
    "imagefolder": "<root>/<split>/<class>/<image>, e.g. <root>/train/cat/001.jpg",
    "digits": "<root>/<split>/<digit>/<index>.png (materialized on first use)",
    "parquet": "<root>/<split>/part-NNNNN.parquet and <root>/classes.json (python -m jobs.prepare)",
    "cifar10": "<root>/data_batch_1..5, test_batch, batches.meta (or <root>/cifar-10-batches-py/)",
    "cifar100": "<root>/train, test, meta (or <root>/cifar-100-python/)",
    "multi_digits": "<root>/<split>/<index>.png and <root>/labels.csv (materialized on first use)",
    "multi_label": "<root>/<split>/<image> and <root>/<labels_file>: CSV rows 'train/001.jpg,cat dog' "
                   "(header path,labels) or JSON {\"train/001.jpg\": [\"cat\", \"dog\"]}",
}


def load_dataset(cfg: DataConfig, *, train_images: bool = True) -> DatasetSplits:
    """Train, val and test records for ``cfg`` (test is None when the source has no test split).

    ``train_images=False`` (Parquet shards read by Ray Data, which streams the train images itself):
    the train records' image bytes stay on disk, read a row group at a time when a record is
    loaded (:class:`~imgcls_core.data.shards.ShardImages`; the normalization statistics' sample)."""
    root = Path(os.path.abspath(os.path.expanduser(cfg.root)))
    multi = is_multi_label(cfg)
    if cfg.format == "digits":
        if not (root / ".complete.json").is_file():
            materialize_digits(root, seed=cfg.seed)
    elif cfg.format == "multi_digits":
        if not (root / ".complete.json").is_file():
            from imgcls_core.data.multi_digits import materialize_multi_digits

            materialize_multi_digits(root, seed=cfg.seed)
    elif not root.is_dir():
        raise FileNotFoundError(
            f"data.root {str(root)!r} does not exist; "
            f"data.format={cfg.format} expects {_LAYOUTS[cfg.format]}"
        )
    if cfg.format in ("cifar10", "cifar100"):
        train, test = _load_cifar(root, cfg.format)
        val = None
    elif cfg.format == "parquet":
        train, val, test = _load_parquet(root, cfg, train_images)
    elif multi:
        train, val, test = _load_labelled_folder(root, cfg)
    else:
        train, val, test = _load_imagefolder(root, cfg)
    _check_classes(root, cfg, train, {cfg.val_split: val, cfg.test_split: test})
    if val is None:
        if not 0.0 < cfg.val_fraction < 1.0:
            raise ValueError(
                f"there is no validation split ({root / cfg.val_split} does not exist) and "
                f"data.val_fraction={cfg.val_fraction}; "
                "set data.val_fraction in (0, 1) to take one from train"
            )
        train_idx, val_idx = (random_split(len(train), cfg.val_fraction, cfg.seed) if multi
                              else stratified_split(train.labels, cfg.val_fraction, cfg.seed))
        train, val = train.subset(train_idx), train.subset(val_idx)
    for name, records in (("train", train), ("val", val), ("test", test)):
        if records is not None and len(records) == 0:
            raise ValueError(
                f"the {name} split of {root} has no images (expected {_layout(cfg)})"
            )
    return DatasetSplits(train, val, test, list(train.classes))


def _layout(cfg: DataConfig) -> str:
    return _LAYOUTS["multi_label"] if cfg.multi_label and cfg.format == "imagefolder" else _LAYOUTS[cfg.format]


def _check_classes(
    root: Path, cfg: DataConfig, train: SplitRecords, others: dict[str, SplitRecords | None]
) -> None:
    """Refuse a training split of fewer than two classes (a classifier would learn to answer
    the one class and report 100% accuracy) and val/test images of classes that train has
    none of (they can never be predicted right)."""
    counts = train.class_counts()
    present = [c for c, n in zip(train.classes, counts) if n]
    where = root / cfg.train_split if cfg.format in ("imagefolder", "digits", "parquet", "multi_digits") else root
    if len(present) < 2:
        found = f"only class {present[0]!r}" if present else "no labelled images"
        raise ValueError(
            f"the training split in {where} has {found} ({len(train)} images); a classifier "
            f"needs images of at least 2 classes (expected {_layout(cfg)})"
        )
    for split, records in others.items():
        if records is None:
            continue
        unseen = [c for c, n, t in zip(records.classes, records.class_counts(), counts) if n and not t]
        if unseen:
            shown = ", ".join(repr(c) for c in unseen[:10]) + (", ..." if len(unseen) > 10 else "")
            raise ValueError(
                f"the {split} split of {root} has images of {len(unseen)} class(es) that the "
                f"training split in {where} has none of: {shown}; a model trained on it can "
                "never predict them. Add training images of these classes or remove them"
            )


def stratified_split(
    labels: Sequence[int], fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(len(labels))`` keeping class proportions.

    Returns (kept, held-out ``fraction``) index arrays, each sorted.
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    y = np.asarray(labels, dtype=np.int64)
    try:
        keep, held = train_test_split(
            np.arange(len(y)), test_size=fraction, stratify=y, random_state=seed
        )
    except ValueError as exc:
        raise ValueError(
            f"cannot take a stratified {fraction:g} split of {len(y)} images in "
            f"{len(np.unique(y))} classes: {exc}. "
            "Provide an explicit validation split or change the fraction"
        ) from None
    return np.sort(keep), np.sort(held)


def random_split(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` (multi-label records have no single class to stratify by).

    Returns (kept, held-out ``fraction``) index arrays, each sorted."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    held = max(1, round(n * fraction))
    return np.sort(order[held:]), np.sort(order[:held])


def class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse class frequency, normalized to mean 1 over the classes present (0 for absent ones).

    Proportional to scikit-learn's ``compute_class_weight("balanced")``.
    """
    counts = torch.bincount(
        torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes
    ).double()
    if len(counts) > num_classes:
        raise ValueError(f"labels go up to {len(counts) - 1} but num_classes={num_classes}")
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = 1.0 / counts[present]
    weights[present] /= weights[present].mean()
    return weights.float()


def build_weighted_sampler(labels: Sequence[int]) -> WeightedRandomSampler:
    """Draws ``len(labels)`` samples per epoch with replacement, each class equally likely."""
    y = torch.as_tensor(list(labels), dtype=torch.long)
    counts = torch.bincount(y).double()
    return WeightedRandomSampler((1.0 / counts)[y], num_samples=len(y), replacement=True)


# ------------------------------------------------------------------------- imagefolder


def _load_imagefolder(
    root: Path, cfg: DataConfig
) -> tuple[SplitRecords, SplitRecords | None, SplitRecords | None]:
    train_dir = root / cfg.train_split
    if not train_dir.is_dir():
        raise FileNotFoundError(
            f"no train split: {str(train_dir)!r} does not exist; expected {_LAYOUTS[cfg.format]}"
        )
    classes, class_to_idx = find_image_classes(train_dir)
    train = _folder_records(train_dir, classes, class_to_idx)
    empty = [c for c, n in zip(classes, train.class_counts()) if n == 0]
    if empty:
        raise ValueError(
            f"class folder(s) in {train_dir} with no images ({', '.join(IMG_EXTENSIONS)}): {empty}"
        )
    val = _folder_split(root / cfg.val_split, classes, class_to_idx)
    test = _folder_split(root / cfg.test_split, classes, class_to_idx)
    return train, val, test


def _folder_split(
    directory: Path, classes: list[str], class_to_idx: dict[str, int]
) -> SplitRecords | None:
    if not directory.is_dir():
        return None
    found, _ = (
        find_image_classes(directory) if any(p.is_dir() for p in directory.iterdir()) else ([], {})
    )
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(
            f"{directory} has class folder(s) that are not in the train split: {unknown}"
        )
    return _folder_records(directory, classes, class_to_idx)


def _folder_records(
    directory: Path, classes: list[str], class_to_idx: dict[str, int]
) -> SplitRecords:
    samples = make_dataset(  # hidden files (macOS's ._<name> resource forks) are not images
        str(directory), class_to_idx, allow_empty=True,
        is_valid_file=lambda p: not_hidden(p) and has_file_allowed_extension(p, IMG_EXTENSIONS),
    )
    return SplitRecords(
        list(classes), [label for _, label in samples], [path for path, _ in samples]
    )


# ------------------------------------------------------------------ multi-label folders


def _load_labelled_folder(
    root: Path, cfg: DataConfig
) -> tuple[SplitRecords, SplitRecords | None, SplitRecords | None]:
    """Images under ``<root>/<split>/`` with label sets from ``<root>/<data.labels_file>``.

    Classes: ``<root>/classes.json`` when present, else the sorted names found in the train rows.
    Every image must have a row (an empty label set is a row with no labels) and every row an image."""
    label_sets = read_label_sets(root / cfg.labels_file)
    classes, encode = label_set_classes(root, root / cfg.labels_file, label_sets, cfg.train_split)
    listed: set[str] = set()

    def split(name: str, required: bool) -> SplitRecords | None:
        directory = root / name
        if not directory.is_dir():
            if required:
                raise FileNotFoundError(f"no train split: {str(directory)!r} does not exist; "
                                        f"expected {_LAYOUTS['multi_label']}")
            return None
        files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        keys = [p.relative_to(root).as_posix() for p in files]
        unlisted = [k for k in keys if k not in label_sets]
        if unlisted:
            raise ValueError(f"{len(unlisted)} image(s) under {directory} have no row in {root / cfg.labels_file}, "
                             f"e.g. {unlisted[:3]}; add them (an image with no labels gets an empty label list)")
        labels = [encode(key) for key in keys]
        listed.update(keys)
        return SplitRecords(list(classes), labels, [str(p) for p in files], multi_label=True)

    train = split(cfg.train_split, True)
    val, test = split(cfg.val_split, False), split(cfg.test_split, False)
    missing = sorted(set(label_sets) - listed)
    if missing:
        raise ValueError(f"{root / cfg.labels_file} lists {len(missing)} image(s) that are not under the "
                         f"{cfg.train_split}/{cfg.val_split}/{cfg.test_split} folders of {root}, e.g. {missing[:3]}")
    return train, val, test


def label_set_classes(root: Path, labels_file: Path, label_sets: dict[str, list[str]], train_split: str
                      ) -> tuple[list[str], Callable[[str], list[int]]]:
    """A multi-label folder's classes (``<root>/classes.json`` when present, else the sorted labels of
    the ``train_split`` rows) and ``encode(key)``: the class indices of a row of ``label_sets``, or a
    ValueError naming the labels that are not classes."""
    from_index = (root / CLASS_INDEX).is_file()
    if from_index:
        classes = load_class_index(root)
    else:
        prefix = f"{train_split}/"
        classes = sorted({c for key, names in label_sets.items() if key.startswith(prefix) for c in names})
    position = {c: i for i, c in enumerate(classes)}

    def encode(key: str) -> list[int]:
        unknown = [c for c in label_sets[key] if c not in position]
        if unknown:
            raise ValueError(f"{labels_file}: {key} has label(s) {unknown} that "
                             + ("are not in classes.json" if from_index
                                else f"no training image has ({len(classes)} classes)"))
        return [position[c] for c in label_sets[key]]

    return classes, encode


def read_label_sets(path: Path) -> dict[str, list[str]]:
    """``{"<split>/<file>": [label, ...]}`` from a labels CSV (header ``path,labels``; labels separated by
    spaces) or JSON file (that mapping itself)."""
    import csv
    import json

    if not path.is_file():
        raise FileNotFoundError(f"data.labels_file: {str(path)!r} does not exist; multi-label image folders "
                                f"need one: {_LAYOUTS['multi_label']}")
    text = path.read_text(encoding="utf-8-sig")  # spreadsheets save UTF-8 with a byte-order mark
    if path.suffix.lower() == ".json":
        def pairs(items: list[tuple[str, object]]) -> dict:  # a file listed twice would keep one silently
            seen: dict[str, object] = {}
            for key, value in items:
                if (name := Path(key).as_posix()) in seen:
                    raise ValueError(f"{path}: {name} is listed twice")
                seen[name] = value
            return seen

        try:
            data = json.loads(text, object_pairs_hook=pairs)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not all(
                isinstance(v, list) and all(isinstance(c, str) for c in v) for v in data.values()):
            raise ValueError(f'{path}: expected {{"<split>/<file>": ["label", ...]}}')
        return _checked_label_names(path, {k: list(v) for k, v in data.items()})
    rows = list(csv.reader(text.splitlines()))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["path", "labels"]:
        raise ValueError(f"{path}: the first row must be the header 'path,labels'")
    found: dict[str, list[str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2:
            raise ValueError(f"{path}, line {line}: expected 2 fields (path,labels), got {len(row)}: {row}")
        key = Path(row[0].strip()).as_posix()
        if key in found:
            raise ValueError(f"{path}, line {line}: {key} is listed twice")
        found[key] = row[1].split()
    return _checked_label_names(path, found)


def _checked_label_names(path: Path, label_sets: dict[str, list[str]]) -> dict[str, list[str]]:
    """``label_sets``, unless a label holds a comma, semicolon or bar: labels joined by another
    separator than the format's would each become one class named after the whole set."""
    for key, labels in label_sets.items():
        if joined := [label for label in labels if any(c in label for c in ",;|")]:
            raise ValueError(f"{path}: {key} has label {joined[0]!r}; a CSV separates labels by spaces "
                             f"('cat dog'), a JSON file lists them ([\"cat\", \"dog\"])")
    return label_sets


# ----------------------------------------------------------------------------- parquet


def _load_parquet(
    root: Path, cfg: DataConfig, train_images: bool = True
) -> tuple[SplitRecords, SplitRecords | None, SplitRecords | None]:
    classes = load_class_index(root)

    def split(name: str, required: bool) -> SplitRecords | None:
        if not (root / name).is_dir():
            if required:
                raise FileNotFoundError(
                    f"no train split: {str(root / name)!r} does not exist; "
                    f"expected {_LAYOUTS['parquet']}"
                )
            return None
        images = train_images or name != cfg.train_split
        table = read_shard_table(root, name, images=images)
        multi = "labels" in table.column_names
        if multi != is_multi_label(cfg):
            raise ValueError(f"{root / name}: the shards have a {'labels (list)' if multi else 'label'} column, "
                             f"so they are {'multi' if multi else 'single'}-label; set data.multi_label="
                             f"{'true' if multi else 'false'}")
        labels = table.column("labels" if multi else "label").to_pylist()
        flat = [c for label in labels for c in label] if multi else labels
        unknown = sorted({label for label in flat if not 0 <= label < len(classes)})
        if unknown:
            raise ValueError(
                f"{root / name} has label(s) {unknown} that are not in classes.json "
                f"({len(classes)} classes)"
            )
        return SplitRecords(
            list(classes),
            labels,
            table.column("path").to_pylist(),
            images=table.column("image").to_pylist() if images else ShardImages(root, name),
            multi_label=multi,
        )

    return split(cfg.train_split, True), split(cfg.val_split, False), split(cfg.test_split, False)


# ------------------------------------------------------------------------------- CIFAR


def _load_cifar(root: Path, fmt: str) -> tuple[SplitRecords, SplitRecords | None]:
    nested = root / ("cifar-10-batches-py" if fmt == "cifar10" else "cifar-100-python")
    folder = nested if nested.is_dir() else root
    if fmt == "cifar10":
        train_files, test_file, meta_file = (
            [f"data_batch_{i}" for i in range(1, 6)],
            "test_batch",
            "batches.meta",
        )
        label_key, names_key = "labels", "label_names"
    else:
        train_files, test_file, meta_file = ["train"], "test", "meta"
        label_key, names_key = "fine_labels", "fine_label_names"
    missing = [f for f in [*train_files, meta_file] if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is missing {missing}; data.format={fmt} expects {_LAYOUTS[fmt]}"
        )
    names = _unpickle(folder / meta_file, names_key)[names_key]
    classes = [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in names]

    def records(files: list[str], split: str) -> SplitRecords:
        arrays, labels = [], []
        for name in files:
            batch = _unpickle(folder / name, "data", label_key)
            try:
                arrays.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(int(label) for label in batch[label_key])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{folder / name}: not a CIFAR python batch: {exc}") from None
        data = np.concatenate(arrays)
        paths = [f"{fmt}/{split}/{i}" for i in range(len(labels))]
        return SplitRecords(classes, labels, paths, arrays=data)

    test = records([test_file], "test") if (folder / test_file).is_file() else None
    return records(train_files, "train"), test


def _unpickle(path: Path, *keys: str) -> dict:
    """A CIFAR python batch holding ``keys``, read with :class:`_BatchUnpickler` (no code from
    the file runs); its keys as text."""
    try:
        with path.open("rb") as fh:
            raw = _BatchUnpickler(fh, encoding="latin1").load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(
            f"{path}: refusing to load: {exc}. A CIFAR batch holds only lists, numbers, text and "
            "numpy arrays; this file is not one, or has been tampered with"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"{path}: not a readable CIFAR python batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a CIFAR python batch: it holds a {type(raw).__name__}, not a dict")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"{path}: not a CIFAR python batch: no {missing} (it holds {sorted(map(str, batch))})")
    return batch


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asks for a function or class that loading a data batch never needs."""


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What a protocol 0-2 pickle written by Python 3 calls to rebuild ``bytes``
    (``_codecs.encode(text, "latin1")``), and nothing else ``_codecs.encode`` could do."""
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise UnsafePickleError(f"_codecs.encode with {type(text).__name__} and {encoding!r}")
    return text.encode("latin1")


def _plain_dtype(*args) -> np.dtype:
    """numpy.dtype, refusing object dtypes (their arrays hold arbitrary pickled objects)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise UnsafePickleError(f"a numpy array of Python objects (dtype {dtype})")
    return dtype


def _numpy_picklers() -> dict[tuple[str, str], object]:
    """The globals numpy arrays, dtypes and scalars pickle through, under the module names of
    numpy 1 (``numpy.core``: the real CIFAR files, pickled by Python 2) and numpy 2 (``numpy._core``)."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray, numeric
    found: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _plain_dtype}
    for package in ("numpy.core", "numpy._core"):
        found[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct  # protocols 0-4
        found[(f"{package}.multiarray", "scalar")] = multiarray.scalar  # a numpy number
        found[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return found


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, tuples, str, bytes, numbers and numpy arrays, nothing else.

    ``pickle.load`` calls whatever function a file names (``os.system`` included) while it
    loads: a downloaded "CIFAR batch" could run any code. Here every global a pickle asks for
    must be one of the numpy constructors a real batch uses (``numpy.core.multiarray
    ._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``), their numpy 2 and protocol 5
    counterparts, or ``_codecs.encode`` for latin-1 (Python 3's protocol 2 ``bytes``); any other
    raises :class:`UnsafePickleError` before anything is called.
    """

    ALLOWED = {**_numpy_picklers(), ("_codecs", "encode"): _latin1_bytes}

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"the pickle calls {module}.{name}") from None
