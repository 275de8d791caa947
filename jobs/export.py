"""Export a model to TorchScript and ONNX (and TensorRT on a GPU), each checked against eager PyTorch on real images.

    python -m jobs.export --config configs/digits_ray.yaml --model digits                 # models:/digits@champion
    python -m jobs.export --config configs/digits_ray.yaml --model digits --version 3 --opset 18
    python -m jobs.export --config configs/digits.yaml --model-file runs/digits/model.pt --out exports/
    python -m jobs.export --config configs/digits_ray.yaml --model digits --formats tensorrt   # CUDA + '.[tensorrt]'

The check batch is the first ``--check-images`` images of the test split (the
validation split when there is none), preprocessed as the model was trained.
Each export passes when its logits are within ``--tolerance`` (max absolute
difference, default 1e-4) of eager PyTorch and its top-1 agrees on every image.

Files go to ``--out`` (default ``<train.output_dir>/exports/<model>/v<N>``, or
``.../exports/file`` with ``--model-file``). For a registered version, this run's
exports, ``parity.json`` and ``export.json`` (nothing else the folder holds) are
logged to the version's run under ``exports/v<N>/``, and the version is tagged
(``export.onnx.uri``, ``export.onnx.max_abs_diff``, ...): the Serve app's
``serve.backend=onnx`` loads the file ``export.onnx.uri`` names, ``serve.backend=tensorrt``
the engine folder ``export.tensorrt.uri`` names (fp16 engines are checked within 0.05). A failed parity
check prints the figures, logs nothing to the registry and exits 1.

Exit status: 0 when every export passed, 1 on failure (parity included), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from imgcls_core.config import Config
from jobs.common import add_config_args, job_config, positive_int, resolve_config_paths, run_main


def check_batch(cfg: Config, model_file: Path, images: int) -> torch.Tensor:
    """The first ``images`` test (else validation) images, preprocessed by the model's own transform."""
    from imgcls_core.data import load_dataset
    from imgcls_core.predict import Predictor

    splits = load_dataset(cfg.data)
    records = splits.test if splits.test is not None else splits.val
    predictor = Predictor.from_file(model_file)
    if list(records.classes) != list(predictor.pre.classes):
        raise ValueError(f"the data's classes {records.classes[:10]} differ from the model's "
                         f"{predictor.pre.classes[:10]}; pass the config the model was trained with")
    n = min(images, len(records))
    if n < 2:
        raise ValueError(f"need at least 2 check images, the split has {len(records)}")
    return torch.stack([predictor.transform(records.load(i)) for i in range(n)])


