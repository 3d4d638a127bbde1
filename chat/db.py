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

That thread is `DatabaseThread`, installed as asgiref's single thread-sensitive
executor (`install()`, at start-up), so both ways in reach the same thread.
run_db hands it work directly: asgiref's `sync_to_async` costs ~120 µs of CPU
per call here (a context copy and restore, an executor future, a wrapped
future), run_db's own hand-off ~30 µs, and an API request makes three.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import functools
import queue
import threading
import time
from typing import Any

from asgiref.sync import AsyncToSync, SyncToAsync, sync_to_async
from django.contrib.auth import backends as auth_backends
from django.contrib.sessions.backends import base as session_base
from django.contrib.sessions.backends import db as session_db
from django.core import signals
from django.core.handlers import asgi as asgi_handler
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db import close_old_connections as django_close_old_connections
from django.db.models import base as model_base
from django.db.models import query as model_query
from django.dispatch import dispatcher

# How often a thread's connection is checked (CONN_MAX_AGE, and with
# CONN_HEALTH_CHECKS a query: a round trip on PostgreSQL). Django checks once per
# request, assuming a connection per request; the database thread's one connection
# serves every request, so a check per request cost each request four round trips.
CONNECTION_CHECK_SECONDS = 1.0


def check_connection(wrapper=connection) -> None:
    """Drop the thread's connection if it is obsolete or broken, at most once a second
    unless an error occurred on it; never one inside a transaction (as in a test).

    One that is open outside any atomic block but not in autocommit mode is dropped at
    once, whatever the interval: a connect() that failed half-way leaves it so (the
    driver's connection opened, autocommit not yet switched on; in the tests,
    pytest-django blocking database access at the end of a test while this thread
    connects). SQLite's driver then begins a transaction before its first write that
    nobody commits: the database's write lock stays held while this thread is idle.
    """
    if wrapper is connection:  # each read through the proxy costs a thread-local lookup
        wrapper = connections[DEFAULT_DB_ALIAS]
    if wrapper.in_atomic_block:
        return
    if _autocommit_lost(wrapper):
        wrapper.close()
        return
    now = time.monotonic()
    if wrapper.errors_occurred or now >= getattr(wrapper, "chatsite_next_check", 0.0):
        wrapper.close_if_unusable_or_obsolete()
        wrapper.chatsite_next_check = now + CONNECTION_CHECK_SECONDS


def _autocommit_lost(wrapper) -> bool:
    """Whether the connection is open but its driver is not in autocommit mode (outside
    an atomic block). Django's own flag can be stale: a connect() that failed half-way
    keeps the previous connection's. A few attribute reads, no query."""
    raw = wrapper.connection
    if raw is None or not wrapper.settings_dict["AUTOCOMMIT"]:
        return False
    if not wrapper.autocommit:
        return True
    if wrapper.vendor == "sqlite":
        return raw.isolation_level is not None  # None: the driver's autocommit
    return getattr(raw, "autocommit", True) is False  # psycopg


def close_old_connections(**kwargs) -> None:
    """Django's request_started/request_finished receiver of that name, throttled."""
    for wrapper in connections.all(initialized_only=True):
        check_connection(wrapper)


def _call(func, args, kwargs):
    """run_db's call on a thread of asgiref's (the database thread checks in `_work`)."""
    check_connection()  # replies write between requests too
    return func(*args, **kwargs)


