"""Multi-label end to end on the shared local Ray instance: real composed digit images (2-4 real
handwritten digits per image, labels = the set of digits present) as multi-label Parquet shards,
jobs.train with two Ray Train workers and MLflow (sqlite), jobs.promote on test mAP, and the Serve
app answering real PNGs over HTTP with every label over the threshold; the registered pyfunc gives
the same labels."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from imgcls_core.config import load_config
from jobs.common import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "multi-digits"


@pytest.fixture(scope="module")
def multi_shards(tmp_path_factory):
    """The composed digits (folder + labels.csv) and the same images as multi-label Parquet shards."""
    from imgcls_core.config import DataConfig
    from imgcls_core.data import convert_image_folder, load_dataset

    tmp = tmp_path_factory.mktemp("multi")
    folder = tmp / "multi_digits"
    splits = load_dataset(DataConfig(format="multi_digits", root=str(folder)))
    shards = tmp / "shards"
    report = convert_image_folder(folder, shards, labels_file="labels.csv", num_workers=1, shard_size=700)
    assert {s: w.images for s, w in report.splits.items()} == {"train": 2000, "val": 300, "test": 300}
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

    port = free_port()
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


def test_a_sweep_optimises_val_map_on_the_labelled_image_folder(ray_session, multi_shards, tmp_path):
    """jobs.tune with tune.metric=val/mAP on the folder + labels.csv form of the same data; a
    single-label metric is refused before any trial starts."""
    from mlflow.tracking import MlflowClient

    from imgcls_core.config import ConfigError
    from jobs.tune import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["data.format=imagefolder", "data.multi_label=true", f"data.root={multi_shards['folder']}",
            "data.batch_size=64", "train.epochs=2", "train.log_every=50", f"train.output_dir={tmp_path / 'out'}",
            f"ray.storage_path={tmp_path / 'results'}", "ray.name=multi", "ray.num_workers=1",
            "tracking.enabled=true", f"tracking.tracking_uri={uri}", "tracking.experiment=multi-tune",
            "tune.space=lr_schedules", "tune.num_samples=2", "tune.scheduler=fifo", "tune.seed=0"]
    with pytest.raises(ConfigError, match="val/mAP"):
        run_sweep(load_config("configs/multi_digits.yaml", [*args, "tune.metric=val/acc1"]))
    summary = run_sweep(load_config("configs/multi_digits.yaml", args))
    print(f"\nmulti-label sweep: best val/mAP {summary['best_metric']:.4f} of {summary['trials']} trials")
    assert summary["trials"] == 2 and summary["errors"] == 0, summary
    assert 0.3 < summary["best_metric"] <= 1.0, summary  # 2 epochs; chance-level mAP is about 0.3
    client = MlflowClient(uri)
    children = client.search_runs([client.get_experiment_by_name("multi-tune").experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert len(children) == 2
    assert all(len(client.get_metric_history(c.info.run_id, "val/mAP")) == 2 for c in children)
