#!/usr/bin/env bash
# The imgcls MLflow tracking server (UI, REST API, model registry, proxied artifacts).
#
# Production: a PostgreSQL backend store and an S3(-compatible) artifact store. See README.md here.
#   export PGHOST=db.internal PGUSER=mlflow PGDATABASE=mlflow   # PGPASSWORD or ~/.pgpass: the password
#   export MLFLOW_ARTIFACTS_DESTINATION=s3://<bucket>/mlflow     # AWS_* creds or an instance role
#   cluster/mlflow/server.sh
# Local / tests: with neither PGHOST nor MLFLOW_BACKEND_STORE_URI it uses sqlite under
# $MLFLOW_STATE_DIR (default ~/.imgcls/mlflow) and a local artifact folder there.
#
# Environment (all optional):
#   MLFLOW_BACKEND_STORE_URI      any SQLAlchemy URI (sqlite:///..., postgresql+psycopg2://user@host:5432/db);
#                                 default: postgresql+psycopg2 built from PGHOST/PGPORT/PGUSER/PGDATABASE
#                                 when PGHOST is set, else sqlite:///$MLFLOW_STATE_DIR/mlflow.db.
#                                 Name the driver: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3,
#                                 and the driver installed (README.md) is psycopg2-binary
#   PGHOST PGPORT PGUSER PGDATABASE PGPASSWORD   libpq's own variables: the password stays out of
#                                 the URI and so out of `ps` and logs
#   MLFLOW_ARTIFACTS_DESTINATION  s3://bucket/prefix (or a local folder); default $MLFLOW_STATE_DIR/mlartifacts
#   MLFLOW_S3_ENDPOINT_URL        for MinIO/Ceph/R2 etc. (read by MLflow's S3 client), with
#   AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION   (or an instance profile / IRSA)
#   MLFLOW_HOST                   interface to bind; default 127.0.0.1. A cluster's workers log to
#                                 it, so on a cluster bind the private address and firewall it
#                                 (security group / NetworkPolicy) to the cluster's nodes
#   MLFLOW_PORT                   default 5000
#   MLFLOW_WORKERS                server worker processes; default 4
#   MLFLOW_ALLOWED_HOSTS          --allowed-hosts (Host headers accepted), e.g. mlflow.internal:5000
#   MLFLOW_BIN                    the mlflow executable; default: the repository's .venv, else PATH
# Extra arguments are passed to `mlflow server` as they are.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

state="${MLFLOW_STATE_DIR:-$HOME/.imgcls/mlflow}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-4}"

if [ -n "${MLFLOW_BACKEND_STORE_URI:-}" ]; then
    backend="$MLFLOW_BACKEND_STORE_URI"
elif [ -n "${PGHOST:-}" ]; then
    backend="postgresql+psycopg2://${PGUSER:-mlflow}@${PGHOST}:${PGPORT:-5432}/${PGDATABASE:-mlflow}"
else
    backend="sqlite:///$state/mlflow.db"
fi
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$state/mlartifacts}"

# A password written into the URI would show in `ps` and in MLflow's own log lines.
if [[ "$backend" =~ ^[a-z0-9+]+://[^/@]*:[^/@]*@ ]]; then
    echo "error: MLFLOW_BACKEND_STORE_URI holds a password; drop it from the URI and set PGPASSWORD (or ~/.pgpass) instead" >&2
    exit 2
fi

case "$backend" in
    sqlite:///*) mkdir -p "$(dirname "${backend#sqlite:///}")" ;;
esac
case "$artifacts" in
    *://*) ;;
    *) mkdir -p "$artifacts" ;;
esac

if [ -n "${MLFLOW_BIN:-}" ]; then
    mlflow_bin="$MLFLOW_BIN"
elif [ -x "$repo/.venv/bin/mlflow" ]; then
    mlflow_bin="$repo/.venv/bin/mlflow"
else
    mlflow_bin="mlflow"
fi

args=(server --host "$host" --port "$port" --workers "$workers"
      --backend-store-uri "$backend" --artifacts-destination "$artifacts")
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then
    args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi

echo "MLflow server on http://$host:$port (backend ${backend%%://*}, artifacts $artifacts)" >&2
# exec: the server takes this process's place (and its pid), so a supervisor or `kill` reaches it.
exec "$mlflow_bin" "${args[@]}" "$@"
