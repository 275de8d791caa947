"""The MLflow model registry: register a run's model once, and gate the ``champion`` alias.

A promotion registers the candidate run's model (or finds the version that
already holds it: one run, one version), points ``challenger`` at it, and moves
``champion`` only when the challenger's test top-1 beats the champion's by
``margin``, both measured on the same test split in the same call. ``force``
moves it regardless and records the reason on the version. Every decision is
written as tags on the challenger's version, so the registry is its own log.

A registry that answers "no such alias/version/model" and a registry that does not
answer at all are told apart: :meth:`Registry.alias` returns None only for the
first, and raises the MlflowException of the second, so a tracking server that is
down never looks like "no champion yet".
"""

from __future__ import annotations

import glob
import os
import re
import time
from collections.abc import Callable
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
    metric: str = "acc1"  # what challenger_acc1/champion_acc1 hold: test top-1, or mAP (multi-label)

    def summary(self) -> str:
        what = "top-1" if self.metric == "acc1" else self.metric
        lines = [f"challenger: {self.model} v{self.version} (run {self.run_id}) test {what} {self.challenger_acc1:.4f}"]
        if self.champion_version is None:
            lines.append("champion:   none yet")
        elif self.champion_version == self.version:
            lines.append(f"champion:   {self.model} v{self.champion_version} (this version)")
        elif self.champion_acc1 is None:
            lines.append(f"champion:   {self.model} v{self.champion_version} (could not be evaluated)")
        else:
            lines.append(f"champion:   {self.model} v{self.champion_version} test {what} {self.champion_acc1:.4f}"
                         f" (same test split)")
            lines.append(f"difference: {self.challenger_acc1 - self.champion_acc1:+.4f} (margin {self.margin:+.4f})")
        verdict = "PROMOTED" if self.promoted else "NOT PROMOTED"
        lines.append(f"decision:   {verdict}: {self.reason}; champion is v{self.champion_after}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_missing(exc: BaseException) -> bool:
    """Whether an MLflow error says that what was asked for does not exist (a registered model,
    version, run or alias), as opposed to the tracking server or store failing."""
    return isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def should_promote(challenger: float, champion: float | None, margin: float) -> tuple[bool, str]:
    """The gate: promote when there is no champion or the challenger gains at least ``margin`` over it
    (a positive margin), or more than ``margin`` (zero or negative: with the default 0 a tie keeps the
    champion; -0.01 accepts a model up to a point worse, e.g. a smaller one)."""
    if champion is None:
        return True, "no champion yet"
    gain = challenger - champion
    # Within 1e-6: a score read back from a tag an older imgcls rounded to 6 digits; one image of a
    # test split moves a score by far more.
    if margin > 0:
        passed, rule = gain >= margin - 1e-6, ">="
    else:
        passed, rule = gain > margin + 1e-6, ">"
    if passed:
        return True, f"beats the champion by {gain:+.4f} ({rule} margin {margin:+.4f})"
    return False, f"does not beat the champion by the margin ({gain:+.4f}, not {rule} {margin:+.4f})"


def gate_champion(registry: Registry, version: str, challenger_acc1: float, *, evaluate: Callable[[Any], float],
                  margin: float, force_reason: str | None = None, log: Callable[[str], None] = print,
                  attempts: int = 3) -> tuple[bool, str, Any, float | None]:
    """Decide whether ``version`` (test top-1 ``challenger_acc1``) becomes ``champion`` and move the
    alias if so: ``(promoted, reason, the champion decided against or None, its top-1)``.

    ``evaluate(model_version)`` is the champion's test top-1 on the same split. No champion
    (no alias, no registered model) makes ``version`` the first one; a registry that fails raises
    and leaves the champion where it is. Right before the move the champion is read again: if
    another promotion moved it meanwhile, the decision is made again against the new champion
    (``attempts`` times at most, then RuntimeError), so a promotion never overwrites a champion
    it was not compared with."""
    version = str(version)
    champion = registry.alias(CHAMPION)
    for _ in range(attempts):
        same = champion is not None and str(champion.version) == version
        champion_acc1 = None
        if champion is not None and not same:
            try:
                champion_acc1 = evaluate(champion)
            except Exception as exc:  # noqa: BLE001 - a forced move is how a broken champion is replaced
                if not force_reason:
                    raise
                log(f"{registry.name}: the champion {_named(champion)} could not be evaluated ({exc}); "
                    f"forced, it is replaced anyway")
        if same:
            promoted, reason = False, "it is the champion already"
        elif force_reason:
            promoted, reason = True, f"forced: {force_reason}"
        else:
            promoted, reason = should_promote(challenger_acc1, champion_acc1, margin)
        if not promoted:
            return False, reason, champion, champion_acc1
        expected = str(champion.version) if champion is not None else None
        moved, now = registry.set_alias_if(CHAMPION, version, expected)
        if moved:
            return True, reason, champion, champion_acc1
        log(f"{registry.name}: the champion changed while this promotion decided (it was {_named(champion)}, "
            f"it is {_named(now)}); deciding again against {_named(now)}")
        champion = now
    raise RuntimeError(f"the champion of {registry.name!r} changed {attempts} times while this promotion decided "
                       f"(now {_named(champion)}); it was left there: run the promotion again")


def _named(version) -> str:
    return f"v{version.version}" if version is not None else "no champion"


class MissingStoreError(FileNotFoundError):
    """A local tracking store (sqlite file, file-store folder) that does not exist."""


def local_store_path(uri: str) -> Path | None:
    """The file or folder of a local tracking store URI (``sqlite:///mlflow.db``, ``file:///mlruns``,
    ``./mlruns``), None for a server or an in-memory database."""
    from urllib.parse import unquote, urlparse

    if uri.startswith("sqlite:"):
        path = uri[len("sqlite:"):].split("?", 1)[0]
        if not path.startswith("///") or path[3:] in ("", ":memory:"):
            return None
        return Path(unquote(path[3:]))
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if uri.startswith("databricks"):
        return None
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # a plain path
        return Path(uri).expanduser()
    return None


def check_store_exists(tracking_uri: str | None) -> None:
    """Raise MissingStoreError when ``tracking_uri`` (else MLflow's default) names a local store that
    is not there: MLflow would create an empty one, and a typo'd path would read as "no such model"."""
    import mlflow

    uri = tracking_uri or mlflow.get_tracking_uri()
    path = local_store_path(uri)
    if path is not None and not path.exists():
        where = "" if path.is_absolute() else f" (relative to the working directory {os.getcwd()})"
        raise MissingStoreError(
            f"there is no MLflow store at {path}{where}, from the tracking URI {uri!r}: set "
            f"tracking.tracking_uri (or MLFLOW_TRACKING_URI) to the store the model was logged to")


class Registry:
    """One registered model name in an MLflow tracking server's registry.

    A local store must exist already (:func:`check_store_exists`) unless ``create``: only
    registering a new file may start one.
    """

    def __init__(self, tracking_uri: str | None, name: str, *, create: bool = False):
        if not create:
            check_store_exists(tracking_uri)
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
        except MlflowException as exc:
            if not is_missing(exc):
                raise
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
        """The version ``alias`` points at; None when the model or the alias does not exist. A
        registry that fails (unreachable, erroring) raises its MlflowException."""
        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException as exc:
            if is_missing(exc):
                return None
            if exc.error_code != "INVALID_PARAMETER_VALUE":
                raise
            # A SQL store reports a missing alias as an invalid parameter: ask the model itself.
            try:
                aliases = self.client.get_registered_model(self.name).aliases
            except MlflowException as again:
                if is_missing(again):
                    return None
                raise
            if alias in aliases:
                raise
            return None

    def version(self, version: str | int):
        """Version ``version``, or LookupError when the model has no such version (a registry that
        fails raises its MlflowException)."""
        try:
            return self.client.get_model_version(self.name, str(version))
        except MlflowException as exc:
            if is_missing(exc):
                raise LookupError(f"registered model {self.name!r} has no version {version}") from None
            raise

    def resolve(self, alias: str | None, version: str | int | None):
        """The version to use: ``version`` if given, else the one ``alias`` (default champion)
        points at; LookupError when there is none."""
        if version is not None:
            return self.version(version)
        alias = alias or CHAMPION
        found = self.alias(alias)
        if found is None:
            raise LookupError(f"registered model {self.name!r} has no version with alias {alias!r}; "
                              f"promote one first (python -m jobs.promote) or name a version")
        return found

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, str(version))

    def set_alias_if(self, alias: str, version: str, expected: str | None) -> tuple[bool, Any]:
        """Point ``alias`` at ``version`` only if it still points at ``expected`` (None: nowhere),
        re-read right before the move: ``(True, None)`` when moved, else ``(False, the version it
        points at now or None)`` with the alias left alone.

        MLflow has no compare-and-set: the re-read narrows the race with a concurrent promotion
        to the two calls here, it does not close it."""
        now = self.alias(alias)
        if (str(now.version) if now is not None else None) != (str(expected) if expected is not None else None):
            return False, now
        self.set_alias(alias, version)
        return True, None

    def tag(self, version: str, tags: dict[str, Any]) -> None:
        for key, value in _strings(tags).items():
            self.client.set_model_version_tag(self.name, str(version), key, value)

    def model_file(self, version: str, dst: str | Path) -> Path:
        """Download the version's artifacts into ``dst`` (a folder the caller removes, e.g. a
        TemporaryDirectory) and return its ``model.pt``."""
        import mlflow.artifacts

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file otherwise
        dst = Path(dst)
        uri = self.client.get_model_version_download_uri(self.name, str(version))
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=self.tracking_uri)
        found = sorted(glob.glob(f"{local}/**/model.pt", recursive=True))
        if not found:
            raise FileNotFoundError(f"{self.name} v{version} has no model.pt among its artifacts")
        return Path(found[0])


