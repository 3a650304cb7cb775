"""gunicorn's settings for the web node: `gunicorn -c python:compressor_app.gunicorn compressor_app.wsgi`.

The docker image runs it, and so does the bench's web server, so the bench measures what is deployed.
Command-line flags (the bench's --bind) and GUNICORN_CMD_ARGS override what is set here.
"""

import os

bind = os.environ.get("WEB_BIND", "0.0.0.0:8000")
# Threads: a long streamed checkpoint download holds a thread, not a whole worker, and the worker keeps
# answering the arbiter's heartbeat meanwhile.
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("WEB_THREADS", "8"))
timeout = 60
accesslog = "-"
