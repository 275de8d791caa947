"""Parquet shards: an ImageFolder tree converted to ``<out>/<split>/part-NNNNN.parquet``.

Each row holds the original encoded file bytes (never re-encoded), the class
index and the source path relative to the converted folder::

    image: binary, label: int64, path: string

Multi-label shards hold a ``labels: list<int64>`` column (the image's set of class indices)
instead of ``label`` (:data:`MULTI_SCHEMA`).

``<out>/classes.json`` holds ``{"classes": [...], "class_to_idx": {...}}`` and
``<out>/report.json`` the :class:`ConversionReport`. Each split is written to a
temporary folder and renamed into place, so a crash never leaves a half-written
split behind.

A source without ``val/`` or ``test/`` (a flat ``<src>/<class>/<image>`` tree, or
``train/`` alone) can have them held out of its train files: ``val_fraction`` and
``test_fraction`` of them, each file's split a seeded hash of its path, so that
re-running the conversion gives the same splits (recorded in the report's
``held_out``), and adding images to the source moves none of those already there
between train and a held-out split.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import random
import shutil
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from imgcls_core.data.records import decode_image

SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("path", pa.string())])
MULTI_SCHEMA = pa.schema([("image", pa.binary()), ("labels", pa.list_(pa.int64())), ("path", pa.string())])
SPLITS = ("train", "val", "test")
CLASS_INDEX = "classes.json"
REPORT = "report.json"
_CHUNK = 64


@dataclass
class SplitShards:
    """What was written for one split."""

    split: str
    images: int
    shards: list[str]
    class_counts: dict[str, int]  # images per class (multi-label: images carrying it)


@dataclass
class ConversionReport:
    """The result of :func:`convert_image_folder`; also saved as ``<out>/report.json``."""

    source: str
    out: str
    layout: str  # "splits" (<src>/<split>/<class>/...), "flat" (<src>/<class>/..., all train) or "multi_label"
    classes: list[str]
    splits: dict[str, SplitShards]
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    # split -> {"from": "train", "fraction": f, "seed": s, "files": n, "method": "path-hash"}: splits the source lacked,
    # held out of its train files (by a seeded hash of each file's path)
    held_out: dict[str, dict] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return sum(s.images for s in self.splits.values())

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """Images and shards per split, then every skipped file with its reason."""
        shards = sum(len(s.shards) for s in self.splits.values())
        lines = [
            f"converted {self.source} -> {self.out} ({self.layout} layout): "
            f"{len(self.classes)} classes, "
            f"{self.images:,} images in {shards} shard(s), {self.seconds:.1f}s"
        ]
        width = max(len(name) for name in self.splits)
        for name, s in self.splits.items():
            lines.append(f"  {name:<{width}}  {s.images:>9,} images  {len(s.shards):>4} shard(s)")
        if self.held_out:
            held = self.held_out.items()
            parts = [f"{n} {h['fraction']:.0%} ({h['files']} files)" for n, h in held]
            seed = next(iter(self.held_out.values()))["seed"]
            lines.append(
                f"the source has no {' or '.join(f'{n}/' for n in self.held_out)}: held out "
                f"{', '.join(parts)} of its train files, by a hash of each file's path (seed {seed})"
            )
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s):")
            lines.extend(f"  {item['path']}: {item['reason']}" for item in self.skipped)
        else:
            lines.append("skipped 0 files")
        lines.append(f"report: {Path(self.out) / REPORT}")
        return "\n".join(lines)


def write_shards(
    records: Iterable[tuple[bytes, int, str]],
    out_dir: str | Path,
    split: str,
    classes: list[str],
    shard_size: int = 2048,
) -> SplitShards:
    """Write ``(encoded bytes, label, path)`` records as ``<out_dir>/<split>/part-NNNNN.parquet``
    (a label that is a list or tuple of class indices: multi-label shards, :data:`MULTI_SCHEMA`).

    Replaces an existing split atomically. Writes ``classes.json`` when absent and
    raises ValueError when it exists with other classes.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = out_dir / CLASS_INDEX
    if index.is_file():
        existing = load_class_index(out_dir)
        if existing != list(classes):
            raise ValueError(
                f"{index} lists other classes ({len(existing)}) than these shards ({len(classes)})"
            )
    else:
        _write_class_index(out_dir, classes)
    tmp = out_dir / f".{split}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    counts = [0] * len(classes)
    rows_written = 0
    files: list[str] = []
    try:
        rows = iter(records)
        while batch := list(itertools.islice(rows, shard_size)):
            images, labels, paths = zip(*batch)
            multi = isinstance(labels[0], (list, tuple))
            flat = [int(c) for y in labels for c in y] if multi else [int(y) for y in labels]
            bad = sorted({y for y in flat if not 0 <= y < len(classes)})
            if bad:
                raise ValueError(f"labels {bad} out of range for {len(classes)} classes")
            for y in flat:
                counts[y] += 1
            rows_written += len(batch)
            table = pa.Table.from_arrays(
                [
                    pa.array(images, pa.binary()),
                    pa.array([[int(c) for c in y] for y in labels] if multi else labels,
                             pa.list_(pa.int64()) if multi else pa.int64()),
                    pa.array(paths, pa.string()),
                ],
                schema=MULTI_SCHEMA if multi else SCHEMA,
            )
            name = f"part-{len(files):05d}.parquet"
            pq.write_table(table, tmp / name)
            files.append(name)
        _replace_dir(tmp, out_dir / split)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SplitShards(split, rows_written, files, dict(zip(classes, counts)))


