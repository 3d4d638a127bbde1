"""The reply journal (chat.journal): running replies' text outside the database,
and how the sweep uses it. Other processes are real subprocesses: whether a
worker is alive is the kernel's flock, which a process cannot fake for itself."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connections
from django.utils import timezone

from chat import journal, services
from chat.journal import ADD, END, SET, Journal, LogState, TextReader, record
from chat.models import Message

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def conversation(user):
    return services.conversation_create(owner=user, model="fake")


def _streaming_reply(conversation) -> Message:
    return services.message_send(conversation=conversation, content="q", model="fake")[1]


class Worker:
    """A journal in another process; `die()` ends it the way kill -9 does."""

    def __init__(self, root: Path, texts: dict[int, str], finals: dict[int, dict] | None = None):
        code = textwrap.dedent(
            f"""
            import json, os, sys
            from pathlib import Path
            from chat.journal import FINAL, SET, Journal, record
            j = Journal(Path({str(root)!r}))
            assert j.write(b"".join(record(SET, i, t.encode()) for i, t in {texts!r}.items()))
            ends = {finals or {}!r}
            finals = [record(FINAL, i, json.dumps(e).encode()) for i, e in ends.items()]
            assert j.write(b"".join(finals))
            print(j.worker, flush=True)
            sys.stdin.readline()
            os._exit(0)  # no atexit: nothing is cleaned up, as after kill -9
            """
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.name = self.process.stdout.readline().strip()
        assert self.name, "the worker did not start"

    def die(self) -> None:
        self.process.stdin.close()
        self.process.wait(5)


def test_records_are_read_back_incrementally_in_whole_characters(tmp_path):
    own = Journal(tmp_path)
    assert own.write(record(SET, 7, b"") + record(SET, 8, b"other"))  # 7 registered
    reader = TextReader(tmp_path, 7)
    assert reader.read() == ""
    data = "héllo 🙂".encode()
    torn = record(ADD, 7, data)
    assert own.write(torn[:-3])  # the writer is between two writes: half a record
    assert reader.read() == ""
    assert own.write(torn[-3:])
    assert reader.read() == "héllo 🙂"
    assert reader.read() == ""
    assert own.write(record(ADD, 7, b"!") + record(END, 8, b""))
    assert reader.read() == "!"
    state = LogState(own.log_path)
    state.feed()
    assert state.texts == {7: bytearray("héllo 🙂!".encode())}  # 8 has ended
    assert own.write(record(END, 7, b""))
    assert reader.read() == ""
    own.close(clean=True)
    assert list(tmp_path.iterdir()) == []  # a clean exit leaves nothing


def test_a_rotated_log_keeps_only_the_running_replies_and_readers_follow_it(tmp_path):
    own = Journal(tmp_path)
    own.write(record(SET, 1, b"one ") + record(SET, 2, b"gone"))
    reader = TextReader(tmp_path, 1)
    assert reader.read() == "one "
    assert own.rotate(record(SET, 1, b"one two "))
    assert own.write(record(ADD, 1, b"three"))
    assert reader.read() == "two three"  # a new file at the path: read from its start
    state = LogState(own.log_path)
    state.feed()
    assert state.texts == {1: bytearray(b"one two three")}
    assert own.size == own.log_path.stat().st_size


@pytest.mark.parametrize(
    "garbage", [b"not a record\n", b"+ 1 -5\nxx\n", b"? 1 2\nxx\n", b"! 1 2\n{{\n"]
)
def test_garbage_in_a_log_stops_its_reading_there(tmp_path, garbage):
    path = tmp_path / "w.log"
    path.write_bytes(record(SET, 1, b"kept") + garbage + record(ADD, 1, b"lost"))
    state = LogState(path)
    state.feed()
    assert (state.texts, state.finals) == ({1: bytearray(b"kept")}, {})


def test_an_unwritable_journal_says_so(tmp_path):
    (tmp_path / "file").write_text("")
    own = Journal(tmp_path / "file" / "journal")  # its parent is a file
    assert not own.write(record(SET, 1, b"a"))
    assert not own.rotate(record(SET, 1, b"a"))


def test_a_failed_append_leaves_no_torn_record(tmp_path, monkeypatch):
    own = Journal(tmp_path)
    assert own.write(record(SET, 1, b"first "))
    real_write = os.write

    def disk_full(fd, data):
        real_write(fd, bytes(data[:5]))  # part of it made it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal.os, "write", disk_full)
    assert not own.write(record(ADD, 1, b"second"))
    monkeypatch.setattr(journal.os, "write", real_write)
    assert own.write(record(ADD, 1, b"third"))
    state = LogState(own.log_path)
    state.feed()
    assert state.texts == {1: bytearray(b"first third")}


def test_a_live_workers_replies_are_live_and_a_dead_ones_are_claimed(tmp_path):
    alive = Worker(tmp_path, {1: "alive"})
    dead = Worker(tmp_path, {2: "dead text", 3: ""})
    dead.die()
    try:
        # A dead worker's replies still count until a sweep has stored them: a row
        # must not be marked from its age while its text is still in a log.
        assert journal.live_ids(tmp_path) == {1, 2, 3}
        claimed = journal.claim_dead(tmp_path)
        assert [(w.worker, w.texts) for w in claimed] == [(dead.name, {2: "dead text", 3: ""})]
        assert journal.claim_dead(tmp_path) == []  # held by this process until removed
        claimed[0].remove()
        assert journal.live_ids(tmp_path) == {1}
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == [f"{alive.name}.lock", f"{alive.name}.log"]
    finally:
        alive.die()
    (gone,) = journal.claim_dead(tmp_path)
    assert gone.texts == {1: "alive"}
    gone.release()


def test_sweep_stores_a_dead_workers_text_in_its_rows(conversation, settings):
    settings.CHAT_MAX_CONCURRENT_REPLIES = 10
    killed, ended, running, old = (_streaming_reply(conversation) for _ in range(4))
    services.reply_finish(message_id=ended.pk, content="final", status="complete")
    Message.objects.filter(pk__in=[running.pk, old.pk]).update(
        updated=timezone.now() - timedelta(hours=1)
    )
    root = journal.journal_root()
    alive = Worker(root, {running.pk: "still going"})
    Worker(root, {killed.pk: "so far\x00", ended.pk: "fin"}).die()
    try:
        assert services.replies_sweep() == 2  # killed, and old (in no journal)
        assert services.replies_sweep(older_than=timedelta(0)) == 0
    finally:
        alive.die()
    rows = {m.pk: m for m in Message.objects.all()}
    assert (rows[killed.pk].status, rows[killed.pk].content) == ("interrupted", "so far\ufffd")
    assert rows[killed.pk].error == services.REPLY_KILLED
    assert (rows[ended.pk].status, rows[ended.pk].content) == ("complete", "final")
    assert rows[running.pk].status == "streaming"  # old, but its worker is alive
    assert (rows[old.pk].status, rows[old.pk].content) == ("interrupted", "")
    assert services.replies_sweep() == 1  # its worker has died since
    assert Message.objects.get(pk=running.pk).content == "still going"


def test_the_journal_directory_is_one_per_database(settings):
    settings.CHAT_JOURNAL_DIR = ""
    first = journal.journal_root()
    assert first.parent == Path(settings.DATA_DIR) / "journal"
    db = connections["default"].settings_dict
    name = db["NAME"]
    try:
        db["NAME"] = f"{name}-other"
        assert journal.journal_root() != first
    finally:
        db["NAME"] = name
    assert journal.journal_root() == first


def test_a_worker_that_exits_with_a_reply_left_leaves_it_to_the_sweep(tmp_path):
    own = Journal(tmp_path)
    own.write(record(SET, 5, b"unsaved"))
    own.close(clean=False)  # its lock is free now: the next sweep stores the text
    (left,) = journal.claim_dead(tmp_path)
    assert left.texts == {5: "unsaved"}
    left.remove()
    assert list(tmp_path.iterdir()) == []


def test_a_dead_workers_failed_final_save_is_stored_with_its_end(conversation):
    reply = _streaming_reply(conversation)
    end = {"status": "complete", "finish_reason": "stop", "completion_tokens": 3, "ttft_ms": 9}
    Worker(journal.journal_root(), {reply.pk: "all of it"}, {reply.pk: end}).die()
    assert services.replies_sweep() == 1
    row = Message.objects.get(pk=reply.pk)
    assert (row.status, row.content, row.finish_reason, row.error) == (
        "complete",
        "all of it",
        "stop",
        "",
    )
    assert (row.completion_tokens, row.ttft_ms) == (3, 9)


def test_a_failed_recovery_leaves_every_dead_worker_to_the_next_sweep(
    conversation, settings, monkeypatch
):
    settings.CHAT_MAX_CONCURRENT_REPLIES = 10
    first, second = _streaming_reply(conversation), _streaming_reply(conversation)
    root = journal.journal_root()
    Worker(root, {first.pk: "one"}).die()
    Worker(root, {second.pk: "two"}).die()
    recover = services._replies_recover

    def busy_once(dead):
        monkeypatch.setattr(services, "_replies_recover", recover)
        raise services.OperationalError("database is locked")

    monkeypatch.setattr(services, "_replies_recover", busy_once)
    with pytest.raises(services.OperationalError):
        services.replies_sweep()
    assert services.replies_sweep() == 2  # neither lock was kept
    assert {m.content for m in Message.objects.filter(pk__in=[first.pk, second.pk])} == {
        "one",
        "two",
    }
