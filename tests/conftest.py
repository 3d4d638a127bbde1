from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie

import pytest
from asgiref.sync import SyncToAsync, sync_to_async
from asgiref.testing import ApplicationCommunicator
from django.core.cache import cache
from django.db import connections
from django.test import Client

import chat.llm
from chat import replies
from chat.llm import ChatMessage, Delta, GenerationParams
from chat.llm.fake_upstream import FakeUpstream
from tests.live import LiveServer

CSRF_SECRET = "a" * 32


def wait_for_reply(statuses, timeout: float = 10):
    """The newest assistant row once its status is one of `statuses` (for live-server tests)."""
    from chat.models import Message

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = Message.objects.filter(role="assistant").order_by("-id").first()
        if row and row.status in statuses:
            return row
        time.sleep(0.05)
    raise AssertionError(f"no reply reached {statuses}")


def pytest_collection_modifyitems(items):
    # Browser tests last: Playwright's sync API holds an event loop in the main
    # thread for the rest of the session, which async tests cannot share.
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)


@pytest.fixture(autouse=True)
def _test_settings(settings, tmp_path):
    # A journal of its own per test: ids are reused after a test's rollback.
    settings.CHAT_JOURNAL_DIR = str(tmp_path / "journal")
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.CHAT_FAKE_MODEL = True
    settings.CHAT_DEFAULT_MODEL = "fake"
    settings.LOCAL_MODEL_PATH = "off"
    settings.OPENAI_API_KEY = ""
    settings.OPENAI_BASE_URL = ""
    settings.CHAT_HEARTBEAT_SECONDS = 15
    settings.CHAT_CHECKPOINT_SECONDS = 1.0
    cache.clear()
    yield
    cache.clear()


@pytest.fixture(scope="session", autouse=True)
def _db_thread_disconnected(django_db_setup):
    """Close the database thread's connection (chat.db.run_db) before the test database
    is dropped; PostgreSQL refuses to drop a database that is still in use."""
    yield
    SyncToAsync.single_thread_executor.submit(connections.close_all).result(timeout=10)


@pytest.fixture(autouse=True)
def _async_test_cleanup(request):
    if inspect.iscoroutinefunction(request.function):
        request.getfixturevalue("_control_plane_closed")


@pytest.fixture
async def _control_plane_closed():
    """An async test's Redis control plane is closed before its event loop is."""
    yield
    await replies.control_plane_close()


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user(username="alice", password="pw-alice-123!")


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create_user(username="mallory", password="pw-mallory-123!")


class ScriptedProvider:
    """A provider the test drives: each item put on `script` is streamed as it comes.

    str → a text delta; a Delta → sent as is; an Exception → raised; None → end.
    Records whether the stream was closed (the upstream released).
    """

    name = "scripted"

    def __init__(self):
        self.script: asyncio.Queue = asyncio.Queue()
        self.calls: list[list[ChatMessage]] = []
        self.closed = asyncio.Event()

    async def list_models(self) -> list[str]:
        return ["scripted"]

    async def stream(
        self, messages: list[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[Delta]:
        self.calls.append(messages)
        try:
            while True:
                item = await self.script.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item if isinstance(item, Delta) else Delta(text=item)
        finally:
            self.closed.set()


@pytest.fixture
def scripted(monkeypatch):
    provider = ScriptedProvider()
    monkeypatch.setattr(chat.llm, "configured_providers", lambda: [provider])
    return provider


@pytest.fixture
def fake_provider(monkeypatch):
    """The deterministic fake models, counting the streams started (`started`)."""
    from chat.llm.fake import FakeProvider

    provider = FakeProvider()
    monkeypatch.setattr(chat.llm, "configured_providers", lambda: [provider])
    return provider


def session_cookies(user) -> str:
    client = Client()
    client.force_login(user)
    cookies = SimpleCookie()
    cookies["sessionid"] = client.cookies["sessionid"].value
    cookies["csrftoken"] = CSRF_SECRET
    return "; ".join(f"{k}={v.value}" for k, v in cookies.items())


class AsgiStream:
    """One HTTP request through the real ASGI application, read chunk by chunk."""

    def __init__(self, method: str, path: str, *, cookie: str = "", form: dict | None = None):
        from chatsite.asgi import application

        body = b""
        headers = [(b"host", b"testserver")]
        if cookie:
            headers.append((b"cookie", cookie.encode()))
        if method == "POST":
            from urllib.parse import urlencode

            body = urlencode(form or {}).encode()
            headers += [
                (b"content-type", b"application/x-www-form-urlencoded"),
                (b"x-csrftoken", CSRF_SECRET.encode()),
            ]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": headers,
            "client": ("127.0.0.1", 5555),
            "server": ("testserver", 80),
        }
        self.communicator = ApplicationCommunicator(application, scope)
        self.body = body
        self.status: int | None = None
        self.headers: dict[str, str] = {}

    async def start(self, timeout: float = 5) -> int:
        await self.communicator.send_input(
            {"type": "http.request", "body": self.body, "more_body": False}
        )
        message = await self.communicator.receive_output(timeout)
        assert message["type"] == "http.response.start", message
        self.status = message["status"]
        self.headers = {k.decode().lower(): v.decode() for k, v in message["headers"]}
        return self.status

    async def chunk(self, timeout: float = 5) -> bytes | None:
        """The next body chunk, or None once the response is complete."""
        message = await self.communicator.receive_output(timeout)
        assert message["type"] == "http.response.body", message
        body = message.get("body", b"")
        if not message.get("more_body", False):
            return body or None
        return body

    async def events(self, timeout: float = 5) -> AsyncIterator[tuple[str, dict]]:
        """Parsed SSE events (comments skipped) until the response ends."""
        buffer = b""
        while True:
            chunk = await self.chunk(timeout)
            if chunk is None:
                return
            buffer += chunk
            while b"\n\n" in buffer:
                frame, buffer = buffer.split(b"\n\n", 1)
                name, data = "message", None
                for line in frame.decode().split("\n"):
                    if line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        data = json.loads(line[5:])
                if data is not None:
                    yield name, data

    async def disconnect(self) -> None:
        await self.communicator.send_input({"type": "http.disconnect"})
        await self.communicator.wait(timeout=5)


@pytest.fixture
def asgi_login():
    """Cookie header of a logged-in session for `user`, for AsgiStream."""

    async def make(user) -> str:
        return await sync_to_async(session_cookies)(user)

    return make


@pytest.fixture(scope="session")
def upstream():
    """The fake OpenAI-compatible server (a real HTTP server on 127.0.0.1)."""
    server = FakeUpstream(gap_ms=0).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def daphne_server(django_db_setup, django_db_blocker, upstream):
    """The project under a real daphne, on the test database, with `upstream` as its OpenAI."""
    with django_db_blocker.unblock():
        server = LiveServer(upstream_url=upstream.base_url)
    yield server
    server.stop()
