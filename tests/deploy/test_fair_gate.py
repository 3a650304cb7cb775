"""The web process's fair gate (compressor_app.gate): a few requests run the app at once, the others in the
order they came; none waits past its limit; a response's body is sent outside the gate."""

from __future__ import annotations

import threading
import time

from compressor_app.gate import FairGate
from tests.support import wait_until


class _App:
    """A WSGI app whose requests record when they run and hold their place until released."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.inside = 0
        self.most_inside = 0
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        with self._lock:
            self.order.append(environ["PATH_INFO"])
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        if environ.get("hold"):
            self.release.wait(30)
        with self._lock:
            self.inside -= 1
        start_response("200 OK", [])
        return [b"done"]


def _request(gate: FairGate, path: str, **environ) -> threading.Thread:
    thread = threading.Thread(target=gate, args=({"PATH_INFO": path, **environ}, lambda *a: None))
    thread.start()
    return thread


def _waiting(gate: FairGate) -> int:
    return len(gate._waiting)


def test_waiting_requests_run_in_the_order_they_came():
    app = _App()
    gate = FairGate(app, places=1, max_wait_s=30)
    holder = _request(gate, "/holder", hold=True)
    wait_until(lambda: app.order == ["/holder"], timeout=30, what="the first request to run")
    waiters = []
    for index in range(6):
        waiters.append(_request(gate, f"/{index}"))
        wait_until(lambda n=index + 1: _waiting(gate) == n, timeout=30, what=f"request {index} to wait at the gate")

    app.release.set()
    for thread in [holder, *waiters]:
        thread.join(30)

    assert app.order == ["/holder", "/0", "/1", "/2", "/3", "/4", "/5"]


def test_no_more_requests_run_at_once_than_the_gate_has_places():
    app = _App()
    gate = FairGate(app, places=2, max_wait_s=30)
    threads = [_request(gate, f"/{index}", hold=True) for index in range(12)]
    wait_until(lambda: app.inside == 2 and _waiting(gate) == 10, timeout=30, what="2 requests in, 10 waiting")

    app.release.set()
    for thread in threads:
        thread.join(30)

    assert app.most_inside == 2
    assert len(app.order) == 12
    assert gate._free == 2  # every place back once all have left


def test_a_request_that_waited_its_limit_runs_without_a_place():
    app = _App()
    gate = FairGate(app, places=1, max_wait_s=0.2)
    holder = _request(gate, "/slow-upload", hold=True)
    wait_until(lambda: app.inside == 1, timeout=30, what="the slow request to run")

    started = time.monotonic()
    body = gate({"PATH_INFO": "/next"}, lambda *a: None)
    waited = time.monotonic() - started

    assert body == [b"done"] and 0.2 <= waited < 10
    assert _waiting(gate) == 0  # it left the queue when it gave up
    app.release.set()
    holder.join(30)
    assert gate._free == 1


def test_a_streamed_body_is_sent_after_the_request_left_the_gate():
    def streaming(environ, start_response):
        start_response("200 OK", [])
        return iter([b"chunk"] * 3)

    gate = FairGate(streaming, places=1, max_wait_s=30)
    body = gate({"PATH_INFO": "/checkpoint.tar"}, lambda *a: None)

    assert gate._free == 1  # the place is free while the body is still to be sent
    assert list(body) == [b"chunk"] * 3


def test_the_deployed_application_is_behind_a_gate_of_two_places():
    from compressor_app.wsgi import application

    assert isinstance(application, FairGate) and application._free == 2
