"""Integration fixtures: one real local Ray instance per test session, real MLflow sqlite stores."""

from __future__ import annotations

import os

import pytest

from jobs.common import free_port


DASHBOARD: dict[str, str] = {}


@pytest.fixture(scope="session")
def ray_dashboard_url(ray_session) -> str:
    """The state API / dashboard of the shared instance (for drivers started in a subprocess)."""
    return DASHBOARD["url"]


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by every test that needs one (starting Ray costs ~10 s).

    4 logical CPUs on a 2-core machine: 2 training workers plus Ray Data's decode tasks.
    The dashboard runs because Ray Train's placement-group cleaner (which frees the workers
    of trials Ray Tune stops) asks the state API it serves; RAY_API_SERVER_ADDRESS points
    the workers at this instance rather than at whatever /tmp/ray/ray_current_cluster names."""

    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not ray.is_initialized():
        port = free_port()
        from jobs.common import init_local_ray

        init_local_ray(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=port, configure_logging=False,
                       runtime_env={"env_vars": {"OMP_NUM_THREADS": "1",
                                                 "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
        DASHBOARD["url"] = f"http://127.0.0.1:{port}"
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path):
    """A fresh sqlite tracking store (with the model registry) per test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def digits_shards(digits_root, tmp_path_factory):
    """The digits as Parquet shards (train/val/test), converted once per session."""
    from imgcls_core.data import convert_image_folder

    out = tmp_path_factory.mktemp("shards") / "digits"
    convert_image_folder(digits_root, out, num_workers=1, shard_size=512)
    return out


@pytest.fixture(scope="session", autouse=True)
def _quiet_ray_data():
    """Ray Data's per-operator progress bars flood captured test logs."""
    try:
        from ray.data import DataContext
    except ImportError:
        yield
        return
    DataContext.get_current().enable_progress_bars = False
    yield
