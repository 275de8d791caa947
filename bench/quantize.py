"""int8 vs fp32 (ONNX Runtime) on a trained digits model, and pruning figures, in one run.

    python -m bench.quantize [--model-file runs/digits/model.pt] [--threads 2] [--batch-size 64]

Without ``--model-file`` it first trains a ResNet-18 (width 0.25, 32 x 32 input,
small-input stem: the convolutions dominate, which is where int8 pays) on the
digits in process for ``--epochs`` epochs: the model and input size the published
row was measured with, pinned here (:data:`MODEL_OVERRIDES`), since configs/digits.yaml
has since moved to cnn3 at 16 px. The rest of the recipe comes from configs/digits.yaml.
Then, all on this machine with the same threads and batch size:

(a) static int8 (QDQ, per-channel, 256 training images for calibration) vs the
    fp32 ONNX export: test top-1 delta, images/s of both (interleaved timed
    repeats after a warm-up, medians), speed-up, file sizes;
(b) dynamic int8 (Linear layers only) the same way;
(c) unless ``--no-prune``: global unstructured pruning (``--amount``) and
    structured channel pruning, each fine-tuned ``--finetune-epochs``:
    sparsity, top-1 before/after, gzip sizes.

Results go to bench/results/quantize.json. Speed-ups are ratios measured side
by side; absolute images/s depend on the machine's load.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import save

# The model and input size bench/results/quantize.json was measured with (configs/digits.yaml then):
# ResNet-18 with the small-input stem at 32 x 32. The data are read at the same size.
MODEL_NAME, IMAGE_SIZE = "resnet18", 32
MODEL_OVERRIDES = [f"model.name={MODEL_NAME}", "model.small_input=true", f"data.image_size={IMAGE_SIZE}"]


def train_model(out: Path, epochs: int, width: float) -> Path:
    from imgcls_core.config import load_config
    from imgcls_core.runner import train_and_evaluate

    cfg = load_config("configs/digits.yaml", [*MODEL_OVERRIDES, f"model.width={width}", f"train.epochs={epochs}",
                                              "data.num_workers=0", f"train.output_dir={out}", "train.resume=false"])
    start = time.perf_counter()
    result = train_and_evaluate(cfg, log=lambda _line: None)
    print(f"trained {MODEL_NAME} width {width} at {IMAGE_SIZE} px for {epochs} epochs in {time.perf_counter() - start:.0f}s: "
          f"test top-1 {result.test.acc1:.4f}")
    return result.files["model"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-file", help="a trained digits model.pt (default: train one)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs when training the model here")
    parser.add_argument("--width", type=float, default=0.25, help=f"{MODEL_NAME} channel width ({IMAGE_SIZE} px input)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--no-prune", action="store_true")
    parser.add_argument("--name", default="quantize", help="results file name under bench/results/")
    args = parser.parse_args(argv)

    import torch

    from imgcls_core import compress
    from imgcls_core.config import load_config
    from imgcls_core.data import load_dataset
    from imgcls_core.export import load_eager

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    start = time.perf_counter()
    model_file = Path(args.model_file) if args.model_file else train_model(tmp / "run", args.epochs, args.width)
    cfg = load_config("configs/digits.yaml", [*MODEL_OVERRIDES, "data.num_workers=0"])
    splits = load_dataset(cfg.data)
    model, pre = load_eager(model_file)
    calibration = compress.calibration_batch(splits.train, pre, 256)
    result: dict = {"config": {"model_file": str(model_file), "threads": args.threads, "batch_size": args.batch_size,
                               "repeats": args.repeats, "calibration_images": len(calibration),
                               "trained_epochs": None if args.model_file else args.epochs, "width": args.width,
                               "model": MODEL_NAME, "image_size": IMAGE_SIZE}}
    files, static = compress.quantize(model, pre, calibration, splits.test, tmp / "static", method="static",
                                      batch_size=args.batch_size, threads=args.threads, repeats=args.repeats)
    print(static.summary())
    _, dynamic = compress.quantize(model, pre, calibration, splits.test, tmp / "dynamic", method="dynamic",
                                   fp32_onnx=files["fp32_onnx"], batch_size=args.batch_size, threads=args.threads,
                                   repeats=args.repeats)
    print(dynamic.summary())
    result["static"], result["dynamic"] = static.to_dict(), dynamic.to_dict()
    if not args.no_prune:
        for method, amount in (("prune-unstructured", args.amount), ("prune-structured", args.amount / 2)):
            _, report = compress.prune(model_file, cfg, splits, tmp / method, method=method, amount=amount,
                                       finetune_epochs=args.finetune_epochs)
            print(report.summary())
            result[method] = report.to_dict()
    result["seconds"] = time.perf_counter() - start
    print(f"\nint8 static: x{static.speedup:.2f} images/s vs fp32 ONNX Runtime "
          f"(x{static.int8_images_per_s / static.eager_images_per_s:.2f} vs eager PyTorch), "
          f"top-1 {static.acc1_delta_points:+.2f} points, size x{static.size_ratio:.2f}; "
          f"total {result['seconds']:.0f}s")
    save(args.name, result)
    return result


if __name__ == "__main__":
    main()
