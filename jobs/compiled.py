"""Querysets compiled to SQL once per process and database, then run again with each request's values.

Every API request and every submission runs a few small queries: the token's user, the owner's lock, the
owner's quotas, the registered workers. Django's compiling of such a queryset costs more CPU than PostgreSQL's
answering it (0.3 ms against 0.1 ms for the token's user), and on a web node the CPU is what a burst of
submissions waits for. Such a queryset is built once with placeholder values and compiled; each run swaps
the request's values in for the placeholders.

Each query compiled here (and jobs.selectors.queue_position's SQL) is on the submission path; the token's user is
checked on every API request too. Measured without them, each submission costs the web server 1.5 times the CPU,
while the pages' latency does not change (bench/results/compiled_queries.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import Any

from django.db import connection
from django.db.models import Model, QuerySet

CompiledQuery = Callable[..., tuple[str, list]]

ANY_ID = -7  # the placeholder for a row's id (a user's, a job's): ids are positive, so no other parameter is it


def compiled_once(build: Callable[..., QuerySet]) -> CompiledQuery:
    """Decorator: build(*shape) returns a queryset with placeholder values; the decorated function takes a
    mapping {placeholder: value} and the shape, and returns the queryset's SQL (compiled at its first call on
    each database vendor and shape) with its parameters, each placeholder replaced.

    The shape is what changes the SQL itself, such as the length of an IN list; a placeholder must be a valid
    value of its field that no other parameter of the query equals.
    """

    @functools.cache
    def sql_for(vendor: str, *shape: Hashable) -> tuple[str, tuple]:
        # Compiled at first use, inside the caller's transaction: select_for_update compiles only there.
        return build(*shape).query.sql_with_params()

    @functools.wraps(build)
    def bound(values: dict[Hashable, Any], *shape: Hashable) -> tuple[str, list]:
        sql, params = sql_for(connection.vendor, *shape)
        return sql, [values.get(param, param) if isinstance(param, Hashable) else param for param in params]

    return bound


def fetch_one(query: CompiledQuery, values: dict[Hashable, Any], *shape: Hashable) -> tuple | None:
    """The first row of a compiled query, as a tuple; None when it has none."""
    with connection.cursor() as cursor:
        cursor.execute(*query(values, *shape))
        return cursor.fetchone()


def fetch_all(query: CompiledQuery, values: dict[Hashable, Any], *shape: Hashable) -> list[tuple]:
    """The rows of a compiled query, as tuples."""
    with connection.cursor() as cursor:
        cursor.execute(*query(values, *shape))
        return cursor.fetchall()


def instances(model: type[Model], query: CompiledQuery, values: dict[Hashable, Any]) -> list[Model]:
    """The model instances of a compiled query."""
    return list(model.objects.raw(*query(values)))