def _strings(tags: dict[str, Any]) -> dict[str, str]:
    # repr: the shortest text that reads back as the same float (a score read back from its tag must
    # compare with a freshly measured one exactly, or rounding would decide a tie)
    return {k: (repr(v) if isinstance(v, float) else str(v)) for k, v in tags.items()}


def register_model_file(tracking_uri: str | None, name: str, model_file: str | Path, *, experiment: str = "imgcls",
                        run_name: str | None = None, tags: dict[str, Any] | None = None):
    """Log a model file (``model.pt`` from jobs.train_local, say) as a new run's model and register it.

    Returns the new model version; it gets no alias (``jobs.promote`` or
    :meth:`Registry.set_alias` decide that).
    """
    import mlflow

    from imgcls_core.packaging import log_model

    registry = Registry(tracking_uri, name, create=True)
    client = registry.client
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    try:
        mlflow.set_tracking_uri(client.tracking_uri)  # log_model's fluent calls go there too
        log_model(run_id, model_file)
    except BaseException:
        _end_run_quietly(client, run_id, "FAILED")
        raise
    client.set_terminated(run_id)
    version, _ = registry.register(run_id, tags or {})
    return version


def _end_run_quietly(client, run_id: str, status: str) -> None:
    try:
        client.set_terminated(run_id, status=status)
    except MlflowException:
        pass  # the error being raised says why
