"""Every benchmark in one run: side-by-side ratios, medians over repeats, BENCHMARKS.md.

    python -m bench.run --list                          # what there is, runs of each, and how long one takes here
    python -m bench.run                                 # every benchmark, its default runs; BENCHMARKS.md rewritten
    python -m bench.run --repeats 5                     # medians over 5 runs of each
    python -m bench.run --only serve_throughput quantize
    python -m bench.run --quick                         # shorter settings: a smoke run, not figures to quote

Each benchmark is a module of this package, also runnable alone
(``python -m bench.<name> --help``); every one measures its figures side by
side in one process run (e.g. ASHA and FIFO sweeps over the same trials), so
a ratio never compares runs from different moments. The harness runs each
benchmark ``--repeats`` times (default: the benchmark's own count, ``--list``:
5 for the serving benchmarks, whose points are measured once per run; 2 for
tune_asha, one run with each sweep first; 1 where the script itself takes
medians of 5 or more) in a fresh process (IMGCLS_BENCH_REPEAT tells it which
repeat it is, so that it can alternate its order), takes each figure's median
(and min/max), records the machine (CPU, GPU, versions) and writes
BENCHMARKS.md, with the command that reproduces every row, and
bench/results/harness.json with every run's raw result. Once every repeat
succeeded, the last run's raw result replaces bench/results/<name>.json
(written to a temporary file and renamed; never by ``--quick`` runs). Benchmarks that need
a GPU are listed as not measured on a machine without one. Benchmarks not
selected keep their previous rows in BENCHMARKS.md (from harness.json), each
with the machine and date it was measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import RESULTS, machine, median, write_atomic

REPO = Path(__file__).resolve().parents[1]
HARNESS = RESULTS / "harness.json"
MARKDOWN = REPO / "BENCHMARKS.md"

Figures = Callable[[dict], dict[str, float]]
INVALID = "invalid"  # a figure's value in a run where its point saw no steady state (bench.loadgen)


@dataclass(frozen=True)
class Bench:
    name: str
    issue: str  # the capability it measures
    what: str  # the comparison, one line
    args: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()
    figures: Figures = field(default=lambda r: {})
    gpu: bool = False  # its figures mean something only on a CUDA device
    minutes: float = 1.0  # one run on the 2-core reference machine
    module: str = ""  # bench.<module> to run; default: the name
    repeats: int = 1  # runs when --repeats is not given: medians of >= 5 for rates the script measures once

    def command(self, quick: bool = False) -> list[str]:
        return [sys.executable, "-m", f"bench.{self.module or self.name}", *(self.quick if quick else self.args)]


KIND_NAMES = {"torch": "PyTorch", "onnx": "ONNX Runtime", "tensorrt": "TensorRT", "auto": "serve.backend=auto"}


def _kind(kind: str) -> str:
    """``"torch bf16"`` -> ``"PyTorch bf16"``."""
    backend, _, precision = kind.partition(" ")
    return f"{KIND_NAMES.get(backend, backend)} {precision}".strip()


def _serve(r: dict) -> dict[str, float | str | None]:
    """Per mode: the saturation ratios (valid points only, each side's backend and precision
    named), then every point (img/s, latency, server CPU-ms/img, batch); a point with no steady
    state in its window is ``invalid``. Results from before the naive server and the in-process
    runs followed the mode's backend and precision (both ran PyTorch fp32) are read as such."""
    from bench.loadgen import row_invalid
    from bench.serve_throughput import TORCH_FP32, mode_ratios, mode_settings, served_kind

    cfg = r["config"]
    k = cfg["images_per_request"]

    def judged(rows: list[dict]) -> list[dict]:  # rows from before the check: judged on their fixed window
        out = []
        for row in rows:
            why = row_invalid(row, cfg["seconds"])
            out.append({**row, "valid": why is None, **({"invalid_reason": why} if why else {})})
        return out

    naive_by_kind = {kind: judged(rows) for kind, rows in
                     r.get("naive_by_kind", {TORCH_FP32: r["naive"]} if r["naive"] else {}).items()}
    local = r["in_process"]
    local_by_kind = r.get("in_process_by_kind", {TORCH_FP32: local})
    out: dict[str, float | str | None] = {
        "in-process end to end (decode + preprocess + batched forward) img/s": local["end_to_end_images_per_s"],
        "in-process end to end CPU-ms per image": local["end_to_end_cpu_ms_per_image"],
        # both sides decode, preprocess and run the forward pass: what batching gives end to end
        "in-process end to end, batched / one image at a time, img/s (x)":
            local["end_to_end_images_per_s"] / local["one_image_end_to_end_images_per_s"],
        "preprocessing CPU-ms per image, normalised per image (as served)": local.get("preprocess_cpu_ms_per_image"),
        "preprocessing CPU-ms per image, uint8 batch normalised once (rejected)": local.get(
            "preprocess_uint8_batch_normalised_once_cpu_ms_per_image")}
    for kind, x in local_by_kind.items():
        if kind != TORCH_FP32:
            out[f"in-process end to end, {_kind(kind)}, img/s"] = x["end_to_end_images_per_s"]
    served = {spec: judged(rows) for spec, rows in r["served"].items()}
    for spec, rows in served.items():
        stored = r["ratios"]["by_mode"].get(spec, {})
        if "served_kind" in stored:
            sk, nk = stored["served_kind"], stored["naive_kind"]
        else:
            sk, nk = served_kind(mode_settings(spec, cfg.get("serve_set", [])), cfg.get("export", False)), TORCH_FP32
        ratios = mode_ratios(rows, k, sk, nk, local_by_kind.get(nk, local), naive_by_kind.get(nk))
        if "served_over_naive_at_saturation" in ratios:
            pair = f"both {_kind(sk)}" if sk == nk else f"served {_kind(sk)} / naive {_kind(nk)}"
            out[f"{spec}: served / naive ({pair}), img/s at saturation (x)"] = ratios["served_over_naive_at_saturation"]
        out[f"{spec}: server CPU-ms per image at saturation"] = ratios["server_cpu_ms_per_image_at_saturation"]
        pair = f"both {_kind(sk)}" if sk == nk else f"served {_kind(sk)} / in-process {_kind(nk)}"
        out[f"{spec}: {k} images per request / in-process end to end ({pair}), img/s (x)"] = \
            ratios[f"x{k}_over_in_process_end_to_end"]
    points = [("naive" if kind == TORCH_FP32 else f"naive {_kind(kind)}", rows) for kind, rows in naive_by_kind.items()]
    for mode, rows in [*points, *served.items()]:
        for row in rows:
            at = f"{mode} c={row['concurrency']} x{row['images_per_request']}"
            if not row["valid"]:  # no steady state inside the window: no figure of it counts
                out[f"{at}: img/s"] = INVALID
                continue
            out[f"{at}: img/s"] = row["images_per_s"]
            out[f"{at}: p50 ms"], out[f"{at}: p99 ms"] = row["p50_ms"], row["p99_ms"]
            if not row["images_per_s"]:  # no work done inside the window: no cost to show
                continue
            out[f"{at}: server CPU-ms/img"] = row["server_cpu_ms_per_image"]
            if "mean_batch" in row:
                out[f"{at}: mean batch"] = row["mean_batch"]
    return out


