import json

import pytest

from imgcls_core.config import load_config
from imgcls_core.registry import Decision, should_promote
from jobs.promote import candidate_run, main


def test_gate_promotes_only_past_the_margin():
    assert should_promote(0.90, None, 0.01) == (True, "no champion yet")
    assert should_promote(0.95, 0.94, 0.01)[0]  # +0.01 >= margin 0.01
    promoted, reason = should_promote(0.945, 0.94, 0.01)
    assert not promoted and "+0.0050, not >= +0.0100" in reason
    assert not should_promote(0.93, 0.94, 0.0)[0]
    assert not should_promote(350 / 360, 350 / 360, 0.0)[0]  # a tie keeps the champion
    assert should_promote(0.935, 0.94, -0.01)[0]  # a negative margin accepts a slightly worse model
    # a champion's score tagged by an older imgcls, rounded to 6 digits: still a tie
    assert not should_promote(350 / 360, float(f"{350 / 360:.6g}"), 0.0)[0]
    assert should_promote(351 / 360, 350 / 360, 0.0)[0]  # one image more is a gain


def test_a_score_read_back_from_its_tag_equals_the_measured_one():
    """The champion's score comes back from its version tag: rounding it would decide ties."""
    from imgcls_core.registry import _strings

    for score in (350 / 360, 352 / 360, 0.1 + 0.2):
        assert float(_strings({"test/acc1": score})["test/acc1"]) == score


def test_a_forced_promotion_replaces_a_champion_that_cannot_be_evaluated():
    from types import SimpleNamespace

    from imgcls_core.registry import gate_champion

    class Stand_in:  # the two registry calls the gate makes
        name = "digits"

        def __init__(self):
            self.champion = SimpleNamespace(version="1")

        def alias(self, _):
            return self.champion

        def set_alias_if(self, _alias, version, expected):
            assert expected == "1"
            self.champion = SimpleNamespace(version=version)
            return True, self.champion

    def broken(_version):
        raise ValueError("the split's classes differ from the model's")

    with pytest.raises(ValueError, match="classes differ"):
        gate_champion(Stand_in(), "2", 0.9, evaluate=broken, margin=0.0, log=lambda m: None)
    registry, said = Stand_in(), []
    promoted, reason, _, score = gate_champion(registry, "2", 0.9, evaluate=broken, margin=0.0,
                                               force_reason="roll back", log=said.append)
    assert promoted and reason == "forced: roll back" and score is None and registry.champion.version == "2"
    assert "could not be evaluated (the split's classes differ" in said[0]
    text = Decision("digits", "2", "abc", 0.9, "1", None, 0.0, True, reason, True, "2").summary()
    assert "champion:   digits v1 (could not be evaluated)" in text and "this version" not in text


def test_decision_summary_names_both_versions_and_the_verdict():
    d = Decision("digits", "2", "abc", 0.91, "1", 0.95, 0.0, False, "does not beat the champion", True, "1")
    text = d.summary()
    assert "digits v2 (run abc) test top-1 0.9100" in text and "digits v1 test top-1 0.9500" in text
    assert "difference: -0.0400" in text and "NOT PROMOTED" in text and "champion is v1" in text


def test_candidate_is_the_sweeps_best_trial(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="run `python -m jobs.tune` with this config first, or pass --run-id"):
        candidate_run(cfg, None)
    trial = tmp_path / "trials" / "t1"
    trial.mkdir(parents=True)
    (trial / "train_summary.json").write_text(json.dumps({"mlflow_run_id": "r123"}))
    (tmp_path / "sweep_summary.json").write_text(json.dumps(
        {"sweep": "s", "parent_run_id": "p9", "best_trial": "t1", "best_output_dir": str(trial)}))
    run_id, tags = candidate_run(cfg, None)
    assert run_id == "r123" and tags == {"imgcls.sweep": "s", "imgcls.sweep_run_id": "p9", "imgcls.trial": "t1"}
    assert candidate_run(cfg, "given") == ("given", {})


def test_force_needs_a_reason(capsys):
    assert main(["--force"]) == 2
    assert "--force needs --reason" in capsys.readouterr().err
    assert main(["--reason", "why"]) == 2


def test_candidate_can_be_the_run_a_train_summary_names(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path}"])
    summary = tmp_path / "run" / "train_summary.json"
    with pytest.raises(FileNotFoundError, match="no training summary"):
        candidate_run(cfg, None, summary)
    summary.parent.mkdir()
    summary.write_text(json.dumps({"mlflow_run_id": None, "model_file": "model.pt"}))
    with pytest.raises(LookupError, match=r"tracking was off.*python -m jobs.register --model .*model.pt"):
        candidate_run(cfg, None, summary)
    summary.write_text(json.dumps({"mlflow_run_id": "r7"}))
    assert candidate_run(cfg, None, summary) == ("r7", {"imgcls.summary": str(summary.resolve())})