def read_shard_table(root: str | Path, split: str, *, images: bool = True) -> pa.Table:
    """All rows of ``<root>/<split>/*.parquet`` (in file order) as one table (multi-label shards: with
    a ``labels`` column, :data:`MULTI_SCHEMA`); ``images=False`` leaves the image bytes unread (the
    labels and paths only)."""
    directory = Path(root) / split
    if not directory.is_dir():
        raise FileNotFoundError(f"no shard folder {str(directory)!r}")
    files = sorted(directory.glob("*.parquet"))
    if not files:
        raise ValueError(f"{directory} has no .parquet shards")
    tables = []
    for f in files:
        names = pq.read_schema(f).names
        schema = MULTI_SCHEMA if "labels" in names else SCHEMA
        missing = [n for n in schema.names if n not in names]
        if missing:
            raise ValueError(f"{f} lacks column(s) {missing}; expected schema {schema}")
        if not images:
            schema = pa.schema([field for field in schema if field.name != "image"])
        tables.append(pq.read_table(f, columns=schema.names).cast(schema))
    return pa.concat_tables(tables)


class ShardImages(Sequence):
    """The ``image`` column of ``<root>/<split>/*.parquet`` as a sequence of bytes, read on demand.

    Rows are numbered as :func:`read_shard_table` orders them. Reading a row reads its row group's
    image column and keeps that one group, so a pass in row order (a seeded sample sorted, as the
    normalization statistics take it) holds one row group's bytes at a time, not the split's. Used
    for the train split when Ray Data streams it (``load_dataset(train_images=False)``): the driver
    and the workers never load it whole. Pickles without its cache."""

    def __init__(self, root: str | Path, split: str):
        self.files = sorted((Path(root) / split).glob("*.parquet"))
        starts, groups, first = [], [], 0
        for f in self.files:
            meta = pq.ParquetFile(f).metadata
            for g in range(meta.num_row_groups):
                starts.append(first)
                groups.append((f, g))
                first += meta.row_group(g).num_rows
        self._starts, self._groups, self._len = starts, groups, first
        self._cached: tuple[int, list[bytes]] | None = None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):  # noqa: ANN001 - an int (a slice gives a list)
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._len))]
        if not -self._len <= index < self._len:
            raise IndexError(f"row {index} of {self._len}")
        index %= self._len
        group = bisect.bisect_right(self._starts, index) - 1
        if self._cached is None or self._cached[0] != group:
            path, number = self._groups[group]
            column = pq.ParquetFile(path).read_row_group(number, columns=["image"]).column("image")
            self._cached = (group, column.to_pylist())
        return self._cached[1][index - self._starts[group]]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cached": None}