def _quantize(r: dict) -> dict[str, float]:
    s = r["static"]
    out = {"int8 / fp32 ONNX Runtime, img/s (x)": s["speedup"],
           "int8 ONNX Runtime / eager PyTorch, img/s (x)": s["int8_images_per_s"] / s["eager_images_per_s"],
           "int8 / fp32 file size (x)": s["size_ratio"], "int8 - fp32 top-1 (points)": s["acc1_delta_points"]}
    if "prune-unstructured" in r:
        p = r["prune-unstructured"]
        out["50% pruned + fine-tuned - dense top-1 (points)"] = (p["acc1_finetuned"] - p["acc1_before"]) * 100
        out["50% pruned / dense gzip size (x)"] = p["pruned_gzip_mb"] / p["dense_gzip_mb"]
    return out


def _reliability(r: dict) -> dict[str, float]:
    s, k = r["soak"], r["replica_kill"]
    out = {"soak: error fraction": s["error_fraction"]}
    if "shed_fraction" in s:  # results from before sheds were counted apart from errors lack it
        out["soak: shed fraction (503 + Retry-After)"] = s["shed_fraction"]
    return {**out, "soak: achieved / target rate (x)": s["achieved_rate"] / s["target_rate"],
            "soak: p99 last third / first third (x)": s["p99_drift"],
            "soak: replica RSS growth (MB)": s["max_rss_growth_mb"],
            "replica kill: failed request fraction": k["failed_fraction"],
            "replica kill: seconds to full replica count": k["time_to_recover_s"]}


