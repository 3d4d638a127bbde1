"""A real daphne server of the project, in a subprocess, on the test database.

Used by the browser tests and the API tests: streaming, disconnects and stop
behave as in production only through a real ASGI server.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


def _die_with_parent() -> None:
    # A test run that is killed (a timeout, ^C) must not leave daphne behind
    # holding the test database: the next run could not drop it.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_database_url() -> str:
    """The URL of the database pytest-django created, for the server process."""
    settings = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{settings['NAME']}"
    user = settings.get("USER") or "postgres"
    host = settings.get("HOST") or "127.0.0.1"
    port = settings.get("PORT") or 5432
    return f"postgres://{user}@{host}:{port}/{settings['NAME']}"


class LiveServer:
    def __init__(
        self,
        *,
        upstream_url: str,
        extra_env: dict[str, str] | None = None,
        app: str = "chatsite.asgi:application",
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Servers that must see each other's running replies share a journal
        # directory (extra_env); otherwise each has one of its own.
        self._own_journal = "CHAT_JOURNAL_DIR" not in (extra_env or {})
        self.journal_dir = Path(
            tempfile.mkdtemp(prefix="chatsite-journal-")
            if self._own_journal
            else extra_env["CHAT_JOURNAL_DIR"]
        )
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "chatsite.settings",
            "DATABASE_URL": test_database_url(),
            "DATABASE_CONN_MAX_AGE": "0",
            "OPENAI_BASE_URL": upstream_url,
            "OPENAI_API_KEY": "test-upstream-key",
            "OPENAI_MODELS": "",
            "LOCAL_MODEL_PATH": "off",
            "CHAT_FAKE_MODEL": "0",
            "CHAT_DEFAULT_MODEL": "fake-echo",
            "CHAT_MAX_CONCURRENT_REPLIES": "20",
            "CHAT_MAX_REPLIES_PER_HOUR": "0",
            "CHAT_CHECKPOINT_SECONDS": "0.3",
            "SERVE_STATIC": "1",
            "DJANGO_DEBUG": "0",
            "CHAT_JOURNAL_DIR": str(self.journal_dir),
            **(extra_env or {}),
        }
        # The server's output, kept only if it fails to start (see _wait_ready).
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            "w", prefix=f"chatsite-live-{self.port}-", suffix=".log", delete=False
        )
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chatsite.serve",  # daphne, as the README runs it
                "-e",
                f"tcp:port={self.port}:interface=127.0.0.1:backlog=512",
                app,
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daphne exited early; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("daphne did not start")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
        os.unlink(self.log.name)
        if self._own_journal:
            shutil.rmtree(self.journal_dir, ignore_errors=True)
