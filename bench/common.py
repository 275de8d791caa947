"""Shared bits of the benchmarks: the machine record and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    info = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    info.update({name: version(name) for name in ("torch", "torchvision", "ray", "mlflow")})
    return info


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``: a reader (or a
    crash half-way) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def partial_path(path: Path) -> Path:
    """Where a run still in progress keeps what it has so far: <name>.partial.json beside ``path``."""
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def save(name: str, result: dict, partial: bool = False) -> Path:
    """Write bench/results/<name>.json, or the file $IMGCLS_BENCH_OUT names (bench.run sets it per run),
    atomically. ``partial``: a run in progress saving what it has so far, to <name>.partial.json
    beside it, so that the result of the last complete run stays; the final save removes it."""
    path = Path(os.environ.get("IMGCLS_BENCH_OUT") or RESULTS / f"{name}.json")
    target = partial_path(path) if partial else path
    write_atomic(target, json.dumps({"machine": machine(), **result, **({"partial": True} if partial else {})},
                                    indent=1))
    if not partial:
        partial_path(path).unlink(missing_ok=True)
    print(f"results: {target}")
    return target


def start_local_ray(cpus: int) -> None:
    """A fresh local Ray instance with ``cpus`` logical CPUs and its dashboard, for the sweep
    benchmarks. The dashboard serves the state API that Ray Train's placement-group cleaner asks,
    from the workers, before it frees the workers of a trial a scheduler stopped;
    RAY_API_SERVER_ADDRESS points it at this instance rather than at whichever
    /tmp/ray/ray_current_cluster names."""
    from jobs.common import free_port
    from jobs.common import init_local_ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    dashboard = free_port()
    init_local_ray(num_cpus=cpus, configure_logging=False, include_dashboard=True,
                   dashboard_host="127.0.0.1", dashboard_port=dashboard,
                   runtime_env={"env_vars": {"OMP_NUM_THREADS": "1",
                                             "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}"}})


def sweep_overrides(root: Path, out: Path, name: str, *, epochs: int, samples: int, scheduler: str,
                    seed: int = 0, reduction_factor: int = 4, data_format: str = "imagefolder") -> list[str]:
    """A seeded random search over tune_spaces/lr_schedules.yaml with a small CNN on the digits at
    16 px (decoded once, no augmentation), one worker per trial: the sweep benchmarks' common config.
    Like the default recipe, trials keep an EMA of the weights (0.98) and smooth labels (0.1); the
    sweep ranks them on the EMA weights (val_ema/acc1), which judge an unfinished trial better.
    ``root`` is the digits as PNGs (imagefolder) or composed digits as Parquet shards (parquet)."""
    return [
        f"data.format={data_format}", f"data.root={root}", "data.batch_size=32", "data.image_size=16",
        "model.name=cnn3", "model.width=0.5", "augment.strength=0",
        "train.ema_decay=0.98", "train.label_smoothing=0.1", "tune.metric=val_ema/acc1",
        "augment.policy=none", "augment.batched=true",
        f"train.epochs={epochs}", "train.log_every=1000", "train.seed=0",
        f"train.output_dir={out}", f"ray.storage_path={out.parent / 'results'}",
        f"ray.name={name}", "ray.num_workers=1", "ray.ingest=dataloader",
        "tune.space=lr_schedules", f"tune.num_samples={samples}", f"tune.scheduler={scheduler}",
        "tune.grace_period=1", f"tune.reduction_factor={reduction_factor}", f"tune.seed={seed}",
    ]
