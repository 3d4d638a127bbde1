"""A cheap asyncio load generator for streaming chat endpoints.

It shares a core with the fake upstream during `make bench`, so it is written to
cost little per token: one `asyncio.Protocol` per stream, a hand-written
HTTP/1.1 response parser (status line, headers, chunked or plain body) and an
SSE splitter that looks for the few bytes it needs instead of parsing JSON.

Modes:

* ``openai``: OpenAI chat-completion chunks (``data: {..."content":"..."}``,
  ending with ``data: [DONE]``), from the fake upstream, the baseline proxy or
  chatsite's ``/v1/chat/completions``.
* ``browser``: chatsite's chat page stream (``event: start``, ``event:
  snapshot``, ``data: {"t":"..."}`` frames, ``event: end`` with the status).

The content is expected to be the fake upstream's ``fake-count`` script
("tok0 tok1 ... "), so every token is checked to arrive once and in order; a
server may join several tokens into one frame. ``leave_after=k`` closes the
connection once k tokens have arrived (a client that goes away).

Per stream it records the time to first token (from sending the request to the
first content token), the gaps between frames carrying content, the total
time, the tokens, and any error. `run_load` runs C concurrent streams until R
requests are done and summarises them; the CLI prints that summary as JSON::

    python benchmarks/loadgen.py --url http://127.0.0.1:8100 -c 100 -n 200 --tokens 100
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

now = time.monotonic  # CLOCK_MONOTONIC on Linux: comparable with other processes

_EXPECTED = [b"tok%d" % i for i in range(20000)]


@dataclass(slots=True)
class Target:
    """Where and what to send: one prepared HTTP request."""

    host: str
    port: int
    request: bytes


@dataclass(slots=True)
class StreamResult:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    total: float = 0.0
    tokens: int = 0
    frames: int = 0
    error: str | None = None
    complete: bool = False  # every expected token, in order, and a clean end
    left_at: float | None = None  # monotonic time the client closed (leave_after)
    started_at: float = 0.0


class _StreamProtocol(asyncio.Protocol):
    __slots__ = (
        "mode",
        "expect",
        "leave_after",
        "result",
        "done",
        "transport",
        "t_sent",
        "t_last",
        "head",
        "headers_done",
        "chunked",
        "status",
        "cbuf",
        "need",
        "sse",
        "finished",
        "body_err",
        "ended",
    )

    def __init__(
        self, mode: str, expect: int | None, leave_after: int | None, done: asyncio.Future
    ):
        self.mode = mode
        self.expect = expect
        self.leave_after = leave_after
        self.result = StreamResult()
        self.done = done
        self.transport = None
        self.t_sent = 0.0
        self.t_last = 0.0
        self.head = bytearray()
        self.headers_done = False
        self.chunked = False
        self.status = 0
        self.cbuf = bytearray()
        self.need = -1  # bytes of chunk payload (+2 for CRLF) still wanted; -1: a size line
        self.sse = bytearray()
        self.finished = False  # the body ended ([DONE] / end event / last chunk)
        self.body_err = bytearray()
        self.ended = False  # the protocol reported its result

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, request: bytes) -> None:
        self.t_sent = self.t_last = self.result.started_at = now()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        if self.ended:
            return
        if not self.headers_done:
            self.head += data
            i = self.head.find(b"\r\n\r\n")
            if i < 0:
                return
            head = bytes(self.head[:i])
            data = bytes(self.head[i + 4 :])
            self.head = bytearray()
            self.headers_done = True
            first, _, rest = head.partition(b"\r\n")
            try:
                self.status = int(first.split(b" ", 2)[1])
            except (IndexError, ValueError):
                self._end(f"bad status line {first[:60]!r}")
                return
            self.chunked = b"transfer-encoding: chunked" in rest.lower()
            if not data:
                return
        if self.chunked:
            self._dechunk(data)
        else:
            self._body(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        if self.ended:
            return
        if self.finished:
            self._end(None)
        elif self.status and self.status != 200:
            self._end(f"HTTP {self.status}: {bytes(self.body_err[:120]).decode(errors='replace')}")
        else:
            self._end("connection closed before the end" + (f" ({exc})" if exc else ""))

    # -- parsing ---------------------------------------------------------------------------------
    def _dechunk(self, data: bytes) -> None:
        buf = self.cbuf
        buf += data
        pos = 0
        n = len(buf)
        while pos < n:
            if self.need < 0:
                j = buf.find(b"\r\n", pos)
                if j < 0:
                    break
                size = int(buf[pos:j].split(b";", 1)[0], 16)
                pos = j + 2
                if size == 0:
                    self.finished = True
                    self._body_end()
                    del buf[:]
                    return
                self.need = size + 2
            if n - pos < self.need:
                break
            end = pos + self.need - 2
            self._body(buf[pos:end])
            if self.ended:
                return
            pos = end + 2
            self.need = -1
        if pos:
            del buf[:pos]

    def _body(self, data) -> None:
        if self.status != 200:
            self.body_err += data
            return
        sse = self.sse
        sse += data
        start = 0
        while True:
            i = sse.find(b"\n\n", start)
            if i < 0:
                break
            self._event(sse[start:i])
            if self.ended:
                return
            start = i + 2
        if start:
            del sse[:start]

    def _body_end(self) -> None:
        if self.status != 200:
            self._end(f"HTTP {self.status}: {bytes(self.body_err[:120]).decode(errors='replace')}")
        else:
            self._end(None)

    def _event(self, ev: bytearray) -> None:
        if ev[:1] == b":":  # comment (stream open, ping)
            return
        if self.mode == "openai":
            i = ev.find(b'"content":"')
            if i < 0:
                if ev.startswith(b"data: [DONE]"):
                    self.finished = True
                    self._end(None)
                elif b'"error"' in ev:
                    self._end("error frame: " + bytes(ev[:160]).decode(errors="replace"))
                return
            i += 11
        else:
            if ev.startswith(b"event: end"):
                self.finished = True
                if b'"status":"complete"' not in ev:
                    self._end("end frame: " + bytes(ev[:160]).decode(errors="replace"))
                else:
                    self._end(None)
                return
            if ev.startswith(b"event: start"):
                return
            i = ev.find(b'{"t":"')
            if i < 0:
                return
            i += 6
        j = ev.find(b'"', i)
        content = ev[i:j]
        if b"\\" in content:  # escapes: not the fake's tokens, but decode properly
            j = i
            while True:
                j = ev.find(b'"', j)
                k = j - 1
                while ev[k] == 0x5C:
                    k -= 1
                if (j - 1 - k) % 2 == 0:
                    break
                j += 1
            content = json.loads(b'"' + ev[i:j] + b'"').encode()
        if not content:
            return
        t = now()
        r = self.result
        words = content.split()
        n = r.tokens
        for w in words:
            if n >= len(_EXPECTED) or w != _EXPECTED[n]:
                self._end(f"token {n}: got {bytes(w[:20])!r}")
                return
            n += 1
        r.tokens = n
        if r.ttft is None:
            r.ttft = t - self.t_sent
        else:
            r.gaps.append(t - self.t_last)
        r.frames += 1
        self.t_last = t
        if self.leave_after is not None and n >= self.leave_after:
            r.left_at = now()
            self.transport.close()
            self._end(None, left=True)

    def _end(self, error: str | None, left: bool = False) -> None:
        if self.ended:
            return
        self.ended = True
        r = self.result
        r.total = now() - self.t_sent
        r.error = error
        if error is None and not left:
            r.complete = self.expect is None or r.tokens == self.expect
            if not r.complete:
                r.error = f"incomplete: {r.tokens} of {self.expect} tokens"
        if not self.done.done():
            self.done.set_result(r)
        if not left and self.transport is not None and not self.transport.is_closing():
            self.transport.close()


async def one_stream(
    target: Target,
    mode: str = "openai",
    expect: int | None = None,
    leave_after: int | None = None,
    timeout: float = 120.0,
) -> StreamResult:
    """Send one request over a new connection and read its stream."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    t0 = now()
    try:
        transport, proto = await asyncio.wait_for(
            loop.create_connection(
                lambda: _StreamProtocol(mode, expect, leave_after, done), target.host, target.port
            ),
            timeout,
        )
    except (TimeoutError, OSError) as exc:
        return StreamResult(error=f"connect: {type(exc).__name__}: {exc}", started_at=t0)
    proto.send(target.request)
    try:
        return await asyncio.wait_for(asyncio.shield(done), timeout)
    except TimeoutError:
        proto._end(f"timeout after {timeout:.0f} s ({proto.result.tokens} tokens)")
        transport.abort()
        return proto.result
    finally:
        if not done.done():
            done.cancel()


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = max(0, min(len(values) - 1, int(round(p / 100 * len(values) + 0.5)) - 1))
    return values[k]


