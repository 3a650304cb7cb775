"""Counting events in a sliding window in the shared cache (Redis), so every web process counts together.

"30/hour" means at most 30 in any 60 minutes, not in each clock hour (where 60 fit around the hour). Each
window is a Redis sorted set of its events' times (Redis' own clock, so web nodes need not agree on theirs),
at most `limit` of them; each change is one Lua script, so two processes can never both take the last place.
The policies (what is limited, for whom) live in jobs.services.policy and jobs.auth.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from typing import NamedTuple

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


class Place(NamedTuple):
    """A place taken in a window (to give it back)."""

    key: str
    member: str


# Every script first drops the events older than the period (ARGV[1]) and reads the time from Redis.
_NOW_AND_TRIM = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local period, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - period)
local count = redis.call('ZCARD', KEYS[1])
"""
# A place when fewer than the limit are in the window: 1, else 0.
_TAKE = (
    _NOW_AND_TRIM
    + """
if count >= limit then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(period) + 1)
return 1
"""
)
# One event whatever the count (a failed sign-in); only the newest `limit` are kept: the rest decide nothing.
_HIT = (
    _NOW_AND_TRIM
    + """
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(limit + 1))
redis.call('EXPIRE', KEYS[1], math.ceil(period) + 1)
return math.min(count + 1, limit)
"""
)
# {count, whole seconds until a place is free (0: one is free now)}.
_STATE = (
    _NOW_AND_TRIM
    + """
if count < limit then return {count, 0} end
local oldest = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
if #oldest == 0 then return {count, math.ceil(period)} end  -- a limit of 0: never a place
return {count, math.max(1, math.ceil(tonumber(oldest[2]) + period - now))}
"""
)


@dataclass(frozen=True)
class Window:
    """The sliding window of one limit for one subject (a user id, an address)."""

    name: str
    subject: str
    rate: str

    @property
    def limit(self) -> int:
        return parse_rate(self.rate)[0]

    @property
    def _key(self) -> str:
        # Under the cache's key prefix, like every key of this service in the shared Redis.
        return cache.make_key(f"rate:{self.name}:{self.subject}")

    def _run(self, script: str, *extra: str):
        limit, period = parse_rate(self.rate)
        return _scripts()[script](keys=[self._key], args=[period, limit, *extra])

    def count(self) -> int:
        """The events in the last period."""
        return int(self._run(_STATE)[0])

    def seconds_left(self) -> int:
        """Whole seconds until a place is free: when the oldest event that fills the window leaves it (0: now)."""
        return int(self._run(_STATE)[1])

    def hit(self) -> int:
        """Count one event; the count now (at most the limit)."""
        return int(self._run(_HIT, uuid.uuid4().hex))

    def take(self) -> Place | None:
        """Take a place in this window (give_back returns it), or None when the window is full."""
        member = uuid.uuid4().hex
        return Place(self._key, member) if self._run(_TAKE, member) else None

    @staticmethod
    def give_back(place: Place) -> None:
        """Return a place taken by take() (the request it was taken for did not go through); nothing when it
        has left the window meanwhile."""
        _redis().zrem(place.key, place.member)


@functools.cache
def _redis() -> redis.Redis:
    """The shared cache's Redis, spoken to directly: a window's check-and-take is one script, one round trip."""
    return redis.Redis.from_url(settings.CACHES["default"]["LOCATION"])


@functools.cache
def _scripts() -> dict[str, redis.commands.core.Script]:
    """The scripts, registered once per process (sent by their sha1 after the first call)."""
    return {script: _redis().register_script(script) for script in (_TAKE, _HIT, _STATE)}
