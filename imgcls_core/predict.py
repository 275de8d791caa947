"""Offline prediction from a saved model: the core that serving wraps.

The model file carries its own preprocessing (input size, mean/std, class
names), so callers never re-declare it::

    predictor = Predictor.from_file("runs/digits/model.pt")
    predictor.classify([open("3.png", "rb").read()], top_k=3)
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from imgcls_core.config import ModelConfig
from imgcls_core.data import SplitRecords, decode_image
from imgcls_core.data.presets import build_eval_transform
from imgcls_core.data.preprocessing import Preprocessing
from imgcls_core.engine.checkpoint import load_checkpoint
from imgcls_core.evaluation import EvalReport, MultiLabelReport, compute_metrics, predict, without_skipped
from imgcls_core.models import build_model


def rebuild_model(model_config: dict, num_classes: int, image_size: int) -> nn.Module:
    """The network a model file was trained with, without re-reading pretrained weights."""
    known = {f.name for f in fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in model_config.items() if k in known})
    cfg.pretrained, cfg.freeze_stages = None, 0
    return build_model(cfg, num_classes, image_size)


class Predictor:
    def __init__(self, model: nn.Module, preprocessing: Preprocessing, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.pre = preprocessing
        self.transform = build_eval_transform(
            preprocessing.image_size, preprocessing.mean, preprocessing.std, preprocessing.crop_ratio
        )

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> Predictor:
        """Load ``model.pt`` (from the runner) or a training checkpoint (file or directory)."""
        payload = load_checkpoint(path)
        pre = Preprocessing.from_dict(payload["preprocessing"])
        model_config = payload["model_config"] if "model_config" in payload else payload["config"]["model"]
        model = rebuild_model(model_config, len(pre.classes), pre.image_size)
        model.load_state_dict(payload["model"])
        return cls(model, pre, device)

    def preprocess(self, images: list[bytes | str | Path | torch.Tensor]) -> torch.Tensor:
        """Decode (bytes/paths) and transform into one float batch; uint8 CHW tensors pass through decode.

        A file that is not an image raises CorruptImageError naming its path (``images[i]`` for bytes)."""
        # each decoded image is transformed at once: a batch holds model-size tensors, not full-size pixels
        return torch.stack([self.transform(img if isinstance(img, torch.Tensor) else
                                           decode_image(img, name=None if isinstance(img, (str, Path))
                                                        else f"images[{i}]"))
                            for i, img in enumerate(images)])

    def evaluate(self, records: SplitRecords, batch_size: int = 256,
                 num_workers: int = 0) -> EvalReport | MultiLabelReport:
        """Metrics of this model on a labelled split, preprocessed the way the model was trained
        (multi-label: decisions at the model's threshold)."""
        if list(records.classes) != list(self.pre.classes):
            raise ValueError(f"the split's classes {records.classes[:10]} differ from the model's "
                             f"{self.pre.classes[:10]}; evaluate on data with the classes the model was trained on")
        if records.multi_label != self.pre.multi_label:
            kinds = ("multi-label", "single-label")
            raise ValueError(f"a {kinds[not self.pre.multi_label]} model cannot be evaluated on "
                             f"{kinds[not records.multi_label]} data")
        loader = DataLoader(records.dataset(self.transform), batch_size=batch_size, num_workers=num_workers)
        preds, _ = without_skipped(predict(self.model, loader, self.device), loader.dataset)
        return compute_metrics(preds.logits, preds.labels, self.pre.classes,
                               threshold=self.pre.threshold if self.pre.multi_label else None)

    @torch.no_grad()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities of a preprocessed batch: softmax, or per-class sigmoids when multi-label."""
        return self.to_probabilities(self.model(batch.to(self.device)))

    def to_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.detach().float()
        return (logits.sigmoid() if self.pre.multi_label else logits.softmax(dim=1)).cpu()

    def rank(self, probs: torch.Tensor, top_k: int) -> list[list[dict]]:
        """Top-k ``{"label", "index", "probability"}`` per row of ``probs``, best first; a multi-label
        model ranks every class, so that callers can also take those over the threshold (:meth:`present`)
        whatever ``top_k`` (they cut the top-k themselves)."""
        return top_k_rows(probs, self.pre.classes, len(self.pre.classes) if self.pre.multi_label else top_k)

    def classify(self, images: list[bytes | str | Path | torch.Tensor], top_k: int = 5) -> list[list[dict]]:
        """:meth:`rank` of the images' probabilities."""
        return self.classify_batch(self.preprocess(images), top_k)

    def classify_batch(self, batch: torch.Tensor, top_k: int = 5) -> list[list[dict]]:
        """:meth:`rank` of a preprocessed batch's probabilities."""
        return self.rank(self.probabilities(batch), top_k)

    def present(self, ranked: list[dict]) -> list[dict]:
        """The classes of a ranked row (best first, every class) at or over the multi-label threshold."""
        return [r for r in ranked if r["probability"] >= self.pre.threshold]


def top_k_rows(probs: torch.Tensor, classes: list[str], top_k: int) -> list[list[dict]]:
    """Top-k ``{"label", "index", "probability"}`` per row of ``N x C`` probabilities, best first."""
    values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
    return [[{"label": classes[i], "index": int(i), "probability": float(p)} for p, i in zip(vs, ids)]
            for vs, ids in zip(values.tolist(), indices.tolist())]