def _resolve(future, result, error: BaseException | None) -> None:
    """Settle an asyncio or concurrent future, unless its caller gave up on it."""
    if future.done():  # the caller was cancelled; the work itself still ran to its end
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class DatabaseThread(concurrent.futures.Executor):
    """One worker thread running calls in order: run_db's and asgiref's (`submit`)."""

    def __init__(self, name: str = "chatsite-db"):
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _put(self, item) -> None:
        if self._thread is None or self._closed:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the database thread has shut down")
                if self._thread is None:
                    # A daemon thread, shut down by atexit (below) after its queue is done.
                    self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                    self._thread.start()
        self._queue.put(item)

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._put((None, future, fn, args, kwargs, None))
        return future

    async def run(self, fn, args, kwargs) -> Any:
        """Run `fn(*args, **kwargs)` on the thread, in a copy of the caller's context."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._put((loop, future, fn, args, kwargs, contextvars.copy_context()))
        return await future

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, future, fn, args, kwargs, context = item
            # submit()'s concurrent future (loop None) may have been cancelled while queued.
            if loop is None and not future.set_running_or_notify_cancel():
                continue
            result = error = None
            try:
                if loop is not None:  # the direct hand-off: run_db's, the ORM's, Django's
                    check_connection()
                result = context.run(fn, *args, **kwargs) if context else fn(*args, **kwargs)
            except BaseException as exc:
                error = exc
            if loop is None:
                _resolve(future, result, error)
            else:
                # RuntimeError: that event loop has closed, so nobody is waiting.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_resolve, future, result, error)
            del item, future, result, error  # nothing of a call outlives it here

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)  # after everything queued: pending writes still run
            if wait:
                thread.join()


_thread = DatabaseThread()


# Django's modules that hop to the database thread through asgiref's sync_to_async on
# the chat page's path: the handler and signals, and for the async ORM and a page's
# session and user (`request.auser()`) the query, model, session and auth backends.
_HOPPING_MODULES = (
    asgi_handler,
    dispatcher,
    auth_backends,
    session_base,
    session_db,
    model_base,
    model_query,
)


def install() -> None:
    """Make asgiref's thread-sensitive calls run on the database thread (once, at start-up).

    Django's ASGI handler and its signals' `asend` also hop through
    `sync_to_async` two or three times per request (the request_started and
    request_finished receivers, `response.close()`), and a page's session and
    user load twice more; they get the direct hand-off too
    (`sync_to_async_direct`, in `_HOPPING_MODULES`). Those receivers check
    connections at most once a second (`close_old_connections`).
    """
    if SyncToAsync.single_thread_executor is not _thread:
        SyncToAsync.single_thread_executor = _thread
        atexit.register(_thread.shutdown)
        for module in _HOPPING_MODULES:
            module.sync_to_async = sync_to_async_direct
        for signal in (signals.request_started, signals.request_finished):
            signal.disconnect(django_close_old_connections)
            signal.connect(close_old_connections)


def _direct() -> bool:
    """Whether asgiref would run a thread-sensitive call from here on the database thread.

    Not when called from sync code through async_to_sync (tests), nor inside a
    request's own thread-sensitive context: asgiref knows which thread that is.
    """
    return (
        SyncToAsync.single_thread_executor is _thread
        and getattr(AsyncToSync.executors, "current", None) is None
        and SyncToAsync.thread_sensitive_context.get(None) is None
        and asyncio.get_running_loop() not in AsyncToSync.loop_thread_executors
    )


async def run_db(func, /, *args, **kwargs) -> Any:
    """Run the sync function `func` (ORM work) on the process's database thread."""
    if _direct():
        return await _thread.run(func, args, kwargs)
    return await sync_to_async(_call, thread_sensitive=True)(func, args, kwargs)


def sync_to_async_direct(func=None, /, *, thread_sensitive=True, executor=None, context=None):
    """asgiref's `sync_to_async`, handing the call straight to the database thread
    where asgiref would run it there anyway; asgiref's own way everywhere else.

    The call sees a copy of the caller's context variables, but changes it makes
    to them are not copied back, and asgiref's per-thread `Local`s (Django's active
    time zone, language and script prefix) are not carried over. Nothing on the
    chat and API paths activates those; code that does must use asgiref's own
    `sync_to_async` with an executor, or run_db with explicit arguments.
    """
    if func is None:  # used as @sync_to_async_direct(...)
        options = {"thread_sensitive": thread_sensitive, "executor": executor, "context": context}
        return functools.partial(sync_to_async_direct, **options)
    if not thread_sensitive or executor is not None or context is not None:
        return sync_to_async(
            func, thread_sensitive=thread_sensitive, executor=executor, context=context
        )

    @functools.wraps(func)
    async def call(*args, **kwargs):
        if _direct():
            return await _thread.run(func, args, kwargs)
        return await sync_to_async(func, thread_sensitive=True)(*args, **kwargs)

    return call
