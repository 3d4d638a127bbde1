"""Database work from async code, on a few long-lived threads per process.

Django's async ORM runs each request's queries on a thread of that request,
with a connection of its own. Under a burst that means hundreds of SQLite
connections contending for the write lock (and SQLite's busy handler sleeps),
or hundreds of PostgreSQL connections. Here every query of the hot paths goes
through one executor: a single thread for SQLite, so writers never contend
inside a process, and a small pool for PostgreSQL. Connections persist
(CONN_MAX_AGE) and are recycled when obsolete or broken.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django.db import close_old_connections, connection

_executor: ThreadPoolExecutor | None = None


def _get_executor() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        threads = 1 if connection.vendor == "sqlite" else 4
        _executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="db")
    return _executor


def _call(func, args, kwargs):
    close_old_connections()  # drops a connection that is obsolete or broken
    return func(*args, **kwargs)


async def run_db(func, /, *args, **kwargs) -> Any:
    """Run the sync function `func` (ORM work) on the database threads."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_get_executor(), functools.partial(_call, func, args, kwargs))
