"""Django's PostgreSQL backend with a health check that costs no round trip while the connection is idle.

Each web thread keeps its connection between requests and Django checks it before a request uses it
(CONN_HEALTH_CHECKS) with `SELECT 1`: one more round trip per request, which under load waits for a core
and then for the interpreter lock like any query. When the server ends a connection (a restart, an
administrator's pg_terminate_backend, idle_session_timeout) it sends its last message and closes the socket,
so an idle connection whose socket has something to read is the one that may be gone. Only that one, or one
in a transaction, is checked with `SELECT 1` as before; an idle socket with nothing to read is usable.
"""

from __future__ import annotations

import select

from django.db.backends.postgresql import base
from psycopg import pq


class DatabaseWrapper(base.DatabaseWrapper):
    def is_usable(self) -> bool:
        connection = self.connection
        if connection is None or connection.closed or connection.broken:
            return False
        if connection.pgconn.transaction_status == pq.TransactionStatus.IDLE and not _has_input(connection):
            return True
        return super().is_usable()


def _has_input(connection) -> bool:
    """Whether the server has sent something the connection has not read (at once, without waiting)."""
    try:
        readable, _, _ = select.select([connection.fileno()], [], [], 0)
    except (OSError, ValueError):  # the descriptor is already closed
        return True
    return bool(readable)
