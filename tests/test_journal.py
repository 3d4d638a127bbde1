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
from chat.journal import Journal, TextReader
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

    def __init__(self, root: Path, texts: dict[int, str]):
        code = textwrap.dedent(
            f"""
            import os, sys
            from pathlib import Path
            from chat.journal import Journal
            j = Journal(Path({str(root)!r}))
            entries = [(i, t.encode(), True) for i, t in {texts!r}.items()]
            assert not j.write(entries, [])
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


def test_text_is_appended_and_read_back_in_whole_characters(tmp_path):
    own = Journal(tmp_path)
    assert own.write([(7, b"", True)], []) == set()  # registered before any text
    reader = TextReader(tmp_path, 7)
    assert reader.read() == ""
    data = "héllo 🙂".encode()
    own.write([(7, data[:2], False)], [])  # "h" and half of "é"
    assert reader.read() == "h"
    own.write([(7, data[2:], False)], [])
    assert reader.read() == "éllo 🙂"
    assert reader.read() == ""
    assert own.ids() == [7]
    own.write([], [7])  # its final save is done
    assert own.ids() == [] and reader.read() == ""
    own.close()
    assert list(tmp_path.iterdir()) == []  # a clean exit leaves nothing


def test_a_whole_entry_replaces_a_torn_file(tmp_path):
    own = Journal(tmp_path)
    own.write([(1, b"torn hal", True)], [])
    own.write([(1, b"whole text", True)], [])
    assert journal._read(own.dir / "1") == "whole text"


def test_an_unwritable_journal_reports_every_reply_as_failed(tmp_path):
    (tmp_path / "file").write_text("")
    own = Journal(tmp_path / "file" / "journal")  # its parent is a file
    assert own.write([(1, b"a", True), (2, b"b", False)], []) == {1, 2}


def test_a_live_workers_replies_are_live_and_a_dead_ones_are_claimed(tmp_path):
    alive = Worker(tmp_path, {1: "alive"})
    dead = Worker(tmp_path, {2: "dead text", 3: ""})
    dead.die()
    try:
        assert journal.live_ids(tmp_path) == {1}
        claimed = journal.claim_dead(tmp_path)
        assert [(w.dir.name, w.texts) for w in claimed] == [(dead.name, {2: "dead text", 3: ""})]
        assert journal.claim_dead(tmp_path) == []  # held by this process until removed
        claimed[0].remove()
        assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, f"{alive.name}.lock"]
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
    finally:
        alive.die()
    rows = {m.pk: m for m in Message.objects.all()}
    assert (rows[killed.pk].status, rows[killed.pk].content) == ("interrupted", "so far\ufffd")
    assert rows[killed.pk].error == services.REPLY_KILLED
    assert (rows[ended.pk].status, rows[ended.pk].content) == ("complete", "final")
    assert rows[running.pk].status == "streaming"  # old, but its worker is alive
    assert (rows[old.pk].status, rows[old.pk].content) == ("interrupted", "")


def test_sweep_stores_this_processs_replies_whose_final_save_failed(conversation, tmp_path):
    lost = _streaming_reply(conversation)
    own = Journal(tmp_path)
    own.write([(lost.pk, b"kept", True)], [])
    assert services.replies_sweep(own_journal=own, own_abandoned=[lost.pk]) == 1
    row = Message.objects.get(pk=lost.pk)
    assert (row.status, row.content, row.error) == ("interrupted", "kept", services.REPLY_UNSAVED)
    assert own.ids() == []


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


def test_a_worker_that_exits_cleanly_with_a_reply_left_leaves_it_to_the_sweep(tmp_path):
    own = Journal(tmp_path)
    own.write([(5, b"unsaved", True)], [])
    own.close()  # its lock is free now: the next sweep stores the text
    (left,) = journal.claim_dead(tmp_path)
    assert left.texts == {5: "unsaved"}
    left.release()
    assert os.path.exists(tmp_path / own.worker / "5")
