"""`ray start --head` + `ray job submit` of jobs.train, exactly as a user runs it (token auth on)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from jobs.common import HAPROXY_PORT_ENVS, NODE_DRAIN_ENV, SERVE_DRAIN_ENV, SERVE_INGRESS_ENV, free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


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


HEAD: dict[str, str] = {}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head of our own (not the shared test instance), stopped by its own pid at the end."""
    tmp_path = tmp_path_factory.mktemp("head")
    dashboard = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    # Serve's ingress, as env.sh exports it for start.sh's head; HAProxy's two fixed ports moved off
    # those of any other Ray instance of this session
    env.update(SERVE_INGRESS_ENV)
    env.update({key: str(free_port()) for key in HAPROXY_PORT_ENVS})
    env.setdefault(*SERVE_DRAIN_ENV)  # `serve shutdown -y` waits the drain: 2 s, not 30
    env.setdefault(*NODE_DRAIN_ENV)  # and the head stops at once on SIGTERM
    # As cluster/local/start.sh does: `ray start` with token auth needs a token to exist already.
    token = subprocess.run([f"{bin_dir}/ray", "get-auth-token", "--generate"], env=env, capture_output=True,
                           text=True, check=True).stdout.strip()
    gcs, metrics = free_port(), free_port()
    head = subprocess.Popen(
        [f"{bin_dir}/ray", "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={free_port()}", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_dashboard(url, head)
        HEAD.update(gcs=f"127.0.0.1:{gcs}", metrics=f"http://127.0.0.1:{metrics}/metrics", token=token)
        yield url, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: the head tears down what it started
        try:
            head.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        session = _session_dir(tmp_path / "head.log")
        leftover = subprocess.run(["pgrep", "-f", session], capture_output=True, text=True).stdout if session else ""
        assert not leftover.strip(), f"processes of {session} outlived the head: {leftover}"


def _session_dir(log: Path) -> str | None:
    for line in log.read_text().splitlines():  # under /tmp/ray, or $RAY_TMPDIR/ray
        if "/ray/session_" in line:
            start = line.rfind(" ", 0, line.index("/ray/session_")) + 1
            return line[start:].split("/logs")[0].split()[0].strip("'\"")
    return None


def _job_status(job_id: str, url: str, env: dict) -> str:
    """What `ray job status` prints (lower-cased): "job 'x' succeeded" and the like."""
    done = subprocess.run(["ray", "job", "status", job_id, "--address", url], env=env,
                          capture_output=True, text=True, timeout=60)
    return (done.stdout + done.stderr).lower()  # "Job 'x' succeeded", logged to stderr


def _job_state(job_id: str, url: str) -> str:
    """The job's state (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) from the Jobs REST API that
    `ray job status` asks. Polls use it: each `ray job status` costs about 2 CPU-seconds, taken from
    the job's own training on a 2-core machine."""
    request = urllib.request.Request(f"{url}/api/jobs/{job_id}",
                                     headers={"Authorization": f"Bearer {HEAD['token']}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)["status"]


def _wait_for_end(job_id: str, url: str, env: dict, timeout: float = 300) -> str:
    """`ray job status` of the job once it has ended (or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _job_state(job_id, url) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(1)
    return _job_status(job_id, url, env)


def test_ray_job_submit_trains_and_a_killed_driver_resumes_on_resubmit(ray_head, digits_shards, tmp_path):
    """`ray job submit` of jobs.train with the shipped configs/digits_ray.yaml (2 workers, Parquet
    shards, ingest auto) on a head with 2 CPUs: the workers hold both CPUs, so Ray Data could never
    run and the job says it uses DataLoader ingest instead of hanging. Its driver is SIGKILLed after
    epoch 2 of 10 (once Ray has registered a checkpoint); the same command submitted again resumes
    from a checkpoint, continues the same MLflow run and succeeds.

    Ray Train's controller, in the driver, registers a reported checkpoint asynchronously: a kill
    right after epoch N's report can lose that registration (with epochs of a second, even epoch
    1's), so the test kills once checkpoint_manager_snapshot.json lists one, and accepts a resume
    from any epoch from 1 to the last one finished at the kill."""
    from mlflow.tracking import MlflowClient

    url, env = ray_head
    out, name = tmp_path / "out", f"killed-driver-{uuid.uuid4().hex[:8]}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [
        f"data.root={digits_shards}", "data.batch_size=8", "model.name=cnn3", "augment.strength=0",
        "optim.lr=0.05", "train.epochs=10", "train.log_every=1000", f"train.output_dir={out}",
        f"ray.storage_path={tmp_path / 'results'}", f"ray.name={name}", "ray.max_failures=0",
        "tracking.enabled=true", f"tracking.tracking_uri={uri}", "tracking.experiment=imgcls",
    ]

    def submit(job_id: str) -> None:
        command = ["ray", "job", "submit", "--address", url, "--submission-id", job_id, "--no-wait",
                   "--working-dir", str(REPO), "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"),
                   "--", "python", "-m", "jobs.train", "--config", "configs/digits_ray.yaml",
                   *[arg for s in sets for arg in ("--set", s)]]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    first, second = f"imgcls-test-{uuid.uuid4().hex[:8]}", f"imgcls-test-{uuid.uuid4().hex[:8]}"
    submit(first)
    history = out / "history.jsonl"
    deadline = time.monotonic() + 300
    snapshot = tmp_path / "results" / name / "checkpoint_manager_snapshot.json"
    while not (history.exists() and len(history.read_text().splitlines()) >= 2 and _registered(snapshot)):
        assert time.monotonic() < deadline, "epoch 2 did not finish (with a registered checkpoint) in 300 s"
        assert _job_state(first, url) != "FAILED", _job_status(first, url, env)
        time.sleep(1)
    # The driver is the entrypoint process: the only one whose command line holds this run's name.
    drivers = subprocess.run(["pgrep", "-f", f"jobs.train .*ray.name={name}"], capture_output=True, text=True)
    pids = [int(p) for p in drivers.stdout.split()]
    assert pids, "no driver process found"
    killed_after = len(history.read_text().splitlines())
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    status = _wait_for_end(first, url, env, timeout=120)
    assert f"job '{first}' failed" in status, status
    assert not (out / "train_summary.json").exists()

    started = time.monotonic()
    submit(second)
    status = _wait_for_end(second, url, env)
    logs = subprocess.run(["ray", "job", "logs", second, "--address", url], env=env,
                          capture_output=True, text=True, timeout=60).stdout
    assert f"job '{second}' succeeded" in status, status + logs[-6000:]
    summary = json.loads((out / "train_summary.json").read_text())
    print(f"killed driver: SIGKILL after epoch {killed_after} of 10; the resubmitted job resumed from epoch "
          f"{summary['resumed_from']} and finished in {time.monotonic() - started:.0f} s")
    assert 1 <= summary["resumed_from"] <= killed_after and summary["epochs"] == 10, summary
    assert f"resuming from epoch {summary['resumed_from']}" in logs
    assert "epoch 10/10" in logs
    assert "reserve 2 of the cluster's 2 CPU, leaving 0" in logs and "using DataLoader ingest" in logs
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("imgcls").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]  # one run, continued
    steps = {m.step for m in client.get_metric_history(summary["mlflow_run_id"], "val/acc1")}
    assert steps == set(range(1, 11)), steps


def _scrape_until(url: str, names: tuple[str, ...], timeout: float = 90) -> str:
    """The Prometheus text at ``url`` once every one of ``names`` is in it (Ray exports a process's
    metrics every few seconds)."""
    deadline, text = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                text = reply.read().decode()
        except OSError:
            text = ""
        if all(f"\n{name}" in text for name in names):
            return text
        time.sleep(2)
    missing = [name for name in names if f"\n{name}" not in text]
    raise AssertionError(f"{missing} not exported at {url} within {timeout:.0f} s; it has: "
                         f"{sorted({line.split('{')[0] for line in text.splitlines() if 'imgcls' in line or 'serve' in line})}")


def _registered(snapshot: Path) -> bool:
    """Whether Ray Train's checkpoint manager has recorded a checkpoint of the run."""
    try:
        return bool(json.loads(snapshot.read_text()).get("checkpoint_results"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False


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


def test_explicit_ray_data_ingest_that_cannot_run_on_a_two_cpu_head_stops_at_once(ray_head, digits_shards, tmp_path):
    """configs/digits_ray.yaml with ray.ingest=ray_data on a head with 2 CPUs: the 2 workers would
    hold both and Ray Data's tasks wait forever, so the job stops before fitting, with the numbers
    and the settings to change. (With ingest auto it falls back: the killed-driver test above.)"""
    url, env = ray_head
    sets = [f"data.root={digits_shards}", f"train.output_dir={tmp_path / 'out'}",
            f"ray.storage_path={tmp_path / 'results'}", "tracking.enabled=false", "ray.ingest=ray_data"]
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "jobs.submit", "--address", url, "--", "python", "-m", "jobs.train",
                           "--config", "configs/digits_ray.yaml", *[arg for s in sets for arg in ("--set", s)]],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    assert "reserve 2 of the cluster's 2 CPU, leaving 0 for Ray Data's read and decode tasks, which need 1" in out
    assert "set ray.ingest=dataloader" in out, out[-3000:]
    assert not (tmp_path / "out" / "history.jsonl").exists()
    print(f"explicit ray_data on a 2-CPU head refused after {time.monotonic() - started:.0f} s")


def test_serve_run_as_the_readme_says_with_env_sh_sourced(ray_head, digits_root, tmp_path):
    """`. cluster/local/env.sh; serve run serve/config.yaml` (the README's line): with env.sh's two
    addresses `serve run` reaches the cluster (an http RAY_ADDRESS made it fail), serves the
    registry's champion over HTTP, and `serve shutdown -y` removes it. The config file is
    serve/config.yaml with only the port, the model name and the tracking store changed. The head's
    Prometheus port (start.sh's --metrics-export-port) then has the app's imgcls_* metrics and
    Serve's own, as the README's scrape line greps them. `serve deploy` of the same file with the
    deployment's user_config changed (the README's way to change what replicas follow) reaches
    the running replica through reconfigure: same replica, new settings."""
    import requests
    import yaml

    from imgcls_core.registry import CHAMPION, Registry
    from tests.integration.test_serve import MODEL, train_and_register

    url, env = ray_head
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version, _ = train_and_register(digits_root, tmp_path, uri, seed=0, epochs=1)
    Registry(uri, MODEL).set_alias(CHAMPION, version)
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    # The app is built on the cluster, with the head's environment: cluster/local/start.sh's head
    # has env.sh's MLFLOW_TRACKING_URI, this test's head does not, so the file names the store.
    config["applications"][0]["args"].update(model_name=MODEL, num_cpus=0.25, tracking_uri=uri)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    sourced = subprocess.run(["bash", "-c", ". cluster/local/env.sh && env -0"], cwd=REPO, capture_output=True,
                             check=True, env={**env, "RAY_GCS_PORT": HEAD["gcs"].split(":")[1],
                                              "RAY_DASHBOARD_PORT": url.rsplit(":", 1)[1]}).stdout.decode()
    shell = dict(item.split("=", 1) for item in sourced.split("\0") if "=" in item)
    assert shell["RAY_ADDRESS"] == HEAD["gcs"] and shell["RAY_API_SERVER_ADDRESS"] == url
    bin_dir = Path(sys.executable).parent
    log = open(tmp_path / "serve_run.log", "w")
    server = subprocess.Popen([str(bin_dir / "serve"), "run", str(tmp_path / "serve.yaml")], cwd=REPO, env=shell,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    digit = sorted((Path(digits_root) / "test" / "3").glob("*.png"))[0]
    try:
        deadline, answer = time.monotonic() + 180, None
        while time.monotonic() < deadline and (answer is None or answer.status_code in (404, 503)):
            assert server.poll() is None, (tmp_path / "serve_run.log").read_text()[-4000:]
            try:  # the proxy answers 404 until the application's route is up
                answer = requests.post(f"http://127.0.0.1:{port}/v1/predict", timeout=30,
                                       files={"file": (digit.name, digit.read_bytes(), "image/png")})
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(1)
        assert answer is not None, (tmp_path / "serve_run.log").read_text()[-4000:]
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"]["version"] == version
        scraped = _scrape_until(HEAD["metrics"], ("ray_imgcls_images_total", "ray_serve_num_http_requests_total"))
        images = [line for line in scraped.splitlines() if line.startswith("ray_imgcls_images_total{")]
        assert images and float(images[0].rsplit(" ", 1)[1]) >= 1, images

        replica = requests.get(f"http://127.0.0.1:{port}/v1/stats", timeout=30).json()["replica"]
        config["applications"][0]["deployments"] = [
            {"name": "Classifier", "user_config": {"alias": "champion", "version": version, "poll_interval_s": 7}}]
        (tmp_path / "serve_pinned.yaml").write_text(yaml.safe_dump(config))
        deployed = subprocess.run([str(bin_dir / "serve"), "deploy", str(tmp_path / "serve_pinned.yaml")], cwd=REPO,
                                  env=shell, capture_output=True, text=True, timeout=120)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        deadline, following = time.monotonic() + 60, {}
        while time.monotonic() < deadline and following.get("poll_interval_s") != 7:
            time.sleep(1)
            following = requests.get(f"http://127.0.0.1:{port}/v1/model", timeout=30).json()["following"]
        assert following["poll_interval_s"] == 7 and following["pinned_version"] == version, following
        assert requests.get(f"http://127.0.0.1:{port}/v1/stats", timeout=30).json()["replica"] == replica
    finally:
        stopped = subprocess.run([str(bin_dir / "serve"), "shutdown", "-y"], env=shell, capture_output=True,
                                 text=True, timeout=120)
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "Invalid Ray address" not in (tmp_path / "serve_run.log").read_text()
