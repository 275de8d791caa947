"""Compression of a trained model: int8 post-training quantization, bf16 and magnitude pruning.

Quantization (``quantize``) turns the model's fp32 ONNX export into an int8 ONNX
file and measures both side by side::

    model, pre = load_eager("runs/digits/model.pt")
    calib = calibration_batch(splits.train, pre, 256)          # training images, eval transform
    files, report = quantize(model, pre, calib, splits.test, "out/", method="static")
    print(report.summary())                                    # top-1 delta, images/s ratio, sizes

``static`` is ONNX Runtime's post-training static quantization: QDQ format,
per-channel int8 weights, uint8 activations whose ranges are calibrated on
training images (never on the test split that judges the result), after
``quant_pre_process`` (shape inference + graph optimization, which folds
BatchNorm into the convolutions). It was chosen over the PyTorch-side paths
because it yields one portable ``model.int8.onnx`` that carries the preprocessing
metadata and is served by the same ONNX backend as the fp32 export; torchao's
PT2E X86InductorQuantizer fails on torchvision ResNets here (a shared ``relu``
module gives partitions with two outputs; worked around, its int8 kernels need a
minutes-long ``torch.compile`` and leave no portable file) and ``torch.ao`` FX graph mode,
although it runs, produces a model that only TorchScript can save. ``dynamic``
is the fallback: int8 weights of the Linear/MatMul layers only, activations
quantized on the fly, no calibration.

bf16 (``reduced_precision``) keeps the PyTorch weights and runs each forward pass
under bf16 autocast in channels_last (:class:`Bf16Module`); the report compares its
test top-1 and images/s with fp32's. It pays only where the hardware has native bf16
(:func:`bf16_unavailable`): on this project's AVX512-BF16 CPUs a ResNet-18 at
64 px runs about twice as fast as in fp32.

Pruning (``prune``) zeroes weights of a copy of the model, fine-tunes it for a
few epochs with the masks held in place (the project's ``Engine`` and ``fit``),
then makes the zeros permanent (``prune.remove``) and saves an ordinary
``model.pt``. ``unstructured``: global L1 magnitude pruning over every conv and
linear weight. ``structured``: per convolution, the output channels (filters)
with the smallest L-n norm. A dense file with zeros is no smaller on disk; it
shrinks only when compressed (the report gives gzip sizes of both) or stored
sparse, and unstructured zeros do not speed up dense kernels.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from imgcls_core.config import Config
from imgcls_core.data import DatasetSplits, SplitRecords
from imgcls_core.data.preprocessing import Preprocessing
from imgcls_core.engine.checkpoint import load_checkpoint, save_inference_model
from imgcls_core.export import METADATA_KEY, OnnxModule, export_onnx, file_size_mb, load_eager
from imgcls_core.predict import Predictor

Log = Callable[[str], None]

QUANT_METHODS = ("static", "dynamic")
BF16_METHOD = "bf16"
PRUNE_METHODS = ("prune-unstructured", "prune-structured")
METHODS = QUANT_METHODS + (BF16_METHOD,) + PRUNE_METHODS
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


class CompressionError(RuntimeError):
    """A compression step could not be carried out; the message says which and why."""


# --------------------------------------------------------------------------- measuring


def calibration_batch(records: SplitRecords, pre: Preprocessing, n: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` images drawn (seeded, without replacement) from ``records``, preprocessed by the
    model's own eval transform: a float ``n x 3 x S x S`` batch."""
    if n < 2:
        raise ValueError(f"calibration needs at least 2 images, got {n}")
    n = min(n, len(records))
    order = np.random.default_rng(seed).permutation(len(records))[:n]
    data = records.dataset(Predictor(nn.Identity(), pre).transform)  # skips a corrupt record
    return torch.stack([data[int(i)][0] for i in sorted(order)])