def _decode(r: dict) -> dict[str, float]:
    def ratio(kind: str) -> float:  # median after/before over the photos of one format
        rows = [x["after_over_before"] for x in r["cost"] if kind in x["images"] and "digits" not in x["images"]]
        return statistics.median(rows)  # of 2 photos: their mean, not the larger

    digits = {x["images"]: x for x in r["cost"] if x["images"].startswith("digits")}
    out = {"safe / old decode time, digits PNG (x)": digits["digits 32x32 PNG"]["after_over_before"],
           "safe / old decode time, photo PNG (x)": ratio(" PNG"),
           "safe / old decode time, photo JPEG (x)": ratio(" JPEG"),
           "flavour files with other pixels than before": len(r["identity"]["different"])}
    if "fuzz" in r:
        out["fuzz variants decoded in child processes"] = r["fuzz"]["variants"]
        out["fuzz crashes, hangs, slow decodes or foreign exceptions"] = r["fuzz"]["failures"]
    return out


def _train_vs_local(r: dict) -> dict[str, float]:
    out = {}
    for layout, label in (("1x2", "1 worker x 2 threads"), ("2x1", "2 workers x 1 thread")):
        s = r["layouts"].get(layout, {}).get("summary")
        if s is None:
            continue
        out[f"{label}: epoch time, Ray Train / local (x), median of rounds"] = s["epoch_ratio_ray_over_local"]
        out[f"{label}: train pass alone, Ray Train / local (x)"] = s["train_pass_ratio_ray_over_local"]
        out[f"{label}: CPU-ms per image, Ray Train / local (x)"] = s["cpu_per_image_ratio_ray_over_local"]
        out[f"{label}: local img/s (steady)"] = s["images_per_s"]["local"]
        out[f"{label}: Ray Train img/s (steady)"] = s["images_per_s"]["ray"]
        out[f"{label}: start-up to training, local (s)"] = s["startup_s"]["local"]
        out[f"{label}: start-up to training, Ray Train (s)"] = s["startup_s"]["ray"]
        out[f"{label}: other work on the cores during the runs (cores)"] = max(s["other_work_cores"].values())
    out["ray.init, once (s)"] = r["ray_init_s"]
    return {k: v for k, v in out.items() if v == v}  # lockstep runs measure no other work (NaN)


def _ingest(r: dict) -> dict[str, float]:
    out = {"images/s, Ray Data / DataLoader (x)": r["ratio_ray_data_over_dataloader"]}
    if "ray_data" in r and "dataloader" in r:  # results from before the 50k data set carry the ratio alone
        rd, dl = r["ray_data"], r["dataloader"]
        out.update({"CPU-ms per image, Ray Data / DataLoader (x)": r["cpu_ms_ratio_ray_data_over_dataloader"],
                    "Ray Data steady img/s": rd["images_per_s"], "DataLoader steady img/s": dl["images_per_s"],
                    "Ray Data CPU-ms per image": rd["cpu_ms_per_image"],
                    "DataLoader CPU-ms per image": dl["cpu_ms_per_image"],
                    "Ray Data first batch of an epoch (s)": rd["first_batch_s"],
                    "DataLoader first batch of an epoch (s)": dl["first_batch_s"],
                    "Ray Data first batch, cold (s)": rd["first_batch_cold_s"],
                    "DataLoader first batch, cold (s)": dl["first_batch_cold_s"]})
    return out


