"""Several daphne workers sharing Redis: stop and resume reach a reply on another worker."""

from __future__ import annotations

import http.client
import json
import os
import time
from urllib.parse import urlencode

import pytest

from chat import services
from chat.journal import TextReader
from chat.models import Message
from tests.conftest import session_cookies
from tests.live import LiveServer

pytestmark = pytest.mark.django_db(transaction=True)

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/3")


@pytest.fixture
def two_workers(upstream, django_db_blocker, tmp_path):
    # One machine's workers: one database, one journal directory, Redis.
    env = {"REDIS_URL": REDIS_URL, "CHAT_JOURNAL_DIR": str(tmp_path / "journal")}
    with django_db_blocker.unblock():
        servers = [LiveServer(upstream_url=upstream.base_url, extra_env=env) for _ in range(2)]
    yield servers
    for server in servers:
        server.stop()


class SseReader:
    def __init__(self, server: LiveServer, method: str, path: str, cookie: str, form=None):
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        headers = {"Cookie": cookie, "X-CSRFToken": "a" * 32}
        body = None
        if form is not None:
            body = urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        self.conn.request(method, path, body=body, headers=headers)
        self.response = self.conn.getresponse()
        assert self.response.status == 200, self.response.read()

    def event(self) -> tuple[str, dict]:
        name, data = "message", None
        while True:
            line = self.response.fp.readline().decode()
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
            elif line == "\n" and data is not None:
                return name, data

    def until_end(self) -> dict:
        while True:
            name, data = self.event()
            if name == "end":
                return data


def _post(server: LiveServer, path: str, cookie: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", path, headers={"Cookie": cookie, "X-CSRFToken": "a" * 32})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_stop_and_resume_from_another_worker(two_workers, user):
    first, second = two_workers
    cookie = session_cookies(user)
    words = " ".join(f"w{i}" for i in range(40))
    stream = SseReader(
        first, "POST", "/c/send/", cookie, form={"content": words, "model": "fake-slow"}
    )
    _, start = stream.event()
    conversation, reply_id = start["conversation"], start["assistant_message"]
    while stream.event()[0] != "message":
        pass

    # A page on the other worker resumes from the journal's checkpoints.
    time.sleep(0.5)
    resumed = SseReader(second, "GET", f"/c/{conversation}/m/{reply_id}/stream/", cookie)
    name, snapshot = resumed.event()
    assert name == "snapshot" and snapshot["t"].startswith("Echo: w0")

    status, body = _post(second, f"/c/{conversation}/m/{reply_id}/stop/", cookie)
    assert (status, body) == (200, {"status": "stopped"})
    assert stream.until_end()["status"] == "stopped"
    assert resumed.until_end()["status"] == "stopped"
    row = Message.objects.get(pk=reply_id)
    assert row.status == Message.Status.STOPPED
    assert row.content.startswith("Echo: w0") and "w39" not in row.content


def test_worker_killed_mid_reply_leaves_an_interrupted_row_with_its_checkpoint(
    upstream, user, tmp_path
):
    """Fault 7: kill -9 mid-reply; the next worker to start retires the row at once,
    with the text its journal had."""
    env = {"CHAT_JOURNAL_DIR": str(tmp_path / "journal")}
    doomed = LiveServer(upstream_url=upstream.base_url, extra_env=env)
    try:
        stream = SseReader(
            doomed,
            "POST",
            "/c/send/",
            session_cookies(user),
            form={"content": "x", "model": "fake-stall"},
        )
        _, start = stream.event()
        reply_id = start["assistant_message"]
        journal = TextReader(doomed.journal_dir, reply_id)
        deadline = time.monotonic() + 5
        while not (journalled := journal.read()):  # a checkpoint (every 0.3 s)
            assert time.monotonic() < deadline, "no checkpoint before the stall"
            time.sleep(0.05)
        doomed.process.kill()
        doomed.process.wait(5)
    finally:
        doomed.stop()
    row = Message.objects.get(pk=reply_id)
    assert (row.status, row.content) == (Message.Status.STREAMING, "")

    # No waiting for CHAT_STALE_SECONDS: the dead worker's journal lock is free.
    successor = LiveServer(upstream_url=upstream.base_url, extra_env=env)
    try:
        deadline = time.monotonic() + 5
        while Message.objects.get(pk=reply_id).status == Message.Status.STREAMING:
            assert time.monotonic() < deadline, "the row was never swept"
            time.sleep(0.05)
    finally:
        successor.stop()
    row = Message.objects.get(pk=reply_id)
    assert row.status == Message.Status.INTERRUPTED
    assert journalled and row.content.startswith(journalled)  # it survived the kill
    assert row.error == services.REPLY_KILLED
    assert not list((tmp_path / "journal").glob("*/*"))  # the dead worker's files are gone
