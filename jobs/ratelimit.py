"""Counting events per window in the shared cache (Redis), so every web process counts together.

A fixed window ("30/hour": at most 30 in each clock hour) counted with Redis' atomic INCR: two processes can
never both take the last place. The policies (what is limited, for whom) live in jobs.services and jobs.auth.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import redis
from django.conf import settings
from django.core.cache import cache

_PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class RateLimited(Exception):
    """Too many in this window: the message says what and when to try again (the API answers 429)."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


def parse_rate(rate: str) -> tuple[int, int]:
    """ "30/hour" -> (30, 3600); "10/15m" -> (10, 900). The unit is read by its first letter (s, m, h, d)."""
    count, _, per = rate.partition("/")
    digits = "".join(ch for ch in per if ch.isdigit())
    unit = per[len(digits) :].strip()[:1].lower()
    if not count.strip().isdigit() or unit not in _PERIODS:
        raise ValueError(f"A rate is N/period such as 30/hour or 10/15m, not {rate!r}.")
    return int(count), int(digits or 1) * _PERIODS[unit]


@dataclass(frozen=True)
class Window:
    """The current window of one limit for one subject (a user id, an address)."""

    name: str
    subject: str
    rate: str

    @property
    def limit(self) -> int:
        return parse_rate(self.rate)[0]

    def _key_and_wait(self) -> tuple[str, int]:
        period = parse_rate(self.rate)[1]
        now = time.time()
        window = int(now // period)
        # Under the cache's key prefix, like every key of this service in the shared Redis.
        return cache.make_key(f"rate:{self.name}:{self.subject}:{window}"), int((window + 1) * period - now) + 1

    def count(self) -> int:
        key, _ = self._key_and_wait()
        return int(_redis().get(key) or 0)

    def seconds_left(self) -> int:
        return self._key_and_wait()[1]

    def hit(self) -> int:
        """Count one event; the new count."""
        return _count_one(*self._key_and_wait())

    def take(self) -> str | None:
        """Take a place in this window; its key (to give it back), or None when the window is full."""
        key, wait = self._key_and_wait()
        if _count_one(key, wait) > self.limit:
            self.give_back(key)
            return None
        return key

    @staticmethod
    def give_back(key: str) -> None:
        """Return a place taken by take() (the request it was taken for did not go through); nothing when the
        window has ended meanwhile (a DECR then would make a key that never expires)."""
        _redis().eval(_DECR_IF_EXISTS, 1, key)


def _count_one(key: str, wait: int) -> int:
    pipe = _redis().pipeline()
    pipe.set(key, 0, ex=wait + 1, nx=True)  # lives a second past its window, so the count always finds it
    pipe.incr(key)
    return int(pipe.execute()[1])


_DECR_IF_EXISTS = "if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('DECR', KEYS[1]) end return 0"


@functools.cache
def _redis() -> redis.Redis:
    """The shared cache's Redis, spoken to directly: a window's count with its expiry is one round trip
    (Django's cache API takes three: add, exists, incr)."""
    return redis.Redis.from_url(settings.CACHES["default"]["LOCATION"])
