"""Where chatsite's server CPU goes under load: py-spy on one daphne, summarised.

    .venv/bin/python benchmarks/profile_server.py [-c 100] [-n 400] [--seconds 8] [--mode browser]

Sets up the bench database and fake upstream as `make bench` does (benchmarks/run.py),
starts one daphne pinned to core 0, runs C concurrent API streams (or, with
`--mode browser`, the chat page's `POST /c/send/` with a session; 100 tokens
20 ms apart unless told otherwise) from core 1 and, while they run, samples the daphne with
`py-spy record --gil -f raw`. Prints the functions with the largest shares of the
samples, inclusive (on the stack) and exclusive (at the top), as Markdown tables.
Needs py-spy (requirements-bench.txt) and permission to ptrace (root here).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # noqa: E402
import run  # noqa: E402


def summarise(raw: Path, top: int) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    exclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        # "func (path/file.py:line)" -> "func file.py"
        frames = [
            (f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].split(":")[0]).rstrip(")")
            for f in stack.split(";")
        ]
        for frame in set(frames):
            inclusive[frame] += n
        exclusive[frames[-1]] += n
    out = [f"{total} samples holding the GIL\n"]
    for title, counter in (("on the stack (inclusive)", inclusive), ("at the top", exclusive)):
        out.append(f"\n| {title} | share |\n| --- | ---: |")
        for frame, n in counter.most_common(top):
            out.append(f"| `{frame}` | {100 * n / total:.1f}% |")
    return "\n".join(out) + "\n"


async def profile(bench: run.Bench, a) -> Path:
    server, port = bench.start_daphne("daphne", bench.fake_port, "0")
    if a.mode == "browser":  # the chat page's own stream: session cookie, CSRF, /c/send/
        target = [
            loadgen.browser_request(run.HOST, port, session=bench.db.session, csrf=bench.db.csrf)
        ]
    else:
        target = [loadgen.openai_request(run.HOST, port, api_key=bench.db.api_key)]
    await loadgen.run_load(target, 20, 40, mode=a.mode, expect=a.tokens)  # warm-up
    raw = bench.tmp / "profile.txt"
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    spy = subprocess.Popen(
        [py_spy, "record", "--gil", "-r", "200", "-f", "raw"]
        + ["-d", str(a.seconds), "-p", str(server.pid), "-o", str(raw)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    summary, _ = await loadgen.run_load(
        target, a.concurrency, a.requests, mode=a.mode, expect=a.tokens
    )
    spy.wait(a.seconds + 30)
    print(
        f"load: {a.concurrency} streams, first token p50 {summary['ttft_p50_ms']} ms, "
        f"gap p99 {summary['gap_p99_ms']} ms, {summary['tokens_per_s']} tok/s",
        file=sys.stderr,
    )
    return raw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-c", "--concurrency", type=int, default=100)
    p.add_argument("-n", "--requests", type=int, default=400)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--tokens", type=int, default=100, help="tokens per stream")
    p.add_argument("--gap-ms", type=float, default=20.0, help="between tokens")
    p.add_argument("--mode", choices=("openai", "browser"), default="openai")
    p.add_argument("--keep-raw", type=Path, help="also copy py-spy's raw stacks to this file")
    a = p.parse_args()
    args = argparse.Namespace(tokens=a.tokens, gap_ms=a.gap_ms, warmup=20)
    bench = run.Bench(args)
    os.sched_setaffinity(0, {1})
    try:
        bench.fake, bench.fake_port = bench.start_fake("fake-upstream", a.tokens, a.gap_ms)
        bench.db.setup()
        raw = loadgen.run(profile(bench, a))
        if a.keep_raw:
            shutil.copyfile(raw, a.keep_raw)
    finally:
        for proc in list(bench.procs):
            proc.stop()
    print(summarise(raw, a.top))


if __name__ == "__main__":
    main()
