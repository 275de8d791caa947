# Source this file (". cluster/local/env.sh") to talk to the local cluster that start.sh runs.
# Every value can be set beforehand to move ports or the state folder.
export IMGCLS_STATE_DIR="${IMGCLS_STATE_DIR:-$(pwd)/.imgcls}"   # pids, logs, the MLflow store
export RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
export RAY_GCS_PORT="${RAY_GCS_PORT:-6380}"
export MLFLOW_PORT="${MLFLOW_PORT:-5000}"
export SERVE_PORT="${SERVE_PORT:-8000}"
export RAY_ADDRESS="http://127.0.0.1:${RAY_DASHBOARD_PORT}"      # `ray job submit` / jobs.submit
export RAY_AUTH_MODE=token                                       # token auth stays on (~/.ray/auth_token)
export MLFLOW_TRACKING_URI="http://127.0.0.1:${MLFLOW_PORT}"
export IMGCLS_SERVE_URL="http://127.0.0.1:${SERVE_PORT}"
