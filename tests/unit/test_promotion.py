import json

import pytest

from imgcls_core.config import load_config
from imgcls_core.registry import Decision, should_promote
from jobs.promote import candidate_run, main


def test_gate_promotes_only_past_the_margin():
    assert should_promote(0.90, None, 0.01) == (True, "no champion yet")
    assert should_promote(0.95, 0.94, 0.01)[0]  # +0.01 >= margin 0.01
    promoted, reason = should_promote(0.945, 0.94, 0.01)
    assert not promoted and "+0.0050 < +0.0100" in reason
    assert not should_promote(0.93, 0.94, 0.0)[0]


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
