"""Portable exports of a model file: TorchScript and ONNX, each checked against eager PyTorch.

An export is only worth shipping if it answers like the model it came from, so
every export here is run on a real batch next to the eager model, and the
figures (max abs difference of the logits, top-1 agreement) decide whether it
passes::

    model, pre = load_eager("runs/digits/model.pt")
    batch = real_batch(...)                      # preprocessed float N x 3 x S x S
    onnx_file = export_onnx(model, pre, batch, "out/model.onnx", opset=18)
    report = check_parity("onnx", model, OnnxModule(onnx_file), batch, tolerance=1e-4)
    report.raise_if_failed()

The ONNX file carries the preprocessing (input size, mean/std, crop ratio, class
names, and a multi-label model's threshold) in its metadata, so ONNX Runtime users
(and the Serve app's ``onnx`` backend) need nothing else; the TorchScript file
carries the same JSON as its extra file ``imgcls.preprocessing.json``
(:func:`torchscript_preprocessing`). The batch axis is dynamic in both formats.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgcls_core.data.preprocessing import Preprocessing
from imgcls_core.engine.checkpoint import load_checkpoint
from imgcls_core.predict import rebuild_model

DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 18, 23  # what torch.onnx's exporter writes natively (lower ones fail to convert)
DEFAULT_TOLERANCE = 1e-4
METADATA_KEY = "imgcls.preprocessing"  # ONNX metadata_props key holding the preprocessing as JSON
TORCHSCRIPT_EXTRA_FILE = METADATA_KEY + ".json"  # the TorchScript archive's extra file holding the same JSON
FORMATS = ("torchscript", "onnx", "tensorrt")
DEFAULT_FORMATS = ("torchscript", "onnx")  # tensorrt needs a CUDA GPU and the tensorrt extra (trt_export)


class ExportError(RuntimeError):
    """An export could not be produced, or it does not answer like the eager model."""


@dataclass
class ParityReport:
    """How closely an exported model reproduces the eager model on one real batch."""

    format: str
    images: int
    max_abs_diff: float
    top1_agreement: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.top1_agreement == 1.0

    def summary(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"{self.format}: max |logit diff| {self.max_abs_diff:.3g} (tolerance {self.tolerance:g}), "
                f"top-1 agreement {self.top1_agreement:.2%} on {self.images} images: {verdict}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise ExportError(f"parity check failed: {self.summary()}")


def load_eager(model_file: str | Path) -> tuple[nn.Module, Preprocessing]:
    """The eager network and preprocessing of a ``model.pt`` or training checkpoint (weights_only load)."""
    payload = load_checkpoint(model_file)
    pre = Preprocessing.from_dict(payload["preprocessing"])
    model_config = payload["model_config"] if "model_config" in payload else payload["config"]["model"]
    model = rebuild_model(model_config, len(pre.classes), pre.image_size)
    model.load_state_dict(payload["model"])
    return model.eval(), pre


def export_torchscript(model: nn.Module, pre: Preprocessing, batch: torch.Tensor, path: str | Path) -> Path:
    """Trace ``model`` on ``batch`` and save it (``torch.jit.load`` / LibTorch read it back), with the
    preprocessing as JSON in the extra file ``imgcls.preprocessing.json`` (:func:`torchscript_preprocessing`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice; it still runs in LibTorch
        traced = torch.jit.trace(model.eval(), batch, check_trace=False)
        traced = torch.jit.freeze(traced)
        tmp = path.with_name(path.name + ".tmp")
        torch.jit.save(traced, str(tmp), _extra_files={TORCHSCRIPT_EXTRA_FILE: json.dumps(pre.to_dict())})
    os.replace(tmp, path)
    return path


def torchscript_preprocessing(path: str | Path) -> Preprocessing:
    """The preprocessing an imgcls TorchScript export carries in its extra file."""
    extra = {TORCHSCRIPT_EXTRA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    if not extra[TORCHSCRIPT_EXTRA_FILE]:
        raise ExportError(f"{path} is not an imgcls export: it has no {TORCHSCRIPT_EXTRA_FILE!r} extra file")
    return Preprocessing.from_dict(json.loads(extra[TORCHSCRIPT_EXTRA_FILE]))


def export_onnx(model: nn.Module, pre: Preprocessing, batch: torch.Tensor, path: str | Path, *,
                opset: int = DEFAULT_OPSET) -> Path:
    """Export to ONNX with a dynamic batch axis (input ``images``, output ``logits``) and the
    preprocessing in the file's metadata."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if batch.shape[0] < 2:
        raise ExportError("export on a batch of at least 2 images, or the batch axis may be specialized to 1")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model.eval(), (batch,), str(tmp), input_names=["images"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65_536)},),
                opset_version=opset, dynamo=True, external_data=False, verbose=False,
            )
        except Exception as exc:  # the exporter raises many kinds; the message is what matters
            tmp.unlink(missing_ok=True)
            raise ExportError(f"ONNX export (opset {opset}) failed: {exc}") from exc
    proto = onnx.load(str(tmp))
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:  # the exporter falls back to its own opset when down-conversion fails
        tmp.unlink(missing_ok=True)
        raise ExportError(f"asked for opset {opset}, the exporter produced opset {written}; "
                          f"use opset {MIN_OPSET}..{MAX_OPSET}")
    meta = proto.metadata_props.add()
    meta.key, meta.value = METADATA_KEY, json.dumps(pre.to_dict())
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    return path


def onnx_preprocessing(path: str | Path) -> Preprocessing:
    """The preprocessing an imgcls ONNX export carries in its metadata."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ExportError(f"{path} is not an imgcls export: it has no {METADATA_KEY!r} metadata")
    return Preprocessing.from_dict(json.loads(props[METADATA_KEY]))


class OnnxModule(nn.Module):
    """An ONNX file run by ONNX Runtime behind the ``nn.Module`` interface: logits for a float batch.

    It plugs in wherever an eager model goes (``Predictor``, evaluation). Inputs
    are moved to the CPU; the CUDA execution provider is used when ``device`` is
    ``cuda`` and onnxruntime has it.
    """

    def __init__(self, path: str | Path, *, threads: int = 0, device: str = "cpu"):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def load_torchscript(path: str | Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice
        return torch.jit.load(str(path), map_location="cpu").eval()


@torch.no_grad()
def check_parity(fmt: str, reference: nn.Module, exported: nn.Module, batch: torch.Tensor,
                 *, tolerance: float = DEFAULT_TOLERANCE) -> ParityReport:
    """Run both models on ``batch`` and compare their logits."""
    want = reference.eval()(batch).float().cpu()
    got = exported(batch).float().cpu()
    if got.shape != want.shape:
        raise ExportError(f"{fmt}: output shape {tuple(got.shape)} differs from eager {tuple(want.shape)}")
    diff = (got - want).abs().max().item()
    agree = (got.argmax(1) == want.argmax(1)).float().mean().item()
    return ParityReport(fmt, int(batch.shape[0]), float(diff), float(agree), tolerance)


def export_model(model_file: str | Path, batch: torch.Tensor, out_dir: str | Path, *,
                 formats: tuple[str, ...] = DEFAULT_FORMATS, opset: int = DEFAULT_OPSET,
                 tolerance: float = DEFAULT_TOLERANCE, trt_precision: str = "fp16",
                 log=print) -> tuple[dict[str, Path], list[ParityReport]]:
    """Export ``model_file`` to each format under ``out_dir`` and check each against eager on ``batch``
    (``tensorrt``: an engine folder, imgcls_core.trt_export, held to the fp16 tolerance when in fp16).

    Returns ``({format: file}, [ParityReport])``; writes ``parity.json`` beside
    the files. Raises :class:`ExportError` (after writing ``parity.json``) when any
    export misses the tolerance or disagrees on a top-1 class; the files of the formats that
    failed are renamed ``<name>.failed-parity`` (replacing an earlier failure's), so no failed
    export passes for a checked one.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ExportError(f"unknown export format(s) {unknown}; choose from {list(FORMATS)}")
    model, pre = load_eager(model_file)
    if "tensorrt" in formats:  # before any other export is written: the reason, at once
        from imgcls_core.trt_export import unavailable

        if (why := unavailable()) is not None:
            raise ExportError(f"tensorrt: {why}")
    size = pre.image_size
    if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
        raise ExportError(f"the check batch must be N x 3 x {size} x {size}, got {tuple(batch.shape)}")
    out = Path(out_dir)
    files: dict[str, Path] = {}
    reports: list[ParityReport] = []
    if "torchscript" in formats:
        files["torchscript"] = export_torchscript(model, pre, batch, out / "model.torchscript.pt")
        reports.append(check_parity("torchscript", model, load_torchscript(files["torchscript"]), batch,
                                    tolerance=tolerance))
        log(reports[-1].summary())
    if "onnx" in formats:
        files["onnx"] = export_onnx(model, pre, batch, out / "model.onnx", opset=opset)
        reports.append(check_parity("onnx", model, OnnxModule(files["onnx"]), batch, tolerance=tolerance))
        log(reports[-1].summary())
    if "tensorrt" in formats:
        from imgcls_core.trt_export import TensorRTModule, export_tensorrt, tolerance_for

        files["tensorrt"] = export_tensorrt(model, pre, batch, out / "model.trt", precision=trt_precision)
        reports.append(check_parity("tensorrt", model, TensorRTModule(files["tensorrt"]), batch,
                                    tolerance=tolerance_for(trt_precision, tolerance)))
        log(reports[-1].summary() + f" ({trt_precision})")
    (out / "parity.json").write_text(json.dumps({"opset": opset, "reports": [r.to_dict() for r in reports]},
                                                indent=1))
    failed = [r for r in reports if not r.passed]
    if failed:
        for report in failed:
            _set_aside(files[report.format])
        raise ExportError("parity check failed (the failed files are kept as *.failed-parity): "
                          + "; ".join(r.summary() for r in failed))
    return files, reports


def _set_aside(path: Path) -> Path:
    """Rename a failed export ``<name>.failed-parity``, replacing the one an earlier failure left
    (a TensorRT engine is a folder, which a rename cannot replace when it is not empty)."""
    target = path.with_name(path.name + ".failed-parity")
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()
    path.replace(target)
    return target


def file_size_mb(path: str | Path) -> float:
    """The size of a file, or of every file in a folder (a TensorRT export), in MiB."""
    path = Path(path)
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files) / 2**20
