"""Checkpoints survive a writer killed mid-save, a full disk and a corrupted newest checkpoint.

The crashes are real: a child process saves and is SIGKILLed at a chosen point (inside the writer, or at one of
``checkpoint._HOOKS``' crash points); the parent then reads what is on disk.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imgcls_core.engine import checkpoint as ck
from imgcls_core.engine.checkpoint import (
    CHECKPOINT_FILE,
    COMPLETE_FILE,
    CheckpointDir,
    CheckpointSaveError,
    Preprocessing,
    load_checkpoint,
    load_first_readable,
    save_checkpoint,
    save_inference_model,
)

REPO = Path(__file__).resolve().parents[3]
PRE = Preprocessing(32, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], 1.0, ["a", "b"])
CONFIG = {"model": {"name": "tiny"}}


def _state(epoch: int) -> dict:
    return {"model": {"w": torch.arange(4096, dtype=torch.float32) * epoch}, "epoch": epoch, "step": 10 * epoch}


def _writer(epoch: int):
    return lambda folder: save_checkpoint(folder, _state(epoch), CONFIG, PRE)


def _hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def _assert_is_epoch_1(state: dict) -> None:
    assert state["epoch"] == 1 and state["step"] == 10
    assert torch.equal(state["model"]["w"], _state(1)["model"]["w"])


# Runs in a child process: saves epoch 1 with keep=1, then dies (SIGKILL) in the middle of the next save.
CHILD = r"""
import io, os, signal, sys, time
from pathlib import Path
import torch
from imgcls_core.engine import checkpoint as ck

root, mode = Path(sys.argv[1]), sys.argv[2]
pre = ck.Preprocessing(32, [0.5] * 3, [0.25] * 3, 1.0, ["a", "b"])

def state(epoch):
    return {"model": {"w": torch.arange(4096, dtype=torch.float32) * epoch}, "epoch": epoch, "step": 10 * epoch}

def writer(epoch):
    return lambda folder: ck.save_checkpoint(folder, state(epoch), {"model": {"name": "tiny"}}, pre)

def die(*_):
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

checkpoints = ck.CheckpointDir(root, keep=1)
checkpoints.save(1, writer(1))
if mode == "mid_write":  # killed with checkpoint.pt half written
    def half(folder):
        buffer = io.BytesIO()
        torch.save(state(2), buffer)
        (folder / ck.CHECKPOINT_FILE).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        die()
    checkpoints.save(2, half)
elif mode == "sealed":  # killed after the COMPLETE marker, before the rename into place
    ck._HOOKS["sealed"] = die
    checkpoints.save(2, writer(2))
elif mode == "old_set_aside":  # replacing epoch 1 (as a mid-epoch checkpoint does): killed between the renames
    ck._HOOKS["old_set_aside"] = die
    checkpoints.save(1, writer(7))
elif mode == "stall":  # a live writer in the middle of its save
    def stall(folder):
        (folder / ck.CHECKPOINT_FILE).write_bytes(b"partial")
        print("writing", flush=True)
        time.sleep(300)
    checkpoints.save(2, stall)
