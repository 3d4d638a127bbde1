"""`make bench`: chatsite's streaming path against its floor and a baseline, in one run.

Targets, one after another, each at every level (concurrent streams of
`--tokens` tokens `--gap-ms` apart, from the fake upstream's `fake-count`):

* floor      - the fake upstream itself (what no proxy can beat);
* baseline   - benchmarks/baseline_proxy.py (Starlette + openai.AsyncOpenAI under
               plain uvicorn: --loop asyncio --http h11), pinned to core 0;
* chatsite-1 - one daphne process pinned to core 0, `/v1/chat/completions` with an API key;
* chatsite-2 - two daphne processes, pinned to core 0 and core 1, the load split
               round-robin across their ports by the load generator (no nginx);
* browser    - one daphne on core 0, the chat page's own stream (`POST /c/send/`
               with a session cookie and CSRF token).

The fake upstream, this harness and its load generator run on core 1 (so in
chatsite-2 the second daphne shares core 1 with them). Then: the disconnect
tests (50 API clients leave after 5 tokens; and during a silent upstream) on
chatsite-1 and the baseline, and the database writes per reply for 100- and
1,000-token replies. The report goes to docs/performance.md (`--out`).

    .venv/bin/python benchmarks/run.py            # the full run (about 10 minutes)
    .venv/bin/python benchmarks/run.py --quick    # about 3 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import os
import platform
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Kept by hand: what the profiles showed (the report includes it).
PROFILE_NOTES = ROOT / "docs" / "performance-profile.md"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # noqa: E402
import native_harness  # noqa: E402

PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"
TARGETS = ("floor", "baseline", "chatsite-1", "chatsite-2", "browser", "scaling")
BUSY_PCT = 25  # other processes' CPU (% of a core) above which a level is measured again


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# -- /proc ----------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time all cores spent on anything but idle (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq (steal: the hypervisor's, not counted)
    return (sum(fields[:7]) - fields[3] - fields[4]) / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_peak_rss(pid: int) -> None:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


SERVER_NICE = int(os.environ.get("BENCH_SERVER_NICE", "10"))


# -- processes ------------------------------------------------------------------------------------
class Proc:
    def __init__(
        self, name: str, argv: list[str], env: dict, logdir: Path, cpu: str | None, nice: int = 0
    ):
        self.name = name
        self.log = open(logdir / f"{name}.log", "w")  # noqa: SIM115
        cmd = (["taskset", "-c", cpu] if cpu is not None else []) + argv
        self.popen = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
        self.pid = self.popen.pid  # taskset execs the command: same pid

    def wait_port(self, port: int, timeout: float = 60, path: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited early; see {self.log.name}")
            try:
                if path:
                    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=2) as r:
                        if r.status == 200:
                            return
                else:
                    with socket.create_connection((HOST, port), timeout=1):
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start; see {self.log.name}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log.close()


def http_json(port: int, path: str, method: str = "GET") -> object:
    req = urllib.request.Request(
        f"http://{HOST}:{port}{path}", method=method, data=b"" if method == "POST" else None
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


# -- the bench database ---------------------------------------------------------------------------
TRIGGERS = """
CREATE TABLE IF NOT EXISTS bench_writes (id INTEGER PRIMARY KEY, tbl TEXT, op TEXT, row_id INTEGER);
CREATE TRIGGER IF NOT EXISTS bench_msg_ins AFTER INSERT ON chat_message
  BEGIN INSERT INTO bench_writes (tbl, op, row_id) VALUES ('message', 'insert', NEW.id); END;
CREATE TRIGGER IF NOT EXISTS bench_msg_upd AFTER UPDATE ON chat_message
  BEGIN INSERT INTO bench_writes (tbl, op, row_id) VALUES ('message', 'update', NEW.id); END;
CREATE TRIGGER IF NOT EXISTS bench_conv_ins AFTER INSERT ON chat_conversation
  BEGIN INSERT INTO bench_writes (tbl, op, row_id) VALUES ('conversation', 'insert', NEW.id); END;
CREATE TRIGGER IF NOT EXISTS bench_conv_upd AFTER UPDATE ON chat_conversation
  BEGIN INSERT INTO bench_writes (tbl, op, row_id) VALUES ('conversation', 'update', NEW.id); END;