def summarise(results: list[StreamResult], wall: float, cpu: float) -> dict:
    ttfts = [r.ttft for r in results if r.ttft is not None]
    gaps = [g for r in results for g in r.gaps]
    totals = [r.total for r in results if r.error is None]
    tokens = sum(r.tokens for r in results)
    frames = sum(r.frames for r in results)
    errors: dict[str, int] = {}
    for r in results:
        if r.error:
            key = r.error[:100]
            errors[key] = errors.get(key, 0) + 1

    def ms(v):
        return None if v is None else round(v * 1000, 2)

    return {
        "requests": len(results),
        "complete": sum(r.complete for r in results),
        "errors": sum(1 for r in results if r.error),
        "error_kinds": errors,
        "tokens": tokens,
        "tokens_per_frame": round(tokens / frames, 2) if frames else None,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "ttft_p50_ms": ms(percentile(ttfts, 50)),
        "ttft_p99_ms": ms(percentile(ttfts, 99)),
        "gap_p50_ms": ms(percentile(gaps, 50)),
        "gap_p99_ms": ms(percentile(gaps, 99)),
        "gap_max_ms": ms(max(gaps) if gaps else None),
        "total_p50_ms": ms(percentile(totals, 50)),
        "total_p99_ms": ms(percentile(totals, 99)),
        "loadgen_cpu_s": round(cpu, 3),
        "loadgen_cpu_us_per_token": round(cpu / tokens * 1e6, 2) if tokens else None,
    }