print("survived")
"""


def _child(root: Path, mode: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(root), mode], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.parametrize("mode", ["mid_write", "sealed", "old_set_aside"])
def test_a_writer_killed_mid_save_never_loses_the_only_checkpoint(tmp_path, mode):
    root = tmp_path / "checkpoints"
    child = _child(root, mode)
    out, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, f"the child was not killed mid-save:\n{out}\n{err}"
    leftovers = _hidden(root)
    assert leftovers, "the kill came mid-save, so its folder must still be there"
    if mode == "sealed":  # killed after the marker: a whole checkpoint that never made it into place
        assert (root / leftovers[0] / COMPLETE_FILE).is_file()
    if mode == "old_set_aside":  # the only checkpoint is under its aside name, and still listed
        assert not (root / "epoch_0001").exists()
        assert any(name.startswith(".aside-epoch_0001-") for name in leftovers)

    checkpoints = CheckpointDir(root, keep=1)
    assert [e for e, _ in checkpoints.epochs()] == [1]
    logged: list[str] = []
    state, path = checkpoints.load_latest(log=logged.append)
    _assert_is_epoch_1(state)
    assert logged == []  # the newest listed checkpoint loaded: nothing skipped
    assert _hidden(root) == leftovers  # reading changes nothing

    checkpoints.recover()  # what the next save does first
    assert _hidden(root) == []
    assert (root / "epoch_0001" / COMPLETE_FILE).is_file()  # put back if it was set aside
    _assert_is_epoch_1(load_checkpoint(root / "epoch_0001"))

    checkpoints.save(2, _writer(2))
    assert sorted(p.name for p in root.iterdir()) == ["epoch_0002"]
    assert torch.equal(checkpoints.load_latest()[0]["model"]["w"], _state(2)["model"]["w"])


def test_the_next_save_removes_the_leftovers_itself(tmp_path):
    root = tmp_path / "checkpoints"
    child = _child(root, "mid_write")
    child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL
    assert _hidden(root)
    # and a leftover with this process's own pid that this process is not using: an earlier process's, the pid
    # reused (as in a restarted container)
    (root / f".staging-epoch_0009-{os.getpid()}-0badc0de").mkdir()
    CheckpointDir(root, keep=1).save(2, _writer(2))
    assert sorted(p.name for p in root.iterdir()) == ["epoch_0002"]


def test_the_staging_folder_of_a_live_writer_is_left_alone(tmp_path):
    root = tmp_path / "checkpoints"
    child = _child(root, "stall")
    try:
        assert child.stdout.readline().strip() == "writing", child.stderr.read() if child.poll() is not None else ""
        theirs = _hidden(root)
        assert len(theirs) == 1 and f"-{child.pid}-" in theirs[0]
        checkpoints = CheckpointDir(root, keep=2)
        checkpoints.save(3, _writer(3))
        assert _hidden(root) == theirs  # a save in progress
        assert [e for e, _ in checkpoints.epochs()] == [1, 3]
    finally:
        child.kill()
        child.communicate(timeout=60)
    checkpoints.save(4, _writer(4))  # now it is a dead process's leftover
    assert _hidden(root) == []


def _fill_disk_midway(epoch: int):
    def write(folder: Path) -> None:
        with open(folder / CHECKPOINT_FILE, "wb") as fh:
            fh.write(b"PK\x03\x04" + bytes(10_000))  # some bytes made it, then the disk was full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / CHECKPOINT_FILE))
    return write


def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_staging_folder(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoints = CheckpointDir(root, keep=1)
    checkpoints.save(1, _writer(1))
    with pytest.raises(CheckpointSaveError) as caught:
        checkpoints.save(2, _fill_disk_midway(2))
    error = caught.value
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    message = str(error)
    assert f"could not save the checkpoint of epoch 2 in {root}" in message
    assert "No space left on device" in message
    assert "was removed; the checkpoints saved before are intact (epoch_0001)" in message
    assert sorted(p.name for p in root.iterdir()) == ["epoch_0001"]  # no staging folder
    _assert_is_epoch_1(checkpoints.load_latest()[0])
    # the same for a failure while replacing a checkpoint of the same epoch
    with pytest.raises(CheckpointSaveError, match="intact"):
        checkpoints.save(1, _fill_disk_midway(1))
    assert sorted(p.name for p in root.iterdir()) == ["epoch_0001"]
    _assert_is_epoch_1(checkpoints.load_latest()[0])


def test_a_writer_that_writes_no_checkpoint_file_is_refused(tmp_path):
    checkpoints = CheckpointDir(tmp_path, keep=1)
    with pytest.raises(CheckpointSaveError, match="wrote no checkpoint.pt"):
        checkpoints.save(1, lambda folder: (folder / "notes.txt").write_text("x"))
    assert list(tmp_path.iterdir()) == []


# Runs in a child process inside its own user and mount namespaces (``unshare -Urm``), on a 1 MiB tmpfs that
# nobody else sees and that disappears with the process: a real full disk.
TMPFS_CHILD = r"""
import json, os, sys
from pathlib import Path
import torch
from imgcls_core.engine import checkpoint as ck

root = Path(sys.argv[1])
pre = ck.Preprocessing(32, [0.5] * 3, [0.25] * 3, 1.0, ["a", "b"])
small = {"model": {"w": torch.arange(4096, dtype=torch.float32)}, "epoch": 1, "step": 10}
big = {"model": {"w": torch.ones(400_000)}, "epoch": 2, "step": 20}  # 1.6 MB: does not fit
checkpoints = ck.CheckpointDir(root / "checkpoints", keep=1)
checkpoints.save(1, lambda folder: ck.save_checkpoint(folder, small, {}, pre))
report = {}
try:
    checkpoints.save(2, lambda folder: ck.save_checkpoint(folder, big, {}, pre))
