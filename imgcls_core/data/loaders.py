"""DataLoaders for a run's splits, built only for the splits asked for.

Shuffling draws from torch's global RNG, which the engine reseeds every epoch,
so the order is reproducible and a mid-epoch resume continues exactly. The
training loader's worker processes start anew every epoch (about 0.1 s per
epoch here): their seed is then drawn after that reseed, so their augmentation
replays exactly after a resume too (persistent workers seed once, at their
first epoch, so a resumed run's workers drew other augmentations). With
``augment.batched`` the training batches come from :class:`MemoryTrainBatches`
instead: images decoded once into memory, augmented a whole batch at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler
from torchvision.transforms import v2

from imgcls_core.config import Config
from imgcls_core.data.presets import BatchAugment, build_batch_augment, build_eval_transform, build_train_transform
from imgcls_core.data.records import DatasetSplits, RecordDataset, SplitRecords
from imgcls_core.data.preprocessing import Preprocessing
from imgcls_core.data.sources import build_weighted_sampler

SPLITS = ("train", "val", "test")


def _common(cfg: Config) -> dict:
    return {"num_workers": cfg.data.num_workers, "pin_memory": torch.cuda.is_available(),
            "persistent_workers": cfg.data.num_workers > 0}


def train_loader(cfg: Config, records: SplitRecords, pre: Preprocessing, *, sampler: Sampler | None = None,
                 rank: int = 0, world: int = 1) -> DataLoader | MemoryTrainBatches:
    """The augmented, shuffled training batches (``data.balance=weighted_sampler`` draws with a
    class-balancing sampler unless the caller passes its own). With ``augment.batched``, a
    :class:`MemoryTrainBatches` giving rank ``rank`` of ``world`` its share."""
    d = cfg.data
    if cfg.augment.batched:
        return MemoryTrainBatches(cfg, records, build_batch_augment(d.image_size, pre.mean, pre.std, cfg.augment),
                                  rank=rank, world=world)
    if sampler is None and d.balance == "weighted_sampler":
        sampler = build_weighted_sampler(records.labels)
    transform = build_train_transform(d.image_size, pre.mean, pre.std, cfg.augment)
    return DataLoader(records.dataset(transform), batch_size=d.batch_size, shuffle=sampler is None, sampler=sampler,
                      drop_last=len(records) > d.batch_size, **{**_common(cfg), "persistent_workers": False})


def eval_loader(cfg: Config, records: SplitRecords, pre: Preprocessing) -> DataLoader:
    """Batches of ``records`` in order, with the eval transform (resize + center crop + normalize)."""
    transform = build_eval_transform(cfg.data.image_size, pre.mean, pre.std, pre.crop_ratio)
    return DataLoader(records.dataset(transform), batch_size=cfg.data.eval_batch_size, **_common(cfg))


def build_loaders(cfg: Config, splits: DatasetSplits, pre: Preprocessing,
                  which: Sequence[str] = SPLITS) -> dict[str, DataLoader]:
    """DataLoaders for the splits in ``which`` that the data set has (no ``test`` without a test split)."""
    unknown = set(which) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; choose from {list(SPLITS)}")
    loaders: dict[str, DataLoader] = {}
    if "train" in which:
        loaders["train"] = train_loader(cfg, splits.train, pre)
    if "val" in which:
        loaders["val"] = eval_loader(cfg, splits.val, pre)
    if "test" in which and splits.test is not None:
        loaders["test"] = eval_loader(cfg, splits.test, pre)
    return loaders


class MemoryTrainBatches:
    """Training batches from images decoded once, at ``data.image_size``, into one uint8 tensor
    and augmented a whole batch at a time (:class:`~imgcls_core.data.presets.BatchAugment`).

    One process shuffles with torch's global RNG, as a DataLoader does. Several ranks
    (``world`` > 1) call :meth:`set_epoch` every epoch and draw one permutation from ``data.seed``
    and the epoch, the same on every rank; rank ``rank`` takes every ``world``-th image of it
    (equal shares, as ``DistributedSampler`` with ``drop_last``). Augmentation draws from the
    global RNG, which the engine reseeds every epoch, so a resumed run sees the same batches.
    Corrupt images are skipped while decoding, as by a DataLoader (``dataset.skipped_count``).
    """

    def __init__(self, cfg: Config, records: SplitRecords, augment: BatchAugment, *, rank: int = 0, world: int = 1):
        d = cfg.data
        need = len(records) * 3 * d.image_size ** 2
        budget = _available_memory() // 2
        if need > budget:
            raise MemoryError(f"augment.batched keeps the training split in memory: {len(records)} images x 3 x "
                              f"{d.image_size} x {d.image_size} = {need / 2**30:.1f} GiB, more than half of the "
                              f"{budget * 2 / 2**30:.1f} GiB available; set augment.batched=false")
        self.dataset = RecordDataset(records, v2.Compose([
            v2.ToImage(), v2.Resize((d.image_size, d.image_size), antialias=True), v2.ToPureTensor()]))
        decoded = DataLoader(self.dataset, batch_size=256, num_workers=d.num_workers)
        images, labels = zip(*decoded) if len(self.dataset) else ((), ())
        self.images = torch.cat(images) if images else torch.zeros(0, 3, d.image_size, d.image_size, dtype=torch.uint8)
        self.labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
        self.augment, self.batch_size, self.seed = augment, d.batch_size, d.seed
        self.rank, self.world, self.epoch = rank, world, None
        self.per_rank = len(self.images) // world
        self.drop_last = self.per_rank > self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(self.per_rank, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.world > 1 and self.epoch is None:
            raise RuntimeError("MemoryTrainBatches over several ranks: call set_epoch(epoch) before each epoch")
        shared = None if self.epoch is None else torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.images), generator=shared)
        mine = order[self.rank::self.world][: self.per_rank]
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = mine[start:start + self.batch_size]
            yield self.augment(self.images[index]), self.labels[index]


def _available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: assume plenty
        return 1 << 40