async def run_load(
    targets: list[Target],
    concurrency: int,
    requests: int,
    *,
    mode: str = "openai",
    expect: int | None = None,
    leave_after: int | None = None,
    timeout: float = 120.0,
) -> tuple[dict, list[StreamResult]]:
    """C workers, each running streams back to back until R requests are done.

    Requests go to the targets round-robin. Returns the summary and the results.
    """
    counter = iter(range(requests))
    results: list[StreamResult] = []

    async def worker() -> None:
        for i in counter:
            results.append(
                await one_stream(targets[i % len(targets)], mode, expect, leave_after, timeout)
            )

    # No collector pauses inside a measurement (they would show up as gaps).
    gc.collect()
    gc.disable()
    try:
        cpu0, t0 = time.process_time(), now()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
        wall, cpu = now() - t0, time.process_time() - cpu0
    finally:
        gc.enable()
    return summarise(results, wall, cpu), results


# -- request builders ---------------------------------------------------------------------------
def openai_request(
    host: str,
    port: int,
    *,
    path: str = "/v1/chat/completions",
    model: str = "fake-count",
    api_key: str | None = None,
    max_tokens: int | None = None,
    content: str = "Count for me.",
) -> Target:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": True}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    data = json.dumps(body).encode()
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}"
        f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return Target(host, port, head.encode() + data)


def browser_request(
    host: str,
    port: int,
    *,
    session: str,
    csrf: str,
    model: str = "fake-count",
    path: str = "/c/send/",
    content: str = "Count for me.",
) -> Target:
    from urllib.parse import urlencode

    data = urlencode({"content": content, "model": model}).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Cookie: sessionid={session}; csrftoken={csrf}\r\nX-CSRFToken: {csrf}\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nAccept: text/event-stream\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return Target(host, port, head.encode() + data)


def run(coro):
    """Run a coroutine on uvloop when it is installed (cheaper per token), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="http://HOST:PORT[,PORT2...] (round-robin)")
    p.add_argument("--mode", choices=("openai", "browser"), default="openai")
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("-n", "--requests", type=int, default=1)
    p.add_argument("--tokens", type=int, default=None, help="tokens every stream must deliver")
    p.add_argument("--leave-after", type=int, default=None)
    p.add_argument("--model", default="fake-count")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--session", default=None, help="sessionid cookie (browser mode)")
    p.add_argument("--csrf", default=None, help="csrftoken cookie and header (browser mode)")
    p.add_argument("--path", default=None)
    p.add_argument("--timeout", type=float, default=120.0)
    a = p.parse_args(argv)
    u = urlsplit(a.url)
    host = u.hostname or "127.0.0.1"
    ports = [int(x) for x in u.netloc.rsplit(":", 1)[1].split(",")]
    if a.mode == "openai":
        targets = [
            openai_request(
                host,
                port,
                path=a.path or "/v1/chat/completions",
                model=a.model,
                api_key=a.api_key,
                max_tokens=a.max_tokens,
            )
            for port in ports
        ]
    else:
        if not (a.session and a.csrf):
            p.error("browser mode needs --session and --csrf")
        targets = [
            browser_request(
                host, port, session=a.session, csrf=a.csrf, model=a.model, path=a.path or "/c/send/"
            )
            for port in ports
        ]
    summary, _ = run(
        run_load(
            targets,
            a.concurrency,
            a.requests,
            mode=a.mode,
            expect=a.tokens,
            leave_after=a.leave_after,
            timeout=a.timeout,
        )
    )
    json.dump(summary, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
