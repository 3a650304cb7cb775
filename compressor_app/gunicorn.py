"""gunicorn's settings for the web node: `gunicorn -c python:compressor_app.gunicorn compressor_app.wsgi`.

The docker image runs it, and so does the bench's web server, so the bench measures what is deployed.
Command-line flags (the bench's --bind) and GUNICORN_CMD_ARGS override what is set here.
"""

import gc
import os
import threading

bind = os.environ.get("WEB_BIND", "0.0.0.0:8000")
# Threads: a long streamed checkpoint download holds a thread, not a whole worker, and the worker keeps
# answering the arbiter's heartbeat meanwhile.
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("WEB_THREADS", "8"))
timeout = 60
accesslog = "-"

# Python's full garbage collection walks every object the worker holds, about 150 000 once Django, DRF,
# Celery and huggingface_hub are loaded: 85 ms of CPU, during which none of the worker's threads answers.
# Under load it came every 4 s or so (DRF's fields and httpx's responses leave reference cycles behind) and
# made the tail of the submission latency. What is loaded once lives as long as the worker, so it is moved out
# of the collector's sight (gc.freeze); modules imported by a worker's first requests (the views, the hub
# client) too, hence again after its 1st, 10th, 100th and 1000th request. Then a full collection costs
# 5-20 ms.
FREEZE_AFTER_REQUESTS = (1, 10, 100, 1000)


class LongLivedObjects:
    """Freezes what a worker has loaded: at its start, then once it has served each count of requests."""

    def __init__(self, after_requests: tuple[int, ...] = FREEZE_AFTER_REQUESTS) -> None:
        self._due = sorted(after_requests)
        self._lock = threading.Lock()

    def freeze(self, log) -> None:
        gc.collect()  # what is garbage already is not kept for ever
        gc.freeze()
        log.info("%d long-lived objects moved out of the garbage collector's sight", gc.get_freeze_count())

    def served(self, requests: int, log) -> None:
        with self._lock:  # gthread: the requests of several threads end at once, and a count can be skipped
            if not self._due or requests < self._due[0]:
                return
            self._due = [count for count in self._due if count > requests]
            self.freeze(log)


long_lived = LongLivedObjects()


def post_worker_init(worker) -> None:
    long_lived.freeze(worker.log)


def post_request(worker, req, environ, resp) -> None:
    long_lived.served(worker.nr, worker.log)
