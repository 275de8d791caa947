"""Compress a trained model: int8 quantization (ONNX Runtime), bf16, or pruning with fine-tuning.

    python -m jobs.compress --config configs/digits_ray.yaml --model digits --method static
    python -m jobs.compress --config configs/digits_ray.yaml --model digits --version 3 --method dynamic
    python -m jobs.compress --config configs/digits_ray.yaml --model digits --method bf16
    python -m jobs.compress --config configs/digits.yaml --model-file runs/digits/model.pt \\
        --method prune-unstructured --amount 0.6 --finetune-epochs 3

The model comes from the registry (``--model NAME``, at ``--alias`` (default
champion) or ``--version N``) or from a file (``--model-file``). Calibration
images come from the config's training split, accuracy from its test split.
It prints the report (fp32 vs int8 top-1 and images/s measured side by side,
or sparsity and top-1 before/after pruning and after fine-tuning, with sizes)
and writes the files and ``<method>_report.json`` to ``--out`` (default
``<train.output_dir>/compress/<method>``):

    static, dynamic                       model.onnx (fp32), model.int8.onnx
    bf16                                  the report only (bf16 runs the registered weights)
    prune-unstructured, prune-structured  model.pt (a normal imgcls model file)

For a registry model the files and figures are also logged to the version's
MLflow run (artifacts under ``compress/<method>/<UTC time>/``, a folder of this run's
own, so a later run never overwrites a file an earlier one tagged; metrics
``compress/<kind>/*``) and the version is tagged ``compress.<kind>.<figure>`` (kind: ``int8``,
``int8_dynamic``, ``bf16``, ``prune_unstructured``, ``prune_structured``), e.g.
``compress.int8.acc1_delta``. An int8 file whose test top-1 is within 1 point of
fp32 is also tagged servable (``export.int8.uri``, naming that run's file; a run that
fails the gate leaves an earlier servable file and tag as they were): ``serve.backend=onnx`` with
``serve.precision=int8`` serves it. Likewise bf16 within 1 point is tagged servable
(``export.bf16.acc1_delta``): ``serve.backend=torch`` with ``serve.precision=bf16``
serves it, on hardware with native bf16. The job needs no Ray: it runs the same as a plain
process and under ``ray job submit``.

Exit status: 0 on success, 1 on failure, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from imgcls_core.config import Config
from jobs.common import add_config_args, job_config, resolve_config_paths, resolve_path, run_main

METHODS = ("static", "dynamic", "bf16", "prune-unstructured", "prune-structured")
TAG_KIND = {"static": "int8", "dynamic": "int8_dynamic", "bf16": "bf16", "prune-unstructured": "prune_unstructured",
            "prune-structured": "prune_structured"}
GATE_ADVICE = {"int8": "try --method static with more --calibration-images", "bf16": "serve it in fp32"}


def resolve_model(cfg: Config, args: argparse.Namespace, work: Path, log=print):
    """``(model file, registry or None, version or None)`` for the model the arguments name (a
    registry version is downloaded into ``work``)."""
    if args.model_file:
        path = Path(resolve_path(args.model_file))
        if not path.exists():
            raise FileNotFoundError(f"--model-file {path} does not exist")
        return path, None, None
    from imgcls_core.registry import Registry

    registry = Registry(cfg.tracking.tracking_uri, args.model)
    version = registry.resolve(args.alias, args.version)  # a registry that fails raises: never "no such alias"
    log(f"{args.model} v{version.version} (run {version.run_id})")
    return registry.model_file(version.version, work), registry, version


def run(cfg: Config, args: argparse.Namespace, log=print) -> dict:
    """Load the model and data, compress, write the report; returns the report as a dict."""
    cfg = resolve_config_paths(cfg)
    with tempfile.TemporaryDirectory(prefix="imgcls-model-") as work:
        return _run(cfg, args, *resolve_model(cfg, args, Path(work), log), log=log)


def _run(cfg: Config, args: argparse.Namespace, model_file: Path, registry, version, log=print) -> dict:
    from imgcls_core import compress
    from imgcls_core.data import load_dataset
    from imgcls_core.export import load_eager

    out = Path(resolve_path(args.out)) if args.out else Path(cfg.train.output_dir) / "compress" / args.method
    splits = load_dataset(cfg.data)
    if splits.test is None:
        log(f"note: {cfg.data.root} has no test split; accuracy is measured on the validation split")
    start = time.perf_counter()
    if args.method in compress.PRUNE_METHODS:
        files, report = compress.prune(model_file, cfg, splits, out, method=args.method, amount=args.amount,
                                       n=args.norm, finetune_epochs=args.finetune_epochs,
                                       finetune_lr=args.finetune_lr, log=log)
    else:  # int8 or bf16: the same weights measured against fp32 on training images, judged on test
        model, pre = load_eager(model_file)
        images = compress.calibration_batch(splits.train, pre, args.calibration_images, seed=cfg.data.seed)
        measure = {"batch_size": args.batch_size, "threads": args.threads or None, "repeats": args.repeats}
        test = splits.test or splits.val
        if args.method == compress.BF16_METHOD:
            files, report = compress.reduced_precision(model, pre, images, test, out, **measure)
        else:
            files, report = compress.quantize(model, pre, images, test, out, method=args.method,
                                              calibrate=args.calibrate, log=log, **measure)
    log(report.summary())
    log(f"files in {out} ({time.perf_counter() - start:.0f}s)")
    source = str(model_file) if registry is None else f"models:/{args.model}/{version.version}"
    result = {"method": args.method, "model_file": source, **report.to_dict(),
              "files": {k: str(v) for k, v in files.items()}}
    if registry is None:
        files["report"].write_text(json.dumps(result, indent=1))
        return result
    return publish(registry, version, args.model, args.method, report, files, result, log)


def publish(registry, version, model_name: str, method: str, report, files: dict[str, Path], result: dict,
            log=print) -> dict:
    """Judge the gate, write the final report, log it and the files to the version's run under a
    folder of this run's own (``compress/<method>/<UTC time>``), then tag the version: its figures,
    and servable (int8: the file in that folder) only when the gate passed. Returns the report as
    written and logged."""
    from imgcls_core.compress import BF16_METHOD, QUANT_METHODS

    artifact_path = f"compress/{method}/{datetime.now(timezone.utc):%Y%m%dT%H%M%S.%fZ}"
    result = {**result, "model": model_name, "version": str(version.version), "artifact_path": artifact_path}
    precision = "int8" if method in QUANT_METHODS else "bf16" if method == BF16_METHOD else None
    if precision is not None:
        result["servable"] = passes_gate(precision, report, log, GATE_ADVICE[precision])
    files["report"].write_text(json.dumps(result, indent=1))  # final before the upload: the run logs this file
    record_in_registry(registry, version, method, report.metrics(), files, artifact_path)
    log(f"logged to run {version.run_id} under {artifact_path}/; tagged {model_name} v{version.version} "
        f"compress.{TAG_KIND[method]}.*")
    if result.get("servable"):  # after the upload: the tag names a file the run holds
        if precision == "int8":
            tag_servable_int8(registry, version, method, report, f"{artifact_path}/{files['int8_onnx'].name}", log)
        else:
            tag_servable_bf16(registry, version, report, log)
    return result


def record_in_registry(registry, version, method: str, figures: dict[str, float], files: dict[str, Path],
                       artifact_path: str) -> None:
    """Log the files (under ``artifact_path``) and figures to the version's run and tag the version
    with the figures."""
    from mlflow.entities import Metric

    kind = TAG_KIND[method]
    now = int(time.time() * 1000)
    client = registry.client
    client.log_batch(version.run_id, metrics=[Metric(f"compress/{kind}/{k}", float(v), now, 0)
                                              for k, v in figures.items()])
    for path in files.values():
        client.log_artifact(version.run_id, str(path), artifact_path)
    registry.tag(version.version, {f"compress.{kind}.{k}": v for k, v in figures.items()})


def tag_servable_int8(registry, version, method: str, report, artifact: str, log=print) -> None:
    """Tag the version's int8 ONNX file, logged to its run at ``artifact``, as servable
    (``export.int8.uri``: serve.backend=onnx with serve.precision=int8 runs it). Only for a report
    that passed the gate (:func:`passes_gate`)."""
    from imgcls_core.serving import INT8_URI_TAG

    registry.tag(version.version, {INT8_URI_TAG: f"runs:/{version.run_id}/{artifact}", "export.int8.method": method,
                                   "export.int8.acc1_delta": round(report.acc1_delta_points, 4)})
    log("serve it with serve.backend=onnx serve.precision=int8")


def tag_servable_bf16(registry, version, report, log=print) -> None:
    """Tag the version servable in bf16 (``export.bf16.acc1_delta``: serve.backend=torch with
    serve.precision=bf16 runs its weights under bf16 autocast). Only for a report that passed the
    gate (:func:`passes_gate`)."""
    from imgcls_core.serving import BF16_GATE_TAG

    registry.tag(version.version, {BF16_GATE_TAG: round(report.acc1_delta_points, 4)})
    log("serve it with serve.precision=bf16 (serve.backend torch or auto) on hardware with native bf16"
        + (f"; here: {report.native}" if report.native else ""))


def passes_gate(precision: str, report, log, otherwise: str) -> bool:
    """Whether ``report``'s test top-1 is within GATE_POINTS of fp32, said either way."""
    from imgcls_core.serving import GATE_POINTS

    delta = report.acc1_delta_points
    if delta < -GATE_POINTS:
        log(f"{precision} is NOT servable: its test top-1 is {-delta:.2f} points below fp32 "
            f"(the gate is {GATE_POINTS:g}); {otherwise}")
        return False
    log(f"{precision} is servable ({delta:+.2f} points of test top-1 against fp32, gate -{GATE_POINTS:g})")
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.compress", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    source = parser.add_argument_group("model (one of)")
    source.add_argument("--model", help="registered model name (with --alias or --version)")
    source.add_argument("--model-file", help="a model.pt or training checkpoint")
    source.add_argument("--alias", help="registry alias (default: champion)")
    source.add_argument("--version", type=int, help="registry version number")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--out", help="output folder (default: <train.output_dir>/compress/<method>)")
    quant = parser.add_argument_group("quantization and bf16")
    quant.add_argument("--calibration-images", type=int, default=256,
                       help="training images for int8 calibration and the timed batch (default: %(default)s)")
    quant.add_argument("--calibrate", default="minmax", choices=("minmax", "entropy", "percentile"),
                       help="how activation ranges are set from the calibration images")
    quant.add_argument("--batch-size", type=int, default=64, help="batch of the images/s measurement")
    quant.add_argument("--threads", type=int, default=0, help="intra-op threads for every model (0: torch's)")
    quant.add_argument("--repeats", type=int, default=10,
                       help="timed repeats, the median reported (default: %(default)s)")
    pruning = parser.add_argument_group("pruning")
    pruning.add_argument("--amount", type=float, default=0.5,
                         help="fraction of weights/channels to prune (default: %(default)s)")
    pruning.add_argument("--norm", type=int, default=1, choices=(1, 2), help="structured pruning: L1 or L2")
    pruning.add_argument("--finetune-epochs", type=int, default=3,
                         help="fine-tuning epochs after pruning (default: %(default)s)")
    pruning.add_argument("--finetune-lr", type=float, default=0.01,
                         help="fine-tuning learning rate (default: %(default)s)")
    return parser