def _gpu_train(r: dict) -> dict[str, float]:
    """The NVIDIA ratio only where NVIDIA publishes a figure for this GPU's own class (recomputed
    from the GPU's name: results from before this rule set H100/H200 against A100's figure)."""
    from bench.gpu_train import REFERENCE_INPUT, reference_for

    out = {"Ray Train (1 worker) / plain loop, img/s (x)": r["ratios"]["ray_train_over_plain"],
           "plain loop img/s": r["plain_images_per_s"], "Ray Train img/s": r["ray_train_images_per_s"]}
    if ref := reference_for(r.get("gpu")):
        out[f"plain loop (synthetic batch in GPU memory) / NVIDIA published {ref[0]} ({REFERENCE_INPUT}), "
            f"img/s (x)"] = r["plain_images_per_s"] / ref[1]
    return out


def _tensorrt(r: dict) -> dict[str, float]:
    if "skipped" in r:
        return {}
    engine = r.get("precision", "fp16")
    # results from before the eager side matched the engine's precision ran bf16 autocast
    eager = r.get("eager_precision", "bf16 autocast (cudnn.benchmark off)")
    return {f"TensorRT {engine} engine / eager {eager} + channels_last, img/s (x)": r["ratios"]["tensorrt_over_eager_amp"],
            "TensorRT img/s": r["tensorrt_images_per_s"], f"eager {eager} img/s": r["eager_amp_images_per_s"],
            "engine max |logit diff| vs eager fp32": r["parity"]["max_abs_diff"],
            "engine top-1 agreement": r["parity"]["top1_agreement"], "engine build (s)": r["build_s"]}


# --max-ongoing above the most clients (256), as serve_throughput's default is above its own: else
# Serve queues requests outside the replica and the latencies measure that queue. The naive server
# runs its forward pass on the same GPU. The second mode serves the PyTorch weights in bf16.
# Four replicas share the GPU (a quarter each): one replica's request handling and preprocessing
# run on one core, and a GPU answers a batch of 64 ResNet-50 images faster than one core decodes
# and prepares them (the 2026-11-29 H200 run: 1 replica, 107 img/s in batches of 2.2, while the
# batched forward alone ran 4,400 img/s). Measured on the 2-core CPU at 224 px (2026-12-05): a
# one-image request costs the replica 1.8 ms of Serve's request path and 0.56 ms of preprocessing,
# so about 420 img/s per core before any forward pass; x5 the naive server (one image at a time
# ran 183 img/s end to end on the H200) needs 3 replicas or more. The naive server gets 4 threads,
# and runs as each mode does (fp32, then bf16: two sweeps of 3 points). 4 s per point at least
# (warm-up 2 queue rounds, window 3): 12 points of the 2 modes and 6 of the naive server.
SERVE_GPU = ("--model", "resnet50", "--width", "1", "--image-size", "224", "--replicas", "4", "--num-gpus", "0.25",
             "--seconds", "4", "--max-batch-size", "64", "--max-ongoing", "320", "--concurrency", "8", "64", "256", "--modes", "haproxy",
             "haproxy:precision=bf16", "--name", "serve_gpu")
SERVE_HEAVY_MODEL = ("--width", "1", "--image-size", "64")
SERVE_HEAVY = (*SERVE_HEAVY_MODEL, "--export", "--concurrency", "4", "16", "48")
# The options the ingress and batching were chosen from (BENCHMARKS.md keeps the rejected ones).
SERVE_OPTIONS = ("--modes", "proxy:batcher=timeout", "proxy", "proxy_flags", "proxy_grpc", "direct", "haproxy_nometrics",
                 "haproxy:batcher=timeout", "haproxy:backend=onnx", "--name", "serve_options")