def load_class_index(root: str | Path) -> list[str]:
    """Class names from ``<root>/classes.json``, in label order."""
    path = Path(root) / CLASS_INDEX
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} not found; Parquet data sets are written by python -m jobs.prepare"
        )
    payload = json.loads(path.read_text())
    classes = payload.get("classes") if isinstance(payload, dict) else None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError(
            f"{path} must hold {{'classes': [name, ...]}}, a non-empty list of strings"
        )
    mapping = payload.get("class_to_idx")
    if mapping is not None and mapping != {c: i for i, c in enumerate(classes)}:
        raise ValueError(f"{path}: class_to_idx does not match the order of classes")
    return classes


def convert_image_folder(
    src: str | Path,
    out: str | Path,
    *,
    num_workers: int = 2,
    shard_size: int = 2048,
    max_pixels: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    labels_file: str | Path | None = None,
) -> ConversionReport:
    """Convert ``<src>/{train,val,test}/<class>/<image>`` (or flat ``<src>/<class>/<image>``, all
    train) to Parquet shards in ``out``.

    With ``labels_file`` (relative to ``src``, or absolute) the images are multi-label: the
    files the labels CSV/JSON lists (``<split>/<file>``, as data.labels_file reads them) with their
    label sets, written as multi-label shards (:data:`MULTI_SCHEMA`); classes come from
    ``<src>/classes.json`` when present, else the sorted labels of the train rows.

    Rows are written in a seeded random order, so that every shard (and every
    worker's share of a split) holds a mix of all classes: folder order would give
    class-sorted shards, and per-worker batches of a few classes skew BatchNorm
    statistics under data-parallel training.

    Every file is decoded once, in ``num_workers`` processes (0 or 1: in this process);
    empty, truncated, unreadable and non-image files are skipped and listed with
    their reason in the report. Classes are the sorted folder names of train, as in
    torchvision's ImageFolder; val/test may not hold other classes.

    A val or test split the source lacks is held out of its train files when
    ``val_fraction`` / ``test_fraction`` > 0 (fractions of all train files; each file's split a
    hash of ``seed`` and its path, see :func:`_hold_out`); 0 leaves it missing.
    """
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(
            f"source folder {str(src)!r} does not exist; "
            f"expected <src>/{{train,val,test}}/<class>/<image> "
            f"or <src>/<class>/<image>"
        )
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ValueError(f"the output folder {out} must not be inside the source folder {src}")
    for split in SPLITS:  # writing out/<split> replaces that folder: it must not hold the source
        if (out / split).resolve() == src.resolve() or (out / split).resolve() in src.resolve().parents:
            raise ValueError(f"the source folder {src} is the output's {split} split ({out / split}), which "
                             f"prepare replaces; write the shards to another folder")
    split_dirs = {s: src / s for s in SPLITS if (src / s).is_dir()}
    if labels_file is not None:
        return _convert_labelled(src, out, Path(src, labels_file), split_dirs, num_workers=num_workers,
                                 shard_size=shard_size, max_pixels=max_pixels, seed=seed,
                                 fractions={"val": val_fraction, "test": test_fraction}, start=start)
    layout = "splits" if split_dirs else "flat"
    if not split_dirs:
        split_dirs = {"train": src}
    elif "train" not in split_dirs:
        raise ValueError(f"{src} has {sorted(split_dirs)} but no train folder")
    try:
        classes, class_to_idx = find_image_classes(split_dirs["train"])
    except FileNotFoundError:
        raise ValueError(f"{split_dirs['train']} has no class folders (<class>/<image>)") from None
    if len(classes) < 2:
        raise ValueError(f"{split_dirs['train']} has one class folder ({classes[0]!r}); a classifier needs at "
                         f"least 2 (<class>/<image> for each class)")
    samples: dict[str, list[tuple[str, int]]] = {}
    for split, directory in split_dirs.items():
        found = find_image_classes(directory)[0] if any(p.is_dir() for p in directory.iterdir()) else []
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(
                f"{directory} has class folder(s) that are not in the train split: {unknown}"
            )
        samples[split] = make_dataset(
            str(directory), class_to_idx, is_valid_file=not_hidden, allow_empty=True
        )
    if not samples["train"]:
        raise ValueError(f"no files under the class folders of {split_dirs['train']}")
    held_out = _hold_out(samples, {"val": val_fraction, "test": test_fraction}, seed, src, classes)
    return _write_splits(src, out, layout, classes, samples, held_out, num_workers=num_workers, shard_size=shard_size,
                         max_pixels=max_pixels, seed=seed, start=start)


