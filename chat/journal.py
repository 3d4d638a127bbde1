"""The reply journal: the text of running replies, kept outside the database.

Each worker process appends its running replies' new text to a log of its own
about once a second (replies.CheckpointWriter), so a process killed mid-reply
loses at most about that much (cases.md, fault 7), while the database sees a
constant number of writes per reply whatever its length: its insert and its
final save. The journal is also how a page served by another process follows
a running reply.

Layout, under `journal_root()` (CHAT_JOURNAL_DIR, else one directory per
database in CHATSITE_DATA_DIR/journal):

    <worker>.lock    flock()ed by a live worker for as long as it runs
    <worker>.log     its records, appended: one write() a second for all replies

A record is `<kind> <message id> <length>\\n<UTF-8 text>\\n`; kind `=` sets a
reply's text (its first record, and after a rotation), `+` adds to it, `-`
ends it (its final save is done). A file of its own per reply cost an
open/close and an unlink each (ext4 metadata, up to ~0.3 ms on this VM's disk),
and their stalls showed in the gap between tokens; one append for all is
~20 µs. The log is rotated (rewritten with the running replies' texts only)
when it outgrows them.

A lock that can be taken belongs to a worker that is gone (the kernel drops a
killed process's locks): whoever takes it stores that worker's texts in their
rows and removes its files. So every process that shares a
database must share this directory: the README's deployment (several workers
on one machine) does.

No fsync: a killed process's writes are in the page cache, which is what
fault 7 is about; like SQLite's `synchronous=NORMAL`, a power cut may lose the
last seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import socket
from pathlib import Path

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections

SET, ADD, END, FINAL = b"=", b"+", b"-", b"!"
_LOCK, _LOG = ".lock", ".log"
# Rotate when the log is this big and four times its running replies' text.
ROTATE_BYTES = 4 * 1024 * 1024


def journal_root() -> Path:
    """This database's journal directory (CHAT_JOURNAL_DIR, else one per database).

    Keyed by the database, so a data directory shared by two databases (or by
    test runs, each with a database of its own) never applies one's texts to
    the other's rows.
    """
    if settings.CHAT_JOURNAL_DIR:
        return Path(settings.CHAT_JOURNAL_DIR)
    db = connections[DEFAULT_DB_ALIAS].settings_dict
    name = str(db["NAME"])
    if connections[DEFAULT_DB_ALIAS].vendor == "sqlite":
        name = str(Path(name).resolve())
    identity = f"{db['ENGINE']}|{db.get('HOST') or ''}|{db.get('PORT') or ''}|{name}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return Path(settings.DATA_DIR) / "journal" / digest


def record(kind: bytes, message_id: int, text: bytes) -> bytes:
    return b"%s %d %d\n%s\n" % (kind, message_id, len(text), text)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Journal:
    """This worker's log. Written on the event loop (replies.CheckpointWriter):
    one append to the page cache a batch."""

    def __init__(self, root: Path):
        self.root = root
        self.worker = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.log_path = root / f"{self.worker}{_LOG}"
        self.size = 0  # bytes of whole records in the log
        self._lock_fd: int | None = None
        self._log_fd: int | None = None

    def _ensure_open(self) -> None:
        if self._log_fd is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if self._lock_fd is None:
            # Locked under a hidden name, then renamed: no other process can find
            # the lock unlocked and take this worker for a dead one.
            hidden = self.root / f".{self.worker}{_LOCK}"
            fd = os.open(hidden, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.rename(hidden, self.root / f"{self.worker}{_LOCK}")
            except OSError:
                os.close(fd)
                hidden.unlink(missing_ok=True)
                raise
            self._lock_fd = fd
        self._log_fd = os.open(
            self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        self.size = os.fstat(self._log_fd).st_size

    def write(self, records: bytes) -> bool:
        """Append a batch of records in one write; False if it failed (the caller
        then rotates, which rewrites every running reply whole)."""
        try:
            self._ensure_open()
            _write_all(self._log_fd, records)
        except OSError:
            self._cut_torn_tail()
            return False
        self.size += len(records)
        return True

    def _cut_torn_tail(self) -> None:
        # A write that failed part-way (a full disk) must not leave half a record
        # for the next ones to follow.
        if self._log_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._log_fd, self.size)

    def rotate(self, records: bytes) -> bool:
        """Replace the log by one holding only `records` (the running replies')."""
        hidden = self.root / f".{self.worker}{_LOG}"
        try:
            self._ensure_open()
            fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, records)
            finally:
                os.close(fd)
            os.replace(hidden, self.log_path)  # readers see the old log or the new one
        except OSError:
            with contextlib.suppress(OSError):
                hidden.unlink(missing_ok=True)
            return False
        # The new log is in place: the next write opens it (and says so if it can't).
        os.close(self._log_fd)
        self._log_fd = None
        self.size = len(records)
        return True

    def close(self, *, clean: bool) -> None:
        """`clean`: no reply of ours is left, so nothing needs keeping. Otherwise
        the log stays for the next sweep, which finds the lock free."""
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        if self._lock_fd is None:
            return
        if clean:
            _remove_worker_files(self.root, self.worker)
        os.close(self._lock_fd)
        self._lock_fd = None


