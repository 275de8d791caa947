"""Training engine: runtime/numerics, optimizers and schedules, the epoch loop, checkpoints."""

from imgcls_core.engine.checkpoint import (
    CheckpointDir,
    Preprocessing,
    check_same_model,
    load_checkpoint,
    save_checkpoint,
    save_inference_model,
)
from imgcls_core.engine.fit import fit
from imgcls_core.engine.loop import Engine, NonFiniteLossError
from imgcls_core.engine.runtime import Runtime, setup_runtime

__all__ = [
    "CheckpointDir",
    "Engine",
    "NonFiniteLossError",
    "Preprocessing",
    "Runtime",
    "check_same_model",
    "fit",
    "load_checkpoint",
    "save_checkpoint",
    "save_inference_model",
    "setup_runtime",
]
