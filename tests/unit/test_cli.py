"""The `imgcls` console entry point and every job's --help; `imgcls predict`'s CSV."""

from __future__ import annotations

import csv
import io
import json
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import cli

REPO = Path(__file__).resolve().parents[2]
JOB_MODULES = sorted(p.stem for p in (REPO / "jobs").glob("*.py") if "def main(" in p.read_text() and p.stem != "cli")
IMGCLS = Path(sys.executable).parent / "imgcls"


def test_every_job_is_a_step():
    assert sorted(cli.STEPS.values()) == JOB_MODULES
    assert cli.STEPS["train-local"] == "train_local"


def test_imgcls_console_script_is_installed_and_lists_the_steps():
    assert IMGCLS.is_file(), f"{IMGCLS} is missing: re-install the package (make setup, or pip install -e .)"
    result = subprocess.run([str(IMGCLS), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for step, module in cli.STEPS.items():
        line = next(line for line in result.stdout.splitlines() if line.split()[:1] == [step])
        assert cli.summary(module) in line and cli.summary(module)  # each job's docstring, first line
    # the script dispatches to the job (submit --help used to exit 2)
    result = subprocess.run([str(IMGCLS), "submit", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "-- COMMAND" in result.stdout, result.stderr


@pytest.mark.parametrize("step", list(cli.STEPS))
def test_imgcls_step_help_exits_0(step, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([step, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


@pytest.mark.parametrize("module", JOB_MODULES)
def test_python_m_job_help_exits_0(module, monkeypatch, capsys):
    """`python -m jobs.<module> --help`, run in this process (runpy) to save a torch import per job."""
    monkeypatch.setattr(sys, "argv", [f"jobs/{module}.py", "--help"])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exc:
        warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules": imported by an earlier test
        runpy.run_module(f"jobs.{module}", run_name="__main__", alter_sys=True)
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_python_m_jobs_submit_help_exits_0_in_a_fresh_process():
    result = subprocess.run([sys.executable, "-m", "jobs.submit", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


@pytest.mark.parametrize("module", ["jobs.train_local", "jobs.train", "jobs.distill"])
def test_stop_after_must_be_a_positive_number_of_epochs(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--stop-after", "0"])
    assert done.value.code == 2 and "--stop-after: expected an integer >= 1, got 0" in capsys.readouterr().err


def test_promote_and_register_name_what_is_wrong_with_their_inputs(tmp_path, capsys):
    from jobs.promote import main as promote
    from jobs.register import main as register

    assert promote(["--summary", str(tmp_path / "none.json")]) == 2
    assert "no training summary at" in capsys.readouterr().err
    (tmp_path / "train_summary.json").write_text("{bad")
    assert promote(["--summary", str(tmp_path / "train_summary.json"), "--set", "data.format=digits"]) == 1
    assert "train_summary.json is not valid JSON" in capsys.readouterr().err
    (tmp_path / "sweep_summary.json").write_text('{"sweep": "s"}')
    assert promote(["--set", f"train.output_dir={tmp_path}", "--set", "data.format=digits"]) == 1
    assert "sweep_summary.json is not a sweep summary (jobs.tune writes it): it has no 'best_output_dir'" in (
        capsys.readouterr().err)
    model = tmp_path / "model.pt"
    model.write_bytes(b"x")
    assert register(["--model", str(model), "--name", "team/digits"]) == 2  # before any run is logged
    assert "--name: 'team/digits': MLflow's registered model names cannot contain '/' or ':'" in (
        capsys.readouterr().err)


def test_bad_step_and_no_step_exit_2(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown step 'trian'; did you mean 'train'?" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert "usage: imgcls <step>" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert "train-local" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.startswith("imgcls ")


# ----------------------------------------------------------------------------- imgcls predict


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """An untrained cnn3 saved as the runner saves model.pt (predictions only need to be deterministic)."""
    import torch

    from imgcls_core.config import ModelConfig
    from imgcls_core.engine.checkpoint import Preprocessing, save_inference_model
    from imgcls_core.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn3", width=0.5), 3, 16).eval()
    pre = Preprocessing(16, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], 1.0, ["cat", "dog", "eel"])
    return save_inference_model(tmp_path_factory.mktemp("model") / "model.pt", model.state_dict(),
                                {"name": "cnn3", "width": 0.5}, pre)


def write_images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        path = folder / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(path)
        files.append(path)
    return files


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_predict_writes_a_row_per_image_and_an_error_row_per_bad_file(model_file, tmp_path, capsys):
    from imgcls_core.predict import Predictor
    from jobs.predict import main as predict

    folder = tmp_path / "photos"
    good = write_images(folder / "sub", 5)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image, not looked at")
    (folder / ".hidden.png").write_bytes(b"")
    out = tmp_path / "out" / "predictions.csv"
    assert predict(["--model", str(model_file), str(folder), str(tmp_path / "missing.jpg"), "--out", str(out),
                    "--top-k", "2", "--batch-size", "2"]) == 0
    assert "classified 5 of 7 images" in capsys.readouterr().err

    rows = read_csv(out.read_text())
    assert [r["path"] for r in rows] == [str(folder / "broken.png"), *map(str, good), str(tmp_path / "missing.jpg")]
    offline = Predictor.from_file(model_file).classify(good, top_k=2)
    for row, expected in zip(rows[1:6], offline):
        assert row["error"] == "" and row["label"] == expected[0]["label"]
        assert float(row["probability"]) == pytest.approx(expected[0]["probability"], abs=1e-6)
        assert [label for label, _ in json.loads(row["top_k"])] == [c["label"] for c in expected]
    assert rows[0]["label"] == "" and "broken.png" in rows[0]["error"]
    assert rows[-1]["error"] == "unreadable: No such file or directory"


def test_predict_joins_a_multi_label_models_labels_with_bars(tmp_path, capsys):
    """Class names may hold spaces ("golden retriever"): the labels column joins them with "|", as
    predictions.csv does, and lists every class at or over the threshold, best first."""
    import torch

    from imgcls_core.config import ModelConfig
    from imgcls_core.engine.checkpoint import Preprocessing, save_inference_model
    from imgcls_core.models import build_model
    from imgcls_core.predict import Predictor
    from jobs.predict import main as predict

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn3", width=0.5), 3, 16).eval()
    pre = Preprocessing(16, [0.5] * 3, [0.25] * 3, 1.0, ["golden retriever", "cat", "eel"], multi_label=True,
                        threshold=0.0)  # every class present
    file = save_inference_model(tmp_path / "ml.pt", model.state_dict(), {"name": "cnn3", "width": 0.5}, pre)
    images = write_images(tmp_path / "photos", 2)
    assert predict(["--model", str(file), *map(str, images)]) == 0
    rows = read_csv(capsys.readouterr().out)
    expected = Predictor.from_file(file).classify(images, top_k=3)
    assert [row["labels"] for row in rows] == ["|".join(c["label"] for c in ranked) for ranked in expected]
    assert all(len(row["labels"].split("|")) == 3 for row in rows)


def test_predict_to_stdout_and_failures(model_file, tmp_path, capsys):
    from jobs.predict import main as predict

    files = write_images(tmp_path / "p", 2)
    assert predict(["--model", str(model_file), *map(str, files)]) == 0
    rows = read_csv(capsys.readouterr().out)
    assert len(rows) == 2 and all(r["label"] in ("cat", "dog", "eel") for r in rows)

    (tmp_path / "bad.jpg").write_bytes(b"")
    assert predict(["--model", str(model_file), str(tmp_path / "bad.jpg")]) == 1  # nothing classified
    err = capsys.readouterr().err
    assert "classified 0 of 1 images" in err and "error: none of the 1 images could be read" in err
    with pytest.raises(SystemExit) as bad:  # argparse: exit 2 before any image is read
        predict(["--model", str(model_file), "--out", str(tmp_path), str(files[0])])
    assert bad.value.code == 2 and "is a folder; name the CSV file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict(["--model", str(model_file), "--device", "tpu", str(files[0])])
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
    assert predict(["--model", str(tmp_path / "nope.pt"), str(files[0])]) == 1
    assert "cannot load the model" in capsys.readouterr().err
    assert predict(["--model", "models:/x@", str(files[0])]) == 1
    assert "not a registry URI" in capsys.readouterr().err


def test_predict_from_a_registry_uri_matches_the_model_file(model_file, tmp_path, capsys):
    from imgcls_core.registry import CHAMPION, Registry, register_model_file
    from jobs.predict import main as predict

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = register_model_file(uri, "animals", model_file, experiment="unit")
    Registry(uri, "animals").set_alias(CHAMPION, version.version)
    files = write_images(tmp_path / "p", 3)
    assert predict(["--model", str(model_file), *map(str, files)]) == 0
    from_file = read_csv(capsys.readouterr().out)
    for model in ("models:/animals@champion", f"models:/animals/{version.version}"):
        assert predict(["--model", model, "--tracking-uri", uri, *map(str, files)]) == 0
        captured = capsys.readouterr()
        assert read_csv(captured.out) == from_file
        assert f"with animals v{version.version}" in captured.err