def export_job(cfg: Config, *, model_name: str | None, alias: str | None, version: str | None,
               model_file: str | None, formats: tuple[str, ...], opset: int, tolerance: float,
               check_images: int, out: str | None, trt_precision: str = "fp16", log=print) -> dict:
    """Export, check, and (for a registry version) log to MLflow; returns the summary written to
    ``<out>/export.json``. Raises ExportError when a parity check fails."""
    from imgcls_core.export import export_model, file_size_mb
    from imgcls_core.registry import Registry

    cfg = resolve_config_paths(cfg)
    registry = mv = None
    with tempfile.TemporaryDirectory(prefix="imgcls-export-") as tmp:  # the downloaded version
        work = Path(tmp)
        if model_file is None:
            registry = Registry(cfg.tracking.tracking_uri, model_name)
            mv = registry.resolve(alias, version)  # a registry that fails raises: never "no such alias"
            model_path = registry.model_file(mv.version, work / "download")
            source = f"models:/{model_name}/{mv.version}" + (f" (@{alias})" if version is None else "")
        else:
            model_path = Path(model_file)
            if not model_path.exists():
                raise FileNotFoundError(f"model file {model_path} does not exist")
            source = str(model_path)
        # Keyed by model and version: another model's v<N> (or its stale files) never shares the folder
        default = Path(cfg.train.output_dir) / "exports" / (f"{model_name}/v{mv.version}" if mv else "file")
        out_dir = Path(out) if out else default
        log(f"exporting {source} to {', '.join(formats)} (opset {opset}) in {out_dir}")
        batch = check_batch(cfg, model_path, check_images)
        files, reports = export_model(model_path, batch, out_dir, formats=formats, opset=opset,
                                      tolerance=tolerance, trt_precision=trt_precision, log=log)
        summary = {"source": source, "opset": opset, "tolerance": tolerance,
                   "files": {fmt: str(path) for fmt, path in files.items()},
                   "size_mb": {fmt: round(file_size_mb(path), 3) for fmt, path in files.items()},
                   "parity": {r.format: r.to_dict() for r in reports}}
        if mv is None:
            (out_dir / "export.json").write_text(json.dumps(summary, indent=1))
            return summary
        artifact_path = f"exports/v{mv.version}"
        tags = {"export.opset": opset}
        for r in reports:
            name = Path(files[r.format]).name
            tags.update({f"export.{r.format}.uri": f"runs:/{mv.run_id}/{artifact_path}/{name}",
                         f"export.{r.format}.max_abs_diff": r.max_abs_diff,
                         f"export.{r.format}.top1_agreement": r.top1_agreement,
                         f"export.{r.format}.check_images": r.images})
        summary["registry"] = {"model": model_name, "version": str(mv.version), "run_id": mv.run_id,
                               "artifact_path": artifact_path, "tags": sorted(tags)}
        # Written before the upload, so the run holds it beside the files it describes.
        (out_dir / "export.json").write_text(json.dumps(summary, indent=1))
        # This run's files only: the folder may hold others (--out shared, *.failed-parity of an earlier run)
        for path in [*files.values(), out_dir / "parity.json", out_dir / "export.json"]:
            registry.client.log_artifact(mv.run_id, str(path), artifact_path=artifact_path)  # model.trt/: whole
        registry.tag(mv.version, tags)
        log(f"logged to run {mv.run_id} under {artifact_path}/ and tagged {model_name} v{mv.version}")
        return summary


def build_parser() -> argparse.ArgumentParser:
    from imgcls_core.export import DEFAULT_FORMATS, DEFAULT_OPSET, DEFAULT_TOLERANCE, FORMATS

    parser = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="registered model name (default: tracking.register_as, else 'imgcls')")
    source.add_argument("--model-file", help="export this model.pt or checkpoint instead of a registry version")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--alias", default="champion", help="registry alias to export (default: champion)")
    which.add_argument("--version", type=positive_int, help="registry version number to export")
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                        help=f"comma-separated, from {','.join(FORMATS)} (default {','.join(DEFAULT_FORMATS)}; "
                             f"tensorrt needs a CUDA GPU and the tensorrt extra)")
    parser.add_argument("--trt-precision", choices=("fp16", "fp32"), default="fp16",
                        help="TensorRT engine precision (default fp16, checked within 0.05 of the eager logits)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"max abs logit difference allowed (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--check-images", type=int, default=128,
                        help="real images in the parity check batch (default: %(default)s)")
    parser.add_argument("--out", help="output folder (default: <train.output_dir>/exports/<model>/v<N>, or "
                                       ".../exports/file with --model-file)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from imgcls_core.export import FORMATS, MAX_OPSET, MIN_OPSET

    parser = build_parser()
    args, cfg, done = job_config(parser, argv)
    if done is not None:
        return done
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    bad = sorted(set(formats) - set(FORMATS))
    if bad or not formats:
        print(f"error: --formats: unknown {bad or 'empty'}; choose from {','.join(FORMATS)}", file=sys.stderr)
        return 2
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        print(f"error: --opset {args.opset}: choose {MIN_OPSET}..{MAX_OPSET}, the opsets torch.onnx's exporter "
              f"writes natively", file=sys.stderr)
        return 2
    if not math.isfinite(args.tolerance) or args.tolerance <= 0 or args.check_images < 2:
        print("error: --tolerance must be a number > 0 and --check-images >= 2", file=sys.stderr)
        return 2

    def body() -> None:
        export_job(cfg, model_name=None if args.model_file else (args.model or cfg.tracking.register_as or "imgcls"),
                   alias=args.alias, version=args.version, model_file=args.model_file, formats=formats,
                   opset=args.opset, tolerance=args.tolerance, check_images=args.check_images, out=args.out,
                   trt_precision=args.trt_precision)

    return run_main(body, what="export", tracking_uri=cfg.tracking.tracking_uri)


if __name__ == "__main__":
    sys.exit(main())
