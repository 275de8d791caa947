# Source this file (". cluster/local/env.sh") to talk to the local cluster that start.sh runs.
# Every value can be set beforehand to move ports or the state folder.
export IMGCLS_STATE_DIR="${IMGCLS_STATE_DIR:-$(pwd)/.imgcls}"   # pids, logs, the MLflow store
export RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
export RAY_GCS_PORT="${RAY_GCS_PORT:-6380}"
export MLFLOW_PORT="${MLFLOW_PORT:-5000}"
export SERVE_PORT="${SERVE_PORT:-8000}"
export RAY_METRICS_PORT="${RAY_METRICS_PORT:-8080}"             # Prometheus: Ray's, Serve's and imgcls_* metrics
# Two addresses, as Ray reads them: ray.init, `serve run` and `ray status` want the cluster (GCS)
# address in RAY_ADDRESS and refuse an http one; `ray job submit` / jobs.submit take the
# dashboard's from RAY_API_SERVER_ADDRESS first, `serve deploy|status|shutdown` from
# RAY_DASHBOARD_ADDRESS.
export RAY_ADDRESS="127.0.0.1:${RAY_GCS_PORT}"
export RAY_API_SERVER_ADDRESS="http://127.0.0.1:${RAY_DASHBOARD_PORT}"
export RAY_DASHBOARD_ADDRESS="$RAY_API_SERVER_ADDRESS"
export RAY_AUTH_MODE=token                                       # token auth stays on (~/.ray/auth_token)
export MLFLOW_TRACKING_URI="http://127.0.0.1:${MLFLOW_PORT}"
export IMGCLS_SERVE_URL="http://127.0.0.1:${SERVE_PORT}"
# One machine is never preempted: no watcher actor for it in every Ray Train run (Ray 2.60's
# starts one per run and logs a core_worker.cc error about its restart arguments each time).
# Ray Train reads this in the job's driver and passes it to its controller and workers.
export RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="${RAY_TRAIN_ENABLE_PREEMPTION_WATCHER:-0}"
# Ray starts its workers at niceness 15, so the raylet, GCS and agents preempt training ranks
# mid-step: 1.2-1.3x slower train passes on 2 cores (jobs/common.py, WORKER_NICENESS_ENV).
# The raylet reads this when `ray start` starts it.
export RAY_worker_niceness="${RAY_worker_niceness:-0}"
# The Serve ingress (jobs/common.py, SERVE_INGRESS_ENV; measured in BENCHMARKS.md, serve_throughput):
# throughput-optimized Serve (replicas answer HTTP themselves) behind HAProxy on $SERVE_PORT.
# Read by the Serve controller and replicas, which inherit the environment of `ray start`.
# HAProxy's statistics page and Prometheus exporter listen on these ports.
export RAY_SERVE_THROUGHPUT_OPTIMIZED="${RAY_SERVE_THROUGHPUT_OPTIMIZED:-1}"
export RAY_SERVE_ENABLE_HA_PROXY="${RAY_SERVE_ENABLE_HA_PROXY:-1}"
export RAY_SERVE_HAPROXY_STATS_PORT="${RAY_SERVE_HAPROXY_STATS_PORT:-8404}"
export RAY_SERVE_HAPROXY_METRICS_PORT="${RAY_SERVE_HAPROXY_METRICS_PORT:-9101}"
# One node, so nothing to drain to: on SIGTERM (stop.sh) `ray start --block` would first ask the
# GCS, which the same signal stops, to drain the node and wait 30 s for it; and a stopping Serve
# replica would stay open 30 s for load balancers on other nodes (jobs/common.py, SERVE_DRAIN_ENV).
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
export RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="${RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S:-2}"
