"""The web's kept PostgreSQL connections (compressor_app.postgresql), run by test_jobs_postgres.py in its
PostgreSQL process: the file name keeps it out of the SQLite run, where there is no such connection.

Each request checks its thread's kept connection first: an idle one costs no round trip, and one the server
ended is replaced before the request's first query (the server's restart costs a reconnect, not an error).
"""

from __future__ import annotations

import psycopg
import pytest
from django.db import close_old_connections, connection

from compressor_app.postgresql.base import _has_input
from tests.support import database_url, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def _backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def test_an_idle_kept_connection_is_checked_without_a_query(monkeypatch):
    _backend_pid()
    raw = connection.connection
    opened = []
    cursor = raw.cursor
    monkeypatch.setattr(raw, "cursor", lambda *args, **kwargs: opened.append(args) or cursor(*args, **kwargs))

    assert connection.is_usable()
    assert opened == [], "the idle connection's health check sent a query"


def test_a_connection_the_server_ended_is_replaced_before_the_next_request_queries():
    before = _backend_pid()
    url = database_url(connection.settings_dict).replace("postgres://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [before])
    ended = "the ended connection's socket to be readable"
    wait_until(lambda: _has_input(connection.connection), timeout=30, what=ended)
    assert not connection.is_usable()

    close_old_connections()  # what each request starts with (request_started), then its first query
    after = _backend_pid()

    assert after != before
