"""chat.db: the one database thread that run_db and asgiref's thread-sensitive calls share."""

from __future__ import annotations

import asyncio
import contextvars
import os
import subprocess
import sys
import threading

import pytest
from asgiref.sync import SyncToAsync, async_to_sync, sync_to_async
from django.conf import settings

from chat import db
from chat.models import Conversation, Message

pytestmark = pytest.mark.django_db(transaction=True)

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


async def test_run_db_and_asgiref_share_one_thread():
    assert SyncToAsync.single_thread_executor is db._thread  # installed at start-up
    ours = await db.run_db(threading.get_ident)
    theirs = await sync_to_async(threading.get_ident, thread_sensitive=True)()
    assert ours == theirs != threading.get_ident()
    assert threading.current_thread().name != "chatsite-db"
    assert await db.run_db(lambda: threading.current_thread().name) == "chatsite-db"


async def test_calls_run_in_order_and_see_the_callers_context():
    request_id.set("req-7")
    seen: list[int] = []
    await asyncio.gather(*(db.run_db(seen.append, i) for i in range(50)))
    assert seen == list(range(50))
    assert await db.run_db(request_id.get) == "req-7"


async def test_an_error_reaches_the_caller_and_the_thread_goes_on():
    with pytest.raises(ZeroDivisionError):
        await db.run_db(lambda: 1 / 0)
    assert await db.run_db(lambda: 6 * 7) == 42


async def test_a_cancelled_caller_does_not_cut_the_work_short(user):
    """A reply's final save must land even if the task awaiting it is cancelled."""
    started, release = threading.Event(), threading.Event()

    def slow_write():
        started.set()
        release.wait(5)
        return Conversation.objects.create(owner=user, title="written").pk

    task = asyncio.ensure_future(db.run_db(slow_write))
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The next call runs after the cancelled one finished: its row is there.
    assert await db.run_db(Conversation.objects.filter(title="written").count) == 1


def test_from_sync_code_it_runs_on_the_calling_thread():
    """Under async_to_sync (a sync test, a management command) asgiref's rule holds:
    thread-sensitive work goes back to the sync thread that is waiting, which may
    hold a transaction."""
    caller = threading.get_ident()
    assert async_to_sync(db.run_db)(threading.get_ident) == caller


def test_submit_runs_a_concurrent_future():
    future = db._thread.submit(lambda a, b: a + b, 2, b=3)
    assert future.result(timeout=5) == 5
    failing = db._thread.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=5)


def test_shutdown_runs_what_was_queued_first():
    thread = db.DatabaseThread(name="test-db")
    done: list[int] = []
    futures = [thread.submit(done.append, i) for i in range(20)]
    thread.shutdown(wait=True)
    assert done == list(range(20))
    assert all(f.done() for f in futures)
    with pytest.raises(RuntimeError):
        thread.submit(done.append, 99)


async def test_djangos_own_hops_take_the_direct_way_to_the_database_thread():
    """request_started / request_finished receivers and response.close() run where
    asgiref would run them (the database thread), through the direct hand-off."""
    from django.core import signals
    from django.core.handlers import asgi as asgi_handler
    from django.dispatch import dispatcher

    assert asgi_handler.sync_to_async is dispatcher.sync_to_async is db.sync_to_async_direct
    seen = []

    def receiver(**kwargs):
        seen.append((threading.current_thread().name, request_id.get()))

    request_id.set("req-9")
    signals.request_started.connect(receiver)
    try:
        await signals.request_started.asend(sender=None, scope={})
    finally:
        signals.request_started.disconnect(receiver)
    assert seen == [("chatsite-db", "req-9")]


async def test_sync_to_async_direct_keeps_asgirefs_way_elsewhere():
    from asgiref.sync import ThreadSensitiveContext

    name = threading.current_thread
    async with ThreadSensitiveContext():  # a sync view's own thread (admin, accounts)
        assert (await db.sync_to_async_direct(name)()).name != "chatsite-db"
    not_sensitive = db.sync_to_async_direct(thread_sensitive=False)(name)
    assert (await not_sensitive()).name != "chatsite-db"
    decorated = db.sync_to_async_direct(thread_sensitive=True)(lambda x: (x, name().name))
    assert await decorated(5) == (5, "chatsite-db")


async def test_the_connection_is_checked_at_most_once_a_second_unless_a_query_failed(
    monkeypatch,
):
    """Django checks a connection (CONN_MAX_AGE; CONN_HEALTH_CHECKS: a query, a round trip
    on PostgreSQL) before each request's first query; the database thread's connection
    serves every request, so it is checked once a second, and at once after an error."""
    from django.db import DatabaseError, connection
    from django.db.backends.base.base import BaseDatabaseWrapper

    checks: list[float] = []
    original = BaseDatabaseWrapper.close_if_unusable_or_obsolete

    def counting(self):
        checks.append(1)
        return original(self)

    monkeypatch.setattr(BaseDatabaseWrapper, "close_if_unusable_or_obsolete", counting)

    def due_now():
        connection.chatsite_next_check = 0.0

    await db.run_db(due_now)
    checks.clear()
    for _ in range(20):
        await db.run_db(Conversation.objects.count)
    assert len(checks) == 1

    def failing_query():
        with connection.cursor() as cursor:
            cursor.execute("SELECT no_such_column FROM no_such_table")

    with pytest.raises(DatabaseError):
        await db.run_db(failing_query)
    assert await db.run_db(Conversation.objects.count) == 0  # the connection still works
    assert len(checks) == 2  # checked again right after the error

    monkeypatch.setattr(db, "CONNECTION_CHECK_SECONDS", 0.0)
    await db.run_db(due_now)  # the last check set the next one a second ahead
    for _ in range(3):
        await db.run_db(Conversation.objects.count)
    assert len(checks) == 5  # with no interval, every call checks


