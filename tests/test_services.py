from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import OperationalError
from django.utils import timezone

from chat import services
from chat.models import Message
from chat.text import clean_text

pytestmark = pytest.mark.django_db


@pytest.fixture
def conversation(user):
    return services.conversation_create(owner=user, model="fake")


def _exchange(conversation, prompt: str, answer: str, status: str = "complete") -> Message:
    _, reply = services.message_send(conversation=conversation, content=prompt, model="fake")
    services.reply_finish(message_id=reply.pk, content=answer, status=status)
    return reply


def test_message_send_commits_user_message_and_streaming_reply(conversation):
    user_message, reply = services.message_send(
        conversation=conversation, content="  hello  ", model="fake"
    )
    assert Message.objects.get(pk=user_message.pk).content == "hello"
    stored = Message.objects.get(pk=reply.pk)
    assert (stored.role, stored.status, stored.parent_id) == (
        "assistant",
        "streaming",
        user_message.pk,
    )
    conversation.refresh_from_db()
    assert conversation.current_leaf_id == reply.pk


@pytest.mark.parametrize(
    "text",
    ["nul\x00byte", "lone \ud800 surrogate", "rtl \u202e override", "zero\u200bwidth", "emoji 🦀"],
)
def test_odd_unicode_is_stored_and_read_back_the_same(conversation, text):
    user_message, _ = services.message_send(conversation=conversation, content=text, model="fake")
    stored = Message.objects.get(pk=user_message.pk).content
    assert stored == clean_text(text)
    assert "\x00" not in stored
    stored.encode("utf-8")  # storable on PostgreSQL and SQLite alike


def test_clean_text_keeps_ordinary_text():
    assert clean_text("plain ü 中文 \u202e") == "plain ü 中文 \u202e"
    assert clean_text("a\x00b") == "a\ufffdb"


def test_reply_finish_stores_nul_from_the_model(conversation):
    _, reply = services.message_send(conversation=conversation, content="x", model="fake")
    services.reply_finish(message_id=reply.pk, content="a\x00b", status="complete")
    assert Message.objects.get(pk=reply.pk).content == "a\ufffdb"


def test_reply_finish_retries_when_database_is_busy(conversation, monkeypatch):
    _, reply = services.message_send(conversation=conversation, content="x", model="fake")
    real_update = Message.objects.filter(pk=reply.pk).update.__func__
    failures = {"left": 2}

    def flaky_update(self, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("database is locked")
        return real_update(self, **kwargs)

    monkeypatch.setattr(type(Message.objects.all()), "update", flaky_update)
    monkeypatch.setattr(services.time, "sleep", lambda s: None)
    services.reply_finish(message_id=reply.pk, content="saved", status="complete")
    assert Message.objects.get(pk=reply.pk).content == "saved"


def test_context_is_the_path_with_system_prompt(conversation):
    conversation.system_prompt = "Be brief."
    conversation.save()
    _exchange(conversation, "q1", "a1")
    _exchange(conversation, "q2", "", status="error")
    _, reply = services.message_send(conversation=conversation, content="q3", model="fake")
    context = services.reply_context(conversation, reply)
    assert [(m.role, m.content) for m in context] == [
        ("system", "Be brief."),
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
        ("user", "q3"),
    ]


def test_context_trims_oldest_messages_first(conversation):
    for i in range(10):
        _exchange(conversation, f"question {i} " + "x" * 100, f"answer {i} " + "y" * 100)
    _, reply = services.message_send(conversation=conversation, content="latest", model="fake")
    context = services.reply_context(conversation, reply, context_chars=500)
    assert context[-1].content == "latest"
    assert sum(len(m.content) for m in context) <= 500
    assert "answer 9" in context[-2].content
    assert all("question 0" not in m.content for m in context)


def test_context_keeps_an_overlong_latest_message_cut(conversation):
    _, reply = services.message_send(conversation=conversation, content="z" * 5000, model="fake")
    context = services.reply_context(conversation, reply, context_chars=2000)
    assert len(context) == 1
    assert 1000 <= len(context[0].content) <= 2000


def test_regenerate_keeps_earlier_version(conversation):
    first = _exchange(conversation, "q", "v1")
    second = services.reply_regenerate(conversation=conversation, reply=first, model="fake")
    assert second.parent_id == first.parent_id
    assert Message.objects.filter(parent_id=first.parent_id).count() == 2
    conversation.refresh_from_db()
    assert conversation.current_leaf_id == second.pk


def test_sweep_marks_only_stale_streaming_rows(conversation):
    _, stale = services.message_send(conversation=conversation, content="a", model="fake")
    _, fresh = services.message_send(conversation=conversation, content="b", model="fake")
    Message.objects.filter(pk=stale.pk).update(updated=timezone.now() - timedelta(minutes=5))
    assert services.replies_sweep() == 1
    assert Message.objects.get(pk=stale.pk).status == "interrupted"
    assert Message.objects.get(pk=fresh.pk).status == "streaming"
    assert services.replies_sweep(older_than=timedelta(0), exclude_ids=[fresh.pk]) == 0
    assert services.replies_sweep(older_than=timedelta(0)) == 1


def test_chat_sweep_command(conversation):
    from django.core.management import call_command

    _, reply = services.message_send(conversation=conversation, content="a", model="fake")
    call_command("chat_sweep", "--all")
    assert Message.objects.get(pk=reply.pk).status == "interrupted"
