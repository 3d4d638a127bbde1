"""The native (C) fake upstream and load generator (benchmarks/native/harness.c), for real.

The upstream is checked with the openai client and byte for byte against the Python fake;
the load generator against both fakes and against small scripted servers that misbehave.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import socketserver
import struct
import subprocess
import threading
import time
import urllib.request

import pytest

if shutil.which("cc") is None:
    pytest.skip("no C compiler (cc) to build the native harness", allow_module_level=True)

import openai  # noqa: E402

from benchmarks import loadgen, native_harness  # noqa: E402
from chat.llm.fake_upstream import FakeUpstream  # noqa: E402

HOST = "127.0.0.1"
TOKENS = 20
PROMPT = "hello big world"


def expected_text(n: int) -> str:
    return "".join(f"tok{i} " for i in range(n))


class NativeUpstream:
    """The C fake upstream as a subprocess on a free port."""

    def __init__(self, tokens: int = TOKENS, gap_ms: float = 0.0):
        argv = native_harness.upstream_argv(0, tokens, gap_ms)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        m = re.fullmatch(r"listening on http://127\.0\.0\.1:(\d+)/v1\n", line)
        assert m, f"unexpected first line {line!r}"
        self.port = int(m.group(1))
        self.base_url = f"http://{HOST}:{self.port}/v1"

    def stats(self) -> dict:
        return http_json(self.port, "/stats")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)
        self.proc.stdout.close()


def http_json(port: int, path: str, method: str = "GET"):
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", method=method)
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def native():
    up = NativeUpstream()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def slow_native():
    """Long streams, 20 ms apart: time for a client to leave in the middle."""
    up = NativeUpstream(tokens=200, gap_ms=20)
    yield up
    up.stop()


@pytest.fixture(scope="module")
def python_fake():
    up = FakeUpstream(tokens=TOKENS).start()
    yield up
    up.stop()


def client(up) -> openai.OpenAI:
    return openai.OpenAI(base_url=up.base_url, api_key="x", max_retries=0, timeout=10)


def collect(up, **kwargs) -> tuple[str, str | None, list]:
    """The text, the finish reason and all chunks of one streamed completion."""
    chunks = list(
        client(up).chat.completions.create(
            model="fake-count",
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
            **kwargs,
        )
    )
    text, finish = "", None
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish, chunks


# -- the build --------------------------------------------------------------------------------
def test_compiles_without_warnings(tmp_path):
    out = subprocess.run(
        ["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(tmp_path / "h")]
        + [str(native_harness.SOURCE)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


def test_build_is_cached():
    path = native_harness.build()
    mtime = path.stat().st_mtime
    assert native_harness.build() == path
    assert path.stat().st_mtime == mtime


# -- the upstream through the openai client ---------------------------------------------------
def test_stream_gives_every_token_and_stop(native):
    text, finish, chunks = collect(native)
    assert text == expected_text(TOKENS)
    assert finish == "stop"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.model for c in chunks} == {"fake-count"}
    assert len({c.id for c in chunks}) == 1


def test_max_tokens_cuts_with_length(native):
    text, finish, _ = collect(native, max_tokens=5)
    assert text == expected_text(5)
    assert finish == "length"
    text, finish, _ = collect(native, max_tokens=TOKENS + 5)
    assert (text, finish) == (expected_text(TOKENS), "stop")


def test_include_usage(native):
    text, _, chunks = collect(native, max_tokens=7, stream_options={"include_usage": True})
    assert text == expected_text(7)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.prompt_tokens == 3  # "hello big world"
    assert last.usage.completion_tokens == 7
    assert last.usage.total_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_not_streamed(native):
    r = client(native).chat.completions.create(
        model="fake-count", messages=[{"role": "user", "content": PROMPT}], max_tokens=4
    )
    assert r.choices[0].message.content == expected_text(4)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 4)


def test_unknown_model_is_404(native):
    with pytest.raises(openai.NotFoundError) as info:
        client(native).chat.completions.create(
            model="gpt-nope", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert "gpt-nope" in info.value.message


def test_models(native):
    ids = [m.id for m in client(native).models.list()]
    assert ids == ["fake-count"]


def test_stats_count_started_and_completed(native):
    http_json(native.port, "/stats/reset", "POST")
    for _ in range(3):
        collect(native)
    assert native.stats() == {"started": 3, "completed": 3, "abandoned": 0, "active": 0}


def open_stream(port: int, model: str = "fake-count") -> socket.socket:
    body = json.dumps({"model": model, "messages": [], "stream": True}).encode()
    s = socket.create_connection((HOST, port), timeout=10)
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return s


def wait_for(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_client_that_leaves_is_abandoned(slow_native):
    up = slow_native
    http_json(up.port, "/stats/reset", "POST")
    s = open_stream(up.port)
    seen = b""
    while b'"tok2 "' not in seen:
        data = s.recv(65536)
        assert data
        seen += data
    assert up.stats()["active"] == 1
    left = time.monotonic()
    s.close()
    assert wait_for(lambda: up.stats()["abandoned"] == 1)
    assert up.stats() == {"started": 1, "completed": 0, "abandoned": 1, "active": 0}
    (record,) = http_json(up.port, "/stats/abandoned")
    assert 3 <= record["sent"] < 10
    assert 0 <= record["eof_at"] - left < 1.0  # the same clock as time.monotonic()


def test_client_that_resets_is_abandoned(slow_native):
    up = slow_native
    http_json(up.port, "/stats/reset", "POST")
    s = open_stream(up.port)
    assert b"tok0" in s.recv(65536)
    # SO_LINGER 0: close() sends a RST instead of a FIN.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    assert wait_for(lambda: up.stats()["abandoned"] == 1)
    assert up.stats()["active"] == 0
    text, finish, _ = collect(up, max_tokens=2)  # and it goes on serving
    assert (text, finish) == (expected_text(2), "length")


def test_keep_alive_and_pipelining(native):
    body = json.dumps({"model": "fake-count", "stream": True, "max_tokens": 2}).encode()
    one = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    last = b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection((HOST, native.port), timeout=10) as s:
        s.sendall(one + one + last)  # all at once: the second waits for the first
        raw = read_all(s)
    assert raw.count(b"HTTP/1.1 200 OK") == 3
    assert raw.count(b'"content":"tok1 "') == 2
    assert raw.count(b"data: [DONE]") == 2
    assert raw.endswith(b'"active":0}')


# -- the upstream against the Python fake, byte for byte -------------------------------------
def read_all(s: socket.socket) -> bytes:
    parts = []
    while data := s.recv(65536):
        parts.append(data)
    return b"".join(parts)


def raw_exchange(port: int, method: str, path: str, body: dict | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(head.encode() + data)
        return read_all(s)


_VOLATILE = re.compile(rb'"id":"chatcmpl-fake\d+"|"created":\d+|Content-Length: \d+')


def normalise(raw: bytes) -> bytes:
    return _VOLATILE.sub(lambda m: m.group(0).split(b":")[0] + b":*", raw)


def dechunk(body: bytes) -> list[bytes]:
    chunks = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert body == b"\r\n", "bytes after the last chunk"
            return chunks
        chunks.append(body[:size])
        assert body[size : size + 2] == b"\r\n"
        body = body[size + 2 :]


def events(chunks: list[bytes]) -> list:
    """Each chunk is one SSE event; its JSON without the id and the timestamp."""
    out = []
    for chunk in chunks:
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
        data = chunk[6:-2]
        if data == b"[DONE]":
            out.append("[DONE]")
            continue
        obj = json.loads(data)
        assert obj.pop("id").startswith("chatcmpl-fake")
        assert isinstance(obj.pop("created"), int)
        out.append(obj)
    return out


STREAM_REQUESTS = [
    {"model": "fake-count", "messages": [{"role": "user", "content": PROMPT}], "stream": True},
    {
        "model": "fake-count",
        "messages": [
            {"role": "system", "content": "be  brief\n"},
            {"role": "user", "content": [{"type": "text", "text": "a b"}, {"type": "image"}]},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 3,
    },
    {"model": "fake-count", "stream": 1, "max_completion_tokens": 1, "max_tokens": 9},
    {"model": "fake-count", "stream": True, "max_tokens": 0, "stream_options": {}},
]


@pytest.mark.parametrize("body", STREAM_REQUESTS)
def test_stream_bytes_match_the_python_fake(native, python_fake, body):
    theirs = raw_exchange(python_fake.port, "POST", "/v1/chat/completions", body)
    ours = raw_exchange(native.port, "POST", "/v1/chat/completions", body)
    their_head, _, their_body = theirs.partition(b"\r\n\r\n")
    our_head, _, our_body = ours.partition(b"\r\n\r\n")
    assert our_head == their_head
    assert our_head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Transfer-Encoding: chunked" in our_head
    ours_chunks, their_chunks = dechunk(our_body), dechunk(their_body)
    assert events(ours_chunks) == events(their_chunks)
    assert [normalise(c) for c in ours_chunks] == [normalise(c) for c in their_chunks]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/chat/completions", {"model": "fake-count", "max_tokens": 2}),
        ("POST", "/v1/chat/completions", {"model": "nope", "stream": True}),
        ("POST", "/v1/chat/completions", {"stream": True}),
        ("POST", "/v1/chat/completions", ["not", "an", "object"]),
        ("GET", "/v1/chat/completions", None),
        ("GET", "/nowhere/", None),
        ("POST", "/stats/reset", None),
        ("GET", "/stats", None),
    ],
)
def test_other_responses_match_the_python_fake(native, python_fake, method, path, body):
    if path == "/stats":  # the same counters on both sides
        python_fake.reset_stats()
        http_json(native.port, "/stats/reset", "POST")
    theirs = raw_exchange(python_fake.port, method, path, body)
    ours = raw_exchange(native.port, method, path, body)
    assert normalise(ours) == normalise(theirs)


def test_bad_json_matches_the_python_fake(native, python_fake):
    def send(port):
        with socket.create_connection((HOST, port), timeout=10) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                b"Connection: close\r\n\r\n{bad"
            )
            s.sendall(b"}")
            return read_all(s)

    assert send(native.port) == send(python_fake.port)
    assert send(native.port).startswith(b"HTTP/1.1 400 Bad Request")


def test_gap_timing_matches_the_python_fake():
    """First token at once, then gap_ms between tokens, as the Python fake does."""
    results = {}
    native = NativeUpstream(tokens=6, gap_ms=30)
    fake = FakeUpstream(tokens=6, gap_ms=30).start()
    try:
        for name, port in (("native", native.port), ("python", fake.port)):
            s = open_stream(port)
            t0, times, seen = time.monotonic(), [], b""
            while seen.count(b'"content":"tok') < 6:
                data = s.recv(65536)
                assert data
                seen += data
                times += [time.monotonic() - t0] * data.count(b'"content":"tok')
            s.close()
            results[name] = times
    finally:
        native.stop()
        fake.stop()
    for times in results.values():
        assert times[0] < 0.02
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert all(0.028 <= g < 0.1 for g in gaps), gaps


# -- the load generator -----------------------------------------------------------------------
def test_load_against_the_python_fake():
    up = FakeUpstream(tokens=30, gap_ms=5).start()
    try:
        summary = native_harness.run_load([(HOST, up.port)], c=20, n=20, tokens=30)
        # The Python fake counts a stream once its last write is drained: just after the
        # client has seen [DONE].
        done = {"started": 20, "completed": 20, "abandoned": 0, "active": 0}
        assert wait_for(lambda: up.stats == done), up.stats
    finally:
        up.stop()
    assert summary["requests"] == 20
    assert summary["complete"] == 20
    assert summary["errors"] == 0, summary["error_samples"]
    assert summary["tokens"] == 20 * 30
    assert summary["tokens_per_frame"] == 1.0
    assert 4.5 <= summary["gap_p50_ms"] <= 20
    assert summary["ttft_p50_ms"] < 100
    assert 30 * 5 * 0.9 <= summary["total_p50_ms"] < 2000
    assert summary["cpu_s"] >= 0
    # Every key the Python load generator reports (run.py reads them) is there too.
    assert set(loadgen.summarise([], 1.0, 0.0)) <= set(summary)


def test_load_against_the_native_upstream_round_robin():
    a, b = NativeUpstream(tokens=30, gap_ms=5), NativeUpstream(tokens=30, gap_ms=5)
    try:
        summary = native_harness.run_load(
            [(HOST, a.port), (HOST, b.port)], c=20, n=40, tokens=30, api_key="sk-x"
        )
        assert a.stats()["completed"] == b.stats()["completed"] == 20
    finally:
        a.stop()
        b.stop()
    assert (summary["requests"], summary["complete"], summary["errors"]) == (40, 40, 0)
    assert summary["tokens"] == 40 * 30
    assert summary["gap_max_ms"] >= summary["gap_p99_ms"] >= summary["gap_p50_ms"] >= 4.5


def test_load_max_tokens_and_incomplete(native):
    ok = native_harness.run_load([(HOST, native.port)], c=2, n=2, tokens=4, max_tokens=4)
    assert (ok["complete"], ok["tokens"]) == (2, 8)
    short = native_harness.run_load([(HOST, native.port)], c=2, n=3, tokens=TOKENS + 1)
    assert (short["complete"], short["errors"]) == (0, 3)
    assert short["error_kinds"] == {f"incomplete: {TOKENS} of {TOKENS + 1} tokens": 3}


def test_load_non_200_status(native):
    summary = native_harness.run_load([(HOST, native.port)], c=2, n=2, tokens=5, model="nope")
    assert (summary["complete"], summary["errors"], summary["tokens"]) == (0, 2, 0)
    (kind,) = summary["error_kinds"]
    assert kind.startswith('HTTP 404: {"error":{"message":"The model `nope` does not exist')


def test_load_connection_refused():
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]  # nobody listens there
    summary = native_harness.run_load([(HOST, port)], c=1, n=2, tokens=5)
    assert (summary["requests"], summary["errors"]) == (2, 2)
    assert summary["error_samples"][0].startswith("connect: ")


# A tiny scripted HTTP server, one behaviour per path.
def _sse(*payloads: str) -> list[bytes]:
    return [f"data: {p}\n\n".encode() for p in payloads]


def _tok(text: str) -> str:
    return json.dumps({"choices": [{"delta": {"content": text}}]}, separators=(",", ":"))


SCRIPTS = {
    "/order": (200, "chunked", _sse(_tok("tok0 "), _tok("tok2 "), "[DONE]")),
    "/joined": (200, "length", _sse(_tok("tok0 tok1 "), _tok("tok2 "), "[DONE]")),
    "/escaped": (200, "close", _sse(_tok("tok0\ntok1 "), '{"content":"\\u0074ok2"}', "[DONE]")),
    "/cut": (200, "chunked-cut", _sse(_tok("tok0 "))),
    "/no-done": (200, "chunked", _sse(_tok("tok0 "), _tok("tok1 "))),
    "/error-frame": (200, "chunked", _sse(_tok("tok0 "), '{"error":{"message":"boom"}}')),
    "/500": (500, "length", [b'{"error":"upstream exploded"}']),
    "/split": (
        200,
        "chunked",
        [b"da", b"ta: " + _tok("tok0 ").encode() + b"\n", b"\ndata: [DONE]\n\n"],
    ),
}


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        s = self.request
        data = b""
        while b"\r\n\r\n" not in data:
            more = s.recv(65536)
            if not more:
                return
            data += more
        path = data.split(b" ", 2)[1].decode()
        if path == "/silent":  # never answers; waits for the client to give up
            with contextlib.suppress(OSError):
                while s.recv(65536):
                    pass
            return
        status, framing, parts = SCRIPTS[path]
        reason = "OK" if status == 200 else "Internal Server Error"
        head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/event-stream\r\n"
        if framing.startswith("chunked"):
            s.sendall(head.encode() + b"Transfer-Encoding: chunked\r\n\r\n")
            for part in parts:
                s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
                time.sleep(0.002)
            if framing == "chunked":
                s.sendall(b"0\r\n\r\n")
        elif framing == "length":
            body = b"".join(parts)
            s.sendall(head.encode() + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        else:  # until close
            s.sendall(head.encode() + b"\r\n" + b"".join(parts))
        time.sleep(0.05)


@pytest.fixture(scope="module")
def scripted():
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer((HOST, 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def load_path(port: int, path: str, tokens: int | None = 3, timeout: float = 10) -> dict:
    return native_harness.run_load(
        [(HOST, port)], c=2, n=2, tokens=tokens, path=path, timeout=timeout
    )


def only_error(summary: dict) -> str:
    assert summary["complete"] == 0
    assert summary["errors"] == summary["requests"] == 2
    (kind,) = summary["error_kinds"]
    assert summary["error_kinds"][kind] == 2
    return kind


def test_load_wrong_token_order(scripted):
    assert only_error(load_path(scripted, "/order")) == "token 1: got b'tok2'"


def test_load_joined_tokens_with_content_length(scripted):
    summary = load_path(scripted, "/joined")
    assert (summary["complete"], summary["errors"], summary["tokens"]) == (2, 0, 6)
    assert summary["tokens_per_frame"] == 1.5


def test_load_escapes_and_read_until_close(scripted):
    summary = load_path(scripted, "/escaped")
    assert (summary["complete"], summary["errors"], summary["tokens"]) == (2, 0, 6)


def test_load_events_split_across_chunks(scripted):
    summary = load_path(scripted, "/split", tokens=1)
    assert (summary["complete"], summary["errors"]) == (2, 0)


def test_load_connection_cut(scripted):
    assert only_error(load_path(scripted, "/cut")) == "connection closed before the end"


def test_load_no_done(scripted):
    assert only_error(load_path(scripted, "/no-done", tokens=2)) == (
        "body ended without data: [DONE]"
    )


def test_load_error_frame(scripted):
    assert only_error(load_path(scripted, "/error-frame")).startswith(
        'error frame: data: {"error":{"message":"boom"}}'
    )


def test_load_http_500(scripted):
    assert only_error(load_path(scripted, "/500")) == 'HTTP 500: {"error":"upstream exploded"}'


def test_load_timeout_is_bounded(scripted):
    t0 = time.monotonic()
    summary = native_harness.run_load(
        [(HOST, scripted)], c=2, n=5, tokens=3, path="/silent", timeout=1
    )
    assert time.monotonic() - t0 < 5
    assert (summary["requests"], summary["errors"], summary["complete"]) == (5, 5, 0)
    assert summary["error_kinds"] == {
        "timeout after 1 s (0 tokens)": 2,
        "timeout after 1 s (not started)": 3,
    }
