#!/usr/bin/env bash
# The GPU checks in one go, on a machine with a CUDA device (the workplace's lent H200, say):
# the tests that need CUDA, then the GPU benchmarks through the harness (bench.run), which
# update bench/results/harness.json and BENCHMARKS.md in this checkout.
#
#     OUT=/some/dir bash bench/gpu_device.sh        # OUT: where the log and the results are copied
#     STEPS="pytest serve_gpu" bash bench/gpu_device.sh   # some of the steps only
#
# The steps' limits add up to more than the 600 s a lent device runs one command, so there it
# takes three calls, most needed first: STEPS="pytest serve_gpu" (issue: served / naive on a GPU),
# then STEPS=tensorrt (ends in seconds where torch-tensorrt is missing), then STEPS=gpu_train
# (5 alternated repeats: about 330 s).
#
# It expects python3 with torch + torchvision (CUDA), numpy, pyarrow, pandas, pillow, scikit-learn,
# aiohttp, grpcio, pytest. What that machine lacks (Ray 2.60, MLflow 3.17 and their own
# dependencies) comes as one archive, .whl/site.tar.xz, unpacked to /tmp/site and put on
# PYTHONPATH (the Ray wheel alone is 79 MB, over the 64 MiB a device call may carry; the archive
# is an install of the pinned wheels for Python 3.12 without Ray's Java jar, RLlib, Ray LLM and
# the dashboard's and MLflow's web UI builds: 48 MB). Wheels beside it in .whl/ replace a package
# of the archive (grpcio-reflection 1.84.0: the 1.85.1 in the archive refuses the H200 image's
# grpcio 1.84.0, and Ray Serve imports it). .whl/ is ignored (.git/info/exclude); to remake it:
#   pip install --target /tmp/site312 --no-compile --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux_2_28_x86_64 --platform any -c <(.venv/bin/pip freeze) \
#       "ray[serve,train]==2.60.0" mlflow==3.17.2 python-multipart
#   then keep only what the H200 image lacks (ray, mlflow, mlflow-skinny, mlflow-tracing, sqlalchemy,
#   alembic, mako, cryptography, cffi, pycparser, databricks-sdk and google-*, opencensus*,
#   opentelemetry-*, pydantic*, annotated-types, typing-inspection, fastapi, starlette, uvicorn,
#   httptools, watchfiles, websockets, python-multipart, python-dotenv, jsonschema*, referencing,
#   rpds-py, aiohttp-cors, colorful, smart-open, mmh3, grpcio-reflection, virtualenv, distlib,
#   platformdirs, python-discovery, gitpython, gitdb, smmap, importlib-metadata, cachetools,
#   sqlparse, tensorboardx, protobuf), drop ray/jars ray/rllib ray/llm ray/dashboard/client/build
#   mlflow/server/js and bin/, and `tar -C /tmp/site312 -cf - . | xz -9 > .whl/site.tar.xz`.
# Where Ray and MLflow are installed already (a project venv), no archive is needed.
#
# Every step has its own time limit, so one that hangs cannot take the others' time; the results
# are copied to $OUT after each step, so a later failure keeps what came before.
set -u -o pipefail
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STEPS=${STEPS:-pytest gpu_train serve_gpu tensorrt}  # a subset reruns only those
want() { [[ " $STEPS " == *" $1 "* ]]; }
SUMMARY=()
FAILED=0

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    echo; echo "=== $name (limit ${limit} s): $*"
    local started=$SECONDS
    timeout -k 15 "$limit" "$@"
    local rc=$?
    local took=$((SECONDS - started))
    [ $rc -eq 124 ] && echo "=== $name: TIMED OUT after ${limit} s"
    echo "=== $name: rc=$rc in ${took} s"
    SUMMARY+=("$name rc=$rc ${took}s")
    [ $rc -eq 0 ] || FAILED=1
    return $rc
}

# A step's Ray cluster ends with its driver; after a failed step, stop what it may have left
# (a raylet, workers holding GPU memory), but only where no Ray ran before this script did.
RAY_BEFORE=$(pgrep -x raylet || true)
stop_ray() {
    [ -z "$RAY_BEFORE" ] || return 0
    pgrep -x raylet >/dev/null || return 0
    echo "=== stopping the Ray processes the failed step left"
    timeout 60 "$PY" -m ray.scripts.scripts stop --force || true
}

collect() {
    cp -f bench/results/harness.json "$OUT/harness.json" 2>/dev/null || true
    cp -f BENCHMARKS.md "$OUT/BENCHMARKS.md" 2>/dev/null || true
}

main() {
    if [ -f .whl/site.tar.xz ]; then
        step unpack 90 bash -c 'rm -rf /tmp/site && mkdir -p /tmp/site && tar -C /tmp/site -xJf .whl/site.tar.xz' || return 1
        export PYTHONPATH=/tmp/site:$PWD
        if ls .whl/*.whl >/dev/null 2>&1; then  # wheels that replace a package of the archive
            step wheels 60 bash -c 'for w in .whl/*.whl; do n=$(basename "$w" | cut -d- -f1); rm -rf /tmp/site/"$n"-*.dist-info; done
                "$0" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl' "$PY" || return 1
        fi
    else
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
    step versions 60 bash -c "nvidia-smi || true; $PY - <<'EOF'
import importlib.metadata as md, os, platform, torch
print('python', platform.python_version(), 'cpus', os.cpu_count())
print({n: md.version(n) for n in ('torch', 'torchvision', 'numpy', 'ray', 'mlflow', 'protobuf', 'pydantic', 'fastapi')})
print('cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'bf16', torch.cuda.is_bf16_supported())
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
EOF" || return 1

    want pytest && step pytest_gpu 120 "$PY" -m pytest -p no:cacheprovider -rA --junitxml="$OUT/pytest_gpu.xml" \
        tests/unit/engine/test_loop.py tests/unit/test_serving.py::test_device_resolution tests/unit/test_tensorrt.py

    # Two harness runs, not one `--only gpu_train serve_gpu`: each gets its own limit. Both update
    # bench/results/harness.json and BENCHMARKS.md (the second reads what the first wrote).
    want gpu_train && { step bench_gpu_train 420 "$PY" -m bench.run --only gpu_train || stop_ray; collect; }
    # Serve's per-request log lines would reach this driver (the load generator) thousands a second.
    # One harness run (its sweeps alternate and take medians inside): the fp32 and bf16 naive sweeps take ~360 s.
    want serve_gpu && { RAY_SERVE_LOG_TO_STDERR=0 step bench_serve_gpu 450 "$PY" -m bench.run --only serve_gpu --repeats 1 || stop_ray; collect; }
    # TensorRT engines need torch-tensorrt (the tensorrt extra; TensorRT's libraries are far more than the 64 MiB a
    # device call carries); where the machine lacks it, the test above and this step say so and skip.
    want tensorrt && { step bench_tensorrt 300 "$PY" -m bench.run --only tensorrt; collect; }
    echo; echo "=== summary"; printf '  %s\n' "${SUMMARY[@]}"
    return $FAILED
}

main 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
