"""`ray start --head` + `ray job submit` of jobs.train, exactly as a user runs it (token auth on)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited early"
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:  # e.g. 401 with token auth on: the server answers
            return
        except OSError:  # refused until it is up
            pass
        time.sleep(1)
    raise TimeoutError(f"dashboard at {url} did not come up in {timeout}s")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head of our own (not the shared test instance), stopped by its own pid at the end."""
    tmp_path = tmp_path_factory.mktemp("head")
    dashboard = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [f"{bin_dir}/ray", "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_dashboard(url, head)
        yield url, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: the head tears down what it started
        try:
            head.wait(timeout=90)  # the head drains for up to 30 s first
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        session = _session_dir(tmp_path / "head.log")
        leftover = subprocess.run(["pgrep", "-f", session], capture_output=True, text=True).stdout if session else ""
        assert not leftover.strip(), f"processes of {session} outlived the head: {leftover}"


def _session_dir(log: Path) -> str | None:
    for line in log.read_text().splitlines():
        if "/tmp/ray/session_" in line:
            start = line.index("/tmp/ray/session_")
            return line[start:].split("/logs")[0].split()[0]
    return None


def test_ray_job_submit_trains_and_succeeds(ray_head, digits_root, tmp_path):
    url, env = ray_head
    job_id = f"imgcls-test-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out"
    sets = [
        "data.format=imagefolder", f"data.root={digits_root}", "data.batch_size=32", "model.name=cnn3",
        "augment.strength=0", "optim.lr=0.05", "train.epochs=2", f"train.output_dir={out}",
        f"ray.storage_path={tmp_path / 'results'}", "ray.num_workers=1", "tracking.enabled=true",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    command = ["ray", "job", "submit", "--address", url, "--submission-id", job_id, "--no-wait",
               "--working-dir", str(REPO), "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"),
               "--", "python", "-m", "jobs.train", *[arg for s in sets for arg in ("--set", s)]]
    submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    deadline, status = time.monotonic() + 300, ""
    while time.monotonic() < deadline:
        done = subprocess.run(["ray", "job", "status", job_id, "--address", url], env=env,
                              capture_output=True, text=True, timeout=60)
        status = (done.stdout + done.stderr).lower()  # "Job 'x' succeeded", logged to stderr
        if any(f"' {s}" in status for s in ("succeeded", "failed", "stopped")):
            break
        time.sleep(3)
    logs = subprocess.run(["ray", "job", "logs", job_id, "--address", url], env=env,
                          capture_output=True, text=True, timeout=60).stdout
    assert f"job '{job_id}' succeeded" in status, status + logs[-6000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["epochs"] == 2 and summary["mlflow_run_id"]
    assert "epoch 2/2" in logs


def test_jobs_submit_follows_the_job_and_returns_its_outcome(ray_head):
    """python -m jobs.submit streams the job's output and exits with the job's outcome."""
    url, env = ray_head

    def submit(*entrypoint: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "jobs.submit", "--address", url, "--", *entrypoint],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=300)

    ok = submit("python", "-m", "jobs.train", "--print-config", "--set", "train.epochs=7")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "epochs: 7" in ok.stdout and "succeeded" in ok.stdout + ok.stderr  # the job's output, then its outcome
    bad = submit("python", "-m", "jobs.train", "--set", "optim.lr=fast")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "optim.lr: expected a number" in bad.stdout + bad.stderr
    assert "failed" in (bad.stdout + bad.stderr).lower()


def test_job_submit_without_the_token_mode_is_refused(ray_head):
    url, env = ray_head
    plain = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    listed = subprocess.run(["ray", "job", "list", "--address", url], env=plain,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode != 0
    assert "token" in (listed.stdout + listed.stderr).lower()