async def test_a_half_open_connection_is_dropped_before_it_can_hold_the_write_lock():
    """connect() can fail after the driver's connection is open and before autocommit
    is on: under pytest-django, when database access is blocked at the end of a test
    while this thread connects (work a test's request left behind). The next call
    must not use that connection: on SQLite its first write began a transaction that
    nobody committed, and the idle thread held the write lock for the rest of the run."""
    import sqlite3
    import time

    from django.db import connection

    def connect_half_way():
        connection.close()

        def blocked(*args, **kwargs):
            raise RuntimeError("Database access not allowed")  # as pytest-django's block

        connection.set_autocommit = blocked  # the last step of connect()
        try:
            with pytest.raises(RuntimeError):
                connection.ensure_connection()
        finally:
            del connection.set_autocommit
        connection.chatsite_next_check = time.monotonic() + 60  # no check is due
        return connection.connection is not None

    def write_and_look():
        Conversation.objects.filter(pk=0).update(title="x")
        raw = connection.connection
        if connection.vendor == "sqlite":  # in a transaction: the write lock is held
            return raw.isolation_level is None and not raw.in_transaction
        return raw.autocommit

    try:
        assert await db.run_db(connect_half_way)  # the state the flake left behind
        assert await db.run_db(write_and_look)
        if connection.vendor == "sqlite":
            other = sqlite3.connect(connection.settings_dict["NAME"], timeout=0)
            try:
                other.execute("BEGIN IMMEDIATE")  # "database is locked" if it is held
                other.rollback()
            finally:
                other.close()
    finally:
        await db.run_db(lambda: connection.close())


async def test_a_dropped_connection_is_replaced_once_the_check_is_due():
    from django.db import connection

    if connection.vendor == "sqlite":
        pytest.skip("no server to drop an SQLite connection; Django deems it always usable")

    def close_under_django():
        connection.ensure_connection()
        connection.connection.close()  # as if the server had dropped it
        connection.chatsite_next_check = 0.0  # a second has passed

    await db.run_db(close_under_django)
    assert await db.run_db(Conversation.objects.count) == 0


def test_the_request_signals_run_the_throttled_check():
    # In a process of its own: Django's test client reconnects Django's receiver.
    probe = (
        "import django; django.setup()\n"
        "from django.core import signals\n"
        "from django.db import close_old_connections\n"
        "from chat import db\n"
        "for signal in (signals.request_started, signals.request_finished):\n"
        "    receivers = [entry[1]() for entry in signal.receivers]\n"
        "    print(db.close_old_connections in receivers, close_old_connections in receivers)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=settings.BASE_DIR,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "chatsite.settings"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["True", "False", "True", "False"]


async def test_the_async_orm_session_and_user_load_take_the_direct_hand_off(user, monkeypatch):
    from django.contrib.sessions.backends.db import SessionStore

    handed: list[object] = []
    run = db._thread.run

    async def counting(fn, args, kwargs):
        handed.append(fn)
        return await run(fn, args, kwargs)

    monkeypatch.setattr(db._thread, "run", counting)
    assert await Conversation.objects.acount() == 0
    session = SessionStore()
    await session.aset("k", "v")
    await session.asave()
    assert await SessionStore(session.session_key).aget("k") == "v"
    from django.contrib.auth.backends import ModelBackend

    assert (await ModelBackend().aget_user(user.pk)) == user
    assert len(handed) >= 4  # count, save, load, get_user: none through asgiref's executor


async def test_a_final_save_outlives_a_connection_the_server_dropped(user):
    """Between two checks (a second apart) the server may drop the connection: the
    final save's retry then reconnects instead of failing on the dead one again."""
    import psycopg
    from django.db import connection

    from chat import services

    if connection.vendor != "postgresql":
        pytest.skip("no server to drop an SQLite connection")
    conversation = await Conversation.objects.acreate(owner=user, model="fake")
    _, reply = await db.run_db(
        services.message_send, conversation=conversation, content="q", model="fake"
    )

    def backend():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pid = cursor.fetchone()[0]
        return pid, connection.get_connection_params()

    pid, params = await db.run_db(backend)
    params = {k: v for k, v in params.items() if k in ("host", "port", "user", "dbname")}
    with psycopg.connect(**params, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])
    await db.run_db(
        services.reply_finish, message_id=reply.pk, content="all of it", status="complete"
    )
    row = await Message.objects.aget(pk=reply.pk)
    assert (row.content, row.status) == ("all of it", "complete")
