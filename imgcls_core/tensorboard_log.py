"""TensorBoard event files of a training run, beside MLflow (``<train.output_dir>/tensorboard``).

Written by rank 0 only, through ``torch.utils.tensorboard``: every epoch's metrics
and learning rate as scalars (the step is the epoch), a grid of the first
augmented training batch as the loader yields it (un-normalized; before MixUp or CutMix, which
the training step applies), and the test
confusion matrix as an image. The folder is logged to MLflow with the other
artifacts. ``tensorboard --logdir runs/<run>`` (or the folder above several
runs) shows them. Sweeps: Ray Tune writes each trial's reported metrics and its
hyperparameters (the HPARAMS tab) into the trial's folder under
``<ray.storage_path>/<sweep>/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FOLDER = "tensorboard"
SAMPLES = 16  # augmented training images shown
_NOT_SCALARS = ("epoch", "step", "mid_epoch", "epoch_step")


class TensorBoardLog:
    """One run's event files; every call is a no-op when ``enabled`` is false (other ranks, or
    ``tracking.tensorboard: false``). The writer opens on first use and appends on resume; set
    :attr:`purge_step` to the first epoch a session trains, and TensorBoard hides what an earlier
    attempt logged from that step on (the epochs it trained again after a crash or restart)."""

    def __init__(self, out: Path, enabled: bool):
        self.dir = Path(out) / FOLDER
        self.enabled = enabled
        self.purge_step: int | None = None
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.dir), purge_step=self.purge_step)
        return self._writer

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        for key, value in metrics.items():
            if key not in _NOT_SCALARS and isinstance(value, (int, float)) and np.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def samples(self, images: torch.Tensor, mean: list[float], std: list[float], step: int) -> None:
        """The first images of a normalized ``N x 3 x H x W`` batch, back in [0, 1]."""
        if not self.enabled:
            return
        shown = images[:SAMPLES].detach().float().cpu()
        shown = shown * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        self.writer.add_images("train/augmented_samples", shown.clamp(0, 1), step)
        self.writer.flush()

    def png(self, tag: str, path: Path, step: int) -> None:
        """A PNG written by the run (e.g. the confusion matrix), as an image."""
        if not self.enabled:
            return
        from PIL import Image

        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
        self.writer.add_image(tag, array, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