def test_promote_summary_reads_the_runs_config_and_excludes_run_id(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(load_config(None, [f"train.output_dir={run}", "model.name=cnn3"]).to_yaml())
    assert main(["--summary", str(run / "train_summary.json"), "--print-config"]) == 0
    assert "name: cnn3" in capsys.readouterr().out  # the config beside the summary
    assert main(["--summary", str(run / "train_summary.json"), "--print-config", "--set", "model.name=resnet18"]) == 0
    assert "name: resnet18" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--summary", "a.json", "--run-id", "r"])
    assert exc.value.code == 2


@pytest.fixture
def untracked_run(digits_root, tmp_path):
    """<run>/model.pt (an untrained cnn3 for the digits), config.yaml and a train_summary.json without
    an MLflow run: what jobs.train_local leaves with tracking off."""
    import torch

    from imgcls_core.engine.checkpoint import Preprocessing, save_inference_model
    from imgcls_core.models import build_model

    run = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, ["data.format=digits", f"data.root={digits_root}", "model.name=cnn3", "model.width=0.25",
                             f"train.output_dir={run}", f"tracking.tracking_uri={uri}", "tracking.experiment=unit"])
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    torch.manual_seed(0)
    model = build_model(cfg.model, 10, 32)
    pre = Preprocessing(32, [0.5] * 3, [0.25] * 3, 1.0, [str(i) for i in range(10)])
    model_file = save_inference_model(run / "model.pt", model.state_dict(), cfg.to_dict()["model"], pre)
    (run / "train_summary.json").write_text(json.dumps({"mlflow_run_id": None, "model_file": str(model_file),
                                                        "model_uri": None, "epochs": 1}))
    return {"run": run, "uri": uri, "model_file": model_file}


def test_register_then_promote_a_local_model_file(untracked_run, capsys):
    from mlflow.tracking import MlflowClient

    from imgcls_core.registry import CHAMPION, Registry
    from jobs.register import main as register

    run, uri = untracked_run["run"], untracked_run["uri"]
    assert register(["--model", str(untracked_run["model_file"]), "--name", "digits-local"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["mlflow_run_id"] and summary["registered_version"] == "1"  # the summary records the new run
    assert "registered digits-local v1" in out and f"jobs.promote --summary {run / 'train_summary.json'}" in out
    version = MlflowClient(uri).get_model_version("digits-local", "1")
    assert version.run_id == summary["mlflow_run_id"]
    assert version.tags["imgcls.model_sha256"] and version.tags["imgcls.model_file"] == str(untracked_run["model_file"])

    assert register(["--model", str(untracked_run["model_file"]), "--name", "digits-local"]) == 0
    assert "found digits-local v1" in capsys.readouterr().out  # one file, one version
    (run / "train_summary.json").unlink()
    assert register(["--model", str(untracked_run["model_file"]), "--name", "digits-local"]) == 0
    assert "registered from the same file" in capsys.readouterr().out  # found by its SHA-256

    (run / "train_summary.json").write_text(json.dumps(summary))
    assert main(["--summary", str(run / "train_summary.json"), "--model", "digits-local"]) == 0
    out = capsys.readouterr().out
    assert "found digits-local v1" in out and "PROMOTED: no champion yet" in out
    assert str(Registry(uri, "digits-local").alias(CHAMPION).version) == "1"
    decision = json.loads((run / "promotion.json").read_text())  # train.output_dir of the run's config
    assert decision["promoted"] and decision["extra"]["imgcls.summary"] == str((run / "train_summary.json").resolve())


def test_register_does_not_trust_a_summarys_run_for_other_bytes(untracked_run, capsys):
    """The summary names a run that logged other weights than model.pt holds now (a run evaluated
    again with tracking off ships other weights): a new version is registered from the file, not
    the run's model tagged with the file's SHA-256, and the summary then names the new run."""
    from imgcls_core.engine.checkpoint import Preprocessing, file_sha256, load_checkpoint, save_inference_model
    from jobs.register import main as register

    run, model_file = untracked_run["run"], untracked_run["model_file"]
    assert register(["--model", str(model_file), "--name", "d"]) == 0
    first = json.loads((run / "train_summary.json").read_text())
    assert first["model_sha256"] == file_sha256(model_file)
    payload = load_checkpoint(model_file)
    state = {k: (v + 1 if v.is_floating_point() else v) for k, v in payload["model"].items()}
    save_inference_model(model_file, state, payload["model_config"], Preprocessing.from_dict(payload["preprocessing"]))
    capsys.readouterr()
    assert register(["--model", str(model_file), "--name", "d"]) == 0
    assert "registered d v2" in capsys.readouterr().out
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["registered_version"] == "2" and summary["model_sha256"] == file_sha256(model_file)
    assert summary["mlflow_run_id"] != first["mlflow_run_id"]


def test_register_refuses_a_missing_file(tmp_path, capsys):
    from jobs.register import main as register

    assert register(["--model", str(tmp_path / "model.pt")]) == 1
    assert "no model file" in capsys.readouterr().err


def test_promote_summary_without_a_config_names_the_fix(tmp_path, capsys):
    (tmp_path / "train_summary.json").write_text(json.dumps({"mlflow_run_id": "r1"}))
    assert main(["--summary", str(tmp_path / "train_summary.json")]) == 2
    assert "no config.yaml beside" in capsys.readouterr().err
