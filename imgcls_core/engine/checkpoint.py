"""Checkpoints: one ``checkpoint.pt`` per directory, loadable with ``weights_only=True``.

A checkpoint directory holds everything to resume exactly (engine state, RNG
states) and everything to serve (config, class names, input size, mean/std),
plus human-readable copies (``config.yaml``, ``class_index.json``,
``metrics.json``). Writes go to a temporary file first, then an atomic rename,
so a crash mid-save never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
FORMAT_VERSION = 1


@dataclass
class Preprocessing:
    """What a server needs to turn image bytes into this model's input; travels with the weights."""

    image_size: int
    mean: list[float]
    std: list[float]
    crop_ratio: float
    classes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(**data)


def git_revision() -> str:
    """The source revision, or "unknown" (e.g. inside a Ray working_dir without .git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    directory: str | Path,
    engine_state: dict[str, Any],
    config: dict[str, Any],
    preprocessing: Preprocessing,
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``<directory>/checkpoint.pt`` and its readable companions; returns the directory.

    ``extra`` holds the caller's own plain values (strings, numbers), e.g. a tracking run id."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        **engine_state,
        "config": config,
        "preprocessing": preprocessing.to_dict(),
        "metrics": dict(metrics or {}),
        "extra": dict(extra or {}),
        "git_rev": git_revision(),
    }
    _atomic_save(payload, directory / CHECKPOINT_FILE)
    _write_text(directory / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    _write_text(directory / "class_index.json", json.dumps({"classes": preprocessing.classes}, indent=1))
    _write_text(directory / "metrics.json", json.dumps(payload["metrics"], indent=1))
    return directory


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file or directory safely (``weights_only=True``)."""
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file}")
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/foreign files
        raise ValueError(f"checkpoint {file} is unreadable or not an imgcls checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {file} has format {payload.get('format_version') if isinstance(payload, dict) else '?'}; "
                         f"this version of imgcls reads format {FORMAT_VERSION}")
    return payload


def check_same_model(state: dict[str, Any], config: dict[str, Any], where: str) -> None:
    """Refuse to resume weights into a differently configured network."""
    if state["config"]["model"] != config["model"]:
        changed = sorted(k for k in config["model"] if state["config"]["model"].get(k) != config["model"][k])
        raise ValueError(
            f"checkpoint {where} was trained with a different model config (changed: {changed}); "
            f"start a new run (another output_dir / run name) or set train.resume=false"
        )


class CheckpointDir:
    """Epoch checkpoints under ``<root>/epoch_NNNN``; keeps the newest ``keep`` of them."""

    _PATTERN = re.compile(r"^epoch_(\d{4,})$")

    def __init__(self, root: str | Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def epochs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = self._PATTERN.match(child.name)
            if match and (child / CHECKPOINT_FILE).is_file():  # incomplete saves have no file
                found.append((int(match.group(1)), child))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.epochs()
        return found[-1][1] if found else None

    def path_for(self, epoch: int) -> Path:
        return self.root / f"epoch_{epoch:04d}"

    def commit(self, source: Path, epoch: int) -> Path:
        """Move a finished checkpoint directory into place, then prune the oldest."""
        target = self.path_for(epoch)
        if target.exists():
            shutil.rmtree(target)
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), target)
        for _, old in self.epochs()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return target


def save_inference_model(
    path: str | Path, state_dict: dict[str, torch.Tensor], model_config: dict[str, Any],
    preprocessing: Preprocessing, metrics: dict[str, float] | None = None,
) -> Path:
    """The deployable artifact: weights + how to rebuild the network + preprocessing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(
        {
            "format_version": FORMAT_VERSION,
            "model": state_dict,
            "model_config": model_config,
            "preprocessing": preprocessing.to_dict(),
            "metrics": dict(metrics or {}),
            "git_rev": git_revision(),
        },
        path,
    )
    return path
