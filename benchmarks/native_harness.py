"""The native (C) fake upstream and load generator of benchmarks/native/harness.c.

They do what chat/llm/fake_upstream.py (model ``fake-count``) and benchmarks/loadgen.py
(openai mode) do, for a small fraction of the CPU per token, so that the harness takes
little of the core it shares with a server under test. Standard library only::

    from native_harness import build, upstream_argv, run_load

    argv = upstream_argv(8100, tokens=100, gap_ms=20)  # spawn it (under taskset) yourself;
    # it prints "listening on http://127.0.0.1:8100/v1" once ready
    summary = run_load([("127.0.0.1", 8000)], c=200, n=400, tokens=100, cpu="1")

`run_load` returns loadgen.summarise()'s keys (plus ``error_samples``, ``frames``,
``connect_p50_ms``/``p99``, ``ttft_from_connect_p50_ms``/``p99``, ``elapsed_s`` and
``cpu_s``, the load generator's own CPU seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "benchmarks" / "native" / "harness.c"
BINARY = ROOT / "var" / "native" / "harness"
CFLAGS = ["-O2", "-Wall", "-Wextra"]


class BuildError(RuntimeError):
    """The C compiler is missing or failed."""


def build() -> Path:
    """Compile harness.c into var/native/harness, unless the binary is newer than the source."""
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    cc = shutil.which("cc")
    if cc is None:
        raise BuildError("no C compiler: `cc` is not on PATH (install gcc to build the harness)")
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name, then rename: a concurrent build or run never sees half a file.
    fd, tmp = tempfile.mkstemp(prefix=".harness-", dir=BINARY.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *CFLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise BuildError(f"cc failed on {SOURCE}:\n{proc.stderr}")
        os.chmod(tmp, 0o755)  # mkstemp made it 0600
        os.replace(tmp, BINARY)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return BINARY


def upstream_argv(port: int, tokens: int, gap_ms: float, host: str = "127.0.0.1") -> list[str]:
    """The command line of the native fake upstream (builds the binary if needed)."""
    return [
        str(build()),
        "upstream",
        "--host",
        host,
        "--port",
        str(port),
        "--tokens",
        str(tokens),
        "--gap-ms",
        str(gap_ms),
    ]


def load_argv(
    targets: list[tuple[str, int]],
    c: int,
    n: int,
    tokens: int | None,
    api_key: str | None = None,
    timeout: float = 120,
    cpu: str | None = None,
    *,
    path: str = "/v1/chat/completions",
    model: str = "fake-count",
    max_tokens: int | None = None,
) -> list[str]:
    """The command line of the native load generator (see run_load)."""
    if not targets:
        raise ValueError("no targets")
    argv = ["taskset", "-c", cpu] if cpu is not None else []
    argv += [str(build()), "load", "--target", ",".join(f"{h}:{p}" for h, p in targets)]
    argv += ["-c", str(c), "-n", str(n), "--timeout", str(timeout), "--path", path]
    argv += ["--model", model]
    if tokens is not None:
        argv += ["--tokens", str(tokens)]
    if api_key:
        argv += ["--api-key", api_key]
    if max_tokens is not None:
        argv += ["--max-tokens", str(max_tokens)]
    return argv


def run_load(
    targets: list[tuple[str, int]],
    c: int,
    n: int,
    tokens: int | None,
    api_key: str | None = None,
    timeout: float = 120,
    **options,
) -> dict:
    """C concurrent streams, each on a new connection, until n are done; the JSON summary.

    Requests go round-robin over `targets` ((host, port) pairs); every stream must deliver
    `tokens` tokens "tok0 " ... in order (None: any number). After `timeout` seconds the
    streams still running, and those not started, count as errors. `cpu` pins the load
    generator with `taskset -c CPU`; `options` are load_argv's others.
    """
    argv = load_argv(targets, c, n, tokens, api_key, timeout, **options)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"native load generator failed ({proc.returncode}): {proc.stderr}")
    return json.loads(proc.stdout)


if __name__ == "__main__":
    print(build())
