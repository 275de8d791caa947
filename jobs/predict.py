"""Classify image files or folders with a model file or a registry version, and write CSV.

    python -m jobs.predict --model runs/mine/model.pt photos/ extra.jpg --out predictions.csv
    python -m jobs.predict --model models:/mine@champion photos/ [--tracking-uri http://127.0.0.1:5000]

``--model`` is a ``model.pt`` (or a training checkpoint), ``models:/<name>@<alias>`` or
``models:/<name>/<version>`` (loaded from the registry at ``--tracking-uri``, else
MLFLOW_TRACKING_URI, the way the Serve app loads it). The model carries its own
preprocessing. Folders are searched recursively for image files (by extension,
hidden files left out); files named on the command line are always read. One CSV
row per image, in input order: ``path, label, probability`` (top-1), ``top_k`` (a
JSON list of ``[label, probability]``, best first) and ``error``: a file that cannot
be read or decoded gets a row with the reason and the run goes on. The CSV goes to
``--out`` (default: standard output); a summary line goes to standard error.

Exit status: 0 when at least one image was classified, 1 when none was (or the model
did not load), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from jobs.common import mlflow_failure, run_main

COLUMNS = ["path", "label", "probability", "top_k", "labels", "error"]  # labels: multi-label models only
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--model", required=True,
                        help="model.pt, models:/<name>@<alias> or models:/<name>/<version>")
    parser.add_argument("--tracking-uri", help="registry for models:/ URIs (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--out", default="-", metavar="CSV", help="where to write the CSV (default: stdout)")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image in the top_k column (default 5)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                        help="where to run the model (default cpu)")
    return parser


def find_images(inputs: list[str]) -> list[Path]:
    """Named files as they are; folders' image files (recursively, sorted, no hidden ones)."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(item).parts))
        else:
            found.append(item)  # a missing file gets an error row
    return found


def load_predictor(model: str, tracking_uri: str | None, device: str):
    """``(Predictor, description)`` for a model file or a models:/ registry URI."""
    from imgcls_core.predict import Predictor
    from imgcls_core.serving import load_served_model, resolve_device

    if model.startswith("models:"):
        from imgcls_core.registry import parse_model_uri

        name, alias, version = parse_model_uri(model)
        served = load_served_model(tracking_uri, name, alias=alias, version=version, device=device)
        return served.predictor, f"{name} v{served.version}" + (f" (@{alias})" if alias else "")
    if not Path(model).exists():
        raise FileNotFoundError(f"no model file {model}; give a model.pt or models:/<name>@<alias>")
    return Predictor.from_file(model, resolve_device(device)), model


def classify(predictor, paths: list[Path], *, top_k: int, batch_size: int) -> Iterator[dict[str, Any]]:
    """One CSV row per path, in order; a file that fails gets its error instead of a label."""
    from imgcls_core.data import decode_image

    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        rows: list[dict[str, Any]] = [{"path": str(p)} for p in chunk]
        decoded = {}  # model-size input tensors: a chunk never holds full-resolution pixels
        for i, path in enumerate(chunk):
            try:
                decoded[i] = predictor.transform(decode_image(path))
            except Exception as exc:  # noqa: BLE001 - any unreadable file is one error row
                rows[i]["error"] = _reason(exc)
        for i, result in zip(decoded, _classify_batch(predictor, list(decoded.values()), top_k)):
            if isinstance(result, Exception):
                rows[i]["error"] = _reason(result)
            else:
                rows[i].update(label=result[0]["label"], probability=f"{result[0]['probability']:.6f}",
                               top_k=json.dumps([[c["label"], round(c["probability"], 6)] for c in result[:top_k]]))
                if predictor.pre.multi_label:  # every class is ranked: those over the threshold
                    # "|" as predictions.csv joins them: class names may hold spaces
                    rows[i]["labels"] = "|".join(c["label"] for c in predictor.present(result))
        yield from rows


def _classify_batch(predictor, images: list, top_k: int) -> list:
    """Top-k per preprocessed image; when the batch fails, image by image, so one bad image fails alone."""
    import torch

    def classify(batch: list) -> list:
        return predictor.classify_batch(torch.stack(batch), top_k)

    if not images:
        return []
    try:
        return classify(images)
    except Exception as exc:  # noqa: BLE001
        if len(images) == 1:
            return [exc]
    results = []
    for image in images:
        try:
            results.append(classify([image])[0])
        except Exception as exc:  # noqa: BLE001
            results.append(exc)
    return results


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"unreadable: {exc.strerror}"
    return str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"


@contextmanager
def _output(out: str) -> Iterator[TextIO]:
    if out == "-":
        yield sys.stdout
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{out}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", newline="") as fh:
            yield fh
        os.replace(tmp, out)  # a complete CSV or none
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be >= 1")
    if args.out != "-" and Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a folder; name the CSV file to write")
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return run_main(lambda: predict(args, tracking_uri), what="prediction", tracking_uri=tracking_uri)


def predict(args: argparse.Namespace, tracking_uri: str | None) -> int:
    """Classify every image the arguments name and write the CSV; the exit status."""
    paths = find_images(args.inputs)
    if not paths:
        raise FileNotFoundError(f"no image files in {' '.join(args.inputs)}")
    try:
        predictor, source = load_predictor(args.model, tracking_uri, args.device)
    except Exception as exc:
        if mlflow_failure(exc) is not None:
            raise  # reported as MLflow's failure, with the server it could not reach
        # LookupError, a corrupt or foreign file, ...: one line that names the model
        raise RuntimeError(f"cannot load the model {args.model}: {exc}") from exc
    classified = errors = 0
    with _output(args.out) as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        for row in classify(predictor, paths, top_k=args.top_k, batch_size=args.batch_size):
            writer.writerow(row)
            errors += "error" in row
            classified += "error" not in row
    where = "" if args.out == "-" else f" -> {args.out}"
    print(f"classified {classified} of {len(paths)} images with {source}"
          f"{f' ({errors} could not be read: see the error column)' if errors else ''}{where}", file=sys.stderr)
    if not classified:
        print(f"error: none of the {len(paths)} images could be read (the error column says why)", file=sys.stderr)
    return 0 if classified else 1


if __name__ == "__main__":
    sys.exit(main())
