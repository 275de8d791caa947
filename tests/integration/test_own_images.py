"""A user's own image folder to a served endpoint, the README's way, on real images and real servers.

A flat <class>/<image> folder of real handwritten digits (PNG files, no val/ or test/)
goes through the `imgcls` steps: prepare (holds out val/test) -> train-local
(tracked to a real MLflow server, cluster/mlflow/server.sh) -> register -> promote
--summary -> deploy (Ray Serve on the shared local Ray) -> predict over HTTP and with
`imgcls predict` (CSV). Every answer is checked against the model file, image for image.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from jobs import cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "own-digits"
CLASSES = {0: "zero", 1: "one", 7: "seven"}
PER_CLASS = 40
IMGCLS = Path(sys.executable).parent / "imgcls"


def write_image_folder(root: Path) -> Path:
    """PER_CLASS real 8x8 digits per class, upscaled to 32x32 RGB PNGs, in a flat <class>/<image> tree."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label, name in CLASSES.items():
        (root / name).mkdir(parents=True)
        for i in np.flatnonzero(digits.target == label)[:PER_CLASS]:
            pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels).resize((32, 32), Image.BILINEAR).convert("RGB").save(root / name / f"{i:04d}.png")
    return root


@pytest.fixture
def mlflow_server(tmp_path):
    from tests.mlflow_server import free_port, server_env, start_server, stop_server, wait_for_health

    port = free_port()
    env = server_env(tmp_path, MLFLOW_PORT=str(port), MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "artifacts"))
    log = tmp_path / "mlflow.log"
    proc = start_server(env, log)
    try:
        wait_for_health(proc, port, log, timeout=90)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(proc)


STAGE_SECONDS: dict[str, float] = {}


def run_step(capsys, *argv: str) -> str:
    """`imgcls <argv>` in this process (the Ray instance is shared); its stdout, after it exited 0."""
    started = time.perf_counter()
    code = cli.main(list(argv))
    STAGE_SECONDS[argv[0]] = time.perf_counter() - started
    captured = capsys.readouterr()
    assert code == 0, f"imgcls {' '.join(argv)} exited {code}:\n{captured.out[-3000:]}\n{captured.err[-3000:]}"
    return captured.out


def test_own_image_folder_to_served_endpoint(ray_session, mlflow_server, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient
    from ray import serve

    from imgcls_core.data import read_shard_table
    from imgcls_core.predict import Predictor
    from tests.mlflow_server import free_port

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # as cluster/local/env.sh exports it
    src = write_image_folder(tmp_path / "photos")

    # prepare: the folder has no val/ or test/, so 10% each are held out, by a seeded hash of each path
    out = run_step(capsys, "prepare", "--source", "photos", "--out", "data/photos", "--workers", "1")
    counts = {split: read_shard_table("data/photos", split).column("label").to_pylist()
              for split in ("train", "val", "test")}
    assert (f"the source has no val/ or test/: held out val 10% ({len(counts['val'])} files), test 10% "
            f"({len(counts['test'])} files) of its train files, by a hash of each file's path (seed 0)") in out, out
    assert sum(map(len, counts.values())) == 120 and all(np.bincount(counts[s], minlength=3).min() >= 1
                                                         for s in ("val", "test")), counts
    test_files = sorted(src / p for p in read_shard_table("data/photos", "test").column("path").to_pylist())

    # train-local, tracked: one MLflow run with params, per-epoch metrics, artifacts and the model
    run_step(capsys, "train-local", "--set", "data.format=parquet", "--set", "data.root=data/photos",
             "--set", "data.batch_size=8", "--set", "data.num_workers=0", "--set", "model.name=cnn3",
             "--set", "optim.lr=0.05", "--set", "augment.strength=0", "--set", "train.epochs=4",
             "--set", "train.output_dir=runs/photos", "--set", "tracking.enabled=true",
             "--set", "tracking.experiment=own-images")
    summary = json.loads(Path("runs/photos/train_summary.json").read_text())
    run_id = summary["mlflow_run_id"]
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == "cnn3"
    assert [m.step for m in client.get_metric_history(run_id, "val/acc1")] == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "class_index.json", "confusion_matrix.png"} <= artifacts, artifacts

    # register the local model.pt (the run's own logged model), then promote the run by its summary
    out = run_step(capsys, "register", "--model", "runs/photos/model.pt", "--name", MODEL)
    assert f"registered {MODEL} v1: the model of training run {run_id}" in out, out
    out = run_step(capsys, "promote", "--summary", "runs/photos/train_summary.json", "--model", MODEL)
    assert "PROMOTED: no champion yet; champion is v1" in out, out
    decision = json.loads(Path("runs/photos/promotion.json").read_text())
    assert decision["run_id"] == run_id and decision["extra"]["test_images"] == len(counts["test"])
    assert decision["challenger_acc1"] >= 0.6, decision  # 4 epochs on 96 images; chance is 1/3

    # serve the champion and classify over HTTP: the same answers as the model file, image for image
    port = free_port()
    offline = [a[0]["label"] for a in Predictor.from_file("runs/photos/model.pt").classify(test_files, top_k=1)]
    try:
        out = run_step(capsys, "deploy", "--model", MODEL, "--name", "own-images", "--route-prefix", "/own",
                       "--port", str(port), "--set", "serve.num_cpus=0.25", "--set", "serve.max_replicas=1",
                       "--wait-s", "180", "--predict", *map(str, test_files[:2]))
        assert f"serving {MODEL} v1 at http://127.0.0.1:{port}/own/v1/predict" in out, out
        response = requests.post(f"http://127.0.0.1:{port}/own/v1/predict", params={"top_k": 2}, timeout=60,
                                 files=[("file", (f.name, f.read_bytes(), "image/png")) for f in test_files])
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == {"name": MODEL, "version": "1", "alias": "champion"}
        served = [p["top_k"][0]["label"] for p in body["predictions"]]
    finally:
        serve.delete("own-images")
        serve.shutdown()
    assert served == offline
    truth = [f.parent.name for f in test_files]
    assert np.mean([s == t for s, t in zip(served, truth)]) == pytest.approx(decision["challenger_acc1"])

    # imgcls predict, the console script, from the registry's champion: CSV, a bad file gets an error row
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    started = time.perf_counter()
    result = subprocess.run([str(IMGCLS), "predict", "--model", f"models:/{MODEL}@champion", *map(str, test_files),
                             str(bad), "--out", "predictions.csv"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server})
    STAGE_SECONDS["predict"] = time.perf_counter() - started
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in STAGE_SECONDS.items()))
    assert result.returncode == 0, result.stderr[-3000:]
    n = len(test_files)
    assert f"classified {n} of {n + 1} images with {MODEL} v1 (@champion)" in result.stderr
    rows = list(csv.DictReader(Path("predictions.csv").open()))
    assert [r["label"] for r in rows[:-1]] == offline
    assert rows[-1]["path"] == str(bad) and rows[-1]["label"] == "" and rows[-1]["error"]