def images_per_second(models: dict[str, nn.Module], batch: torch.Tensor, *, warmup: int = 3,
                      repeats: int = 10) -> dict[str, float]:
    """Median images/s of each model's forward pass on ``batch``.

    The models take turns within each repeat, so a change in the machine's load
    hits all of them alike; each figure is the median over ``repeats``."""
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                model(batch)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(batch)
                seconds[name].append(time.perf_counter() - start)
    return {name: batch.shape[0] / statistics.median(values) for name, values in seconds.items()}


def refuse_multi_label(pre: Preprocessing) -> None:
    """Compression is judged on test top-1, which a multi-label model does not have: refuse it up front."""
    if pre.multi_label:
        raise ValueError("quantization and pruning are gated on test top-1; a multi-label model (judged by mAP) "
                         "cannot be compressed yet")


def test_acc1(model: nn.Module, pre: Preprocessing, test: SplitRecords, batch_size: int = 256) -> float:
    refuse_multi_label(pre)
    return Predictor(model, pre).evaluate(test, batch_size=batch_size).acc1


# --------------------------------------------------------------------------- quantization


class _VersusFp32:
    """What the reduced-precision reports share: fp32's and the reduced precision's test top-1 and
    images/s, from the fields ``fp32_acc1``/``<PRECISION>_acc1``, ``fp32_images_per_s``/
    ``<PRECISION>_images_per_s`` and ``test_images`` of the dataclass that mixes it in."""

    PRECISION: ClassVar[str]

    @property
    def acc1(self) -> float:
        return getattr(self, f"{self.PRECISION}_acc1")

    @property
    def images_per_s(self) -> float:
        return getattr(self, f"{self.PRECISION}_images_per_s")

    @property
    def acc1_delta_points(self) -> float:
        """Reduced precision minus fp32 test top-1, in percentage points."""
        return 100.0 * (self.acc1 - self.fp32_acc1)

    @property
    def speedup(self) -> float:
        return self.images_per_s / self.fp32_images_per_s

    def _figure_lines(self, speed_note: str = "") -> list[str]:
        p = self.PRECISION
        return [f"  test top-1   fp32 {self.fp32_acc1:.4f}  {p} {self.acc1:.4f}  "
                f"delta {self.acc1_delta_points:+.2f} points (n={self.test_images})",
                f"  images/s     fp32 {self.fp32_images_per_s:.0f}  {p} {self.images_per_s:.0f}  "
                f"speed-up x{self.speedup:.2f}{speed_note}"]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "acc1_delta_points": self.acc1_delta_points, "speedup": self.speedup}

    def metrics(self) -> dict[str, float]:
        """Flat figures for MLflow metrics and model-version tags (prefix added by the caller)."""
        return {"fp32_acc1": self.fp32_acc1, "acc1": self.acc1, "acc1_delta": self.acc1_delta_points,
                "fp32_images_per_s": self.fp32_images_per_s, "images_per_s": self.images_per_s,
                "speedup": self.speedup}


@dataclass
class QuantReport(_VersusFp32):
    """fp32 vs int8, measured in one call on one machine with the same threads and batch."""

    PRECISION = "int8"

    method: str
    backend: str
    fp32_acc1: float
    int8_acc1: float
    fp32_images_per_s: float
    int8_images_per_s: float
    eager_images_per_s: float  # the PyTorch model itself, for reference
    fp32_mb: float
    int8_mb: float
    test_images: int
    calibration_images: int
    batch_size: int
    threads: int
    repeats: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size_ratio(self) -> float:
        return self.int8_mb / self.fp32_mb

    def summary(self) -> str:
        return "\n".join([
            f"int8 {self.method} ({self.backend}), {self.calibration_images} calibration images, "
            f"batch {self.batch_size}, {self.threads} thread(s), median of {self.repeats}",
            *self._figure_lines(f"  (eager PyTorch fp32 {self.eager_images_per_s:.0f})"),
            f"  file size    fp32 {self.fp32_mb:.2f} MB  int8 {self.int8_mb:.2f} MB  ratio {self.size_ratio:.2f}",
        ])

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "size_ratio": self.size_ratio}

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "fp32_mb": self.fp32_mb, "size_mb": self.int8_mb}


