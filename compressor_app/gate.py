"""A fair gate in front of the WSGI application: at most N requests of a web process run it at once, and
the others wait their turn in the order they came.

A gthread worker runs its threads' requests under one interpreter lock. When all of them run the app at once,
each query's answer waits for the lock behind the others, and the order they get it in is the OS's: under
load some requests are passed over again and again and the latency's tail grows (a plain semaphore, tried,
is no fairer: any waiter may take a freed place). With a few places, handed on oldest first, requests finish
in about the order they came. A request waits for a place at most `max_wait_s`, then runs anyway, so that a
few slow ones (an upload from a slow client) cannot hold the rest back; a response's body (a checkpoint's
stream) is sent after its request has left the gate.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable


class FairGate:
    def __init__(self, app: Callable, *, places: int, max_wait_s: float) -> None:
        self.app, self.max_wait_s = app, max_wait_s
        self._free = places
        self._waiting: deque[threading.Lock] = deque()  # one locked lock per waiting request, oldest first
        self._lock = threading.Lock()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        has_place = self.enter()
        try:
            return self.app(environ, start_response)
        finally:
            if has_place:
                self.leave()

    def enter(self) -> bool:
        """Wait for a place (True), or until max_wait_s has passed (False: the request runs without one)."""
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                return True
            turn = threading.Lock()
            turn.acquire()
            self._waiting.append(turn)
        if turn.acquire(timeout=self.max_wait_s):
            return True  # a leaving request handed its place over
        with self._lock:
            if turn in self._waiting:
                self._waiting.remove(turn)
                return False
        return True  # handed over between the timeout and the lock

    def leave(self) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().release()  # the place goes to the oldest waiter, never back to the pool
            else:
                self._free += 1
