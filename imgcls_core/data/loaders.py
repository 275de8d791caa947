"""DataLoaders for a run's splits, built only for the splits asked for.

Shuffling draws from torch's global RNG, which the engine reseeds every epoch,
so the order is reproducible and a mid-epoch resume continues exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from imgcls_core.config import Config
from imgcls_core.data.presets import build_eval_transform, build_train_transform
from imgcls_core.data.records import DatasetSplits, SplitRecords
from imgcls_core.data.preprocessing import Preprocessing
from imgcls_core.data.sources import build_weighted_sampler

SPLITS = ("train", "val", "test")


def _common(cfg: Config) -> dict:
    return {"num_workers": cfg.data.num_workers, "pin_memory": torch.cuda.is_available(),
            "persistent_workers": cfg.data.num_workers > 0}


def train_loader(cfg: Config, records: SplitRecords, pre: Preprocessing, *, sampler: Sampler | None = None) -> DataLoader:
    """The augmented, shuffled training batches (``data.balance=weighted_sampler`` draws with a
    class-balancing sampler unless the caller passes its own)."""
    d = cfg.data
    if sampler is None and d.balance == "weighted_sampler":
        sampler = build_weighted_sampler(records.labels)
    transform = build_train_transform(d.image_size, pre.mean, pre.std, cfg.augment)
    return DataLoader(records.dataset(transform), batch_size=d.batch_size, shuffle=sampler is None, sampler=sampler,
                      drop_last=len(records) > d.batch_size, **_common(cfg))


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