"""


def signed_in_session(username: str) -> str:
    """A new user, signed in: their session key (Django is set up on the bench database)."""
    from django.contrib.auth import (
        BACKEND_SESSION_KEY,
        HASH_SESSION_KEY,
        SESSION_KEY,
        get_user_model,
    )
    from django.contrib.sessions.backends.db import SessionStore

    user = get_user_model().objects.create_user(username, password=secrets.token_hex(16))
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    return session.session_key


class BenchDB:
    """A fresh chatsite SQLite database in a temp dir, with write-counting triggers.

    BENCH_DATABASE_URL (an empty PostgreSQL database, say) is used instead when set;
    writes are then not counted.
    """

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.path = tmp / "db.sqlite3"
        self.url = os.environ.get("BENCH_DATABASE_URL", "")
        self.counts_writes = not self.url
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "chatsite.settings",
            "DATABASE_URL": self.url or f"sqlite:///{self.path}",
            "CHATSITE_DATA_DIR": str(tmp),
            "DJANGO_SECRET_KEY": "bench-" + secrets.token_hex(24),
            "DJANGO_DEBUG": "0",
            "DJANGO_ALLOWED_HOSTS": HOST,
            "LOCAL_MODEL_PATH": "off",
            "CHAT_FAKE_MODEL": "0",
            "CHAT_MAX_CONCURRENT_REPLIES": "100000",
            "CHAT_MAX_REPLIES_PER_HOUR": "0",
            "OPENAI_API_KEY": "x",
            "OPENAI_MODELS": "fake-count,fake-stall",
        }

    def setup(self) -> None:
        subprocess.run(
            [PY, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, env=self.env, check=True
        )
        if self.counts_writes:
            with contextlib.closing(sqlite3.connect(self.path)) as db:
                db.executescript(TRIGGERS)
        # The user and the browser session, made with Django in this process.
        for key in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "CHATSITE_DATA_DIR"):
            os.environ[key] = self.env[key]
        for key in ("DJANGO_SECRET_KEY", "LOCAL_MODEL_PATH", "DJANGO_ALLOWED_HOSTS"):
            os.environ[key] = self.env[key]
        import django

        django.setup()
        from django.db import connections

        self.session = signed_in_session("bench")
        self.csrf = secrets.token_hex(16)  # 32 characters: a valid unmasked CSRF secret
        connections.close_all()
        out = subprocess.run(
            [PY, "manage.py", "create_api_key", "bench", "--name", "bench"],
            cwd=ROOT,
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        )
        self.api_key = out.stdout.strip().splitlines()[-1]

    def writes(self) -> dict[str, int]:
        with contextlib.closing(sqlite3.connect(self.path, timeout=30)) as db:
            rows = db.execute("SELECT tbl, op, count(*) FROM bench_writes GROUP BY tbl, op")
            return {f"{t}.{o}": n for t, o, n in rows}


def writes_delta(before: dict, after: dict) -> dict[str, int]:
    return {
        k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) - before.get(k, 0)
    }


# -- the harness ----------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.a = args
        self.tmp = Path(tempfile.mkdtemp(prefix="chatsite-bench-"))
        self.procs: list[Proc] = []
        self.results: dict = {"levels": {}, "disconnect": {}, "db_writes": {}}
        self.db = BenchDB(self.tmp)

    def spawn(self, name, argv, env, cpu, nice=0) -> Proc:
        proc = Proc(name, argv, env, self.tmp, cpu, nice)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        self.procs.remove(proc)

    def start_fake(self, name: str, tokens: int, gap_ms: float) -> tuple[Proc, int]:
        port = free_port()
        argv = [PY, "-m", "chat.llm.fake_upstream", "--port", str(port), "--tokens", str(tokens)]
        argv += ["--gap-ms", str(gap_ms), "--stall-seconds", "30"]
        proc = self.spawn(name, argv, os.environ.copy(), "1")
        proc.wait_port(port, path="/stats")
        return proc, port

    def start_daphne(self, name: str, fake_port: int, cpu: str | None) -> tuple[Proc, int]:
        port = free_port()
        env = {**self.db.env, "OPENAI_BASE_URL": f"http://{HOST}:{fake_port}/v1"}
        argv = [PY, "-m", "chatsite.serve", "-e", f"tcp:port={port}:interface={HOST}:backlog=2048"]
        proc = self.spawn(name, argv + ["chatsite.asgi:application"], env, cpu, SERVER_NICE)
        proc.wait_port(port, path="/healthz")
        return proc, port

    def start_baseline(self, fake_port: int) -> tuple[Proc, int]:
        port = free_port()
        env = {
            **os.environ,
            "OPENAI_BASE_URL": f"http://{HOST}:{fake_port}/v1",
            "OPENAI_API_KEY": "x",
        }
        argv = [PY, "-m", "uvicorn", "--app-dir", str(ROOT / "benchmarks"), "baseline_proxy:app"]
        argv += ["--host", HOST, "--port", str(port), "--no-access-log", "--log-level", "warning"]
        argv += ["--loop", "asyncio", "--http", "h11", "--backlog", "2048"]
        proc = self.spawn("baseline", argv, env, "0", SERVER_NICE)
        proc.wait_port(port)
        return proc, port

    # -- one level of one target -------------------------------------------------------------
    async def level(
        self,
        name: str,
        targets,
        mode: str,
        c: int,
        n: int,
        servers: list[Proc],
        native: tuple[Proc, int] | None = None,
    ) -> dict:
        """One load level; `native` is the native harness's upstream, whose load generator
        then drives `targets` (host, port pairs) instead of loadgen.py."""
        fake, fake_port = native or (self.fake, self.fake_port)

        async def load(c: int, n: int) -> dict:
            if native is None:
                summary, _ = await loadgen.run_load(
                    targets, c, n, mode=mode, expect=self.a.tokens, timeout=120
                )
                return summary
            return await asyncio.to_thread(
                native_harness.run_load, targets, c, n, self.a.tokens, self.db.api_key, cpu="1"
            )

        await self.wait_quiet()
        # Warm-up: every server process gets at least two streams.
        warm = max(2 * len(targets), min(c, self.a.warmup))
        await load(warm, warm)
        await self.wait_idle(fake_port)
        http_json(fake_port, "/stats/reset", "POST")
        for p in servers:
            reset_peak_rss(p.pid)
        cpu0 = {p.name: cpu_seconds(p.pid) for p in servers}
        fake0 = cpu_seconds(fake.pid)
        counted = self.db.counts_writes and name.startswith(("chatsite", "browser"))
        w0 = self.db.writes() if counted else None
        busy0, self0, t0 = machine_busy_seconds(), time.process_time(), time.monotonic()
        summary = await load(c, n)
        # Work the level started that outlives its streams (e.g. title requests) counts too.
        await self.wait_idle(fake_port)
        fake_cpu = cpu_seconds(fake.pid) - fake0
        tokens = summary["tokens"] or 1
        server_cpu = {p.name: cpu_seconds(p.pid) - cpu0[p.name] for p in servers}
        # Anything else using the machine meanwhile (other people's tests, say) skews results.
        ours = fake_cpu + sum(server_cpu.values()) + time.process_time() - self0
        if native is not None:  # the load generator was a process of its own
            ours += summary["loadgen_cpu_s"]
        other = machine_busy_seconds() - busy0 - ours
        summary["other_cpu_pct"] = round(max(0.0, other) / (time.monotonic() - t0) * 100, 1)
        summary["server_cpu_s"] = round(sum(server_cpu.values()), 2) if servers else None
        summary["server_cpu_s_each"] = {k: round(v, 2) for k, v in server_cpu.items()}
        summary["elapsed_s"] = round(time.monotonic() - t0, 2)
        summary["server_cpu_us_per_token"] = (
            round(sum(server_cpu.values()) / tokens * 1e6, 1) if servers else None
        )
        summary["server_peak_rss_mb"] = (
            {p.name: round(peak_rss_mb(p.pid), 1) for p in servers} if servers else None
        )
        summary["fake_cpu_us_per_token"] = round(fake_cpu / tokens * 1e6, 1)
        gap = self.a.gap_ms
        summary["ideal_tokens_per_s"] = round(min(c, n) * 1000 / gap, 1) if gap else None
        if w0 is not None:
            delta = writes_delta(w0, self.db.writes())
            summary["db_writes"] = delta
            summary["db_writes_per_reply"] = round(sum(delta.values()) / max(1, n), 2)
        summary["upstream"] = http_json(fake_port, "/stats")
        log(
            f"  {name:10s} C={c:<4d} n={n:<4d} ok={summary['complete']}/{n} "
            f"err={summary['errors']} "
            f"ttft p50={summary['ttft_p50_ms']} p99={summary['ttft_p99_ms']} ms  "
            f"gap p99={summary['gap_p99_ms']} ms  tok/s={summary['tokens_per_s']}  "
            f"srv cpu/tok={summary['server_cpu_us_per_token']} us"
        )
        return summary

    async def levels(self, name: str, targets, mode: str, servers: list[Proc]) -> None:
        for c, n in self.a.plan:
            res = await self.level(name, targets, mode, c, n, servers)
            for _ in range(self.a.retries):
                if res["other_cpu_pct"] <= BUSY_PCT:
                    break
                log(f"  other processes used {res['other_cpu_pct']}% of a core: measuring again")
                again = await self.level(name, targets, mode, c, n, servers)
                if again["other_cpu_pct"] < res["other_cpu_pct"]:
                    res = again
            self.results["levels"].setdefault(str(c), {})[name] = res

    # -- disconnects -------------------------------------------------------------------------
    async def disconnect(self, name: str, port: int, api_key: str | None) -> None:
        for variant, model, leave in (("streaming", "fake-count", 5), ("silent", "fake-stall", 2)):
            target = loadgen.openai_request(HOST, port, model=model, api_key=api_key)
            http_json(self.fake_port, "/stats/reset", "POST")
            n = self.a.disconnect_clients
            summary, results = await loadgen.run_load(
                [target], n, n, mode="openai", leave_after=leave, timeout=60
            )
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                stats = http_json(self.fake_port, "/stats")
                if stats["abandoned"] >= n and stats["active"] == 0:
                    break
                await asyncio.sleep(0.05)
            stats = http_json(self.fake_port, "/stats")
            records = http_json(self.fake_port, "/stats/abandoned")
            left = sorted(r.left_at for r in results if r.left_at is not None)
            eofs = sorted(r["eof_at"] for r in records)
            delays = [e - lft for e, lft in zip(eofs, left, strict=False)]
            received = [r.tokens for r in results if r.left_at is not None]
            sent = [r["sent"] for r in records]
            out = {
                "clients": n,
                "left_after_tokens": leave,
                "clients_left": len(left),
                "errors": summary["errors"],
                "upstream": stats,
                "close_delay_p50_ms": _ms(loadgen.percentile(delays, 50)),
                "close_delay_p99_ms": _ms(loadgen.percentile(delays, 99)),
                "close_delay_max_ms": _ms(max(delays) if delays else None),
                "tokens_received_max": max(received) if received else None,
                "upstream_tokens_sent_max": max(sent) if sent else None,
            }
            if variant == "silent" and stats["active"]:
                # Streams the proxy never closed stay silent for 30 s; wait them out.
                out["never_closed"] = stats["active"]
            self.results["disconnect"].setdefault(name, {})[variant] = out
            log(f"  disconnect {name} {variant}: {json.dumps(out)}")

    async def wait_quiet(self) -> None:
        """Wait (up to --quiet-wait s) until other processes leave the machine mostly idle."""
        deadline = time.monotonic() + self.a.quiet_wait
        while True:
            b0, t0 = machine_busy_seconds(), time.monotonic()
            await asyncio.sleep(1.0)
            busy = (machine_busy_seconds() - b0) / (time.monotonic() - t0)
            if busy < 0.25 or time.monotonic() > deadline:
                if busy >= 0.25:
                    log(f"  the machine is still busy ({busy:.0%} of a core); measuring anyway")
                return

    async def wait_idle(self, fake_port: int | None = None, timeout: float = 40) -> None:
        """Wait until the upstream has no stream in flight."""
        deadline = time.monotonic() + timeout
        port = fake_port or self.fake_port
        while time.monotonic() < deadline and http_json(port, "/stats")["active"]:
            await asyncio.sleep(0.2)

    # -- one process against two, with the native harness ---------------------------------
    async def scaling(self) -> None:
        """Throughput of one daphne against two, at a load that saturates both.

        The second daphne runs on core 1, where the harness runs too. The Python
        harness (fake upstream and loadgen.py) needs ~27 µs of CPU a token, most of
        that core at these rates; benchmarks/native/harness.c does the same job
        for ~5 µs, so what is measured is the server, not the harness.
        """
        a = self.a
        port = free_port()
        argv = native_harness.upstream_argv(port, a.tokens, a.gap_ms)
        upstream = self.spawn("native-upstream", argv, os.environ.copy(), "1")
        upstream.wait_port(port, path="/stats")
        native = (upstream, port)
        out: dict = {}
        try:
            for c, n in a.scaling:
                res = out.setdefault(f"{c}:{n}", {})
                res["floor"] = await self.level("floor", [(HOST, port)], "openai", c, n, [], native)
                proc, p = self.start_daphne("daphne-scale", port, "0")
                try:
                    res["chatsite-1"] = await self.level(
                        "chatsite-1", [(HOST, p)], "openai", c, n, [proc], native
                    )
                finally:
                    self.stop(proc)
                p0, port0 = self.start_daphne("daphne-scale-a", port, "0")
                p1, port1 = self.start_daphne("daphne-scale-b", port, "1")
                try:
                    res["chatsite-2"] = await self.level(
                        "chatsite-2",
                        [(HOST, port0), (HOST, port1)],
                        "openai",
                        c,
                        n,
                        [p0, p1],
                        native,
                    )
                finally:
                    self.stop(p0)
                    self.stop(p1)
        finally:
            self.stop(upstream)
        self.results["scaling"] = out

    # -- database writes per reply ----------------------------------------------------------
    async def db_writes(self) -> None:
        cases = [("100 tokens, 20 ms apart", None, 100, 20.0)]
        cases.append(("1,000 tokens, 20 ms apart", "fake-1000", 1000, 20.0))
        if not self.a.quick:
            cases.append(("1,000 tokens, 2 ms apart", "fake-1000-fast", 1000, 2.0))
        for label, fake_name, tokens, gap in cases:
            fake_proc = None
            fake_port = self.fake_port
            if fake_name:
                fake_proc, fake_port = self.start_fake(fake_name, tokens, gap)
            server, port = self.start_daphne("daphne-writes", fake_port, "0")
            try:
                target = loadgen.openai_request(HOST, port, api_key=self.db.api_key)
                warm = loadgen.openai_request(HOST, port, api_key=self.db.api_key, max_tokens=5)
                await loadgen.run_load([warm], 2, 2, mode="openai")
                await self.wait_idle()
                w0 = self.db.writes()
                n = self.a.writes_replies
                summary, _ = await loadgen.run_load([target], n, n, mode="openai", expect=tokens)
                delta = writes_delta(w0, self.db.writes())
                self.results["db_writes"][label] = {
                    "replies": n,
                    "complete": summary["complete"],
                    "writes": delta,
                    "writes_per_reply": round(sum(delta.values()) / n, 2),
                    "reply_seconds_p50": _s(summary["total_p50_ms"]),
                }
                log(f"  db writes, {label}: {self.results['db_writes'][label]}")
            finally:
                self.stop(server)
                if fake_proc:
                    self.stop(fake_proc)

    # -- everything --------------------------------------------------------------------------
    async def run_all(self) -> None:
        a = self.a
        fake_target = [loadgen.openai_request(HOST, self.fake_port)]
        if "floor" in a.targets:
            log("floor: the fake upstream directly")
            await self.levels("floor", fake_target, "openai", [])
        if "baseline" in a.targets:
            log("baseline: Starlette + AsyncOpenAI under uvicorn, core 0")
            proc, port = self.start_baseline(self.fake_port)
            try:
                await self.levels(
                    "baseline", [loadgen.openai_request(HOST, port)], "openai", [proc]
                )
                if not a.skip_disconnect:
                    await self.disconnect("baseline", port, None)
            finally:
                self.stop(proc)
            await self.wait_idle()
        if "chatsite-1" in a.targets:
            log("chatsite-1: one daphne on core 0, /v1/chat/completions")
            proc, port = self.start_daphne("daphne", self.fake_port, "0")
            try:
                target = [loadgen.openai_request(HOST, port, api_key=self.db.api_key)]
                await self.levels("chatsite-1", target, "openai", [proc])
                if not a.skip_disconnect:
                    await self.disconnect("chatsite-1", port, self.db.api_key)
            finally:
                self.stop(proc)
            await self.wait_idle()
        if "chatsite-2" in a.targets:
            log("chatsite-2: daphne on core 0 and daphne on core 1, round-robin")
            p0, port0 = self.start_daphne("daphne-a", self.fake_port, "0")
            p1, port1 = self.start_daphne("daphne-b", self.fake_port, "1")
            try:
                targets = [
                    loadgen.openai_request(HOST, port0, api_key=self.db.api_key),
                    loadgen.openai_request(HOST, port1, api_key=self.db.api_key),
                ]
                await self.levels("chatsite-2", targets, "openai", [p0, p1])
            finally:
                self.stop(p0)
                self.stop(p1)
        if "browser" in a.targets:
            log("browser: one daphne on core 0, POST /c/send/ with session + CSRF")
            proc, port = self.start_daphne("daphne-browser", self.fake_port, "0")
            try:
                target = [
                    loadgen.browser_request(HOST, port, session=self.db.session, csrf=self.db.csrf)
                ]
                await self.levels("browser", target, "browser", [proc])
            finally:
                self.stop(proc)
        if "scaling" in a.targets and a.scaling:
            log("scaling: one daphne (core 0) against two (cores 0 and 1), native harness")
            await self.scaling()
        if not a.skip_writes and not self.db.counts_writes:
            log("database writes per reply: not counted on BENCH_DATABASE_URL")
        elif not a.skip_writes:
            log("database writes per reply")
            await self.db_writes()

    def main(self) -> int:
        a = self.a
        started = time.monotonic()
        with open("/proc/loadavg") as f:
            self.results["loadavg"] = " ".join(f.read().split()[:3])
        self.results["date"] = _now()
        self.results["database"] = "PostgreSQL" if self.db.url.startswith("postgres") else "SQLite"
        self.results["commit"], self.results["dirty"] = git_state()
        self.results["command"] = (a.command or "").strip() or " ".join(
            [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]
        )
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {1})  # the harness and load generator share core 1
        try:
            log(f"temp dir {self.tmp}")
            self.fake, self.fake_port = self.start_fake("fake-upstream", a.tokens, a.gap_ms)
            log(f"fake upstream on :{self.fake_port} (core 1); setting up the database")
            self.db.setup()
            gc.collect()
            gc.freeze()  # Django's objects: out of the collector's way from here on
            loadgen.run(self.run_all())
        finally:
            for proc in list(self.procs):
                proc.stop()
        self.results["elapsed_s"] = round(time.monotonic() - started, 1)
        (self.tmp / "results.json").write_text(json.dumps(self.results, indent=2))
        with contextlib.suppress(OSError):
            (ROOT / "var").mkdir(exist_ok=True)
            shutil.copy(self.tmp / "results.json", ROOT / "var" / "bench-results.json")
        report = render_report(self.results, a)
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        log(f"report: {out}  raw results: var/bench-results.json (--render it again)")
        print(verdict_text(self.results, a))
        if not a.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return 0


def git_state() -> tuple[str, str]:
    """HEAD and the server-side paths with uncommitted changes (the code measured)."""
    try:
        head = subprocess.run(
            ["git", "log", "-1", "--format=%h %s"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "chat", "chatsite", "templates"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.split("\n")
    except OSError:
        return "?", ""
    return head[:80], ", ".join(line[3:] for line in dirty if line.strip())


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _ms(v):
    return None if v is None else round(v * 1000, 1)


def _s(ms):
    return None if ms is None else round(ms / 1000, 2)


# -- the report -----------------------------------------------------------------------------------
def machine() -> dict:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        kb = int(f.readline().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


PACKAGES = ("django", "daphne", "twisted", "channels", "openai", "httpx2", "aiohttp")
PACKAGES += ("pydantic", "uvicorn", "starlette", "uvloop")


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def _get(results, c, target, key):
    return results["levels"].get(str(c), {}).get(target, {}).get(key)


def verdicts(results: dict, a) -> list[tuple[str, bool | None, str]]:
    """(target, passed or None when not measured, the figures)."""
    out = []
    lv = results["levels"]
    lo = min(c for c, _ in a.plan)
    hi = max(c for c, _ in a.plan)
    mid = 100 if any(c == 100 for c, _ in a.plan) else None

    def g(c, t, k):
        return _get(results, c, t, k)

    f1, c1 = g(lo, "floor", "ttft_p50_ms"), g(lo, "chatsite-1", "ttft_p50_ms")
    if f1 is not None and c1 is not None:
        d = c1 - f1
        out.append(
            (
                f"first token p50 at {lo} stream <= floor + 5 ms",
                d <= 5,
                f"{c1} ms vs floor {f1} ms (+{d:.1f} ms)",
            )
        )
    if mid and g(mid, "chatsite-1", "requests"):
        t, gp = g(mid, "chatsite-1", "ttft_p50_ms"), g(mid, "chatsite-1", "gap_p99_ms")
        ok, n = g(mid, "chatsite-1", "complete"), g(mid, "chatsite-1", "requests")
        out.append(
            (f"{mid} streams: first-token p50 < 100 ms", t is not None and t < 100, f"{t} ms")
        )
        out.append((f"{mid} streams: gap p99 < 30 ms", gp is not None and gp < 30, f"{gp} ms"))
        out.append((f"{mid} streams: every token delivered", ok == n, f"{ok}/{n} streams complete"))
    if str(hi) in lv and g(hi, "chatsite-1", "requests"):
        err, ok, n = (g(hi, "chatsite-1", k) for k in ("errors", "complete", "requests"))
        out.append((f"{hi} streams, one core: no errors", err == 0, f"{err} errors"))
        out.append(
            (f"{hi} streams, one core: every token delivered", ok == n, f"{ok}/{n} complete")
        )
        tps, btps = g(hi, "chatsite-1", "tokens_per_s"), g(hi, "baseline", "tokens_per_s")
        if tps and btps:
            out.append(
                (
                    f"{hi} streams: tokens/s >= 2x baseline",
                    tps >= 2 * btps,
                    f"{tps} vs {btps} ({tps / btps:.2f}x)",
                )
            )
        p99 = g(hi, "chatsite-1", "ttft_p99_ms")
        out.append(
            (f"{hi} streams: first-token p99 < 2 s", p99 is not None and p99 < 2000, f"{p99} ms")
        )
        cpu, bcpu = (
            g(hi, "chatsite-1", "server_cpu_us_per_token"),
            g(hi, "baseline", "server_cpu_us_per_token"),
        )
        if cpu and bcpu:
            out.append(
                (
                    f"CPU per token <= 0.5x baseline ({hi} streams)",
                    cpu <= 0.5 * bcpu,
                    f"{cpu} vs {bcpu} us ({cpu / bcpu:.2f}x)",
                )
            )
        t2 = g(hi, "chatsite-2", "tokens_per_s")
        if t2 and tps and not results.get("scaling"):
            out.append(
                (
                    f"two processes >= 1.8x one ({hi} streams)",
                    t2 >= 1.8 * tps,
                    f"{t2} vs {tps} tok/s ({t2 / tps:.2f}x; the floor, which shares core 1 "
                    f"with the second process, did {g(hi, 'floor', 'tokens_per_s')})",
                )
            )
        rss = g(hi, "chatsite-1", "server_peak_rss_mb") or {}
        rss2 = g(hi, "chatsite-2", "server_peak_rss_mb") or {}
        allrss = list(rss.values()) + list(rss2.values())
        if allrss:
            out.append(
                (
                    f"peak RSS < 150 MB per process at {hi} streams",
                    max(allrss) < 150,
                    f"max {max(allrss)} MB ("
                    + ", ".join(f"{k} {v}" for k, v in {**rss, **rss2}.items())
                    + ")",
                )
            )
    for level, lv in (results.get("scaling") or {}).items():
        one, two = lv.get("chatsite-1"), lv.get("chatsite-2")
        if one and two and one["tokens_per_s"]:
            ratio = two["tokens_per_s"] / one["tokens_per_s"]
            out.append(
                (
                    f"two processes >= 1.8x one ({level.replace(':', ' streams: ')} requests, "
                    "native harness)",
                    ratio >= 1.8 and one["errors"] == 0 and two["errors"] == 0,
                    f"{two['tokens_per_s']} vs {one['tokens_per_s']} tok/s ({ratio:.2f}x); "
                    f"cores used: {_cores(one)} against {_cores(two)}; ceiling for a server "
                    f"that scales perfectly here: {scaling_ceiling(one, two) or 0:.2f}x",
                )
            )
    dis = results["disconnect"].get("chatsite-1", {})
    gap = a.gap_ms
    for variant, label in (
        ("streaming", "while streaming"),
        ("silent", "while the upstream is silent"),
    ):
        d = dis.get(variant)
        if d:
            ok = (
                d["upstream"]["abandoned"] == d["clients"]
                and (d["close_delay_max_ms"] or 1e9) <= gap
            )
            out.append(
                (
                    f"upstream closed within one token ({gap:g} ms) of an API client "
                    f"leaving, {label}",
                    ok,
                    f"abandoned {d['upstream']['abandoned']}/{d['clients']}, close delay "
                    f"p50 {d['close_delay_p50_ms']} ms, max {d['close_delay_max_ms']} ms",
                )
            )
    w = results["db_writes"]
    if w:
        per = {k: v["writes_per_reply"] for k, v in w.items()}
        const = len(set(per.values())) == 1
        out.append(
            (
                "constant DB writes per reply whatever its length",
                const,
                "; ".join(f"{k}: {v}" for k, v in per.items()),
            )
        )
    return out


def _cores(summary: dict) -> str:
    """Each server process's CPU over the level, in cores."""
    each = summary.get("server_cpu_s_each") or {}
    return " + ".join(f"{v / summary['elapsed_s']:.2f}" for v in each.values()) or "–"


