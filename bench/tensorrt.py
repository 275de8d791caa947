"""Inference images/s on one GPU: a TensorRT engine (fp16) vs eager PyTorch (fp16 autocast +
channels_last), ResNet-50 at 224 px, batch 64; and the engine's parity with eager on the same batch.

    python -m bench.tensorrt [--model resnet50] [--image-size 224] [--batch-size 64] [--seconds 10]

Both sides run the same random-weight network on the same synthetic batch resident on the GPU,
alternating, ``--repeats`` (5) times; the figures are medians. Like for like: eager runs in the
engine's precision (``--precision fp16``: fp16 autocast, not bf16; fp32: no autocast) with the
project's runtime set-up (imgcls_core.engine.runtime.setup_runtime: cudnn.benchmark, TF32), as
bench.gpu_train does. The engine is built by
imgcls_core.trt_export (Torch-TensorRT, the ``tensorrt`` extra) exactly as ``jobs.export
--formats tensorrt`` builds it, so the build time is reported too. On a machine without CUDA or
Torch-TensorRT it writes ``{"skipped": reason}`` and exits 0.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from bench.common import median, save


def rate(fn, batch, seconds: float) -> float:
    import torch

    for _ in range(3):
        fn(batch)
    torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(batch)
        n += len(batch)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tensorrt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    args = parser.parse_args(argv)

    from imgcls_core.trt_export import unavailable

    if (why := unavailable()) is not None:
        print(f"skipped: {why}")
        save("tensorrt", {"skipped": why})
        return 0
    import torch

    from imgcls_core.config import ModelConfig, TrainConfig
    from imgcls_core.data.preprocessing import Preprocessing
    from imgcls_core.engine.runtime import setup_runtime
    from imgcls_core.export import check_parity
    from imgcls_core.models import build_model
    from imgcls_core.trt_export import TensorRTModule, export_tensorrt, tolerance_for

    # the runtime the training and gpu_train use: cudnn.benchmark, TF32; autocast in the engine's precision
    runtime = setup_runtime(TrainConfig(device="cuda", amp="fp16" if args.precision == "fp16" else "off",
                                        channels_last=True))
    torch.manual_seed(0)
    size, bs = args.image_size, args.batch_size
    model = build_model(ModelConfig(name=args.model), 1000, size).eval()
    pre = Preprocessing(size, [0.5] * 3, [0.25] * 3, 1.0, [str(i) for i in range(1000)])
    batch = torch.randn(bs, 3, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = export_tensorrt(model, pre, batch, f"{tmp}/model.trt", precision=args.precision, max_batch=bs)
        build_s = time.perf_counter() - start
        engine = TensorRTModule(folder)
    parity = check_parity("tensorrt", model, engine, batch, tolerance=tolerance_for(args.precision, 1e-4))

    eager = model.cuda().to(memory_format=torch.channels_last)
    gpu_batch = batch.cuda().to(memory_format=torch.channels_last)
    amp = runtime.amp_dtype  # float16 for the fp16 engine, None (fp32) for the fp32 one
    eager_precision = "fp16 autocast" if amp == torch.float16 else "fp32"

    @torch.inference_mode()
    def run_eager(x):
        with torch.autocast("cuda", dtype=amp or torch.float16, enabled=amp is not None):
            return eager(x)

    @torch.inference_mode()
    def run_engine(x):
        return engine(x)

    eager_rates, engine_rates = [], []
    for _ in range(args.repeats):  # alternate: drifting clocks hit both sides alike
        eager_rates.append(rate(run_eager, gpu_batch, args.seconds))
        engine_rates.append(rate(run_engine, gpu_batch, args.seconds))
    result = {
        "gpu": torch.cuda.get_device_name(), "model": args.model, "image_size": size, "batch_size": bs,
        "precision": args.precision, "eager_precision": eager_precision,
        "cudnn_benchmark": torch.backends.cudnn.benchmark, "build_s": round(build_s, 1), "parity": parity.to_dict(),
        "eager_amp_images_per_s": median(eager_rates), "tensorrt_images_per_s": median(engine_rates),
        "runs": {"eager": eager_rates, "tensorrt": engine_rates},
        "ratios": {"tensorrt_over_eager_amp": median(engine_rates) / median(eager_rates)},
    }
    print(f"{result['gpu']}: {args.model} {size} px batch {bs}: eager {eager_precision} "
          f"{result['eager_amp_images_per_s']:.0f} "
          f"img/s, TensorRT {args.precision} {result['tensorrt_images_per_s']:.0f} img/s "
          f"({result['ratios']['tensorrt_over_eager_amp']:.2f}x); build {build_s:.0f} s; {parity.summary()}")
    save("tensorrt", result)
    return 0 if parity.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
