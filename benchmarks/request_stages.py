"""Where one API request's time goes before its first token (issue #5, the 1-stream target).

    .venv/bin/python benchmarks/request_stages.py [--requests 200]

Drives the real ASGI application in this process (no daphne, no socket to the
client) with sequential `POST /v1/chat/completions` streams of one token each;
the fake upstream runs in a process of its own. Marks the moments the request
reaches the key check, the rows are stored and the upstream answers, and prints
the median of each since the request started, as a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time

import scratch_django  # noqa: E402

ROOT = scratch_django.ROOT
sys.path.insert(0, str(ROOT))
from tests.live import free_port  # noqa: E402

UPSTREAM_PORT = free_port()
os.environ.update(
    {
        "OPENAI_BASE_URL": f"http://127.0.0.1:{UPSTREAM_PORT}/v1",
        "OPENAI_API_KEY": "bench",
        "OPENAI_MODELS": "fake-count",
        "LOCAL_MODEL_PATH": "off",
        "CHAT_MAX_REPLIES_PER_HOUR": "0",
        "CHAT_MAX_CONCURRENT_REPLIES": "1000",
    }
)
scratch_django.setup("chatsite-stages-")
os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE")  # the request path must stay async-safe

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402

from chat import services  # noqa: E402
from chat.llm import openai_compat  # noqa: E402

STAGES = [
    ("key check starts", "auth_start"),
    ("key check done", "auth_end"),
    ("rows stored (conversation, messages, reply)", "stored"),
    ("upstream request sent, headers back", "upstream_headers"),
    ("first token sent to the client", "first_token"),
]
marks: dict[str, float] = {}


def _instrument() -> None:
    """Wrap the stage boundaries; each records the first time it is reached."""
    authenticate, create, raw_stream = (
        services.api_key_authenticate,
        services.api_conversation_create,
        openai_compat._raw_chat_stream,
    )

    def timed_authenticate(*args, **kwargs):
        marks.setdefault("auth_start", time.perf_counter())
        try:
            return authenticate(*args, **kwargs)
        finally:
            marks.setdefault("auth_end", time.perf_counter())

    def timed_create(*args, **kwargs):
        try:
            return create(*args, **kwargs)
        finally:
            marks.setdefault("stored", time.perf_counter())

    @contextlib.asynccontextmanager
    async def timed_raw_stream(*args, **kwargs):
        async with raw_stream(*args, **kwargs) as response:
            marks.setdefault("upstream_headers", time.perf_counter())
            yield response

    services.api_key_authenticate = timed_authenticate
    services.api_conversation_create = timed_create
    openai_compat._raw_chat_stream = timed_raw_stream


async def one_request(application, key: str) -> dict[str, float]:
    body = json.dumps(
        {"model": "fake-count", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"authorization", f"Bearer {key}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    inbox = [{"type": "http.request", "body": body, "more_body": False}]
    finished = asyncio.Event()

    async def receive():
        if inbox:
            return inbox.pop()
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] != "http.response.body":
            return
        if b'"content":"tok' in message.get("body", b""):
            marks.setdefault("first_token", time.perf_counter())
        if not message.get("more_body"):
            finished.set()

    marks.clear()
    started = time.perf_counter()
    await application(scope, receive, send)
    return {name: (at - started) * 1000 for name, at in marks.items()}


async def measure(application, key: str, requests: int, warmup: int) -> list[dict[str, float]]:
    from chat import llm

    for _ in range(warmup):
        await one_request(application, key)
    cpu = time.process_time()
    rows = [await one_request(application, key) for _ in range(requests)]
    cpu_ms = (time.process_time() - cpu) / requests * 1000
    rows.append({"cpu": cpu_ms})  # this process's CPU (event loop and database thread)
    for provider in llm.configured_providers():
        if hasattr(provider, "aclose"):
            await provider.aclose()  # this loop's HTTP client
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--cprofile", metavar="FILE", help="also write a cProfile of the event loop thread"
    )
    options = parser.parse_args()

    upstream = subprocess.Popen(
        [sys.executable, "-m", "chat.llm.fake_upstream", "--port", str(UPSTREAM_PORT)]
        + ["--tokens", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        upstream.stdout.readline()  # "listening on ..."
        call_command("migrate", verbosity=0)
        user = get_user_model().objects.create_user("bench", password="bench-pass-123")
        _, key = services.api_key_create(owner=user, name="bench")
        _instrument()
        from chatsite.asgi import application

        if options.cprofile:
            import cProfile

            with cProfile.Profile() as profile:
                rows = asyncio.run(measure(application, key, options.requests, options.warmup))
            profile.dump_stats(options.cprofile)
        else:
            rows = asyncio.run(measure(application, key, options.requests, options.warmup))
    finally:
        upstream.terminate()
        upstream.wait(5)

    cpu_ms = rows.pop()["cpu"]

    def median(name: str) -> float:
        values = sorted(row[name] for row in rows)
        return values[len(values) // 2]

    print(f"{options.requests} sequential one-token streams, after {options.warmup} warm-up ones")
    print("\n| stage | since the request started, median |\n| --- | ---: |")
    for label, name in STAGES:
        print(f"| {label} | {median(name):.2f} ms |")
    print(f"\nCPU per request (this process: event loop and database thread): {cpu_ms:.2f} ms")


if __name__ == "__main__":
    main()