BENCHES: dict[str, Bench] = {b.name: b for b in [
    Bench("train_vs_local", "distributed training",
          "Ray Train (1 worker x 2 threads; 2 DDP workers x 1 thread) vs the core's local loop (2 threads), "
          "both sides at once taking turns epoch by epoch (--lockstep), start-ups one after the other, "
          "5 rounds, one Ray instance up throughout",
          ("--lockstep", "--rounds", "5", "--epochs", "6"), ("--lockstep", "--rounds", "1", "--epochs", "2", "--layouts", "1x2"),
          _train_vs_local, minutes=12),
    Bench("ingest", "distributed training",
          "50,000 composed 48 px digits in Parquet shards: Ray Data vs a DataLoader, 2 CPUs each, steady state",
          ("--epochs", "6"), ("--epochs", "1", "--count", "12000"), _ingest, minutes=15),
    Bench("tune_asha", "sweeps", "ASHA vs the same seeded trials without early stopping (FIFO); the repeats "
          "alternate which sweep runs first (and pays the cold start)",
          ("--samples", "32", "--epochs", "8"), ("--samples", "2", "--epochs", "2", "--data", "digits"),
          lambda r: {"epochs trained, ASHA / FIFO (x)": r["ratios"]["epochs_asha_over_fifo"],
                     "best val top-1, ASHA / FIFO (x)": r["ratios"]["best_acc_asha_over_fifo"],
                     "best val top-1, FIFO - ASHA (points)": r["ratios"].get(
                         "best_acc_fifo_minus_asha_points",
                         100 * (r["results"]["fifo"]["best_val_acc1"] - r["results"]["asha"]["best_val_acc1"])),
                     "wall time, ASHA / FIFO (x)": r["ratios"]["seconds_asha_over_fifo"]}, minutes=14, repeats=2),
    Bench("recipe", "training speed",
          "the default recipe (configs/digits.yaml, `make local`) over 5 seeds, one process each",
          ("--seeds", "5"), ("--seeds", "1"),
          lambda r: {"mean test top-1 over seeds": r["test_acc1_mean"], "lowest test top-1": r["test_acc1_min"],
                     "training wall, median (s)": r["train_seconds_median"],
                     "training wall, slowest seed (s)": r["train_seconds_max"]}, minutes=3),
    Bench("trial_startup", "sweeps", "per-trial start-up: one-worker trials in the trial's process vs on a TorchTrainer",
          ("--trials", "4", "--rounds", "5"), ("--trials", "2", "--rounds", "1"),
          lambda r: {"per-trial start-up, in the trial (s)": r["medians"]["in_trial"]["startup_s"],
                     "per-trial start-up, TorchTrainer (s)": r["medians"]["torch_trainer"]["startup_s"],
                     "wall per trial, TorchTrainer / in the trial (x)":
                         r["ratios"]["per_trial_wall_torch_trainer_over_in_trial"]}, minutes=10),
    Bench("serve_throughput", "inference service",
          "the Serve app behind HAProxy (imgcls's ingress) and behind Serve's default proxy vs a naive one-image "
          "FastAPI server vs in-process end to end, ResNet-18 1/4 width, 32 px; load generator in its own process; "
          "each point warmed up 2 queue rounds and measured over 3 at least",
          ("--seconds", "4", "--modes", "proxy", "haproxy"),
          ("--seconds", "2", "--concurrency", "1", "8", "--modes", "haproxy"), _serve, minutes=4, repeats=5),
    Bench("serve_heavy", "inference service",
          "the same with a model whose forward pass dominates: ResNet-18 full width, 64 px, behind HAProxy, one "
          "core's worth each (1 replica x 1 thread vs a 1-thread naive server running the mode's backend and "
          "precision); the version has its checked ONNX export, so serve.backend auto may choose ONNX Runtime; the "
          "replica held to PyTorch; and PyTorch in bf16 (serve.precision=bf16, this CPU's AVX512-BF16)",
          (*SERVE_HEAVY, "--seconds", "4", "--modes", "haproxy", "haproxy:backend=torch", "haproxy:backend=torch,precision=bf16",
           "--name", "serve_heavy"),
          (*SERVE_HEAVY_MODEL, "--seconds", "2", "--concurrency", "8", "--modes", "haproxy", "--name", "serve_heavy"),
          _serve, minutes=12, module="serve_throughput", repeats=5),
    Bench("serve_heavy_2cores", "inference service",
          "serve_heavy with both cores each: 2 replicas x 1 thread vs the naive server with 2 threads (running "
          "the mode's backend and precision); serve.backend auto (fp32), and the PyTorch weights in bf16 "
          "(serve.precision=bf16, this CPU's AVX512-BF16)",
          # 8 s per point at least: at 48 clients x 1 image a request takes about 1 s, so a point spans
          # about 8 rounds of answers; at 48 x 8 images a round is 4-8 s, and the window stretches to 3
          # rounds after a warm-up of 2 (bench.loadgen)
          (*SERVE_HEAVY, "--seconds", "8", "--replicas", "2", "--modes", "haproxy",
           "haproxy:backend=torch,precision=bf16", "--name", "serve_heavy_2cores"),
          (*SERVE_HEAVY_MODEL, "--replicas", "2", "--seconds", "2", "--concurrency", "8", "--modes", "haproxy",
           "--name", "serve_heavy_2cores"), _serve, minutes=9, module="serve_throughput", repeats=5),
    Bench("serve_options", "inference service",
          "the ingress and batching options evaluated: Serve's proxy (timeout-sealed and dynamic batches), the "
          "proxy with Serve's performance flags, the proxy over gRPC, direct ingress, HAProxy without metrics, HAProxy with timeout-sealed batches, ONNX Runtime",
          ("--seconds", "4", *SERVE_OPTIONS), ("--seconds", "2", "--concurrency", "8", *SERVE_OPTIONS[:3], "--name",
                                                "serve_options"), _serve, minutes=12, module="serve_throughput",
          repeats=5),
    Bench("quantize", "export and compression",
          "int8 (ONNX Runtime static) vs fp32 ONNX Runtime vs eager, ResNet-18 1/4 width at 32 px (pinned); pruning",
          (), ("--epochs", "1", "--repeats", "3", "--no-prune"), _quantize, minutes=1.5),
    Bench("distill", "export and compression", "student with vs without knowledge distillation, same seeds",
          (), ("--seeds", "0", "--epochs", "2", "--teacher-epochs", "2"),
          lambda r: {"KD - plain student top-1, mean over seeds (points)": r["kd_minus_plain_mean"] * 100,
                     "plain student top-1": r["plain_test_acc1"]["mean"],
                     "KD student top-1": r["kd_test_acc1"]["mean"]}, minutes=6),
    Bench("reliability", "benchmarks and reliability",
          "Serve app soaked at 70% of measured capacity; one of 2 replicas killed under load",
          ("--soak-seconds", "300"), ("--soak-seconds", "30", "--window", "5"), _reliability, minutes=6),
    Bench("decode", "data", "safe image decoding (Pillow alone) vs the old torchvision path per image; fuzz run",
          ("--repeats", "5"), ("--repeats", "1", "--digits", "50", "--random-flips", "24"), _decode, minutes=2),
    Bench("gpu_train", "benchmarks and reliability",
          "ResNet-50 224 px, AMP + channels_last, synthetic batch in GPU memory: Ray Train (1 GPU worker) vs a plain "
          "PyTorch loop, 5 alternated repeats; vs NVIDIA's published figure (ImageNet through DALI) only on the GPU "
          "class it was published for (A100, V100)",
          (), ("--steps", "10", "--warmup", "5", "--repeats", "1"), _gpu_train, gpu=True, minutes=6),
    Bench("serve_gpu", "benchmarks and reliability",
          "ResNet-50 224 px served with batching by 4 replicas sharing one GPU vs a naive one-process server "
          "and the in-process batched forward on the same GPU",
          SERVE_GPU, (*SERVE_GPU, "--seconds", "3"), _serve, gpu=True, minutes=6, module="serve_throughput"),
    Bench("tensorrt", "export and compression",
          "ResNet-50 224 px, batch 64: a TensorRT fp16 engine (jobs.export --formats tensorrt) vs eager PyTorch in "
          "fp16 autocast + channels_last (cudnn.benchmark) on one GPU, 5 alternated repeats",
          (), ("--seconds", "2", "--repeats", "1"), _tensorrt, gpu=True, minutes=4),
]}


