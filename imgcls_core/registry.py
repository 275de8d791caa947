"""The MLflow model registry: register a run's model once, and gate the ``champion`` alias.

A promotion registers the candidate run's model (or finds the version that
already holds it: one run, one version), points ``challenger`` at it, and moves
``champion`` only when the challenger's test top-1 beats the champion's by
``margin``, both measured on the same test split in the same call. ``force``
moves it regardless and records the reason on the version. Every decision is
written as tags on the challenger's version, so the registry is its own log.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CHAMPION = "champion"
CHALLENGER = "challenger"
SOURCE_RUN_TAG = "imgcls.source_run_id"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> ``(name, alias, None)``; ``models:/name/3`` -> ``(name, None, "3")``."""
    match = _MODELS_URI.match(uri.strip())
    if match is None:
        raise ValueError(f"{uri!r} is not a registry URI of the form models:/<name>@<alias> or "
                         f"models:/<name>/<version>")
    return match["name"], match["alias"], match["version"]


@dataclass
class Decision:
    """The outcome of one promotion, as printed and as tagged on the version."""

    model: str
    version: str
    run_id: str
    challenger_acc1: float
    champion_version: str | None
    champion_acc1: float | None
    margin: float
    promoted: bool
    reason: str
    new_version: bool
    champion_after: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"challenger: {self.model} v{self.version} (run {self.run_id}) test top-1 {self.challenger_acc1:.4f}"]
        if self.champion_version is None:
            lines.append("champion:   none yet")
        elif self.champion_acc1 is None:
            lines.append(f"champion:   {self.model} v{self.champion_version} (this version)")
        else:
            lines.append(f"champion:   {self.model} v{self.champion_version} test top-1 {self.champion_acc1:.4f}"
                         f" (same test split, this call)")
            lines.append(f"difference: {self.challenger_acc1 - self.champion_acc1:+.4f} (margin {self.margin:+.4f})")
        verdict = "PROMOTED" if self.promoted else "NOT PROMOTED"
        lines.append(f"decision:   {verdict}: {self.reason}; champion is v{self.champion_after}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def should_promote(challenger: float, champion: float | None, margin: float) -> tuple[bool, str]:
    """The gate: promote when there is no champion or the challenger wins by at least ``margin``."""
    if champion is None:
        return True, "no champion yet"
    if challenger >= champion + margin:
        return True, f"beats the champion by {challenger - champion:+.4f} (>= margin {margin:+.4f})"
    return False, f"does not beat the champion by the margin ({challenger - champion:+.4f} < {margin:+.4f})"


class Registry:
    """One registered model name in an MLflow tracking server's registry."""

    def __init__(self, tracking_uri: str | None, name: str):
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.name = name

    def version_for_run(self, run_id: str):
        """The version already registered from ``run_id``, if any."""
        found = self.client.search_model_versions(f"name = '{self.name}' and tags.`{SOURCE_RUN_TAG}` = '{run_id}'")
        if not found:  # registered by `jobs.train --register`, which names the run but sets no tag
            found = self.client.search_model_versions(f"name = '{self.name}' and run_id = '{run_id}'")
        return min(found, key=lambda v: int(v.version)) if found else None

    def register(self, run_id: str, tags: dict[str, Any]) -> tuple[Any, bool]:
        """The run's logged model as a version (a new one only if the run has none yet)."""
        existing = self.version_for_run(run_id)
        if existing is not None:
            return existing, False
        model = self.logged_model(run_id)
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(self.name, description="imgcls image classifier")
        version = self.client.create_model_version(self.name, model.artifact_location, run_id=run_id,
                                                   tags={SOURCE_RUN_TAG: run_id, **_strings(tags)},
                                                   model_id=model.model_id)
        return self._wait_ready(version), True

    def logged_model(self, run_id: str):
        """The model the run logged (an MLflow 3 LoggedModel)."""
        run = self.client.get_run(run_id)
        models = self.client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                  filter_string=f"source_run_id = '{run_id}'")
        if not models:
            raise LookupError(f"run {run_id} logged no model; was its training finished and tracked?")
        return models[0]

    def _wait_ready(self, version, timeout_s: float = 60.0):
        deadline = time.monotonic() + timeout_s
        while version.status == "PENDING_REGISTRATION" and time.monotonic() < deadline:
            time.sleep(0.5)
            version = self.client.get_model_version(self.name, version.version)
        if version.status != "READY":
            raise RuntimeError(f"model version {self.name} v{version.version} is {version.status}")
        return version

    def alias(self, alias: str):
        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException:
            return None

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, str(version))

    def tag(self, version: str, tags: dict[str, Any]) -> None:
        for key, value in _strings(tags).items():
            self.client.set_model_version_tag(self.name, str(version), key, value)

    def model_file(self, version: str, dst: str | Path | None = None) -> Path:
        """Download the version's artifacts and return its ``model.pt``."""
        import mlflow.artifacts

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file otherwise
        dst = Path(dst or tempfile.mkdtemp(prefix="imgcls-model-"))
        uri = self.client.get_model_version_download_uri(self.name, str(version))
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=self.tracking_uri)
        found = sorted(glob.glob(f"{local}/**/model.pt", recursive=True))
        if not found:
            raise FileNotFoundError(f"{self.name} v{version} has no model.pt among its artifacts")
        return Path(found[0])


def _strings(tags: dict[str, Any]) -> dict[str, str]:
    return {k: (f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in tags.items()}


def register_model_file(tracking_uri: str | None, name: str, model_file: str | Path, *, experiment: str = "imgcls",
                        run_name: str | None = None, tags: dict[str, Any] | None = None):
    """Log a model file (``model.pt`` from jobs.train_local, say) as a new run's model and register it.

    Returns the new model version; it gets no alias (``jobs.promote`` or
    :meth:`Registry.set_alias` decide that).
    """
    from imgcls_core.config import TrackingConfig
    from imgcls_core.tracking import Tracker

    tracker = Tracker(TrackingConfig(enabled=True, tracking_uri=tracking_uri, experiment=experiment),
                      log=lambda _line: None)
    tracker.start(run_name=run_name)
    if tracker.log_model(model_file) is None:
        raise RuntimeError(f"could not log {model_file} to {tracking_uri}: {'; '.join(tracker.lost)}")
    tracker.close()
    version, _ = Registry(tracking_uri, name).register(tracker.run_id, tags or {})
    return version
