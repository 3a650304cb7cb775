#!/usr/bin/env bash
# Find or start what the tests and the demo need: Redis (always) and PostgreSQL (when installed).
set -euo pipefail

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    if command -v redis-server >/dev/null; then
        echo "Starting a local redis-server on 127.0.0.1:6379"
        mkdir -p "${COMPRESSOR_DATA_DIR:-var}/redis"
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
            --dir "${COMPRESSOR_DATA_DIR:-var}/redis" --logfile "${COMPRESSOR_DATA_DIR:-var}/redis/redis.log"
        for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
    else
        echo "Redis is not answering on 127.0.0.1:6379 and redis-server is not installed." >&2
        echo "Install it (apt-get install redis-server) or set CELERY_BROKER_URL." >&2
        exit 1
    fi
fi

if command -v pg_isready >/dev/null && ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
        echo "Starting the local PostgreSQL cluster"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
        for _ in $(seq 50); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 0.2; done
    fi
fi