def run_one(bench: Bench, quick: bool, log=print, keep: Path | None = None, repeat: int = 0) -> dict:
    """One run of one benchmark in a fresh process; its result dict (with a 'seconds' key).
    ``repeat``: which repeat this is (0-based; the benchmark reads IMGCLS_BENCH_REPEAT to alternate
    its order). ``keep``: a folder to write the raw result to, as <name>.json (atomically)."""
    with tempfile.TemporaryDirectory(prefix=f"imgcls-bench-{bench.name}-") as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "IMGCLS_BENCH_OUT": str(out), "IMGCLS_BENCH_REPEAT": str(repeat)}
        started = time.perf_counter()
        done = subprocess.run(bench.command(quick), cwd=REPO, env=env)
        seconds = time.perf_counter() - started
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"bench.{bench.name} exited {done.returncode} after {seconds:.0f} s without a result")
        result = json.loads(out.read_text())
    if keep is not None:
        keep_result(bench, result, keep)
    result["seconds"] = seconds
    log(f"[bench.run] {bench.name}: done in {seconds:.0f} s")
    return result


def keep_result(bench: Bench, result: dict, folder: Path = RESULTS) -> Path:
    """``result`` as ``folder/<name>.json``, written to a temporary file and renamed over it."""
    return write_atomic(folder / f"{bench.name}.json", json.dumps(result, indent=1))


