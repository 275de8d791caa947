"""Which stored sweeps jobs.tune resumes into the configured MLflow store (the parent run is a
stand-in: these functions read only its run_id, active and continued)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from jobs.tune import SWEEP_RUN_FILE, _record_parent_run, _tracked_elsewhere


def parent(run_id: str | None, continued: bool = True) -> SimpleNamespace:
    return SimpleNamespace(run_id=run_id, active=run_id is not None, continued=continued)


def test_the_sweep_that_recorded_this_parent_run_is_resumed(tmp_path):
    _record_parent_run(str(tmp_path), parent("abc"))
    assert json.loads((tmp_path / SWEEP_RUN_FILE).read_text()) == {"parent_run_id": "abc"}
    assert not _tracked_elsewhere(str(tmp_path), parent("abc"))
    assert not _tracked_elsewhere(f"file://{tmp_path}", parent("abc"))


@pytest.mark.parametrize("record", [None, '{"parent_run_id": "other"}', "not json", "[1]"])
def test_a_sweep_recorded_for_another_run_or_without_a_record_is_set_aside(tmp_path, record):
    if record is not None:
        (tmp_path / SWEEP_RUN_FILE).write_text(record)
    assert _tracked_elsewhere(str(tmp_path), parent("abc"))


def test_a_store_that_had_to_create_the_parent_run_never_held_the_sweep(tmp_path):
    _record_parent_run(str(tmp_path), parent("abc"))
    assert _tracked_elsewhere(str(tmp_path), parent("abc", continued=False))


def test_without_tracking_or_on_remote_storage_the_sweep_resumes_as_before(tmp_path):
    assert not _tracked_elsewhere(str(tmp_path), parent(None, continued=False))
    _record_parent_run(str(tmp_path), parent(None))
    assert not (tmp_path / SWEEP_RUN_FILE).exists()
    assert not _tracked_elsewhere("s3://bucket/results/sweep", parent("abc"))
