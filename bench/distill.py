"""Knowledge distillation vs plain training of the same small student, in one run.

    python -m bench.distill [--seeds 0 1 2] [--epochs 6] [--student-width 0.125]

Trains a teacher once (cnn3 at width 1 by default, in-process with the local
runner), then the same student (cnn3 at width 0.125: 16x fewer parameters)
with and without the teacher for each seed: same data split, epochs, batch,
LR schedule and augmentation; only the loss differs (``distill.alpha`` of
the KD term). Runs in one process without Ray, through the same Engine and
``load_teacher`` that the Ray job uses. Prints test top-1 per seed, the mean
and standard deviation of each arm and their difference, whichever way it
goes, and writes bench/results/distill.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import save


def train_student(cfg, splits, pre, loaders, teacher=None) -> dict:
    """One student run through the core engine; test top-1 of the final weights."""
    import torch

    from imgcls_core.data.presets import build_batch_mix
    from imgcls_core.engine import Engine, fit, setup_runtime
    from imgcls_core.models import build_model

    torch.manual_seed(cfg.train.seed)  # the same initial weights for both arms of a seed
    model = build_model(cfg.model, len(pre.classes), cfg.data.image_size)
    engine = Engine(cfg, model, setup_runtime(cfg.train), len(loaders["train"]), teacher=teacher,
                    batch_mix=build_batch_mix(cfg.augment, len(pre.classes)))
    start = time.perf_counter()
    history = fit(engine, loaders["train"], loaders["val"], pre, lambda _metrics, _ckpt: None)
    test = engine.evaluate(loaders["test"], pre.classes)
    return {"test_acc1": test.acc1, "val_acc1": history[-1]["val/acc1"], "seconds": time.perf_counter() - start,
            "final_train_kd_loss": history[-1].get("train/kd_loss")}


def describe(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6, help="student epochs (both arms)")
    parser.add_argument("--teacher-model", default="cnn3")
    parser.add_argument("--teacher-width", type=float, default=1.0)
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--student-model", default="cnn3")
    parser.add_argument("--student-width", type=float, default=0.125)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    import torch

    from imgcls_core.config import load_config
    from imgcls_core.data import load_dataset, materialize_digits
    from imgcls_core.engine import load_teacher
    from imgcls_core.data.loaders import build_loaders
    from imgcls_core.data.preprocessing import build_preprocessing
    from imgcls_core.runner import train_and_evaluate

    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="imgcls-bench-distill-"))
    root = materialize_digits(tmp / "digits")
    common = [f"data.root={root}", "data.format=digits", f"data.batch_size={args.batch_size}", "optim.lr=0.1",
              "augment.strength=0.2", "train.log_every=1000", "data.num_workers=0"]

    start = time.perf_counter()
    teacher_cfg = load_config(None, [*common, f"model.name={args.teacher_model}", f"model.width={args.teacher_width}",
                                     f"train.epochs={args.teacher_epochs}", f"train.output_dir={tmp / 'teacher'}"])
    teacher_run = train_and_evaluate(teacher_cfg, log=lambda _m: None)
    teacher_s = time.perf_counter() - start
    print(f"teacher {args.teacher_model} width {args.teacher_width}: test top-1 {teacher_run.test.acc1:.4f} "
          f"({teacher_s:.0f}s)", flush=True)

    student = [*common, f"model.name={args.student_model}", f"model.width={args.student_width}",
               f"train.epochs={args.epochs}", f"distill.temperature={args.temperature}", f"distill.alpha={args.alpha}"]
    base = load_config(None, student)
    splits = load_dataset(base.data)
    pre = build_preprocessing(base, splits)
    loaders = build_loaders(base, splits, pre)
    teacher = load_teacher(str(teacher_run.files["model"]), pre)
    rows = []
    for seed in args.seeds:
        cfg = load_config(None, [*student, f"train.seed={seed}"])
        plain = train_student(cfg, splits, pre, loaders)
        kd = train_student(cfg, splits, pre, loaders, teacher=teacher.model)
        rows.append({"seed": seed, "plain": plain, "kd": kd})
        print(f"seed {seed}: student test top-1 without KD {plain['test_acc1']:.4f}, with KD {kd['test_acc1']:.4f} "
              f"({kd['test_acc1'] - plain['test_acc1']:+.4f}); {plain['seconds']:.0f}s / {kd['seconds']:.0f}s",
              flush=True)

    plain_acc, kd_acc = ([r[arm]["test_acc1"] for r in rows] for arm in ("plain", "kd"))
    result = {
        "config": vars(args),
        "test_images": teacher_run.test.n,
        "teacher": {"model": args.teacher_model, "width": args.teacher_width, "test_acc1": teacher_run.test.acc1,
                    "params": sum(p.numel() for p in teacher.network.parameters()), "seconds": teacher_s},
        "student_params": _param_count(base, len(pre.classes)),
        "runs": rows,
        "plain_test_acc1": describe(plain_acc),
        "kd_test_acc1": describe(kd_acc),
        "kd_minus_plain_mean": statistics.mean(kd_acc) - statistics.mean(plain_acc),
        "kd_minus_plain_per_seed": [k - p for k, p in zip(kd_acc, plain_acc)],
        "wall_s": time.perf_counter() - start,
    }
    p, k = result["plain_test_acc1"], result["kd_test_acc1"]
    print(f"student ({args.student_model} width {args.student_width}, {result['student_params']:,} params) test top-1 "
          f"over {len(args.seeds)} seeds: without KD {p['mean']:.4f} +- {p['std']:.4f}, with KD {k['mean']:.4f} +- "
          f"{k['std']:.4f}; difference {result['kd_minus_plain_mean']:+.4f} (teacher {teacher_run.test.acc1:.4f}, "
          f"{result['teacher']['params']:,} params; n={teacher_run.test.n})")
    save("distill", result)
    return result


def _param_count(cfg, num_classes: int) -> int:
    from imgcls_core.models import build_model

    return sum(p.numel() for p in build_model(cfg.model, num_classes, cfg.data.image_size).parameters())


if __name__ == "__main__":
    main()