def _convert_labelled(src: Path, out: Path, labels_file: Path, split_dirs: dict[str, Path], *, num_workers: int,
                      shard_size: int, max_pixels: int | None, seed: int, fractions: dict[str, float],
                      start: float) -> ConversionReport:
    """convert_image_folder for a multi-label folder (``labels_file``)."""
    from imgcls_core.data.sources import label_set_classes, read_label_sets  # sources imports this module

    if "train" not in split_dirs:
        raise ValueError(f"{src} has no train folder; a multi-label folder is <src>/<split>/<image> with the "
                         f"label sets in {labels_file.name}")
    label_sets = read_label_sets(labels_file)
    classes, encode = label_set_classes(src, labels_file, label_sets, "train")
    for split, directory in split_dirs.items():  # as training reads the folder: every image has a row
        files = sorted(p for p in directory.rglob("*") if p.is_file() and not_hidden(str(p))
                       and p.suffix.lower() in (*IMG_EXTENSIONS, ".gif"))
        unlisted = [p.relative_to(src).as_posix() for p in files if p.relative_to(src).as_posix() not in label_sets]
        if unlisted:
            raise ValueError(f"{len(unlisted)} file(s) under {directory} have no row in {labels_file}, e.g. "
                             f"{unlisted[:3]}; add them (an image with no labels gets an empty label list)")
    samples: dict[str, list[tuple[str, list[int]]]] = {}
    for key in sorted(label_sets):
        split = key.split("/", 1)[0]
        if split not in split_dirs:
            raise ValueError(f"{labels_file}: {key} is not under a split folder ({', '.join(split_dirs)}) of {src}")
        samples.setdefault(split, []).append((str(src / key), encode(key)))
    if not samples.get("train"):
        raise ValueError(f"{labels_file} lists no train/ images")
    held_out = _hold_out(samples, fractions, seed, src)
    return _write_splits(src, out, "multi_label", classes, samples, held_out, num_workers=num_workers,
                         shard_size=shard_size, max_pixels=max_pixels, seed=seed, start=start)