class _CalibrationReader:
    """ONNX Runtime's CalibrationDataReader protocol over a preprocessed batch, in chunks."""

    def __init__(self, input_name: str, images: torch.Tensor, chunk: int = 32):
        self.input_name, self.images, self.chunk = input_name, images, chunk
        self._it: Iterator[dict[str, np.ndarray]] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        chunks = [self.images[i:i + self.chunk] for i in range(0, len(self.images), self.chunk)]
        self._it = iter([{self.input_name: c.contiguous().numpy()} for c in chunks])


def quantize_onnx_static(fp32_onnx: str | Path, calibration: torch.Tensor, path: str | Path, *,
                         calibrate: str = "minmax", per_channel: bool = True) -> Path:
    """ONNX Runtime static int8 quantization (QDQ, per-channel weights) of an imgcls ONNX export.

    ``calibration`` is a preprocessed float batch of training images; activation
    ranges come from running it through the fp32 model (``calibrate``: ``minmax``,
    ``entropy`` or ``percentile``)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calibrate not in methods:
        raise ValueError(f"unknown calibration method {calibrate!r}; choose from {list(methods)}")

    def run(prepared: Path, tmp: Path) -> None:
        quantize_static(
            str(prepared), str(tmp), _CalibrationReader("images", calibration), quant_format=QuantFormat.QDQ,
            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=methods[calibrate],
            # Keep the model's input and output in fp32 (callers pass floats and get logits).
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )

    return _quantize_file(fp32_onnx, path, "static", run)


def quantize_onnx_dynamic(fp32_onnx: str | Path, path: str | Path) -> Path:
    """ONNX Runtime dynamic quantization: int8 weights of MatMul/Gemm (the Linear layers),
    activations quantized per batch at run time; no calibration data."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def run(prepared: Path, tmp: Path) -> None:
        quantize_dynamic(str(prepared), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])

    return _quantize_file(fp32_onnx, path, "dynamic", run)


