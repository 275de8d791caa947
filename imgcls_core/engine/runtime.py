"""Device, numerics and seeding: everything that depends on the hardware.

CUDA-only features (AMP, channels_last, cudnn.benchmark) degrade to plain fp32
on the CPU instead of failing, so one config runs on a laptop and on GPU nodes.
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from imgcls_core.config import TrainConfig


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None = full fp32
    use_grad_scaler: bool  # fp16 needs loss scaling; bf16 does not
    channels_last: bool

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16+GradScaler"}[self.amp_dtype]
        return f"device={self.device} amp={amp} channels_last={self.channels_last}"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible to this process")
    return torch.device(name)


def resolve_amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """Map train.amp to (autocast dtype, use GradScaler) for this device."""
    if mode == "off":
        return None, False
    if device.type != "cuda":
        if mode == "bf16":
            return torch.bfloat16, False  # CPU autocast supports bf16
        if mode == "fp16":
            warnings.warn("train.amp=fp16 needs CUDA; training in fp32 on the CPU", stacklevel=2)
        return None, False
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return (torch.bfloat16, False) if mode == "bf16" else (torch.float16, True)


def setup_runtime(cfg: TrainConfig, device: torch.device | None = None) -> Runtime:
    """Resolve the device and numerics and apply the global torch flags once per process."""
    device = device or resolve_device(cfg.device)
    amp_dtype, use_scaler = resolve_amp(cfg.amp, device)
    if cfg.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; must be set before first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)
    return Runtime(device, amp_dtype, use_scaler, cfg.channels_last and device.type == "cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0, step: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, epoch, rank), and per step within the epoch.

    Training reseeds at every epoch start, so resuming at an epoch boundary
    replays exactly the same shuffles, augmentations and dropout masks; and
    right after a mid-epoch checkpoint at ``step``, where a run resumed from it
    reseeds too, so it continues with the same random draws as the run that wrote it.
    """
    return (seed * 1_000_003 + epoch * 9_973 + rank * 101 + step * 65_537) % 2**31


def rng_state() -> dict:
    """All RNG states as plain types + tensors (safe for torch.load(weights_only=True))."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
