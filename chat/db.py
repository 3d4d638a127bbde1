"""Database work from async code, on one long-lived thread per process.

Django's own ASGI handler gives every request a thread of its own, and with it
a database connection: under a burst that meant hundreds of SQLite connections
contending for the write lock (SQLite's busy handler sleeps), or hundreds of
PostgreSQL connections. chatsite.asgi.ChatASGIHandler drops that per-request
context on the chat and API paths, so asgiref's thread-sensitive calls,
Django's async ORM and run_db share one thread and one connection per
process: SQLite writers never contend inside a process, and the connection
persists (CONN_MAX_AGE). Slow sync views (admin, accounts) keep threads of
their own.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.db import connection


def _call(func, args, kwargs):
    # Replies write between requests too: drop a connection that is obsolete or
    # broken (never one inside a transaction, as in a test).
    if not connection.in_atomic_block:
        connection.close_if_unusable_or_obsolete()
    return func(*args, **kwargs)


async def run_db(func, /, *args, **kwargs) -> Any:
    """Run the sync function `func` (ORM work) on the process's database thread."""
    return await sync_to_async(_call, thread_sensitive=True)(func, args, kwargs)
