"""Load a data set from its configured source into train/val/test records.

Layouts (``DataConfig.root``):

- ``imagefolder``: ``<root>/<split>/<class>/<image>``; classes are the sorted folder
  names of the train split, as in torchvision's ``ImageFolder``.
- ``parquet``: ``<root>/<split>/*.parquet`` and ``<root>/classes.json``, as written by
  :mod:`imgcls_core.data.shards`.
- ``cifar10`` / ``cifar100``: the python-pickle folder (``cifar-10-batches-py`` /
  ``cifar-100-python``, or its contents directly under root); nothing is downloaded.
- ``digits``: scikit-learn's digits, materialized under root on first use.

Without a ``<root>/<val_split>`` (always for CIFAR) a stratified, seeded
``val_fraction`` of train becomes the validation split.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from imgcls_core.config import DataConfig
from imgcls_core.data.digits import materialize_digits
from imgcls_core.data.records import DatasetSplits, SplitRecords
from imgcls_core.data.shards import load_class_index, read_shard_table

_LAYOUTS = {
    "imagefolder": "<root>/<split>/<class>/<image>, e.g. <root>/train/cat/001.jpg",
    "digits": "<root>/<split>/<digit>/<index>.png (materialized on first use)",
    "parquet": "<root>/<split>/part-NNNNN.parquet and <root>/classes.json (python -m jobs.prepare)",
    "cifar10": "<root>/data_batch_1..5, test_batch, batches.meta (or <root>/cifar-10-batches-py/)",
    "cifar100": "<root>/train, test, meta (or <root>/cifar-100-python/)",
}


def load_dataset(cfg: DataConfig) -> DatasetSplits:
    """Train, val and test records for ``cfg`` (test is None when the source has no test split)."""
    root = Path(os.path.abspath(os.path.expanduser(cfg.root)))
    if cfg.format == "digits":
        if not (root / ".complete.json").is_file():
            materialize_digits(root, seed=cfg.seed)
    elif not root.is_dir():
        raise FileNotFoundError(
            f"data.root {str(root)!r} does not exist; "
            f"data.format={cfg.format} expects {_LAYOUTS[cfg.format]}"
        )
    if cfg.format in ("cifar10", "cifar100"):
        train, test = _load_cifar(root, cfg.format)
        val = None
    elif cfg.format == "parquet":
        train, val, test = _load_parquet(root, cfg)
    else:
        train, val, test = _load_imagefolder(root, cfg)
    if val is None:
        if not 0.0 < cfg.val_fraction < 1.0:
            raise ValueError(
                f"there is no validation split ({root / cfg.val_split} does not exist) and "
                f"data.val_fraction={cfg.val_fraction}; "
                "set data.val_fraction in (0, 1) to take one from train"
            )
        train_idx, val_idx = stratified_split(train.labels, cfg.val_fraction, cfg.seed)
        train, val = train.subset(train_idx), train.subset(val_idx)
    for name, records in (("train", train), ("val", val), ("test", test)):
        if records is not None and len(records) == 0:
            raise ValueError(
                f"the {name} split of {root} has no images (expected {_LAYOUTS[cfg.format]})"
            )
    return DatasetSplits(train, val, test, list(train.classes))


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
    classes, class_to_idx = find_classes(str(train_dir))
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
        find_classes(str(directory)) if any(p.is_dir() for p in directory.iterdir()) else ([], {})
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
    samples = make_dataset(
        str(directory), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True
    )
    return SplitRecords(
        list(classes), [label for _, label in samples], [path for path, _ in samples]
    )


# ----------------------------------------------------------------------------- parquet


def _load_parquet(
    root: Path, cfg: DataConfig
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
        table = read_shard_table(root, name)
        labels = table.column("label").to_pylist()
        unknown = sorted({label for label in labels if not 0 <= label < len(classes)})
        if unknown:
            raise ValueError(
                f"{root / name} has label(s) {unknown} that are not in classes.json "
                f"({len(classes)} classes)"
            )
        return SplitRecords(
            list(classes),
            labels,
            table.column("path").to_pylist(),
            images=table.column("image").to_pylist(),
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
    classes = [str(c) for c in _unpickle(folder / meta_file)[names_key]]

    def records(files: list[str], split: str) -> SplitRecords:
        arrays, labels = [], []
        for name in files:
            batch = _unpickle(folder / name)
            arrays.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(label) for label in batch[label_key])
        data = np.concatenate(arrays)
        paths = [f"{fmt}/{split}/{i}" for i in range(len(labels))]
        return SplitRecords(classes, labels, paths, arrays=data)

    test = records([test_file], "test") if (folder / test_file).is_file() else None
    return records(train_files, "train"), test


def _unpickle(path: Path) -> dict:
    with path.open("rb") as fh:
        raw = pickle.load(fh, encoding="latin1")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
