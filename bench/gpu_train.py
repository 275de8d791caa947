"""Training images/s on one GPU: Ray Train (1 worker) vs a plain PyTorch loop, ResNet-50 at 224 px.

    python -m bench.gpu_train [--batch-size 256] [--steps 60] [--warmup 15] [--repeats 5]

Both sides run the same step (torchvision-compatible ResNet-50 from imgcls_core,
SGD with momentum, the core runtime's AMP: bf16 autocast, or fp16 with
GradScaler where bf16 is missing, channels_last, cudnn.benchmark) on
synthetic images resident on the GPU, as NVIDIA's ``benchmark_training`` mode
does, so the figure is the compute path and its Ray Train overhead, not the
input pipeline. The plain loop runs in this process; the Ray Train run is a
TorchTrainer with one GPU worker (``prepare_model``) timing the same steps.
Repeats alternate the two and report medians. The result is set against
NVIDIA's published ResNet-50 v1.5 PyTorch training throughput (1 GPU, mixed
precision, real ImageNet through DALI: an input pipeline this benchmark does
not have) only where that figure exists for this GPU's own class (A100, V100);
on any other GPU (H100, H200, ...) no ratio is given, since another class's
figure says nothing about this one.

On a machine without CUDA it runs on the CPU (fp32, contiguous) at whatever
size is given, which checks the code path, not the GPU figure:
    python -m bench.gpu_train --device cpu --model resnet18 --width 0.25 --image-size 32 --batch-size 8 --steps 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import median, save

# NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "Training
# performance results" (pytorch-21.03 NGC container, 1 GPU, mixed precision, ImageNet through DALI).
# H100/H200 figures are not in that table: those GPUs get no ratio.
NVIDIA_RN50_AMP_1GPU = {"A100": 2470.0, "V100": 1200.0}
REFERENCE_INPUT = "1 GPU, AMP, ImageNet through DALI"  # the published figures' set-up


def reference_for(gpu_name: str | None) -> tuple[str, float] | None:
    """``(class, images/s)`` NVIDIA published for this GPU's own class, or None (another class, or no GPU)."""
    if not gpu_name:
        return None
    for key, value in NVIDIA_RN50_AMP_1GPU.items():
        if key in gpu_name:
            return key, value
    return None


def measure(opts: dict) -> dict:
    """Time ``opts['steps']`` training steps after ``opts['warmup']``; images/s and the runtime used."""
    import torch
    import torch.nn.functional as F

    from imgcls_core.config import ModelConfig, TrainConfig
    from imgcls_core.engine.runtime import setup_runtime
    from imgcls_core.models import build_model

    runtime = setup_runtime(TrainConfig(device=opts["device"], amp=opts["amp"], channels_last=True))
    device = runtime.device
    model = build_model(ModelConfig(name=opts["model"], width=opts["width"]), 1000, opts["image_size"])
    model = model.to(device, memory_format=runtime.memory_format)
    if opts.get("ray_train"):
        import ray.train.torch

        model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.875, weight_decay=3.0517578125e-05)
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.use_grad_scaler)
    batch, size = opts["batch_size"], opts["image_size"]
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=runtime.memory_format)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=runtime.amp_dtype, enabled=runtime.amp_dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(opts["warmup"]):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(opts["steps"]):
        step()
    sync()
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"images_per_s": opts["steps"] * batch / elapsed, "runtime": runtime.describe(), "peak_gib": peak,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def _train_loop_per_worker(opts: dict) -> None:
    import json
    import tempfile

    import ray.train

    metrics = measure({**opts, "ray_train": True})
    with tempfile.TemporaryDirectory() as tmp:  # Train V2 keeps only metrics reported with a checkpoint
        Path(tmp, "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def ray_train(opts: dict, use_gpu: bool) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(_train_loop_per_worker, train_loop_config=opts,
                           scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu),
                           run_config=RunConfig(name=f"bench-gpu-train-{time.time_ns()}",
                                                storage_path=opts["storage"]))
    return dict(trainer.fit().metrics)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--name", default="gpu_train", help="results file name under bench/results")
    args = parser.parse_args(argv)

    import os
    import tempfile

    import ray
    import torch

    use_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    opts = {"model": args.model, "width": args.width, "image_size": args.image_size, "batch_size": args.batch_size,
            "steps": args.steps, "warmup": args.warmup, "amp": args.amp, "device": "cuda" if use_gpu else "cpu",
            "storage": tempfile.mkdtemp(prefix="imgcls-bench-gpu-")}
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    from jobs.common import init_local_ray

    init_local_ray(configure_logging=False, include_dashboard=False)
    plain, train = [], []
    try:
        for k in range(args.repeats):
            plain.append(measure(opts))
            if use_gpu:
                torch.cuda.empty_cache()
            train.append(ray_train(opts, use_gpu))
            print(f"repeat {k + 1}/{args.repeats}: plain {plain[-1]['images_per_s']:.0f} img/s, "
                  f"Ray Train {train[-1]['images_per_s']:.0f} img/s ({plain[-1]['runtime']})", flush=True)
    finally:
        ray.shutdown()
    p = median([r["images_per_s"] for r in plain])
    t = median([r["images_per_s"] for r in train])
    gpu = plain[0]["gpu"]
    ref = reference_for(gpu)
    ratios = {"ray_train_over_plain": t / p}
    if ref:
        ratios["plain_over_nvidia_published"] = p / ref[1]
        ratios["ray_train_over_nvidia_published"] = t / ref[1]
    print(f"\nmedian plain {p:.0f} img/s, Ray Train {t:.0f} img/s: Ray Train / plain x{ratios['ray_train_over_plain']:.3f}")
    if ref:
        print(f"NVIDIA published ({ref[0]}, {REFERENCE_INPUT}): {ref[1]:.0f} img/s; plain (synthetic batch in GPU "
              f"memory) / published x{ratios['plain_over_nvidia_published']:.2f}")
    else:
        print(f"no NVIDIA figure published for this GPU's class ({gpu or 'CPU'}): no ratio to it")
    result = {"config": vars(args), "gpu": gpu, "runtime": plain[0]["runtime"], "plain": plain, "ray_train": train,
              "plain_images_per_s": p, "ray_train_images_per_s": t,
              "nvidia_reference": {"class": ref[0], "images_per_s": ref[1], "input": REFERENCE_INPUT,
                                   "here": "synthetic batch resident in GPU memory"} if ref else None,
              "ratios": ratios}
    save(args.name, result)
    return result


if __name__ == "__main__":
    main()
