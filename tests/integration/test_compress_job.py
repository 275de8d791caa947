"""jobs.compress against a real MLflow registry (sqlite): the champion is quantized, its run gets
the int8 file and figures, and the version gets the compress.int8.* tags."""

from __future__ import annotations

import json

import pytest

from imgcls_core.config import load_config

pytestmark = pytest.mark.slow

MODEL = "digits-compress"


@pytest.fixture(scope="module")
def registered(digits_root, tmp_path_factory):
    from imgcls_core.registry import CHAMPION, Registry, register_model_file
    from imgcls_core.runner import train_and_evaluate

    tmp = tmp_path_factory.mktemp("compress-job")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config(None, ["data.format=digits", f"data.root={digits_root}", "data.batch_size=64",
                             "model.name=cnn3", "model.width=0.25", "augment.strength=0", "train.epochs=2",
                             f"train.output_dir={tmp / 'run'}"])
    result = train_and_evaluate(cfg, log=lambda _line: None)
    version = register_model_file(uri, MODEL, result.files["model"], experiment="compress")
    Registry(uri, MODEL).set_alias(CHAMPION, str(version.version))
    return {"uri": uri, "tmp": tmp, "version": str(version.version), "run_id": version.run_id}


def compress_champion(registered, digits_root, capsys, method: str, out, *extra: str) -> str:
    """Run jobs.compress on the registered champion with 1 thread and 2 timed repeats; what it printed."""
    from jobs.compress import main

    code = main(["--set", "data.format=digits", "--set", f"data.root={digits_root}",
                 "--set", f"tracking.tracking_uri={registered['uri']}", "--model", MODEL, "--method", method,
                 *extra, "--repeats", "2", "--threads", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    return printed


def test_compress_job_quantizes_the_champion_and_records_it_in_the_registry(registered, digits_root, capsys):
    from imgcls_core.registry import Registry

    out = registered["tmp"] / "out"
    printed = compress_champion(registered, digits_root, capsys, "static", out, "--calibration-images", "64")
    assert "int8 static" in printed and "speed-up" in printed

    report = json.loads((out / "static_report.json").read_text())
    assert report["model"] == MODEL and report["version"] == registered["version"]
    assert (out / "model.int8.onnx").is_file()

    registry = Registry(registered["uri"], MODEL)
    tags = registry.client.get_model_version(MODEL, registered["version"]).tags
    assert float(tags["compress.int8.acc1_delta"]) == pytest.approx(report["acc1_delta_points"], abs=1e-4)
    assert float(tags["compress.int8.size_mb"]) < float(tags["compress.int8.fp32_mb"])
    run = registry.client.get_run(registered["run_id"])
    assert run.data.metrics["compress/int8/acc1"] == pytest.approx(report["int8_acc1"])
    folder = report["artifact_path"]  # compress/static/<UTC time>: this run's own
    assert folder.startswith("compress/static/")
    logged = {a.path for a in registry.client.list_artifacts(registered["run_id"], folder)}
    assert {f"{folder}/model.int8.onnx", f"{folder}/static_report.json"} <= logged


def test_bf16_job_gates_the_champion_and_it_serves_in_bf16_with_the_same_answers(registered, digits_root,
                                                                                  capsys):
    """--method bf16 measures bf16 against fp32 on the test split, tags the version servable, and
    the served model in bf16 (on hardware with native bf16) answers the test digits like fp32."""
    import torch

    from imgcls_core.compress import bf16_unavailable
    from imgcls_core.data import load_dataset
    from imgcls_core.registry import Registry
    from imgcls_core.serving import BF16_GATE_TAG, load_served_model

    out = registered["tmp"] / "bf16"
    printed = compress_champion(registered, digits_root, capsys, "bf16", out, "--batch-size", "32")
    assert "bf16 autocast" in printed and "bf16 is servable" in printed
    report = json.loads((out / "bf16_report.json").read_text())
    assert abs(report["acc1_delta_points"]) <= 1.0
    tags = Registry(registered["uri"], MODEL).client.get_model_version(MODEL, registered["version"]).tags
    assert float(tags[BF16_GATE_TAG]) == pytest.approx(report["acc1_delta_points"], abs=1e-4)
    assert float(tags["compress.bf16.acc1"]) == pytest.approx(report["bf16_acc1"])

    if bf16_unavailable(torch.device("cpu")) is not None:
        with pytest.raises(RuntimeError, match="no native bf16"):
            load_served_model(registered["uri"], MODEL, precision="bf16")
        return
    bf16 = load_served_model(registered["uri"], MODEL, precision="bf16")
    fp32 = load_served_model(registered["uri"], MODEL, backend="torch")
    assert bf16.info()["precision"] == "bf16"
    cfg = load_config(None, ["data.format=digits", f"data.root={digits_root}"])
    test = load_dataset(cfg.data).test
    assert bf16.predictor.evaluate(test).acc1 == pytest.approx(report["bf16_acc1"])
    assert fp32.predictor.evaluate(test).acc1 == pytest.approx(report["fp32_acc1"])


def test_compress_job_fails_cleanly_for_an_unknown_version(registered, digits_root, capsys):
    from jobs.compress import main

    code = main(["--set", f"tracking.tracking_uri={registered['uri']}", "--set", f"data.root={digits_root}",
                 "--model", MODEL, "--version", "99", "--method", "dynamic"])
    assert code == 1
    assert "no version 99" in capsys.readouterr().err
