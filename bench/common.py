"""Shared bits of the benchmarks: the machine record and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
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


def save(name: str, result: dict) -> Path:
    """Write bench/results/<name>.json, or the file $IMGCLS_BENCH_OUT names (bench.run sets it per run)."""
    path = Path(os.environ.get("IMGCLS_BENCH_OUT") or RESULTS / f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **result}, indent=1))
    print(f"results: {path}")
    return path
