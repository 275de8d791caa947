#!/usr/bin/env bash
# Start a local Ray head (token auth on, dashboard on 127.0.0.1) and a real MLflow tracking
# server (sqlite backend store, local artifact folder, 127.0.0.1), unless they already run.
# Pids and logs go to $IMGCLS_STATE_DIR (default .imgcls/); stop.sh ends exactly these.
set -euo pipefail
cd "$(dirname "$0")/../.."
. cluster/local/env.sh
BIN="$(pwd)/${IMGCLS_VENV:-.venv}/bin"
export PATH="$BIN:$PATH"
mkdir -p "$IMGCLS_STATE_DIR"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for NAME URL SECONDS PIDFILE: any HTTP answer (even 401) means it is up
    local deadline=$((SECONDS + $3))
    until curl -s -o /dev/null -m 2 "$2"; do
        if ! alive "$4"; then echo "error: $1 exited; see ${4%.pid}.log" >&2; tail -20 "${4%.pid}.log" >&2; exit 1; fi
        if [ $SECONDS -ge $deadline ]; then echo "error: $1 not answering at $2 after $3 s" >&2; exit 1; fi
        sleep 0.25
    done
}

# Both services start at once and are then waited for: neither needs the other to be up.
# MLflow first: its server takes longest to answer (it creates the sqlite store's tables).
started_mlflow=0
if alive "$IMGCLS_STATE_DIR/mlflow.pid"; then
    echo "MLflow server already running (pid $(cat "$IMGCLS_STATE_DIR/mlflow.pid")) at $MLFLOW_TRACKING_URI"
else
    # The production server script, here with sqlite + a local artifact folder and one worker.
    MLFLOW_BACKEND_STORE_URI="sqlite:///$IMGCLS_STATE_DIR/mlflow.db" MLFLOW_HOST=127.0.0.1 \
        MLFLOW_ARTIFACTS_DESTINATION="$IMGCLS_STATE_DIR/mlartifacts" MLFLOW_WORKERS=1 MLFLOW_BIN="$BIN/mlflow" \
        setsid bash cluster/mlflow/server.sh > "$IMGCLS_STATE_DIR/mlflow.log" 2>&1 < /dev/null &
    echo $! > "$IMGCLS_STATE_DIR/mlflow.pid"
    started_mlflow=1
fi
# Token auth is on (RAY_AUTH_MODE=token) and `ray start` does not create a token: make one with
# Ray's own CLI when this user has none, readable by this user only (MLflow starts meanwhile).
# (A token of your own: RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, as Ray reads them.)
TOKEN_FILE="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
if [ -z "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ] && [ ! -s "$TOKEN_FILE" ]; then
    (umask 077 && ray get-auth-token --generate > /dev/null 2>&1)
    echo "Ray auth token created in $TOKEN_FILE (mode 600)"
fi
if [ -f "$TOKEN_FILE" ]; then chmod 600 "$TOKEN_FILE"; fi

started_ray=0
if alive "$IMGCLS_STATE_DIR/ray.pid"; then
    echo "Ray head already running (pid $(cat "$IMGCLS_STATE_DIR/ray.pid")), dashboard $RAY_API_SERVER_ADDRESS"
else
    # --block keeps the head in the foreground of its own session: stop.sh ends that session only.
    RAY_ADDRESS= setsid ray start --head --block --port="$RAY_GCS_PORT" --num-cpus="${RAY_NUM_CPUS:-4}" \
        --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$RAY_DASHBOARD_PORT" \
        --metrics-export-port="$RAY_METRICS_PORT" --disable-usage-stats > "$IMGCLS_STATE_DIR/ray.log" 2>&1 < /dev/null &
    echo $! > "$IMGCLS_STATE_DIR/ray.pid"
    started_ray=1
fi
if [ "$started_mlflow" = 1 ]; then
    wait_for "MLflow server" "$MLFLOW_TRACKING_URI/health" 120 "$IMGCLS_STATE_DIR/mlflow.pid"
    echo "MLflow server started (pid $(cat "$IMGCLS_STATE_DIR/mlflow.pid")) at $MLFLOW_TRACKING_URI"
fi
if [ "$started_ray" = 1 ]; then
    wait_for "Ray head" "$RAY_API_SERVER_ADDRESS/api/version" 180 "$IMGCLS_STATE_DIR/ray.pid"
    echo "Ray head started (pid $(cat "$IMGCLS_STATE_DIR/ray.pid")), cluster $RAY_ADDRESS"
fi
echo "Ray dashboard $RAY_API_SERVER_ADDRESS: sign in with the token in $TOKEN_FILE (\`ray get-auth-token\` prints it)"