def check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, or None."""
    if bool(args.model) == bool(args.model_file):
        return "name the model with exactly one of --model NAME or --model-file PATH"
    if args.model_file and (args.alias or args.version is not None):
        return "--alias/--version select a registry version; they go with --model, not --model-file"
    if args.alias and args.version is not None:
        return "use --alias or --version, not both"
    checks = [
        (0.0 < args.amount < 1.0, f"--amount is a fraction in (0, 1), got {args.amount}"),
        (args.calibration_images >= 2, f"--calibration-images must be >= 2, got {args.calibration_images}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.threads >= 0, f"--threads must be >= 0, got {args.threads}"),
        (args.repeats >= 1, f"--repeats must be >= 1, got {args.repeats}"),
        (args.finetune_epochs >= 0, f"--finetune-epochs must be >= 0, got {args.finetune_epochs}"),
        (args.finetune_lr > 0, f"--finetune-lr must be > 0, got {args.finetune_lr}"),
        (args.version is None or args.version >= 1, f"--version must be >= 1, got {args.version}"),
    ]
    return next((message for ok, message in checks if not ok), None)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, cfg, done = job_config(parser, argv)
    if done is not None:
        return done
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    args.alias = args.alias or ("champion" if args.version is None else None)

    def body() -> None:
        run(cfg, args)

    return run_main(body, what="compression", tracking_uri=cfg.tracking.tracking_uri)


if __name__ == "__main__":
    sys.exit(main())