def _write_splits(src: Path, out: Path, layout: str, classes: list[str], samples: dict[str, list], held_out: dict,
                  *, num_workers: int, shard_size: int, max_pixels: int | None, seed: int,
                  start: float) -> ConversionReport:
    """Shuffle each split's ``(path, label)`` items (seeded), check-decode them and write the shards."""
    samples = {split: samples[split] for split in SPLITS if split in samples}
    for split, items in samples.items():
        random.Random(f"{seed}/{split}").shuffle(items)

    # Every split is written into a staging folder first and moved into place once all are: an
    # interrupted or failed run leaves the data set that was there whole, never old shards of some
    # splits under the new class index.
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    skipped: list[dict[str, str]] = []
    written: dict[str, SplitShards] = {}
    try:
        _write_class_index(staging, classes)
        pool = ProcessPoolExecutor(num_workers) if num_workers > 1 else None
        try:
            for split, items in samples.items():
                rows = _checked_rows(items, src, split, pool, max_pixels, skipped)
                written[split] = write_shards(rows, staging, split, classes, shard_size)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        for split, shards in written.items():
            if not shards.images:
                reasons = [f"{s['path']}: {s['reason']}" for s in skipped if s["split"] == split]
                example = f"; e.g. {reasons[0]}" if reasons else ""
                what = ("nothing to train on" if split == "train" else
                        f"training would find no {split} shards: add images, or remove the empty {split} folder "
                        f"to hold out a fraction of train (--{split}-fraction)")
                raise ValueError(f"none of the {len(samples[split])} {split} file(s) could be used{example}; {what}")
        (out / REPORT).unlink(missing_ok=True)
        (out / CLASS_INDEX).unlink(missing_ok=True)
        for split in written:
            _replace_dir(staging / split, out / split)
        for stale in set(SPLITS) - set(written):
            directory = out / stale
            if directory.is_dir() and all(p.suffix == ".parquet" for p in directory.iterdir()):
                shutil.rmtree(directory)
        os.replace(staging / CLASS_INDEX, out / CLASS_INDEX)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report = ConversionReport(
        str(src),
        str(out),
        layout,
        list(classes),
        written,
        skipped,
        round(time.perf_counter() - start, 3),
        held_out,
    )
    _atomic_write_text(out / REPORT, json.dumps(report.to_dict(), indent=1))
    return report


def _hold_out(
    samples: dict[str, list[tuple[str, Any]]], fractions: dict[str, float], seed: int, src: Path,
    classes: list[str] | None = None,
) -> dict[str, dict]:
    """Move seeded ``fractions`` of the train files into the splits ``samples`` lacks (in place);
    what was held out, by split. Fractions are of all train files.

    A file's split follows from a hash of ``seed`` and its path under ``src`` alone, never from the
    other files: adding images to the source (or removing some) and preparing it again moves no
    image between train and a held-out split, so a model trained before is never tested (say by
    jobs.promote, on the champion) on images it trained on. Each class's share of a held-out split is
    its fraction in expectation (a 10% split of 1,000 files holds 100 +- 10), not exactly."""
    missing = {s: f for s, f in fractions.items() if s not in samples and f > 0}
    if not missing:
        return {}
    if sum(missing.values()) >= 1.0:
        raise ValueError(
            f"the held-out fractions {missing} leave no training files; keep their sum below 1"
        )
    ranges, low = {}, 0.0
    for split in ("test", "val"):  # test first: its files never depend on the val fraction
        if split in missing:
            ranges[split], low = (low, low + missing[split]), low + missing[split]
    held: dict[str, list] = {split: [] for split in ranges}
    train = []
    for item in samples["train"]:
        u = _unit_hash(f"{seed}/{Path(item[0]).relative_to(src).as_posix()}")
        split = next((name for name, (a, b) in ranges.items() if a <= u < b), None)
        (held[split] if split else train).append(item)
    held_out = {}
    for split, items in held.items():
        if not items:
            raise ValueError(
                f"cannot hold out a {split} split: none of the {len(samples['train'])} train files fell in its "
                f"{missing[split]:.0%} (a file's split is a hash of its path); raise --{split}-fraction or give "
                f"the source a {split}/ folder")
        samples[split] = items
        held_out[split] = {"from": "train", "fraction": missing[split], "seed": seed, "files": len(items),
                           "method": "path-hash"}
    if classes is not None:  # single-label: a class whose few files were all held out has nothing to train on
        kept = {label for _, label in train}
        if emptied := sorted({classes[label] for _, label in samples["train"] if label not in kept}):
            raise ValueError(f"class(es) {emptied} have so few files that all were held out for "
                             f"{'/'.join(held)}; add images to them, or give the source val/ and test/ folders")
    samples["train"] = train
    return {s: held_out[s] for s in SPLITS if s in held_out}