def harness_cpu_us_per_token(*runs: dict) -> float:
    """The load generator's and the upstream's CPU per token together, the lowest of `runs`."""
    return min(
        (r.get("loadgen_cpu_us_per_token") or 0) + (r.get("fake_cpu_us_per_token") or 0)
        for r in runs
    )


def scaling_ceiling(one: dict, two: dict) -> float | None:
    """Two processes against one for a server that scales perfectly, on this machine.

    One process alone: T1 = (cores it used) / c1, with c1 its CPU per token and the
    harness on the other core. Two processes share both cores with the harness, which
    costs h per token: even if each spent only c1 per token, T2 <= 2 / (c1 + h). h is
    the lower of the harness's costs in the two runs (fewer tokens per frame cost it
    more), so the ceiling errs high.
    """
    c1 = one.get("server_cpu_us_per_token")
    h = harness_cpu_us_per_token(one, two)
    cores1 = sum((one.get("server_cpu_s_each") or {}).values()) / (one.get("elapsed_s") or 1)
    if not c1 or not cores1:
        return None
    return 2 * c1 / (cores1 * (c1 + h))


def verdict_text(results, a) -> str:
    lines = ["", "Targets:"]
    for name, ok, fig in verdicts(results, a):
        lines.append(f"  {'PASS' if ok else 'FAIL'}  {name}: {fig}")
    return "\n".join(lines)


