"""TensorRT engines of a model file, through Torch-TensorRT, checked against eager PyTorch.

An optional extra (``pip install -e '.[tensorrt]'``: torch-tensorrt, which brings TensorRT)
on a CUDA machine. The model is traced with ``torch.export`` with a dynamic batch axis
(1..``max_batch``), compiled by Torch-TensorRT's dynamo frontend (fp16 by default: the
weights and input cast to half, so explicit typing builds fp16 kernels) and saved as an
ExportedProgram holding the serialized engine; the preprocessing goes beside it. An export
is a folder::

    model.trt/model.ep            torch_tensorrt.save's ExportedProgram (the engine inside)
    model.trt/imgcls.json         {"preprocessing": {...}, "precision": "fp16", "max_batch": 64}

A TensorRT engine runs only on the GPU architecture it was built for (and a compatible
TensorRT): build it on the kind of GPU that serves it. Everything here raises
:class:`~imgcls_core.export.ExportError` with the reason when CUDA or Torch-TensorRT is
missing, so CPU machines get a clear message, never an import error deep inside.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from imgcls_core.data.preprocessing import Preprocessing

PRECISIONS = {"fp16": torch.float16, "fp32": torch.float32}
DEFAULT_MAX_BATCH = 64
FP16_TOLERANCE = 0.05  # max |logit diff| allowed against fp32 eager for an fp16 engine
META_FILE = "imgcls.json"
PROGRAM_FILE = "model.ep"
INSTALL = "pip install -e '.[tensorrt]' (torch-tensorrt, which brings TensorRT)"


def unavailable() -> str | None:
    """Why TensorRT engines cannot be built or run here, or None when they can."""
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and this machine has none"
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError as exc:
        return f"Torch-TensorRT is not installed ({exc}); {INSTALL}"
    return None


def _require() -> None:
    from imgcls_core.export import ExportError

    why = unavailable()
    if why is not None:
        raise ExportError(why)


class TensorRTModule(nn.Module):
    """A saved TensorRT export behind the ``nn.Module`` interface: float32 logits for a float batch
    on the GPU (inputs are moved and cast to the engine's precision; batches larger than the engine's
    ``max_batch`` run in chunks)."""

    def __init__(self, folder: str | Path):
        super().__init__()
        _require()
        import torch_tensorrt  # noqa: F401 - registers the TensorRT runtime ops the program calls

        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text())
        self.pre = Preprocessing.from_dict(meta["preprocessing"])
        self.dtype, self.max_batch = PRECISIONS[meta["precision"]], int(meta["max_batch"])
        self.program = torch.export.load(str(folder / PROGRAM_FILE)).module()
        self.device = torch.device("cuda")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, self.dtype, non_blocking=True).contiguous()
        outs = [self.program(chunk) for chunk in x.split(self.max_batch)]
        return torch.cat(outs).float()


def export_tensorrt(model: nn.Module, pre: Preprocessing, batch: torch.Tensor, folder: str | Path, *,
                    precision: str = "fp16", max_batch: int = DEFAULT_MAX_BATCH) -> Path:
    """Compile ``model`` for batches of 1..``max_batch`` (tuned for ``batch``'s size, capped at it) and
    save the export folder (see the module docstring); replaces an existing one."""
    from imgcls_core.export import ExportError

    _require()
    import torch_tensorrt

    if precision not in PRECISIONS:
        raise ExportError(f"unknown TensorRT precision {precision!r}; choose from {list(PRECISIONS)}")
    if batch.shape[0] < 2 or max_batch < 2:
        raise ExportError("build on a batch of at least 2 images with max_batch >= 2, or the batch axis may be "
                          "specialized to 1")
    dtype = PRECISIONS[precision]
    size = tuple(batch.shape[1:])
    cuda_model = copy.deepcopy(model).to("cuda", dtype).eval()
    example = batch[: min(len(batch), max_batch)].to("cuda", dtype)
    dim = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        program = torch.export.export(cuda_model, (example,), dynamic_shapes=({0: dim},), strict=False)
        compiled = torch_tensorrt.dynamo.compile(
            program, inputs=[torch_tensorrt.Input(min_shape=(1, *size), opt_shape=(len(example), *size),
                                                  max_shape=(max_batch, *size), dtype=dtype)],
            min_block_size=1)
    except Exception as exc:  # Torch-TensorRT raises many kinds; the message is what matters
        raise ExportError(f"TensorRT compilation ({precision}) failed: {type(exc).__name__}: {exc}") from exc
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch_tensorrt.save(compiled, str(tmp / PROGRAM_FILE), arg_inputs=[example], dynamic_shapes=({0: dim},))
    (tmp / META_FILE).write_text(json.dumps({"preprocessing": pre.to_dict(), "precision": precision,
                                             "max_batch": max_batch,
                                             "gpu": torch.cuda.get_device_name(),
                                             "torch_tensorrt": torch_tensorrt.__version__}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def tensorrt_preprocessing(folder: str | Path) -> Preprocessing:
    """The preprocessing a TensorRT export folder carries (readable without a GPU)."""
    return Preprocessing.from_dict(json.loads((Path(folder) / META_FILE).read_text())["preprocessing"])


def tolerance_for(precision: str, tolerance: float) -> float:
    """The parity tolerance an engine of ``precision`` is held to: the export's own for fp32, at least
    FP16_TOLERANCE for fp16 (half precision cannot match fp32 logits to 1e-4)."""
    return max(tolerance, FP16_TOLERANCE) if precision == "fp16" else tolerance