class LogState:
    """The replies' texts that a log's records leave, read incrementally.

    `feed` reads what was appended since the last call; a rotated log (a new
    file at the path) is read again from its start. A record cut short (the
    writer is between two writes, or died in one) waits for the next call.
    """

    def __init__(self, path: Path, only: int | None = None):
        self.path = path
        self.only = only  # keep this reply's text only (a page following it)
        self.texts: dict[int, bytearray] = {}
        self.finals: dict[int, dict] = {}
        self._offset = 0
        self._inode: tuple[int, int] | None = None

    def feed(self) -> bool:
        """False if the log is gone."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                # A rotated log (another file, or the same inode reused and shorter)
                # starts with whole texts: read it from its start.
                if (st.st_dev, st.st_ino) != self._inode or st.st_size < self._offset:
                    self._inode = (st.st_dev, st.st_ino)
                    self._offset = 0
                    self.texts.clear()
                    self.finals.clear()
                f.seek(self._offset)
                data = f.read()
        except OSError:  # gone (swept), or not ours to read
            return False
        self._offset += self._apply(data)
        return True

    def _apply(self, data: bytes) -> int:
        pos = 0
        while True:
            newline = data.find(b"\n", pos)
            if newline < 0:
                return pos
            try:
                kind, message_id, length = data[pos:newline].split(b" ")
                message_id, length = int(message_id), int(length)
            except ValueError:
                return pos  # not a record: nothing after it can be trusted
            if kind not in (SET, ADD, END, FINAL) or length < 0:
                return pos
            end = newline + 1 + length
            if end + 1 > len(data):
                return pos
            text = data[newline + 1 : end]
            pos = end + 1
            if self.only is not None and message_id != self.only:
                continue
            if kind == END:
                self.texts.pop(message_id, None)
                self.finals.pop(message_id, None)
            elif kind == SET:
                self.texts[message_id] = bytearray(text)
            elif kind == ADD:
                self.texts.setdefault(message_id, bytearray()).extend(text)
            elif kind == FINAL:
                try:
                    self.finals[message_id] = json.loads(text)
                except ValueError:
                    return pos

    def text(self, message_id: int) -> str:
        return bytes(self.texts.get(message_id, b"")).decode("utf-8", errors="replace")


def _workers(root: Path) -> list[str]:
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return [n[: -len(_LOCK)] for n in names if n.endswith(_LOCK) and not n.startswith(".")]


def _try_lock(root: Path, worker: str) -> int | None:
    """The worker's lock if it is free (the worker is gone), else None."""
    try:
        fd = os.open(root / f"{worker}{_LOCK}", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None  # swept by another process meanwhile (or not ours to take)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)  # alive (or being swept by another process)
        return None
    return fd


def _remove_worker_files(root: Path, worker: str) -> None:
    """Its log, a rotation's leftover, then its lock (last: while it exists, the
    worker counts)."""
    for name in (f"{worker}{_LOG}", f".{worker}{_LOG}", f"{worker}{_LOCK}"):
        (root / name).unlink(missing_ok=True)


class DeadWorker:
    """A worker that is gone; this process holds its lock until `remove` or `release`."""

    def __init__(self, root: Path, worker: str, lock_fd: int):
        self.root = root
        self.worker = worker
        self.lock_fd = lock_fd
        state = LogState(root / f"{worker}{_LOG}")
        state.feed()
        self.texts = {i: state.text(i) for i in state.texts}
        self.finals = dict(state.finals)

    def remove(self) -> None:
        """Its replies are stored: delete its files."""
        _remove_worker_files(self.root, self.worker)
        os.close(self.lock_fd)

    def release(self) -> None:
        """Storing failed: leave it for the next sweep."""
        os.close(self.lock_fd)


def claim_dead(root: Path) -> list[DeadWorker]:
    """Take the locks of workers that are gone, with their running replies' texts."""
    dead = []
    for worker in _workers(root):
        fd = _try_lock(root, worker)
        if fd is not None:
            dead.append(DeadWorker(root, worker, fd))
    return dead


def live_ids(root: Path) -> set[int]:
    """Replies that some worker's log holds: the live ones', and those of dead
    workers that no sweep has stored yet (claim_dead's, not for marking)."""
    ids: set[int] = set()
    for worker in _workers(root):
        state = LogState(root / f"{worker}{_LOG}")
        state.feed()
        ids.update(state.texts)
    return ids


class TextReader:
    """Follows one reply from another process: `read` returns the text added
    since the last call."""

    def __init__(self, root: Path, message_id: int):
        self.root = root
        self.message_id = message_id
        self._state: LogState | None = None
        self._sent = 0

    def read(self) -> str:
        if self._state is None:
            for worker in _workers(self.root):
                state = LogState(self.root / f"{worker}{_LOG}", only=self.message_id)
                if state.feed() and self.message_id in state.texts:
                    self._state = state
                    break
            else:
                return ""
        elif not self._state.feed():
            return ""  # its worker was swept: the row has the rest
        text = self._state.text(self.message_id)
        new, self._sent = text[self._sent :], max(self._sent, len(text))
        return new


def text_so_far(message_id: int) -> str:
    """The journalled text of a running reply, from whichever local worker runs it."""
    return TextReader(journal_root(), message_id).read()