def _quantize_file(fp32_onnx: str | Path, path: str | Path, kind: str, run: Callable[[Path, Path], None]) -> Path:
    """``run(prepared, tmp)`` on the pre-processed fp32 file, then the metadata copied and ``path``
    replaced atomically; a failure leaves no file behind and names the step."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prepared = path.with_name(path.stem + ".prep.onnx")
    tmp = path.with_name(path.name + ".tmp")
    try:
        # Shape inference + graph optimization (BatchNorm folded into the convolutions); it also
        # makes the exporter's value_info agree with ORT's shape inference on the Gemm.
        quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=False)
        run(prepared, tmp)
    except Exception as exc:  # ORT raises many kinds; the message is what matters
        tmp.unlink(missing_ok=True)
        raise CompressionError(f"{kind} int8 quantization of {fp32_onnx} failed: {exc}") from exc
    finally:
        prepared.unlink(missing_ok=True)
    _copy_metadata(fp32_onnx, tmp)
    os.replace(tmp, path)
    return path


def _copy_metadata(source: str | Path, target: str | Path) -> None:
    """Carry the preprocessing metadata of the fp32 export over (the quantizers may drop it)."""
    import onnx

    src = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    proto = onnx.load(str(target))
    have = {p.key for p in proto.metadata_props}
    for key, value in src.items():
        if key not in have:
            prop = proto.metadata_props.add()
            prop.key, prop.value = key, value
    onnx.save(proto, str(target))


def quantize(model: nn.Module, pre: Preprocessing, calibration: torch.Tensor, test: SplitRecords,
             out_dir: str | Path, *, method: str = "static", fp32_onnx: str | Path | None = None,
             calibrate: str = "minmax", batch_size: int = 64, threads: int | None = None, repeats: int = 10,
             log: Log = print) -> tuple[dict[str, Path], QuantReport]:
    """Quantize ``model`` to int8 ONNX under ``out_dir`` and compare it with fp32 on ``test``.

    ``fp32_onnx`` reuses an existing export of the same model (else
    ``out_dir/model.onnx`` is written). Speed is measured on ``batch_size``
    images from ``calibration`` with ``threads`` intra-op threads for every
    model (default: torch's current count). Returns ``({"fp32_onnx", "int8_onnx",
    "report"}: path, QuantReport)``. A multi-label model is refused (ValueError) before
    anything is written.
    """
    if method not in QUANT_METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose from {list(QUANT_METHODS)}")
    refuse_multi_label(pre)  # before the export and the quantization: they take a while and leave files
    out = Path(out_dir)
    threads = threads or torch.get_num_threads()
    model = model.eval()
    if fp32_onnx is None:
        start = time.perf_counter()
        fp32_onnx = export_onnx(model, pre, calibration[:8], out / "model.onnx")
        log(f"exported fp32 ONNX {fp32_onnx} in {time.perf_counter() - start:.1f}s")
    int8_path = out / "model.int8.onnx"
    start = time.perf_counter()
    if method == "static":
        quantize_onnx_static(fp32_onnx, calibration, int8_path, calibrate=calibrate)
    else:
        quantize_onnx_dynamic(fp32_onnx, int8_path)
    log(f"quantized ({method}) to {int8_path} in {time.perf_counter() - start:.1f}s")

    fp32_rt, int8_rt = OnnxModule(fp32_onnx, threads=threads), OnnxModule(int8_path, threads=threads)
    with intra_op_threads(threads):
        speed = images_per_second({"fp32": fp32_rt, "int8": int8_rt, "eager": model},
                                  _timing_batch(calibration, batch_size), repeats=repeats)
        fp32_acc, int8_acc = test_acc1(fp32_rt, pre, test), test_acc1(int8_rt, pre, test)
    report = QuantReport(method, "onnxruntime", fp32_acc, int8_acc, speed["fp32"], speed["int8"], speed["eager"],
                         file_size_mb(fp32_onnx), file_size_mb(int8_path), len(test), len(calibration)
                         if method == "static" else 0, batch_size, threads, repeats,
                         extra={"calibrate": calibrate} if method == "static" else {})
    files = {"fp32_onnx": Path(fp32_onnx), "int8_onnx": int8_path,
             "report": _write_json(out / f"{method}_report.json", report.to_dict())}
    return files, report


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` inside the block, restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _timing_batch(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``batch_size`` images, repeating ``images`` when it holds fewer."""
    reps = -(-batch_size // len(images))
    return images.repeat(reps, 1, 1, 1)[:batch_size].contiguous()


# --------------------------------------------------------------------------- bf16


def bf16_unavailable(device: torch.device) -> str | None:
    """Why bf16 would not be faster than fp32 on ``device`` (it lacks native bf16), or None."""
    if device.type == "cuda":
        return None if torch.cuda.is_bf16_supported() else f"{torch.cuda.get_device_name(device)} has no native bf16"
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return ("this CPU has no native bf16 (AVX512-BF16 or AMX) for oneDNN, so bf16 would run slower than fp32; "
            "serve fp32")


class Bf16Module(nn.Module):
    """``model`` run under bf16 autocast in channels_last; the logits come back as fp32.

    The weights stay the fp32 ones, shared with ``model`` (which is put in channels_last in
    place): autocast casts them per operation, so Grad-CAM can still run on ``model`` itself.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            logits = self.model(images.contiguous(memory_format=torch.channels_last))
        return logits.float()


@dataclass
class Bf16Report(_VersusFp32):
    """fp32 vs bf16 autocast of the same PyTorch weights, measured side by side in one call."""

    PRECISION = "bf16"

    fp32_acc1: float
    bf16_acc1: float
    fp32_images_per_s: float
    bf16_images_per_s: float
    test_images: int
    batch_size: int
    threads: int
    repeats: int
    native: str | None  # why the hardware has no native bf16, or None when it has

    def summary(self) -> str:
        return "\n".join([
            f"bf16 autocast (PyTorch, channels_last), batch {self.batch_size}, {self.threads} thread(s), "
            f"median of {self.repeats}" + (f"\n  note: {self.native}" if self.native else ""),
            *self._figure_lines(),
        ])


def reduced_precision(model: nn.Module, pre: Preprocessing, images: torch.Tensor, test: SplitRecords,
                      out_dir: str | Path, *, batch_size: int = 64, threads: int | None = None,
                      repeats: int = 10) -> tuple[dict[str, Path], Bf16Report]:
    """Compare ``model`` in bf16 autocast with itself in fp32: test top-1 on ``test`` and images/s
    on ``batch_size`` of ``images`` with ``threads`` intra-op threads (default: torch's current
    count). Returns ``({"report": path}, Bf16Report)``; a multi-label model is refused (ValueError) at once."""
    refuse_multi_label(pre)  # before the timing, which would be wasted
    threads = threads or torch.get_num_threads()
    fp32 = model.eval()
    bf16 = Bf16Module(copy.deepcopy(fp32))  # a copy: Bf16Module puts its model in channels_last
    with intra_op_threads(threads):
        speed = images_per_second({"fp32": fp32, "bf16": bf16}, _timing_batch(images, batch_size), repeats=repeats)
        fp32_acc, bf16_acc = test_acc1(fp32, pre, test), test_acc1(bf16, pre, test)
    report = Bf16Report(fp32_acc, bf16_acc, speed["fp32"], speed["bf16"], len(test), batch_size, threads, repeats,
                        bf16_unavailable(images.device))
    return {"report": _write_json(Path(out_dir) / f"{BF16_METHOD}_report.json", report.to_dict())}, report


# --------------------------------------------------------------------------- pruning


@dataclass
class PruneReport:
    """Sparsity, accuracy at each stage and sizes of one pruning run."""

    method: str
    amount: float
    sparsity: float  # fraction of zero weights over all conv/linear weights
    channel_sparsity: float  # fraction of conv output channels whose filter is all zeros
    acc1_before: float
    acc1_pruned: float  # right after pruning, before fine-tuning
    acc1_finetuned: float
    finetune_epochs: int
    finetune_lr: float
    finetune_s: float
    dense_mb: float  # the original model.pt
    pruned_mb: float  # the pruned model.pt: same size, zeros are stored as zeros
    dense_gzip_mb: float  # gzip of the original weights
    pruned_gzip_mb: float  # gzip of the pruned weights: where unstructured sparsity saves space
    test_images: int
    norm: int = 1

    @property
    def acc1_drop_points(self) -> float:
        """Fine-tuned minus original test top-1, in percentage points (negative = lost)."""
        return 100.0 * (self.acc1_finetuned - self.acc1_before)

    def summary(self) -> str:
        kind = (f"structured L{self.norm} over conv output channels" if self.method == "prune-structured"
                else "global unstructured L1")
        return "\n".join([
            f"{self.method}: {kind}, amount {self.amount:g}; fine-tuned {self.finetune_epochs} epoch(s) "
            f"at lr {self.finetune_lr:g} in {self.finetune_s:.0f}s",
            f"  sparsity     {self.sparsity:.2%} of conv/linear weights are zero; "
            f"{self.channel_sparsity:.2%} of conv channels are all-zero",
            f"  test top-1   before {self.acc1_before:.4f}  pruned {self.acc1_pruned:.4f}  "
            f"fine-tuned {self.acc1_finetuned:.4f}  ({self.acc1_drop_points:+.2f} points, n={self.test_images})",
            f"  size         model.pt dense {self.dense_mb:.2f} MB, pruned {self.pruned_mb:.2f} MB; gzip dense "
            f"{self.dense_gzip_mb:.2f} MB, pruned {self.pruned_gzip_mb:.2f} MB "
            f"(ratio {self.pruned_gzip_mb / self.dense_gzip_mb:.2f})",
        ])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "acc1_drop_points": self.acc1_drop_points,
                "gzip_ratio": self.pruned_gzip_mb / self.dense_gzip_mb}

    def metrics(self) -> dict[str, float]:
        return {"sparsity": self.sparsity, "channel_sparsity": self.channel_sparsity,
                "acc1_before": self.acc1_before, "acc1_pruned": self.acc1_pruned, "acc1": self.acc1_finetuned,
                "acc1_delta": self.acc1_drop_points, "size_mb": self.pruned_mb, "gzip_mb": self.pruned_gzip_mb,
                "dense_gzip_mb": self.dense_gzip_mb}


def prunable_weights(model: nn.Module, *, convs_only: bool = False) -> list[tuple[nn.Module, str]]:
    """``(module, "weight")`` of every Conv2d (and Linear unless ``convs_only``)."""
    kinds = (nn.Conv2d,) if convs_only else (nn.Conv2d, nn.Linear)
    return [(m, "weight") for m in model.modules() if isinstance(m, kinds)]


def prune_unstructured(model: nn.Module, amount: float) -> nn.Module:
    """Global L1 magnitude pruning: the ``amount`` fraction of smallest |w| over all conv and
    linear weights together is masked (in place; masks stay until :func:`make_permanent`)."""
    _check_amount(amount)
    torch_prune.global_unstructured(prunable_weights(model), pruning_method=torch_prune.L1Unstructured,
                                    amount=amount)
    return model


def prune_structured(model: nn.Module, amount: float, *, n: int = 1) -> nn.Module:
    """Mask the ``amount`` fraction of output channels with the smallest L-``n`` norm in every
    convolution (``dim=0``); the classifier keeps all its outputs (one per class)."""
    _check_amount(amount)
    if n not in (1, 2):
        raise ValueError(f"structured pruning uses the L1 or L2 norm (n=1 or 2), got n={n}")
    for module, name in prunable_weights(model, convs_only=True):
        torch_prune.ln_structured(module, name, amount=amount, n=n, dim=0)
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """``prune.remove`` on every pruned weight: the zeros stay, masks and hooks go, and the
    state_dict has the original parameter names again."""
    for module in model.modules():
        for name in list(getattr(module, "_forward_pre_hooks", {}).values()):
            if isinstance(name, torch_prune.BasePruningMethod):
                torch_prune.remove(module, name._tensor_name)
    return model


def sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries over all conv and linear weights."""
    weights = [m.weight.detach() for m, _ in prunable_weights(model)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(total, 1)


def channel_sparsity(model: nn.Module) -> float:
    """Fraction of conv output channels whose whole filter is zero."""
    filters = [m.weight.detach().flatten(1) for m, _ in prunable_weights(model, convs_only=True)]
    total = sum(f.shape[0] for f in filters)
    return sum(int((f == 0).all(dim=1).sum()) for f in filters) / max(total, 1)


def gzip_mb(state_dict: dict[str, torch.Tensor]) -> float:
    """Size of ``torch.save(state_dict)`` after gzip (level 6), in MB (2**20 bytes)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return len(gzip.compress(buffer.getvalue(), compresslevel=6)) / 2**20


def _check_amount(amount: float) -> None:
    if not 0.0 < amount < 1.0:
        raise ValueError(f"the pruning amount is the fraction of weights to remove, in (0, 1); got {amount}")


def finetune(model: nn.Module, pre: Preprocessing, cfg: Config, splits: DatasetSplits, *, epochs: int,
             lr: float, log: Log = print) -> nn.Module:
    """A few epochs on the training split with the project's engine (cosine LR from ``lr``, no
    warmup, no EMA); pruning masks stay applied, so pruned weights stay zero."""
    from imgcls_core.engine.fit import fit
    from imgcls_core.engine.loop import Engine
    from imgcls_core.engine.runtime import setup_runtime
    from imgcls_core.data.loaders import build_loaders

    if epochs <= 0:
        return model
    tcfg = copy.deepcopy(cfg)
    tcfg.train = replace(tcfg.train, epochs=epochs, ema_decay=0.0, compile=False, checkpoint_every_minutes=0.0,
                         checkpoint_every_epochs=epochs, device="cpu" if not torch.cuda.is_available() else "auto")
    tcfg.optim = replace(tcfg.optim, lr=lr, ref_batch_size=0, schedule="cosine", warmup_epochs=0.0)
    tcfg.augment = replace(tcfg.augment, mixup_alpha=0.0, cutmix_alpha=0.0)
    runtime = setup_runtime(tcfg.train)
    loaders = build_loaders(tcfg, splits, pre, which=("train", "val"))
    engine = Engine(tcfg, model, runtime, len(loaders["train"]))

    def report(metrics: dict[str, float], _ckpt: Path | None) -> None:
        log(f"  fine-tune epoch {int(metrics['epoch'])}/{epochs}: train/loss {metrics['train/loss']:.4f} "
            f"val/acc1 {metrics['val/acc1']:.4f} ({metrics['train/epoch_s']:.1f}s)")

    fit(engine, loaders["train"], loaders["val"], pre, report)
    return engine.model.to("cpu").eval()


def prune(model_file: str | Path, cfg: Config, splits: DatasetSplits, out_dir: str | Path, *,
          method: str = "prune-unstructured", amount: float = 0.5, n: int = 1, finetune_epochs: int = 3,
          finetune_lr: float = 0.01, log: Log = print) -> tuple[dict[str, Path], PruneReport]:
    """Prune the model in ``model_file``, fine-tune it on ``splits.train``, and save it as
    ``out_dir/model.pt`` (a normal imgcls model file). Accuracy is measured on ``splits.test``
    (``splits.val`` when there is no test split)."""
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose from {list(PRUNE_METHODS)}")
    payload = load_checkpoint(model_file)
    model_config = payload["model_config"] if "model_config" in payload else payload["config"]["model"]
    model, pre = load_eager(model_file)
    held_out = splits.test if splits.test is not None else splits.val
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    acc_before = test_acc1(model, pre, held_out)
    if method == "prune-unstructured":
        prune_unstructured(model, amount)
    else:
        prune_structured(model, amount, n=n)
    acc_pruned = test_acc1(model, pre, held_out)
    log(f"{method} amount {amount:g}: test top-1 {acc_before:.4f} -> {acc_pruned:.4f} before fine-tuning")
    start = time.perf_counter()
    model = finetune(model, pre, cfg, splits, epochs=finetune_epochs, lr=finetune_lr, log=log)
    seconds = time.perf_counter() - start
    make_permanent(model)
    acc_tuned = test_acc1(model, pre, held_out)
    out = Path(out_dir)
    state = model.state_dict()
    model_path = save_inference_model(
        out / "model.pt", state, model_config, pre,
        {"test/acc1": acc_tuned, "compress/sparsity": sparsity(model)},
    )
    report = PruneReport(method, amount, sparsity(model), channel_sparsity(model), acc_before, acc_pruned,
                         acc_tuned, finetune_epochs, finetune_lr, seconds, file_size_mb(model_file),
                         file_size_mb(model_path), gzip_mb(dense), gzip_mb(state), len(held_out),
                         n if method == "prune-structured" else 1)
    files = {"model": model_path, "report": _write_json(out / f"{method}_report.json", report.to_dict())}
    return files, report


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


__all__ = [
    "BF16_METHOD", "CALIBRATION_METHODS", "METADATA_KEY", "METHODS", "PRUNE_METHODS", "QUANT_METHODS", "Bf16Module",
    "Bf16Report", "CompressionError", "PruneReport", "QuantReport", "bf16_unavailable", "calibration_batch",
    "channel_sparsity", "finetune", "gzip_mb", "images_per_second", "make_permanent", "prunable_weights", "prune",
    "prune_structured", "prune_unstructured", "quantize", "quantize_onnx_dynamic", "quantize_onnx_static",
    "reduced_precision", "refuse_multi_label", "sparsity", "test_acc1",
]
