"""jobs.distill on the shared local Ray instance: a teacher from a real MLflow registry, real digit images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgcls_core.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TEACHER = "digits-teacher"
# A cnn3 at width 0.25 (6.4k params, a 15th of its teacher) after 3 epochs of 2 x 16-image batches
# (~240 steps): chance is 0.10, and a student that learned from labels and teacher is far above this.
STUDENT_TEST_FLOOR = 0.85


def train_and_register_teacher(digits_root, tmp: Path, uri: str):
    """A cnn3 trained in-process, logged to MLflow, registered and aliased ``champion``."""
    from imgcls_core.registry import CHAMPION, Registry, register_model_file
    from imgcls_core.runner import train_and_evaluate

    cfg = load_config(None, ["data.format=imagefolder", f"data.root={digits_root}", "data.batch_size=64",
                             "model.name=cnn3", "model.width=1.0", "optim.lr=0.1", "augment.strength=0",
                             "train.epochs=4", f"train.output_dir={tmp / 'teacher'}"])
    result = train_and_evaluate(cfg, log=lambda _line: None)
    version = register_model_file(uri, TEACHER, result.files["model"], experiment="teachers", run_name="teacher")
    Registry(uri, TEACHER).set_alias(CHAMPION, version.version)
    return result, str(version.version)


def test_distill_job_trains_a_student_from_the_registered_champion(ray_session, digits_root, tmp_path, mlflow_uri,
                                                                   capsys):
    from mlflow.tracking import MlflowClient

    from imgcls_core.predict import Predictor
    from jobs.distill import main

    teacher, version = train_and_register_teacher(digits_root, tmp_path, mlflow_uri)
    assert teacher.test.acc1 >= 0.95, teacher.test.acc1  # a teacher worth distilling from
    capsys.readouterr()

    code = main(["--teacher", f"models:/{TEACHER}@champion",
                 *(f"--set={item}" for item in [
                     "data.format=imagefolder", f"data.root={digits_root}", "data.batch_size=16",
                     "model.name=cnn3", "model.width=0.25", "augment.strength=0", "optim.lr=0.1",
                     "train.epochs=3", f"train.output_dir={tmp_path / 'student'}",
                     f"ray.storage_path={tmp_path / 'results'}", "ray.name=distill-test", "ray.num_workers=2",
                     "ray.ingest=dataloader", "tracking.enabled=true", f"tracking.tracking_uri={mlflow_uri}",
                     "tracking.experiment=tests", "distill.temperature=2.0", "distill.alpha=0.5"])])
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads(out[out.rindex("\n{\n"):])

    # The alias was pinned to the version it named, on the driver, and that teacher was evaluated
    # on the student's test split with its own preprocessing: the local runner's figure for it.
    assert summary["teacher"] == f"models:/{TEACHER}/{version}"
    assert summary["teacher_test_acc1"] == pytest.approx(teacher.test.acc1, abs=1e-9)
    assert f"vs teacher {teacher.test.acc1:.4f} (models:/{TEACHER}/{version}) on the same 359-image test split" in out

    assert summary["epochs"] == 3 and summary["test_acc1"] >= STUDENT_TEST_FLOOR, summary
    student = Predictor.from_file(summary["model_file"])
    assert sum(p.numel() for p in student.model.parameters()) < sum(
        p.numel() for p in Predictor.from_file(teacher.files["model"]).model.parameters()) / 2

    client = MlflowClient(mlflow_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["distill.teacher"] == f"models:/{TEACHER}@champion"
    assert (params["distill.temperature"], params["distill.alpha"]) == ("2.0", "0.5")
    assert (params["derived.teacher_uri"], params["derived.teacher_version"]) == (summary["teacher"], version)
    assert run.data.tags["imgcls.job"] == "distill"
    # The teacher was really used, by the workers, every epoch: the KD term was logged and fell.
    kd = sorted(client.get_metric_history(run.info.run_id, "train/kd_loss"), key=lambda m: m.step)
    assert [m.step for m in kd] == [1, 2, 3] and all(m.value > 0 for m in kd)
    assert kd[-1].value < kd[0].value, [m.value for m in kd]
    assert run.data.metrics["teacher/test_acc1"] == pytest.approx(teacher.test.acc1)
