"""Multi-label end to end on the shared local Ray instance: real composed digit images (2-4 real
handwritten digits per image, labels = the set of digits present) as multi-label Parquet shards,
jobs.train with two Ray Train workers and MLflow (sqlite), jobs.promote on test mAP, and the Serve
app answering real PNGs over HTTP with every label over the threshold; the registered pyfunc gives
the same labels."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import requests

from imgcls_core.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "multi-digits"


@pytest.fixture(scope="module")
def multi_shards(tmp_path_factory):
    """The composed digits (folder + labels.csv) and the same images as multi-label Parquet shards."""
    from imgcls_core.config import DataConfig
    from imgcls_core.data import load_dataset
    from imgcls_core.data.shards import write_shards

    tmp = tmp_path_factory.mktemp("multi")
    folder = tmp / "multi_digits"
    splits = load_dataset(DataConfig(format="multi_digits", root=str(folder)))
    shards = tmp / "shards"
    for name, records in splits.splits().items():
        rows = ((records.images[i] if records.images else open(records.paths[i], "rb").read(), records.labels[i],
                 records.paths[i]) for i in range(len(records)))
        write_shards(rows, shards, name, splits.classes, shard_size=700)
    return {"folder": folder, "shards": shards, "splits": splits}


@pytest.fixture(scope="module")
def trained(ray_session, multi_shards, tmp_path_factory):
    """jobs.train (2 workers) on the Parquet shards, then jobs.promote: (cfg, summary, decision)."""
    from jobs.promote import promote
    from jobs.train import run_training

    tmp = tmp_path_factory.mktemp("multi-run")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config("configs/multi_digits.yaml", [
        "data.format=parquet", "data.multi_label=true", f"data.root={multi_shards['shards']}",
        "data.batch_size=32", "train.epochs=10", "train.log_every=10", f"train.output_dir={tmp / 'out'}",
        f"ray.storage_path={tmp / 'results'}", "ray.name=multi-test", "ray.num_workers=2",
        "tracking.enabled=true", f"tracking.tracking_uri={uri}", "tracking.experiment=multi"])
    summary = run_training(cfg, log=lambda _line: None)
    decision = promote(cfg, model_name=MODEL, summary=tmp / "out" / "train_summary.json", log=lambda _line: None)
    return {"cfg": cfg, "uri": uri, "summary": summary, "decision": decision, "out": tmp / "out"}


def test_multi_label_shards_train_on_ray_and_are_promoted_on_test_map(trained):
    from mlflow.tracking import MlflowClient

    summary, decision = trained["summary"], trained["decision"]
    print(f"\nmulti-label: val mAP {summary['val_mAP']:.4f}, test mAP {summary['test_mAP']:.4f}")
    assert summary["metric"] == "mAP" and "val_acc1" not in summary
    assert summary["val_mAP"] >= 0.9 and summary["test_mAP"] >= 0.9, summary
    client = MlflowClient(trained["uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["derived.ingest"] == "dataloader"  # auto: Ray Data's ingest is single-label
    assert run.data.params["derived.world_size"] == "2"
    metrics = run.data.metrics
    assert {"val/mAP", "final_val/mAP", "final_val/threshold", "test/mAP", "test/micro_f1", "test/macro_f1"} <= set(metrics)
    assert len(client.get_metric_history(summary["mlflow_run_id"], "val/mAP")) == 10
    assert decision.promoted and decision.metric == "mAP"
    assert decision.challenger_acc1 == pytest.approx(summary["test_mAP"], abs=1e-6)  # the same model, the same split
    version = client.get_model_version(MODEL, decision.version)
    assert float(version.tags["test/mAP"]) == pytest.approx(summary["test_mAP"], abs=1e-6)
    threshold = float(version.tags["test/threshold"])
    assert threshold == pytest.approx(metrics["final_val/threshold"])  # chosen on val, used on test
    files = {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
    assert {"test_metrics.json", "predictions.csv", "gradcam_misclassified.png"} <= files
    assert "confusion_matrix.png" not in files


@pytest.fixture(scope="module")
def served(trained):
    from ray import serve

    from serve.app import build_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"tracking_uri": trained["uri"], "model_name": MODEL, "num_cpus": 0.25,
                         "max_replicas": 1, "poll_interval_s": 0}), name="multi", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_the_endpoint_answers_every_digit_present_and_the_pyfunc_agrees(served, trained, multi_shards):
    import mlflow.pyfunc

    records = multi_shards["splits"].test
    classes = records.classes
    picked = list(range(0, len(records), 10))  # 30 real composed test images
    info = requests.get(f"{served}/v1/model", timeout=10).json()
    assert info["multi_label"] is True and info["name"] == MODEL and info["alias"] == "champion"
    from mlflow.tracking import MlflowClient

    run = MlflowClient(trained["uri"]).get_run(trained["summary"]["mlflow_run_id"])
    assert info["threshold"] == pytest.approx(run.data.metrics["final_val/threshold"])
    assert info["test_metrics"]["mAP"] == pytest.approx(trained["summary"]["test_mAP"], abs=1e-6)
    served_sets, exact = [], 0
    for i in picked:
        data = open(records.paths[i], "rb").read()
        r = requests.post(f"{served}/v1/predict", files=[("file", ("x.png", data, "image/png"))],
                          params={"top_k": 2}, timeout=30)
        assert r.status_code == 200, r.text
        (p,) = r.json()["predictions"]
        assert len(p["top_k"]) == 2 and p["threshold"] == info["threshold"]
        assert all(label["probability"] >= p["threshold"] for label in p["labels"])
        got = sorted(int(label["label"]) for label in p["labels"])
        served_sets.append(got)
        exact += got == [int(classes[c]) for c in records.labels[i]]
    print(f"served label sets exactly right for {exact}/{len(picked)} composed test images; e.g. "
          f"{records.paths[picked[0]].rsplit('/', 1)[-1]}: true {[classes[c] for c in records.labels[picked[0]]]}, "
          f"served {served_sets[0]}")
    assert exact >= 0.6 * len(picked), (exact, served_sets)

    mlflow.set_tracking_uri(trained["uri"])
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    frame = pyfunc.predict([open(records.paths[i], "rb").read() for i in picked])
    assert [sorted(int(x["label"]) for x in labels) for labels in frame["labels"]] == served_sets
    assert all(len(p) == len(classes) for p in frame["probabilities"])
    assert np.all((np.array(list(frame["probabilities"])) >= 0) & (np.array(list(frame["probabilities"])) <= 1))