ROWS = [
    ("streams complete / requests", lambda s: f"{s['complete']}/{s['requests']}"),
    ("errors", lambda s: str(s["errors"])),
    ("first token p50 (ms)", lambda s: _f(s["ttft_p50_ms"])),
    ("first token p99 (ms)", lambda s: _f(s["ttft_p99_ms"])),
    ("gap p50 (ms)", lambda s: _f(s["gap_p50_ms"])),
    ("gap p99 (ms)", lambda s: _f(s["gap_p99_ms"])),
    ("gap max (ms)", lambda s: _f(s["gap_max_ms"])),
    ("total p50 (ms)", lambda s: _f(s["total_p50_ms"])),
    ("total p99 (ms)", lambda s: _f(s["total_p99_ms"])),
    ("tokens/s (aggregate)", lambda s: _f(s["tokens_per_s"], 0)),
    ("tokens per frame", lambda s: _f(s["tokens_per_frame"])),
    ("server CPU per token (µs)", lambda s: _f(s.get("server_cpu_us_per_token"))),
    ("server peak RSS (MB)", lambda s: _rss(s.get("server_peak_rss_mb"))),
    ("DB writes per reply", lambda s: _f(s.get("db_writes_per_reply"))),
    ("load generator CPU per token (µs)", lambda s: _f(s["loadgen_cpu_us_per_token"])),
    ("fake upstream CPU per token (µs)", lambda s: _f(s["fake_cpu_us_per_token"])),
    ("other processes' CPU meanwhile (% of a core)", lambda s: _f(s.get("other_cpu_pct"), 0)),
    (
        "upstream started / completed / abandoned",
        lambda s: "{started}/{completed}/{abandoned}".format(**s["upstream"]),
    ),
]