def summarize(bench: Bench, runs: list[dict]) -> dict:
    """Median, min and max of each figure over the runs (``invalid`` values are counted apart, not
    in the median). Runs that were all skipped (``{"skipped": why}``) give the reason, no figures."""
    measured = [r for r in runs if "skipped" not in r]
    base = {"runs": len(runs), "machine": runs[0]["machine"], "seconds_median": median([r["seconds"] for r in runs])}
    if not measured:
        return {**base, "skipped": runs[-1]["skipped"]}
    per_run = [bench.figures(r) for r in measured]
    labels = list(dict.fromkeys(label for f in per_run for label in f))  # every run's, in the order first seen
    figures = {}
    for label in labels:
        given = [f[label] for f in per_run if f.get(label) is not None]
        values = [v for v in given if v != INVALID]
        figures[label] = {"median": median(values) if values else None, "min": min(values, default=None),
                          "max": max(values, default=None), "values": values}
        if invalid := len(given) - len(values):
            figures[label]["invalid"] = invalid
    return {**base, "figures": figures, "runs": len(measured), "machine": measured[0]["machine"]}


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    if value != 0 and abs(value) < 0.01:
        return f"{value:.3g}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _machine_line(m: dict, when: bool = True) -> str:
    gpu = m.get("gpu") or "no GPU"
    line = (f"{m['cpu']} x{m['cpu_count']} logical CPUs, {gpu}; Python {m['python']}, torch {m['torch']}, "
            f"torchvision {m['torchvision']}, Ray {m['ray']}, MLflow {m['mlflow']}")
    return f"{line}; measured {m['when']}" if when else line


