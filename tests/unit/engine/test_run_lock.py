"""One run per output folder: the flock on ``<output_dir>/.imgcls.lock``, held and released by real processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgcls_core.engine.rundir import LOCK_FILE, OutputDirInUse, RunLock, lock_output_dir

REPO = Path(__file__).resolve().parents[3]

HOLDER = r"""
import sys, time
from imgcls_core.engine.rundir import lock_output_dir
lock = lock_output_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(300)
"""


def _holder(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = child.stdout.readline().strip()
    if line != "locked":
        child.kill()
        pytest.fail(f"the holder process did not take the lock: {line} {child.communicate()[1]}")
    return child


def test_a_second_run_on_the_same_folder_fails_at_once_until_the_holder_dies(tmp_path):
    folder = tmp_path / "runs" / "x"  # created by the lock
    holder = _holder(folder)
    try:
        info = json.loads((folder / LOCK_FILE).read_text())
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        started = time.monotonic()
        with pytest.raises(OutputDirInUse) as caught:
            lock_output_dir(folder)
        assert time.monotonic() - started < 2  # does not wait for the holder
        message = str(caught.value)
        assert message.startswith(f"train.output_dir {folder} is in use by another run "
                                  f"(pid {holder.pid} on host {socket.gethostname()}, since {info['started']})")
        assert message.endswith("wait for it to finish, or set train.output_dir to another folder")
        assert isinstance(caught.value, RuntimeError)
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the OS drops the lock with the process
        holder.communicate(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == holder.pid  # stale content, no lock
    with lock_output_dir(folder) as lock:
        assert lock.held
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not lock.held


def test_release_and_retake_in_one_process(tmp_path):
    lock = lock_output_dir(tmp_path)
    assert isinstance(lock, RunLock) and lock.held
    with pytest.raises(OutputDirInUse, match=f"pid {os.getpid()}"):  # a second open file is refused too
        lock_output_dir(tmp_path, setting="ray.storage_path")
    lock.release()
    lock.release()  # idempotent
    assert (tmp_path / LOCK_FILE).read_text() == ""  # nothing claims the folder any more
    again = lock_output_dir(tmp_path)
    again.release()


def test_the_setting_named_in_the_message(tmp_path):
    with lock_output_dir(tmp_path):
        with pytest.raises(OutputDirInUse, match=r"^ray.storage_path .* or set ray.storage_path to another folder$"):
            lock_output_dir(tmp_path, setting="ray.storage_path")
