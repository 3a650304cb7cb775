"""gunicorn's settings for the web node: `gunicorn -c python:compressor_app.gunicorn compressor_app.wsgi`.

The docker image runs it, and so does the bench's web server, so the bench measures what is deployed.
Command-line flags (the bench's --bind) and GUNICORN_CMD_ARGS override what is set here.
"""

import os
import sys

bind = os.environ.get("WEB_BIND", "0.0.0.0:8000")
# Threads: a long streamed checkpoint download holds a thread, not a whole worker, and the worker keeps
# answering the arbiter's heartbeat meanwhile.
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("WEB_THREADS", "8"))
timeout = 60
accesslog = "-"

# A request waits for its thread's turn at the interpreter after each answer of the database, Redis or the hub
# (about a dozen per submission). Python lets a busy thread run 5 ms before it hands over; at 1 ms a waiting
# request resumes sooner (bench/results: the submission p95 at concurrency 20).
SWITCH_INTERVAL_S = float(os.environ.get("WEB_SWITCH_INTERVAL_S", "0.001"))


def post_fork(server, worker) -> None:
    sys.setswitchinterval(SWITCH_INTERVAL_S)
