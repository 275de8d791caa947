"""A real MLflow tracking server for tests: cluster/mlflow/server.sh on 127.0.0.1, sqlite by default."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from jobs.common import free_port

REPO = Path(__file__).resolve().parents[1]
MLFLOW_SERVER = REPO / "cluster" / "mlflow" / "server.sh"


def server_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """server.sh's environment: state under tmp_path, one worker, no MLFLOW_/PG settings inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))}
    env.update(MLFLOW_STATE_DIR=str(tmp_path / "state"), MLFLOW_BIN=str(Path(sys.executable).parent / "mlflow"),
               MLFLOW_WORKERS="1", **extra)
    return env


def start_server(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """server.sh in its own session (process group), output appended to log_path."""
    with log_path.open("a") as log:
        return subprocess.Popen(["bash", str(MLFLOW_SERVER)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def wait_for_health(proc: subprocess.Popen, port: int, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited {proc.returncode}: {log_path.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                body = response.read().decode().strip()
                assert body == "OK", body
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"no /health answer in {timeout:.0f} s: {log_path.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's whole process group (gunicorn/uvicorn workers too), SIGKILL if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