def _unit_hash(text: str) -> float:
    """A number in [0, 1) that depends on ``text`` only (the same on every machine and Python)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


# Folders that operating systems and tools leave in an image tree (macOS archives' resource forks,
# Synology thumbnails; hidden ones such as .ipynb_checkpoints start with a dot): never a class.
NOT_CLASSES = ("__MACOSX", "@eaDir")


def not_hidden(path: str) -> bool:
    """Not a hidden file (``.DS_Store``, macOS's ``._<name>`` resource forks)."""
    return not os.path.basename(path).startswith(".")


def find_image_classes(directory: str | Path) -> tuple[list[str], dict[str, int]]:
    """torchvision's ``find_classes`` (sorted class folder names and their indices) without hidden
    folders and those of :data:`NOT_CLASSES`, which would become classes of no images and shift
    every other class's index. FileNotFoundError when there is none."""
    with os.scandir(directory) as entries:
        classes = sorted(e.name for e in entries if e.is_dir() and not_hidden(e.name) and e.name not in NOT_CLASSES)
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
    return classes, {c: i for i, c in enumerate(classes)}


def _checked_rows(
    items: list[tuple[str, int]],
    src: Path,
    split: str,
    pool: Executor | None,
    max_pixels: int | None,
    skipped: list[dict[str, str]],
) -> Iterator[tuple[bytes, int, str]]:
    """``(bytes, label, relative path)`` per file that decodes; the rest go to ``skipped``."""
    chunks = [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]
    results: Iterator[list[tuple[bytes | None, str | None]]]
    if pool is None:
        results = (_check_files([p for p, _ in c], max_pixels) for c in chunks)
    else:
        results = _bounded_map(pool, [[p for p, _ in c] for c in chunks], max_pixels)
    for chunk, checked in zip(chunks, results):
        for (path, label), (data, reason) in zip(chunk, checked):
            rel = Path(path).relative_to(src).as_posix()
            if data is None:
                skipped.append({"split": split, "path": rel, "reason": reason or "unknown"})
            else:
                yield data, label, rel


def _bounded_map(pool: Executor, chunks: list[list[str]], max_pixels: int | None, window: int = 8):
    """``pool.map`` in order with at most ``window`` chunks in flight, so memory stays bounded."""
    todo = iter(chunks)
    pending = deque(
        pool.submit(_check_files, c, max_pixels) for c in itertools.islice(todo, window)
    )
    while pending:
        result = pending.popleft().result()
        nxt = next(todo, None)
        if nxt is not None:
            pending.append(pool.submit(_check_files, nxt, max_pixels))
        yield result


def _check_files(paths: list[str], max_pixels: int | None) -> list[tuple[bytes | None, str | None]]:
    """Each file's bytes if it decodes, else None and the reason."""
    results: list[tuple[bytes | None, str | None]] = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            results.append((None, f"unreadable: {exc.strerror or exc}"))
            continue
        try:
            decode_image(data, max_pixels=max_pixels)
        except ValueError as exc:  # CorruptImageError and its subclasses
            results.append((None, str(exc)))
        except Exception as exc:  # a decoder bug must not stop a long conversion
            results.append((None, f"could not decode: {type(exc).__name__}: {exc}"))
        else:
            results.append((data, None))
    return results


def _write_class_index(out: Path, classes: list[str]) -> None:
    payload = {"classes": list(classes), "class_to_idx": {c: i for i, c in enumerate(classes)}}
    _atomic_write_text(out / CLASS_INDEX, json.dumps(payload, indent=1))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``, replacing an existing ``target`` with two renames."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, target)
