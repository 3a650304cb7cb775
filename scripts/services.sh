#!/usr/bin/env bash
# Start and stop the service on this machine: the web server, the compute worker(s) and the light worker
# (housekeeping, with the embedded beat that runs the reaper). Process ids and logs go to one folder,
# $COMPRESSOR_DATA_DIR/run (default var/run).
#
#   scripts/services.sh start    in the background (make demo)
#   scripts/services.sh up       in the foreground, Ctrl-C stops everything (make up)
#   scripts/services.sh stop     (make stop)
#   scripts/services.sh status
#
# Workers: one per GPU, pinned with CUDA_VISIBLE_DEVICES, on the "gpu" queue, plus one CPU worker on
# the "cpu" queue. Without a GPU, one worker takes both queues and runs everything on the CPU.
# Each takes one job at a time (-c 1, prefetch 1) and keeps its child warm between a job that succeeded
# and the next (GPU memory is given back explicitly: gc + torch.cuda.empty_cache). The child is replaced
# after a job that did not succeed (cancelled, time limit, out of memory, crash) and after a job during
# which it held more than COMPRESSOR_WORKER_MAX_MEMORY_MB (default 4096; --max-memory-per-child, set in
# the Celery config). Set WORKER_MAX_TASKS_PER_CHILD=1 for a fresh child after every job instead.
set -euo pipefail
cd "$(dirname "$0")/.."

export COMPRESSOR_DATA_DIR="${COMPRESSOR_DATA_DIR:-$PWD/var}"
# runserver and local workers: development settings, explicitly (production requires DJANGO_SECRET_KEY).
export DJANGO_ENV="${DJANGO_ENV:-development}"
PY="${PY:-.venv/bin/python}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"
RUN_DIR="$COMPRESSOR_DATA_DIR/run"
MAX_TASKS="${WORKER_MAX_TASKS_PER_CHILD:-0}"
mkdir -p "$RUN_DIR"

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

answers() {  # any HTTP answer (401 included) means the server is up
    "$PY" - "$1" <<'PYEOF' 2>/dev/null
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError:
    pass
PYEOF
}

launch() {  # launch NAME COMMAND...: in its own session (process group), pid and log in RUN_DIR
    local name=$1; shift
    if running "$RUN_DIR/$name.pid"; then
        echo "$name already running (pid $(cat "$RUN_DIR/$name.pid"))"
        return
    fi
    setsid nohup "$@" >"$RUN_DIR/$name.log" 2>&1 < /dev/null &
    echo $! >"$RUN_DIR/$name.pid"
    echo "started $name (pid $!, log $RUN_DIR/$name.log)"
}

start() {
    launch web "$PY" manage.py runserver --noreload --insecure "$HOST:$PORT"
    local celery=("$PY" -m celery -A compressor_app worker -l INFO -c 1)
    if [ "$MAX_TASKS" -gt 0 ]; then celery+=(--max-tasks-per-child "$MAX_TASKS"); fi
    local gpus=0
    if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
    if [ "$gpus" -gt 0 ]; then
        for i in $(seq 0 $((gpus - 1))); do
            CUDA_VISIBLE_DEVICES=$i launch "worker-gpu$i" "${celery[@]}" -Q gpu -n "gpu$i@%h"
        done
        CUDA_VISIBLE_DEVICES="" launch worker-cpu "${celery[@]}" -Q cpu -n "cpu@%h"
    else
        launch worker "${celery[@]}" -Q gpu,cpu -n "compute@%h"
    fi
    COMPRESSOR_WORKER_PRELOAD=false launch worker-light "$PY" -m celery -A compressor_app worker -l INFO -c 1 \
        -Q light -n "light@%h" -B -s "$RUN_DIR/celerybeat-schedule"
    local web_ok=""
    for _ in $(seq 60); do
        if answers "http://$HOST:$PORT/api/v1/"; then web_ok=1; break; fi
        if ! running "$RUN_DIR/web.pid"; then break; fi
        sleep 0.5
    done
    sleep 2  # a worker with a bad setting exits within a second or two
    local failed=""
    for pidfile in "$RUN_DIR"/*.pid; do
        if ! running "$pidfile"; then
            failed=1
            echo "$(basename "$pidfile" .pid) did not start; the end of its log:" >&2
            tail -15 "${pidfile%.pid}.log" >&2
        fi
    done
    if [ -z "$web_ok" ] || [ -n "$failed" ]; then
        [ -n "$web_ok" ] || echo "the web server does not answer at http://$HOST:$PORT/" >&2
        exit 1
    fi
    echo "web answers at http://$HOST:$PORT/ (processes and logs in $RUN_DIR)"
}

stop_one() {  # TERM (a worker finishes or hands back its job), then QUIT (cold), then KILL the group
    local pidfile=$1 name pid
    name=$(basename "$pidfile" .pid)
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for signal in QUIT KILL; do
            for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -0 "$pid" 2>/dev/null || break
            kill "-$signal" -- "-$pid" 2>/dev/null || true
        done
        echo "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
}

stop() {
    shopt -s nullglob
    for pidfile in "$RUN_DIR"/*.pid; do stop_one "$pidfile"; done
}

status() {
    shopt -s nullglob
    for pidfile in "$RUN_DIR"/*.pid; do
        if running "$pidfile"; then echo "$(basename "$pidfile" .pid): running (pid $(cat "$pidfile"))"
        else echo "$(basename "$pidfile" .pid): not running"; fi
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    up)
        start
        trap 'echo; stop; exit 0' INT TERM
        echo "Logs follow; Ctrl-C stops web and workers."
        tail -n 0 -F "$RUN_DIR"/*.log &
        wait $!
        ;;
    *) echo "usage: $0 start|up|stop|status" >&2; exit 2 ;;
esac
