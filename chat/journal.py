"""The reply journal: the text of running replies, kept outside the database.

A running reply's text is appended to a file of its own about once a second
(replies.CheckpointWriter), so a process killed mid-reply loses at most about
that much (cases.md, fault 7), while the database sees a constant number of
writes per reply whatever its length: its insert and its final save. The
journal is also how a page served by another process follows the reply.

Layout, under `journal_root()` (one directory per database, in CHATSITE_DATA_DIR):

    <worker>.lock        flock()ed by a live process for as long as it runs
    <worker>/<id>        the text so far of running reply <id>, UTF-8, appended

A lock that can be taken belongs to a process that is gone (the kernel drops
a killed process's locks): whoever takes it stores that worker's texts in
their rows (`interrupted`) and removes its files. So every process that shares
a database must share this directory: the README's deployment (several
workers on one machine) does.

No fsync: a killed process's writes are in the page cache, which is what
fault 7 is about; like SQLite's `synchronous=NORMAL`, a power cut may lose
the last seconds.
"""

from __future__ import annotations

import atexit
import codecs
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections

log = logging.getLogger(__name__)

_LOCK_SUFFIX = ".lock"


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


def _write_file(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | mode, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


class Journal:
    """This process's part of the journal. Its methods do file I/O: call them
    off the event loop (replies.CheckpointWriter runs them in a thread)."""

    def __init__(self, root: Path):
        self.root = root
        self.worker = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.dir = root / self.worker
        self._lock_fd: int | None = None

    def _ensure_open(self) -> None:
        if self._lock_fd is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        # Locked under a hidden name, then renamed: no other process can find
        # the lock unlocked and take this worker for a dead one.
        hidden = self.root / f".{self.worker}{_LOCK_SUFFIX}"
        fd = os.open(hidden, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(hidden, self.root / f"{self.worker}{_LOCK_SUFFIX}")
        self.dir.mkdir()
        self._lock_fd = fd
        atexit.register(self.close)

    def write(self, entries: list[tuple[int, bytes, bool]], finished: list[int]) -> set[int]:
        """Append text to replies' files, (id, UTF-8 text, whole) each; a `whole`
        entry replaces the file (a reply's first, or one whose last write failed
        part-way). Then delete the files of `finished` replies. Returns the ids
        whose text could not be written."""
        failed = set()
        try:
            self._ensure_open()
        except OSError:
            return {message_id for message_id, _, _ in entries}
        for message_id, data, whole in entries:
            path = self.dir / str(message_id)
            try:
                if whole:
                    hidden = self.dir / f".{message_id}"
                    _write_file(hidden, data, os.O_TRUNC)
                    os.replace(hidden, path)
                else:
                    _write_file(path, data, os.O_APPEND)
            except OSError:
                failed.add(message_id)
        self.remove(finished)
        return failed

    def ids(self) -> list[int]:
        """Replies this process has files for."""
        if self._lock_fd is None:
            return []
        return _ids_in(self.dir)

    def read_all(self, message_ids: list[int]) -> dict[int, str]:
        return {message_id: _read(self.dir / str(message_id)) for message_id in message_ids}

    def remove(self, message_ids: list[int]) -> None:
        for message_id in message_ids:
            with _suppress_missing():
                os.unlink(self.dir / str(message_id))

    def close(self) -> None:
        """At a clean exit: nothing of ours is running any more, so nothing to keep."""
        if self._lock_fd is None:
            return
        if not _ids_in(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)
            with _suppress_missing():
                os.unlink(self.root / f"{self.worker}{_LOCK_SUFFIX}")
        # Files left (a final save that failed) go to the next process's sweep.
        os.close(self._lock_fd)
        self._lock_fd = None


class _suppress_missing:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, FileNotFoundError)


def _ids_in(directory: Path) -> list[int]:
    try:
        return [int(name) for name in os.listdir(directory) if name.isdigit()]
    except FileNotFoundError:
        return []


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


@dataclass
class DeadWorker:
    """A worker whose process is gone; this process holds its lock until `remove`."""

    lock_path: Path
    dir: Path
    lock_fd: int
    texts: dict[int, str] = field(default_factory=dict)

    def remove(self) -> None:
        """Its texts are stored: delete its files, then its lock."""
        shutil.rmtree(self.dir, ignore_errors=True)
        with _suppress_missing():
            os.unlink(self.lock_path)
        os.close(self.lock_fd)

    def release(self) -> None:
        """Storing failed: leave it for the next sweep."""
        os.close(self.lock_fd)


def _lock_paths(root: Path) -> list[Path]:
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return [root / n for n in names if n.endswith(_LOCK_SUFFIX) and not n.startswith(".")]


def claim_dead(root: Path) -> list[DeadWorker]:
    """Take the locks of workers that are gone, with their replies' texts."""
    dead = []
    for lock_path in _lock_paths(root):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # another process got there first and removed it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # alive (or being swept by another process)
            continue
        directory = root / lock_path.name[: -len(_LOCK_SUFFIX)]
        worker = DeadWorker(lock_path, directory, fd)
        worker.texts = {i: _read(directory / str(i)) for i in _ids_in(directory)}
        dead.append(worker)
    return dead


def live_ids(root: Path) -> set[int]:
    """Replies that live workers (this one included) have files for."""
    ids: set[int] = set()
    for lock_path in _lock_paths(root):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            ids.update(_ids_in(root / lock_path.name[: -len(_LOCK_SUFFIX)]))
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)  # dead: claim_dead's business, not ours
        finally:
            os.close(fd)
    return ids


class TextReader:
    """Follows one reply's file from another process: each `read` returns the
    text added since the last one (whole characters only)."""

    def __init__(self, root: Path, message_id: int):
        self.root = root
        self.message_id = message_id
        self.path: Path | None = None
        self.offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def read(self) -> str:
        if self.path is None:
            found = [p for p in self.root.glob(f"*/{self.message_id}") if p.is_file()]
            if not found:
                return ""
            self.path = found[0]
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return ""  # the reply ended (or its worker was swept): the row has the rest
        self.offset += len(data)
        return self._decoder.decode(data)


def text_so_far(message_id: int) -> str:
    """The journalled text of a running reply, from whichever local worker runs it."""
    return TextReader(journal_root(), message_id).read()