def _f(v, digits=1):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def _rss(v):
    if not v:
        return "–"
    return " + ".join(f"{x:.0f}" for x in v.values())


def _ratio(v, base):
    if v is None or not base:
        return "–"
    return f"{v / base:.2f}x"


def render_report(results: dict, a) -> str:
    m, v = machine(), versions()
    cmd = results.get("command") or (a.command or "").strip() or " ".join(sys.argv)
    lines = [
        "# Performance",
        "",
        "The streaming path measured by `benchmarks/run.py` (issue #5). Regenerate with "
        "`make bench` (full) or `.venv/bin/python benchmarks/run.py --quick`.",
        "",
        f"- command: `{cmd}`",
        f"- date: {results.get('date') or _now()} (run took {results.get('elapsed_s', 0):.0f} s)",
        f"- machine: {m['nproc']} cores, {m['cpu']}, {m['memory']} RAM, Linux {m['kernel']}; "
        f"load average at the start {results.get('loadavg', '?')}",
        f"- Python {m['python']}; " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- workload: `fake-count` streams of {a.tokens} tokens, {a.gap_ms:g} ms apart, one "
        "new connection per stream; levels (concurrent streams: requests) "
        + ", ".join(f"{c}: {n}" for c, n in a.plan)
        + f"; {a.warmup} warm-up streams (at most) before each level",
        f"- code: commit {results.get('commit', '?')}"
        + (
            f"; uncommitted changes in {results['dirty']}"
            if results.get("dirty")
            else "; no uncommitted changes in chat/, chatsite/, templates/"
        ),
        "",
        "## Set-up",
        "",
        "- **floor**: the load generator straight to the fake upstream "
        "(`chat/llm/fake_upstream.py`).",
        "- **baseline**: `benchmarks/baseline_proxy.py`, Starlette + `openai.AsyncOpenAI`, "
        "each chunk re-serialised with `model_dump_json()`, under uvicorn "
        "`--loop asyncio --http h11` (what `pip install starlette uvicorn` gives), "
        "`taskset -c 0`.",
        "- **chatsite-1**: one daphne (`-e tcp:...:backlog=2048`), `taskset -c 0`, "
        "`POST /v1/chat/completions` with an API key, fresh SQLite database (WAL), "
        "`LOCAL_MODEL_PATH=off`, no Redis.",
        "- **chatsite-2**: two daphne processes, `taskset -c 0` and `taskset -c 1`; the load "
        "generator sends the requests round-robin to their two ports (no nginx). The fake "
        "upstream and the load generator also run on core 1, so the second process shares "
        "that core with them.",
        "- **browser**: one daphne on core 0, the chat page's own stream: `POST /c/send/` "
        "(a new conversation per request) with a session cookie, a `csrftoken` cookie and "
        '`X-CSRFToken`; frames `data: {"t": ...}`. A new conversation also asks the model '
        "for its title: a second upstream stream per message (see *upstream started*).",
        "- The machine may be shared with other work: each level first waits (up to "
        f"{a.quiet_wait:g} s) for it to be quiet, and the row *other processes' CPU* shows "
        "what else ran meanwhile; distrust a level where it is high.",
        "- The fake upstream, the harness and the load generator (asyncio Protocols on "
        "uvloop) are pinned to core 1. Server CPU is utime+stime from `/proc/<pid>/stat` "
        "around each level; peak RSS is `VmHWM`, reset before each level.",
        "- Gaps are measured between frames that carry content (a server that joins tokens "
        "into one frame has fewer, longer gaps); first token is from sending the request to "
        "the first content token. The ideal aggregate rate is streams x "
        f"{1000 / a.gap_ms:g} tokens/s.",
        "",
        "## Targets",
        "",
        "| | target | figures |",
        "| --- | --- | --- |",
    ]
    for name, ok, fig in verdicts(results, a):
        lines.append(f"| {'PASS' if ok else '**FAIL**'} | {name} | {fig} |")
    busy = [
        f"{t} at {c} ({s['other_cpu_pct']:.0f}%)"
        for c, lv in results["levels"].items()
        for t, s in lv.items()
        if s.get("other_cpu_pct", 0) > BUSY_PCT
    ]
    if busy:
        lines += [
            "",
            f"Measured while other processes used more than {BUSY_PCT}% of a core (after "
            f"{a.retries} retry): " + ", ".join(busy) + ". Their latencies and rates are "
            "pessimistic.",
        ]
    for c, _n in a.plan:
        lv = results["levels"].get(str(c))
        if not lv:
            continue
        names = [t for t in TARGETS if t in lv]
        lines += ["", f"## {c} concurrent stream{'s' if c != 1 else ''}", ""]
        lines.append("| | " + " | ".join(names) + " |")
        lines.append("| --- |" + " --- |" * len(names))
        for label, fn in ROWS:
            lines.append(f"| {label} | " + " | ".join(fn(lv[t]) for t in names) + " |")
        ideal = lv[names[0]].get("ideal_tokens_per_s")
        if ideal:
            lines.append(
                "| tokens/s / ideal | "
                + " | ".join(_ratio(lv[t]["tokens_per_s"], ideal) for t in names)
                + " |"
            )
        floor, base = lv.get("floor"), lv.get("baseline")
        if floor and floor.get("ttft_p50_ms") is not None:
            lines.append(
                "| first token p50 minus floor (ms) | "
                + " | ".join(
                    _f(lv[t]["ttft_p50_ms"] - floor["ttft_p50_ms"])
                    if lv[t]["ttft_p50_ms"] is not None
                    else "–"
                    for t in names
                )
                + " |"
            )
        for ref_name, ref in (("floor", floor), ("baseline", base)):
            if not ref:
                continue
            lines.append(
                f"| first token p50 vs {ref_name} | "
                + " | ".join(_ratio(lv[t]["ttft_p50_ms"], ref["ttft_p50_ms"]) for t in names)
                + " |"
            )
            lines.append(
                f"| tokens/s vs {ref_name} | "
                + " | ".join(_ratio(lv[t]["tokens_per_s"], ref["tokens_per_s"]) for t in names)
                + " |"
            )
        if base and base.get("server_cpu_us_per_token"):
            lines.append(
                "| server CPU per token vs baseline | "
                + " | ".join(
                    _ratio(lv[t].get("server_cpu_us_per_token"), base["server_cpu_us_per_token"])
                    for t in names
                )
                + " |"
            )
        kinds = {t: lv[t]["error_kinds"] for t in names if lv[t]["error_kinds"]}
        if kinds:
            lines += ["", "Errors: " + "; ".join(f"{t}: {json.dumps(k)}" for t, k in kinds.items())]
    lines += scaling_lines(results)
    dis = results["disconnect"]
    if dis:
        lines += [
            "",
            "## Disconnects",
            "",
            f"{a.disconnect_clients} API clients at once leave after 5 tokens (`fake-count`), "
            "or after 2 tokens while the upstream is silent (`fake-stall`, silent for 30 s). "
            "The close delay is from the client closing its socket to the fake upstream "
            "seeing EOF on its connection (both `CLOCK_MONOTONIC`; sorted lists paired).",
            "",
            "| target | variant | clients left | upstream abandoned "
            "| close delay p50 / p99 / max (ms) | tokens received max / upstream sent max |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for t, variants in dis.items():
            for variant, d in variants.items():
                lines.append(
                    f"| {t} | {variant} | {d['clients_left']}/{d['clients']} | "
                    f"{d['upstream']['abandoned']} (active after: {d['upstream']['active']}) | "
                    f"{_f(d['close_delay_p50_ms'])} / {_f(d['close_delay_p99_ms'])} / "
                    f"{_f(d['close_delay_max_ms'])} | {d['tokens_received_max']} / "
                    f"{d['upstream_tokens_sent_max']} |"
                )
    w = results["db_writes"]
    if w:
        lines += [
            "",
            "## Database writes per reply",
            "",
            "Counted by AFTER INSERT/UPDATE triggers on `chat_message` and `chat_conversation` "
            "in the bench database; API replies (one conversation, the user message and the "
            "reply each). The 1,000-token replies come from a second fake upstream and daphne.",
            "",
            "| reply | replies | writes per reply | reply time p50 (s) | breakdown |",
            "| --- | --- | --- | --- | --- |",
        ]
        for label, d in w.items():
            lines.append(
                f"| {label} | {d['complete']}/{d['replies']} | {d['writes_per_reply']} | "
                f"{_f(d['reply_seconds_p50'], 2)} | "
                + ", ".join(
                    f"{k} {val / d['replies']:.1f}" for k, val in sorted(d["writes"].items())
                )
                + " |"
            )
    lines += [
        "",
        "## Harness overhead",
        "",
        "The load generator and the fake upstream share core 1 (see the per-level rows "
        "*load generator / fake upstream CPU per token*); when their sum times the "
        "aggregate tokens/s nears one core, the floor itself is limited by the harness.",
        "",
        *overhead_lines(results),
        "## Profile notes",
        "",
        PROFILE_NOTES.read_text().strip(),
        "",
    ]
    return "\n".join(lines)


_SCALING_LABELS = (
    "streams complete / requests",
    "errors",
    "first token p50 (ms)",
    "first token p99 (ms)",
    "gap p99 (ms)",
    "tokens/s (aggregate)",
    "tokens per frame",
    "server CPU per token (µs)",
    "load generator CPU per token (µs)",
    "fake upstream CPU per token (µs)",
    "other processes' CPU meanwhile (% of a core)",
)
SCALING_ROWS = [row for row in ROWS if row[0] in _SCALING_LABELS] + [
    ("cores used by the server processes", _cores),
]


def scaling_lines(results: dict) -> list[str]:
    out = []
    for level, lv in (results.get("scaling") or {}).items():
        c, n = level.split(":")
        names = [t for t in ("floor", "chatsite-1", "chatsite-2") if t in lv]
        out += [
            "",
            f"## Scaling: {c} concurrent streams, {n} requests, native harness",
            "",
            "The second daphne runs on core 1 with the upstream and the load generator, so "
            "they are `benchmarks/native/harness.c` here (a few µs of CPU a token, against "
            "~27 for the Python pair) and the servers run at nice "
            f"{SERVER_NICE}, so the harness gets the little CPU it needs first. Each "
            "concurrency slot runs streams back to back: a sustained rate, not one burst. "
            f"Database: {results.get('database', 'SQLite')}, shared by both processes.",
            "",
            "| | " + " | ".join(names) + " |",
            "| --- |" + " --- |" * len(names),
        ]
        for label, fn in SCALING_ROWS:
            out.append(f"| {label} | " + " | ".join(fn(lv[t]) for t in names) + " |")
        one, two = lv.get("chatsite-1"), lv.get("chatsite-2")
        ceiling = scaling_ceiling(one, two) if one and two else None
        if ceiling:
            c1 = one["server_cpu_us_per_token"]
            h = harness_cpu_us_per_token(one, two)
            out += [
                "",
                f"The ceiling on this machine: one daphne spends {c1:g} µs of CPU a token "
                "with the harness on the other core; two share both cores with the "
                f"harness, which costs at least {h:.1f} µs a token. Even a server whose "
                "per-token cost did not rise at all with a second process would reach "
                f"2 × {c1:g} / ({_cores(one)} × ({c1:g} + {h:.1f})) = **{ceiling:.2f}x**; "
                f"measured: {two['tokens_per_s'] / one['tokens_per_s']:.2f}x.",
            ]
    return out


def overhead_lines(results: dict) -> list[str]:
    out = []
    for c, lv in results["levels"].items():
        f = lv.get("floor")
        if not f or not f.get("loadgen_cpu_us_per_token"):
            continue
        lg, fk = f["loadgen_cpu_us_per_token"], f["fake_cpu_us_per_token"]
        out.append(
            f"- floor at {c} stream(s): load generator {lg:.1f} µs/token, fake upstream "
            f"{fk:.1f} µs/token: core 1 alone tops out near {1e6 / (lg + fk):,.0f} tokens/s."
        )
    return out + ([""] if out else [])


def parse_plan(text: str) -> list[tuple[int, int]]:
    plan = []
    for part in text.split(","):
        c, _, n = part.partition(":")
        plan.append((int(c), int(n or c)))
    return plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="chatsite streaming benchmark (make bench)")
    p.add_argument(
        "--levels",
        default=None,
        help="CONCURRENCY:REQUESTS,... (default 1:20,100:200,500:500; --quick 1:2,100:100,250:250)",
    )
    p.add_argument("--quick", action="store_true", help="small request counts (about 3 minutes)")
    p.add_argument("--targets", default=",".join(TARGETS), help="subset of " + ",".join(TARGETS))
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--gap-ms", type=float, default=20.0)
    p.add_argument("--warmup", type=int, default=None, help="warm-up streams before each level")
    p.add_argument("--disconnect-clients", type=int, default=50)
    p.add_argument("--writes-replies", type=int, default=None, help="replies per DB-writes case")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="before each level, wait up to this many seconds for other load to go",
    )
    p.add_argument(
        "--retries", type=int, default=1, help="re-measure a level that other load disturbed"
    )
    p.add_argument(
        "--scaling",
        default="1000:4000",
        help="CONCURRENCY:REQUESTS,... of the scaling run ('' to skip it)",
    )
    p.add_argument("--skip-disconnect", action="store_true")
    p.add_argument("--skip-writes", action="store_true")
    p.add_argument("--out", default=str(ROOT / "docs" / "performance.md"))
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database)")
    p.add_argument("--render", metavar="RESULTS_JSON", help="only rewrite the report from a run")
    p.add_argument("--command", default=None, help="the command shown in the report")
    a = p.parse_args(argv)
    a.plan = parse_plan(a.levels or ("1:2,100:100,250:250" if a.quick else "1:20,100:200,500:500"))
    a.targets = [t.strip() for t in a.targets.split(",")]
    a.scaling = parse_plan(a.scaling) if a.scaling.strip() else []
    a.warmup = a.warmup if a.warmup is not None else (5 if a.quick else 20)
    a.writes_replies = a.writes_replies or (1 if a.quick else 3)
    if a.render:
        results = json.loads(Path(a.render).read_text())
        Path(a.out).write_text(render_report(results, a))
        print(verdict_text(results, a))
        return 0
    return Bench(a).main()


if __name__ == "__main__":
    sys.exit(main())
