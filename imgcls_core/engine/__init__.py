"""Training engine: runtime/numerics, optimizers and schedules, the epoch loop, checkpoints, distillation."""

from imgcls_core.engine.checkpoint import (
    CheckpointDir,
    CheckpointSaveError,
    Preprocessing,
    check_same_model,
    load_checkpoint,
    load_first_readable,
    save_checkpoint,
    save_inference_model,
)
from imgcls_core.engine.distill import Teacher, distillation_loss, load_teacher, parse_teacher_spec, resolve_teacher
from imgcls_core.engine.fit import fit
from imgcls_core.engine.loop import Engine, NonFiniteLossError
from imgcls_core.engine.rundir import OutputDirInUse, RunLock, lock_output_dir
from imgcls_core.engine.runtime import Runtime, setup_runtime

__all__ = [
    "CheckpointDir",
    "CheckpointSaveError",
    "Engine",
    "NonFiniteLossError",
    "OutputDirInUse",
    "Preprocessing",
    "RunLock",
    "Runtime",
    "Teacher",
    "check_same_model",
    "distillation_loss",
    "fit",
    "load_checkpoint",
    "load_first_readable",
    "load_teacher",
    "lock_output_dir",
    "parse_teacher_spec",
    "resolve_teacher",
    "save_checkpoint",
    "save_inference_model",
    "setup_runtime",
]
