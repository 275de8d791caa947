"""Register a local model.pt as a version in the MLflow model registry (for jobs.promote and Serve).

    python -m jobs.register --model runs/mine/model.pt --name mine [--config CFG] [--set tracking.tracking_uri=URI]

When ``train_summary.json`` beside the file names the MLflow run that logged this
very file (jobs.train_local or jobs.train with tracking on), that run's model is
registered; otherwise the file is logged as the model of a new run in experiment
``tracking.experiment`` (the summary, if any, then records that run). Registering
again finds the same version (by the run, else by the file's SHA-256). The version
gets no alias: ``python -m jobs.promote --summary <dir>/train_summary.json --model
NAME`` (or ``--run-id``) tests it on the held-out split and moves ``champion``,
which the Serve app follows. The config is ``--config``, else ``config.yaml`` beside the file (what
the run trained with), else the defaults; the registry is ``tracking.tracking_uri``,
else MLFLOW_TRACKING_URI.

Exit status: 0 when the version exists, 1 on failure, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from imgcls_core.config import registered_name_error
from jobs.common import add_config_args, config_beside, config_or_exit, read_json, run_main

SHA_TAG = "imgcls.model_sha256"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.register", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, metavar="MODEL_PT",
                        help="the model file (model.pt of jobs.train_local / jobs.train)")
    parser.add_argument("--name", help="registered model name (default: tracking.register_as, else 'imgcls')")
    add_config_args(parser)
    return parser


def read_summary(model_file: Path) -> tuple[Path | None, dict[str, Any]]:
    """The train_summary.json beside ``model_file`` (None if there is none) and its contents."""
    from imgcls_core.tracking import SUMMARY_FILE

    path = model_file.parent / SUMMARY_FILE
    if not path.is_file():
        return None, {}
    return path, read_json(path, "a training summary (jobs.train and jobs.train_local write it)")


def register(model_file: Path, name: str, tracking_uri: str | None, experiment: str, *, log=print):
    """The registry version of ``model_file``: its training run's model, else the version registered
    from the same bytes before, else a new run's."""
    from mlflow.exceptions import MlflowException

    from imgcls_core.engine.checkpoint import file_sha256
    from imgcls_core.registry import Registry, is_missing, register_model_file

    model_file = model_file.resolve()
    summary_file, summary = read_summary(model_file)
    run_id = summary.get("mlflow_run_id")
    sha = file_sha256(model_file)
    # the summary describes this file (by name: the run folder may have moved since); its run logged
    # these very bytes unless the summary records others (a run evaluated again with tracking off
    # may ship other weights than the ones its MLflow run logged)
    same_file = Path(summary.get("model_file") or "").name == model_file.name
    logged = same_file and summary.get("model_sha256") in (None, sha)
    tags = {"imgcls.model_file": str(model_file), SHA_TAG: sha}
    registry = Registry(tracking_uri, name, create=True)  # a file may start a new store
    if run_id and logged and summary.get("model_uri"):
        try:
            version, created = registry.register(run_id, tags)
            log(f"{'registered' if created else 'found'} {name} v{version.version}: the model of training "
                f"run {run_id}")
            return version
        except (MlflowException, LookupError) as exc:
            if isinstance(exc, MlflowException) and not is_missing(exc):
                raise  # the registry failing, not a run this tracking server lacks
            log(f"training run {run_id} (from {summary_file}) is not usable here ({str(exc)[:200]}); "
                f"logging {model_file.name} as a new run")
    same_bytes = registry.client.search_model_versions(f"name = '{name}' and tags.`{SHA_TAG}` = '{sha}'")
    if same_bytes:
        version = min(same_bytes, key=lambda v: int(v.version))
        log(f"found {name} v{version.version}: registered from the same file (SHA-256 {sha[:12]}...) "
            f"as run {version.run_id}")
    else:
        version = register_model_file(tracking_uri, name, model_file, experiment=experiment,
                                      run_name=f"register {model_file.parent.name}", tags=tags)
        log(f"registered {name} v{version.version}: {model_file} logged as run {version.run_id} "
            f"in experiment {experiment!r}")
    if summary_file is not None and same_file and summary.get("mlflow_run_id") != version.run_id:
        # jobs.promote --summary then promotes this version
        summary.update({"mlflow_run_id": version.run_id, "registered_version": str(version.version),
                        "model_uri": f"models:/{name}/{version.version}", "model_sha256": sha})
        summary_file.write_text(json.dumps(summary, indent=1))
        log(f"recorded run {version.run_id} in {summary_file}")
    return version


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model_file = Path(args.model)
    if args.config is None and model_file.is_file():
        args.config = config_beside(model_file)  # what the run trained (and tracked) with
    cfg, done = config_or_exit(args)
    if done is not None:
        return done
    if args.name is not None and (error := registered_name_error(args.name)) is not None:
        print(f"error: --name: {error}", file=sys.stderr)  # before a run is logged for it
        return 2

    def body() -> None:
        if not model_file.is_file():
            raise FileNotFoundError(f"no model file {model_file}; train one with python -m jobs.train_local")
        import mlflow

        uri = cfg.tracking.tracking_uri or mlflow.get_tracking_uri()
        name = args.name or cfg.tracking.register_as or "imgcls"
        version = register(model_file, name, uri, cfg.tracking.experiment)
        summary, _ = read_summary(model_file)
        promote = f"--summary {summary}" if summary is not None else f"--run-id {version.run_id}"
        print(f"{name} v{version.version} is in the registry at {uri}; test it and make it the champion with:\n"
              f"  python -m jobs.promote {promote} --model {name}")

    return run_main(body, what="registration", tracking_uri=cfg.tracking.tracking_uri)


if __name__ == "__main__":
    sys.exit(main())