except ck.CheckpointSaveError as exc:
    report.update(error=str(exc), errno=exc.errno)
report["listing"] = sorted(p.name for p in (root / "checkpoints").iterdir())
state, path = checkpoints.load_latest()
report["latest"] = path.name
report["intact"] = bool(torch.equal(state["model"]["w"], small["model"]["w"]))
ck.save_inference_model(root / "model.pt", small["model"], {}, pre)
try:
    ck.save_inference_model(root / "model.pt", big["model"], {}, pre)
except OSError as exc:
    report.update(model_error=str(exc), model_errno=exc.errno)
report["model_intact"] = bool(torch.equal(ck.load_checkpoint(root / "model.pt")["model"]["w"], small["model"]["w"]))
report["root_listing"] = sorted(p.name for p in root.iterdir())
print(json.dumps(report))
"""


def test_a_real_full_disk(tmp_path):
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1): cannot mount a small private tmpfs without root")
    mount = tmp_path / "small_disk"
    mount.mkdir()
    probe = subprocess.run([unshare, "-Urm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs '{mount}'"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs here (user namespaces unavailable?): {probe.stderr.strip()}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    script = f"mount -t tmpfs -o size=1m tmpfs '{mount}' && exec '{sys.executable}' -c \"$0\" '{mount}'"
    run = subprocess.run([unshare, "-Urm", "sh", "-c", script, TMPFS_CHILD], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=180)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["errno"] == errno.ENOSPC, report
    assert "No space left on device" in report["error"]
    assert "the checkpoints saved before are intact (epoch_0001)" in report["error"]
    assert report["listing"] == ["epoch_0001"]  # no staging folder left to fill the disk
    assert report["latest"] == "epoch_0001" and report["intact"]
    assert report["model_errno"] == errno.ENOSPC and "model.pt" in report["model_error"]
    assert report["model_intact"] and report["root_listing"] == ["checkpoints", "model.pt"]  # no model.pt.tmp
    assert list(mount.iterdir()) == []  # the tmpfs was private to the child


def _two_epochs(root: Path, keep: int = 2) -> CheckpointDir:
    checkpoints = CheckpointDir(root, keep=keep)
    checkpoints.save(1, _writer(1))
    checkpoints.save(2, _writer(2))
    return checkpoints


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    checkpoints = _two_epochs(tmp_path)
    newest = checkpoints.path_for(2)
    file = newest / CHECKPOINT_FILE
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    logged: list[str] = []
    state, path = checkpoints.load_latest(log=logged.append)
    assert path == checkpoints.path_for(1)
    _assert_is_epoch_1(state)
    assert len(logged) == 1
    assert logged[0].startswith(f"checkpoint {newest} is unreadable (checkpoint.pt has ")
    assert logged[0].endswith(f"; resuming from the previous complete one, {checkpoints.path_for(1)}")


def test_corrupted_bytes_that_torch_would_load_are_caught_by_the_marker(tmp_path):
    checkpoints = _two_epochs(tmp_path)
    file = checkpoints.path_for(2) / CHECKPOINT_FILE
    data = bytearray(file.read_bytes())
    at = data.find(_state(2)["model"]["w"][100:104].numpy().tobytes())
    data[at] ^= 0xFF  # one flipped bit pattern in the weights, same size
    file.write_bytes(bytes(data))
    assert not torch.equal(load_checkpoint(file)["model"]["w"], _state(2)["model"]["w"])  # torch loads it silently
    logged: list[str] = []
    state, path = checkpoints.load_latest(log=logged.append)
    _assert_is_epoch_1(state)
    assert "does not match the sha256 its completion marker recorded" in logged[0]


def test_a_legacy_checkpoint_without_marker_is_listed_and_loaded(tmp_path):
    checkpoints = _two_epochs(tmp_path)
    save_checkpoint(checkpoints.path_for(3), _state(3), CONFIG, PRE)  # as older versions wrote them: no marker
    (checkpoints.path_for(4)).mkdir()  # an interrupted save of an older version: no file
    assert [e for e, _ in checkpoints.epochs()] == [1, 2, 3]
    state, path = checkpoints.load_latest()
    assert path == checkpoints.path_for(3) and state["epoch"] == 3
    # a legacy one that was cut short (the old cross-filesystem move) falls back as well
    file = checkpoints.path_for(3) / CHECKPOINT_FILE
    file.write_bytes(file.read_bytes()[:100])
    logged: list[str] = []
    assert checkpoints.load_latest(log=logged.append)[1] == checkpoints.path_for(2)
    assert "failed finding central directory" in logged[0]


def test_no_loadable_checkpoint_is_an_error_naming_each(tmp_path):
    checkpoints = _two_epochs(tmp_path)
    for epoch in (1, 2):
        (checkpoints.path_for(epoch) / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="none of the 2 checkpoint") as caught:
        checkpoints.load_latest(log=lambda line: pytest.fail(f"nothing to resume from, yet logged: {line}"))
    assert str(checkpoints.path_for(1)) in str(caught.value) and str(checkpoints.path_for(2)) in str(caught.value)
    assert CheckpointDir(tmp_path / "none").load_latest() is None


def test_load_first_readable_takes_folders_without_marker(tmp_path):
    # as Ray Train's checkpoint folders are: checkpoint.pt and companions, no COMPLETE marker
    newest = save_checkpoint(tmp_path / "ray_ckpt_2", _state(2), CONFIG, PRE)
    older = save_checkpoint(tmp_path / "ray_ckpt_1", _state(1), CONFIG, PRE)
    (newest / CHECKPOINT_FILE).write_bytes((newest / CHECKPOINT_FILE).read_bytes()[:-50])
    logged: list[str] = []
    state, path = load_first_readable([newest, older], "cpu", logged.append)
    assert path == older
    _assert_is_epoch_1(state)
    assert len(logged) == 1 and logged[0].startswith(f"checkpoint {newest} is unreadable (")
    assert logged[0].endswith(f"); resuming from the previous complete one, {older}")
    with pytest.raises(ValueError, match="empty"):
        load_first_readable([], "cpu", print)


def test_the_marker_records_what_was_sealed(tmp_path):
    checkpoints = CheckpointDir(tmp_path, keep=2)
    path = checkpoints.save(3, _writer(3))
    seal = json.loads((path / COMPLETE_FILE).read_text())
    file = path / CHECKPOINT_FILE
    assert seal["epoch"] == 3 and seal["size"] == file.stat().st_size
    assert seal["sha256"] == ck.file_sha256(file)
    assert {p.name for p in path.iterdir()} == {
        CHECKPOINT_FILE, COMPLETE_FILE, "config.yaml", "class_index.json", "metrics.json"}


def test_replacing_and_pruning(tmp_path):
    checkpoints = CheckpointDir(tmp_path, keep=2)
    for epoch in (1, 2, 3):
        checkpoints.save(epoch, _writer(epoch))
    assert [e for e, _ in checkpoints.epochs()] == [2, 3]
    checkpoints.save(3, _writer(30))  # a mid-epoch checkpoint replaces the one of the same number
    assert checkpoints.load_latest()[0]["epoch"] == 30
    # a run restarted from epoch 1 (or from scratch): the newer numbers belong to the abandoned attempt
    checkpoints.save(1, _writer(1))
    assert [e for e, _ in checkpoints.epochs()] == [1]
    assert _hidden(tmp_path) == []
    with pytest.raises(ValueError, match="keep must be at least 1"):
        CheckpointDir(tmp_path, keep=0)


def test_commit_still_moves_a_finished_directory_into_place(tmp_path):
    checkpoints = CheckpointDir(tmp_path / "ckpts", keep=1)
    source = save_checkpoint(tmp_path / "elsewhere", _state(1), CONFIG, PRE)
    target = checkpoints.commit(source, 1)
    assert target == checkpoints.path_for(1) and (target / COMPLETE_FILE).is_file()
    assert not source.exists()
    _assert_is_epoch_1(checkpoints.load_latest()[0])


def test_save_inference_model_leaves_no_half_file_when_the_write_fails(tmp_path):
    save_inference_model(tmp_path / "model.pt", _state(1)["model"], {}, PRE)

    class Unpicklable:  # torch.save fails partway through writing
        def __reduce__(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError):
        save_inference_model(tmp_path / "model.pt", {"w": Unpicklable()}, {}, PRE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    assert torch.equal(load_checkpoint(tmp_path / "model.pt")["model"]["w"], _state(1)["model"]["w"])
