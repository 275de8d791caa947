"""What a Serve replica follows in the registry, in-process on a real sqlite registry (no Ray:
ClassifierReplica is the plain class under the deployment; Serve calls reconfigure as here)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from imgcls_core.config import ModelConfig, ServeConfig
from imgcls_core.data.preprocessing import Preprocessing
from imgcls_core.engine.checkpoint import save_inference_model
from imgcls_core.models import build_model
from imgcls_core.registry import CHAMPION, Registry, register_model_file

NAME = "animals"


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """Two registered versions of an untrained cnn3, champion = v2."""
    monkeypatch.chdir(tmp_path)  # the sqlite store's artifacts
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pre = Preprocessing(16, [0.5] * 3, [0.25] * 3, 1.0, ["cat", "dog", "eel"])
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(ModelConfig(name="cnn3", width=0.25), 3, 16)
        file = save_inference_model(tmp_path / f"m{seed}" / "model.pt", model.state_dict(),
                                    {"name": "cnn3", "width": 0.25}, pre)
        register_model_file(uri, NAME, file, experiment="unit")
    reg = Registry(uri, NAME)
    reg.set_alias(CHAMPION, "2")
    return reg


@pytest.fixture
def replica(registry, monkeypatch):
    """A replica whose loads are recorded, with its background follower stopped after start."""
    import serve.app as app

    loads = []

    def recording(*args, **kwargs):
        loads.append(kwargs.get("version") or f"@{kwargs.get('alias')}")
        return load(*args, **kwargs)

    load = app.load_served_model
    monkeypatch.setattr(app, "load_served_model", recording)
    made = []

    def start(user_config):
        r = app.ClassifierReplica({"serve": dataclasses.asdict(ServeConfig(poll_interval_s=0)),
                                   "tracking_uri": registry.tracking_uri, "model_name": NAME})
        assert r.model is None  # nothing loads before Serve's first reconfigure
        r.reconfigure(user_config)
        r._stop.set(), r._wake.set()  # the test drives check_for_new_version itself
        made.append(r)
        return r

    yield start, loads


def test_a_replica_started_after_a_pin_loads_the_pinned_version_only(replica):
    """Rolling back by pinning user_config.version: a new replica never loads the champion first."""
    start, loads = replica
    r = start({"alias": "champion", "version": "1", "poll_interval_s": 0})
    assert (r.model.version, r.model.alias) == ("1", None)
    assert loads == ["1"]


def test_tags_of_the_served_version_are_picked_up(replica, registry):
    """New test metrics refresh in place; a new export loads the version again (the backend may change)."""
    start, loads = replica
    r = start({"alias": "champion", "version": None, "poll_interval_s": 0})
    assert (r.model.version, r.model.alias, loads) == ("2", "champion", ["@champion"])
    registry.tag("2", {"test/acc1": "0.75"})
    assert r.check_for_new_version() is False and loads == ["@champion"]
    assert r.model.info()["test_metrics"]["acc1"] == 0.75
    registry.tag("2", {"export.onnx.uri": "runs:/0123456789abcdef/exports/none"})  # an export that is not there
    with pytest.raises(Exception):
        r.check_for_new_version()
    assert loads == ["@champion", "2"]  # loaded again for the export
    assert r.model.version == "2" and r.follow["failed_load"]["version"] == "2"  # kept serving what it had


def test_the_served_alias_follows_reconfigure_without_a_reload(replica):
    start, loads = replica
    r = start({"alias": "champion", "version": None, "poll_interval_s": 0})
    r.reconfigure({"alias": "champion", "version": "2", "poll_interval_s": 0})  # pin the version served
    assert r.check_for_new_version() is False
    assert (r.model.version, r.model.alias, loads) == ("2", None, ["@champion"])
    r.reconfigure({"alias": "champion", "version": None, "poll_interval_s": 0})
    assert r.check_for_new_version() is False and r.model.alias == "champion"