def render(state: dict) -> str:
    """BENCHMARKS.md from the harness state (every benchmark's last summary). A summary's ``notes``
    are printed under its machine line; its ``stale`` maps figure labels to why the figure no
    longer stands (a rerun of the benchmark replaces the summary, and with it both)."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench.run` (bench/run.py); do not edit by hand. Every ratio is measured side",
        "by side in one run of its benchmark; each figure is the median over the runs listed (min..max in",
        "brackets). A load point with no steady state inside its window (p50 latency as long as the window,",
        "or nothing answered in it) is invalid: it counts in no median and no pick. Raw results:",
        "bench/results/harness.json. Reproduce everything (each benchmark its own number of runs, `--list`) with",
        "",
        "```bash",
        "python -m bench.run",
        "```",
        "",
        "or one row's benchmark with the command under its heading (`--help` lists its options).",
        "",
    ]
    machines = sorted({_machine_line(s["machine"], when=False) for s in state.values() if s.get("machine")})
    if machines:
        lines += ["Machines:", ""]
        lines += [f"- {m}" for m in machines]
        lines.append("")
    for name, bench in BENCHES.items():
        summary = state.get(name)
        cmd = shlex.join(["python", *bench.command()[1:]])
        lines += [f"## {name}: {bench.what}", "", f"Capability: {bench.issue}. Command: `{cmd}`", ""]
        if summary is None or "figures" not in summary:
            reason = (summary or {}).get("skipped") or "not run yet"
            where = f" (run on {_machine_line(summary['machine'])})" if (summary or {}).get("machine") else ""
            lines += [f"Not measured: {reason.rstrip('.')}{where}.", ""]
            continue
        m = summary["machine"]
        quick = " Quick settings (`--quick`): a check of the harness, not figures to quote." if summary.get("quick") else ""
        lines += [f"Measured on: {_machine_line(m)}; {summary['runs']} run(s), "
                  f"{summary['seconds_median']:.0f} s each (median).{quick}", ""]
        for note in summary.get("notes", []):
            lines += [f"Note: {note}", ""]
        lines += ["| figure | median | min..max | runs |", "| --- | ---: | --- | ---: |"]
        stale = summary.get("stale", {})
        for label, f in summary["figures"].items():
            shown = f"{label} (stale: {stale[label]})" if label in stale else label
            runs = f"{len(f['values'])}" + (f" (+{f['invalid']} invalid)" if f.get("invalid") else "")
            if f["median"] is None and f.get("invalid"):
                lines.append(f"| {shown} | invalid | n/a | {runs} |")
            else:
                lines.append(f"| {shown} | {_fmt(f['median'])} | {_fmt(f['min'])}..{_fmt(f['max'])} | {runs} |")
        lines.append("")
    return "\n".join(lines)


def write(state: dict, state_file: Path, markdown: Path) -> None:
    write_atomic(state_file, json.dumps(state, indent=1))
    write_atomic(markdown, render(state))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run these benchmarks only")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs of each benchmark (figures are medians); default: each benchmark's own (--list)")
    parser.add_argument("--quick", action="store_true",
                        help="short settings: checks the harness, not figures (bench/results/<name>.json is kept)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--render-only", action="store_true", help="rewrite BENCHMARKS.md from --state, run nothing")
    parser.add_argument("--markdown", type=Path, default=MARKDOWN, help="where to write BENCHMARKS.md")
    parser.add_argument("--state", type=Path, default=HARNESS, help="harness results (read, updated, written)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where each benchmark's last raw result goes, as <name>.json, once all its runs succeeded")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")

    if args.list:
        for b in BENCHES.values():
            runs = args.repeats or b.repeats
            print(f"{b.name:<18} ~{b.minutes:>4.1f} min x {runs} run(s){' (GPU)' if b.gpu else '':<7} {b.what}")
        return 0

    if args.render_only:
        write_atomic(args.markdown, render(json.loads(args.state.read_text())))
        print(f"[bench.run] wrote {args.markdown} from {args.state}")
        return 0

    import torch

    has_gpu = torch.cuda.is_available()
    selected = [BENCHES[n] for n in (args.only or BENCHES)]
    state = json.loads(args.state.read_text()) if args.state.exists() else {}
    print(f"[bench.run] {_machine_line(machine())}")
    failed = []
    for bench in selected:
        if bench.gpu and not has_gpu:
            print(f"[bench.run] {bench.name}: skipped, needs a CUDA device (none here)")
            if "figures" not in state.get(bench.name, {}):
                state[bench.name] = {"skipped": f"needs a CUDA device; the last harness run ({machine()['when']}) "
                                                "had none"}
            continue
        repeats = args.repeats or bench.repeats
        print(f"[bench.run] {bench.name}: {repeats} run(s), about {bench.minutes * repeats:.0f} min here")
        try:
            runs = [run_one(bench, args.quick, repeat=k) for k in range(repeats)]
        except RuntimeError as exc:  # bench/results/<name>.json keeps the last complete run's result
            print(f"[bench.run] {exc}")
            failed.append(bench.name)
            continue
        summary = summarize(bench, runs)
        if "figures" not in summary and "figures" in state.get(bench.name, {}):
            print(f"[bench.run] {bench.name}: skipped ({summary['skipped']}); its earlier figures stay")
            continue
        if not args.quick:  # every run succeeded: the last one's raw result stays beside harness.json
            keep_result(bench, {k: v for k, v in runs[-1].items() if k != "seconds"}, args.results)
        state[bench.name] = {**summary, "quick": args.quick, "raw": runs}
        write(state, args.state, args.markdown)  # after each benchmark: a crash keeps the rest
    write(state, args.state, args.markdown)
    print(f"[bench.run] wrote {args.markdown} and {args.state}")
    if failed:
        print(f"[bench.run] FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
