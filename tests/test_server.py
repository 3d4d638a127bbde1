"""The server layer under daphne: TCP writes sent at once, in order (chatsite.server_tuning),
and daphne started without TLS support (chatsite.serve)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from chat import streaming
from chatsite import serve
from tests.live import ROOT, LiveServer

STATIC = "static/vendor/highlight-11.12.0.min.js"  # 129 KB: far more than one socket buffer


def _get(port: int, path: str, *, pause: float, rcvbuf: int) -> bytes:
    with socket.socket() as sock:
        # A small receive window and a client that waits before reading: the
        # server's sends go through in part, then not at all, so the rest of
        # the body must be queued and sent in order once the client reads.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(
            f"GET /{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        time.sleep(pause)
        chunks = []
        while chunk := sock.recv(1024):
            chunks.append(chunk)
            time.sleep(0.0005)
    return b"".join(chunks)


def test_large_body_to_a_slow_reader_arrives_whole_and_in_order(daphne_server):
    expected = (ROOT / STATIC).read_bytes()
    data = _get(daphne_server.port, STATIC, pause=0.5, rcvbuf=4096)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert f"content-length: {len(expected)}".encode() in head.lower()
    assert body == expected


def test_many_small_responses_on_fresh_connections(daphne_server):
    # The common case: each response fits the socket buffer and goes out in
    # the write that produced it, headers and body complete.
    for _ in range(20):
        data = _get(daphne_server.port, "healthz", pause=0, rcvbuf=65536)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"content-length: 16" in head.lower()
        assert body == b'{"status": "ok"}'


class _Reactor:
    """Records which descriptors wait for writability (the rest of Twisted is real)."""

    def __init__(self):
        self.writers = set()

    def addWriter(self, writer):
        self.writers.add(writer)

    def removeWriter(self, writer):
        self.writers.discard(writer)


def _connection():
    from twisted.internet import tcp
    from twisted.internet.protocol import Protocol

    from chatsite import server_tuning

    server_tuning.install()
    ours, peer = socket.socketpair()
    reactor = _Reactor()
    conn = tcp.Connection(ours, Protocol(), reactor)
    conn.connected = True
    return conn, peer, reactor


def test_a_write_on_an_idle_connection_is_sent_at_once():
    conn, peer, reactor = _connection()
    with peer:
        conn.write(b"data: one\n\n")
        conn.writeSequence([b"data: ", b"two\n\n"])
        assert not reactor.writers  # nothing waits for the next loop turn
        peer.settimeout(1)
        assert peer.recv(100) == b"data: one\n\ndata: two\n\n"
    conn.socket.close()


def test_what_the_socket_does_not_take_is_queued_and_sent_in_order():
    conn, peer, reactor = _connection()
    with peer:
        block = bytes(range(256)) * 4096  # 1 MiB: more than a socketpair holds
        conn.write(block)
        conn.write(b"tail")  # queued behind the rest, never sent ahead of it
        assert conn in reactor.writers
        received = bytearray()
        peer.settimeout(1)
        while conn in reactor.writers or len(received) < len(block) + 4:
            received += peer.recv(1 << 20)
            if conn in reactor.writers:
                conn.doWrite()  # what the reactor does when the socket is writable
        assert bytes(received) == block + b"tail"
    conn.socket.close()


def test_a_write_after_the_peer_left_is_left_to_twisted():
    conn, peer, reactor = _connection()
    peer.close()
    conn.write(b"x" * 10)  # the send fails: queued, so Twisted's own write sees the loss
    assert conn in reactor.writers
    assert conn.doWrite() is not None  # CONNECTION_LOST: Twisted closes the connection
    conn.socket.close()


def test_daphne_reads_twisted_web_http_without_the_deprecation_proxy():
    from daphne import http_protocol
    from twisted.python.deprecate import _ModuleProxy
    from twisted.web import http

    from chatsite import server_tuning

    server_tuning.install()
    assert not isinstance(http_protocol.http, _ModuleProxy)
    assert http_protocol.http.Request is http.Request  # the same module, only unwrapped


# -- chatsite.serve: daphne without Twisted's TLS stack -------------------------------------------
_REACTOR_WITH = """
import sys
from chatsite.serve import refuse_tls
refuse_tls(sys.argv[1:])
import daphne.cli  # imports Twisted and installs its reactor, as daphne's command line does
from twisted.internet import reactor
print(type(reactor).__name__, sys.modules.get("OpenSSL") is not None)
"""


def _reactor_with(*argv: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", _REACTOR_WITH, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


def test_serve_runs_twisted_without_tls_for_a_plain_endpoint():
    argv = ("-e", "tcp:port=8001:interface=127.0.0.1:backlog=2048", "chatsite.asgi:application")
    assert _reactor_with(*argv) == "AsyncioSelectorReactor False"


def test_serve_keeps_tls_for_an_ssl_endpoint():
    argv = ("-e", "ssl:443:privateKey=key.pem:certKey=crt.pem", "chatsite.asgi:application")
    assert _reactor_with(*argv) == "AsyncioSelectorReactor True"


@pytest.mark.parametrize(
    ("argv", "wanted"),
    [
        (["-b", "0.0.0.0", "-p", "8000", "chatsite.asgi:application"], False),
        (["-e", "tcp:8000", "-e", "unix:/run/chat.sock", "chatsite.asgi:application"], False),
        (["-e", "ssl:443:privateKey=k.pem"], True),
        (["-essl:443:privateKey=k.pem"], True),
        (["--endpoint=SSL:443:privateKey=k.pem"], True),
        (["--endpoint", "tls:host=example.com:port=443"], True),
        (["-e", "le:/srv/certs:tcp:443"], True),
    ],
)
def test_serve_sees_which_endpoints_need_tls(argv, wanted):
    assert serve.tls_wanted(argv) is wanted


def test_the_live_server_runs_through_serve(daphne_server):
    """The test server is started as the README starts a worker, and it serves."""
    cmdline = (Path("/proc") / str(daphne_server.process.pid) / "cmdline").read_bytes()
    assert b"chatsite.serve" in cmdline.split(b"\0")
    assert urllib.request.urlopen(f"{daphne_server.url}/healthz", timeout=5).status == 200


# -- disconnect hooks run from daphne's lost-connection callback --------------------------------
def test_daphne_runs_disconnect_hooks_when_the_socket_closes():
    app = "tests.disconnect_app:application"
    server = LiveServer(upstream_url="http://127.0.0.1:9/v1", app=app)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /stream-1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while b"ok" not in data:  # the head and the first chunk may come apart
                chunk = sock.recv(4096)
                assert chunk, data
                data += chunk
        deadline = time.monotonic() + 5
        while "hook ran for /stream-1" not in Path(server.log.name).read_text():
            assert time.monotonic() < deadline, "the hook did not run"
            time.sleep(0.02)
    finally:
        server.stop()


def test_each_disconnect_hook_runs_once_and_a_failing_one_does_not_stop_the_rest(caplog):
    ran = []

    def failing():
        raise RuntimeError("boom")

    hooks = [lambda: ran.append(1), failing, lambda: ran.append(3)]
    streaming.run_disconnect_hooks(hooks)
    streaming.run_disconnect_hooks(hooks)  # the handler reports the same disconnect later
    streaming.run_disconnect_hooks(None)
    assert ran == [1, 3] and hooks == []
    assert "disconnect hook" in caplog.text


# -- Twisted's form parsing, which daphne never reads, is off -------------------------------------
def test_daphne_requests_skip_twisteds_form_parsing(monkeypatch):
    from daphne import http_protocol
    from twisted.web.test.requesthelper import DummyChannel

    from chatsite import server_tuning

    monkeypatch.setattr(http_protocol.WebRequest, "__init__", http_protocol.WebRequest.__init__)
    server_tuning._install_no_form_parsing()  # undone by monkeypatch after the test

    channel = DummyChannel()
    channel.factory = SimpleNamespace(server=SimpleNamespace(protocol_connected=lambda p: None))
    request = http_protocol.WebRequest(channel)
    request.process = lambda: None  # the ASGI hand-off is not under test here
    body = b"content=hello+world&model=fake"
    request.requestHeaders.setRawHeaders(b"content-type", [b"application/x-www-form-urlencoded"])
    request.requestHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    request.gotLength(len(body))
    request.handleContentChunk(body)
    request.requestReceived(b"POST", b"/c/send/?x=1", b"HTTP/1.1")
    assert request.args == {b"x": [b"1"]}  # the query string only: the body is not parsed
    assert request.content.read() == body  # and reaches the application whole


def test_the_worker_tunes_the_garbage_collector_at_start_up():
    """chatsite.asgi freezes what start-up imported and collects young objects less often."""
    code = "import gc, chatsite.asgi; print(gc.get_threshold(), gc.get_freeze_count() > 10_000)"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "chatsite.settings", "LOCAL_MODEL_PATH": "off"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "(10000, 20, 20) True", out.stderr[-2000:]
