"""Django admin: review, filters, search, read-only message view, exports."""

from __future__ import annotations

import csv
import io
import json

import pytest
from django.urls import reverse

from chat import services
from chat.journal import SET, Journal, journal_root, record
from chat.models import Message

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client, django_user_model):
    boss = django_user_model.objects.create_superuser("boss", password="pw-boss-123!")
    client.force_login(boss)
    return client


@pytest.fixture
def reply(user):
    conversation = services.conversation_create(
        owner=user, model="fake", title="<b>Quarterly</b> numbers"
    )
    _, reply = services.message_send(
        conversation=conversation, content="=HYPERLINK(1)", model="fake"
    )
    services.reply_finish(
        message_id=reply.pk,
        content="The answer is 42",
        status="error",
        finish_reason="stop",
        prompt_tokens=11,
        completion_tokens=5,
        ttft_ms=150,
        duration_ms=900,
        error="The model server failed (HTTP 500).",
    )
    return Message.objects.get(pk=reply.pk)


def test_admin_refused_for_normal_user(client, user, reply):
    client.force_login(user)
    response = client.get(reverse("admin:chat_message_changelist"))
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]
    response = client.get(reverse("admin:chat_message_change", args=[reply.pk]))
    assert b"The answer is 42" not in response.content


def test_message_list_filters_by_status_model_user_and_searches(admin_client, reply, user):
    url = reverse("admin:chat_message_changelist")
    assert b"The answer" not in admin_client.get(url, {"status": "complete"}).content
    by_status = admin_client.get(url, {"status": "error", "model": "fake"})
    assert by_status.status_code == 200
    assert f"/admin/chat/message/{reply.pk}/change/".encode() in by_status.content
    by_owner = admin_client.get(url, {"conversation__owner__id__exact": user.pk})
    assert f"/admin/chat/message/{reply.pk}/change/".encode() in by_owner.content
    searched = admin_client.get(url, {"q": "answer is 42"})
    assert f"/admin/chat/message/{reply.pk}/change/".encode() in searched.content
    assert admin_client.get(url, {"created__gte": "2000-01-01T00:00:00Z"}).status_code == 200


def test_message_view_is_read_only_with_metadata(admin_client, reply):
    response = admin_client.get(reverse("admin:chat_message_change", args=[reply.pk]))
    html = response.content.decode()
    assert response.status_code == 200
    for value in ["150", "900", "HTTP 500", "stop", "fake", "The answer is 42"]:
        assert value in html
    assert 'name="_save"' not in html  # no save button: read-only
    post = admin_client.post(
        reverse("admin:chat_message_change", args=[reply.pk]), {"content": "rewritten"}
    )
    assert post.status_code == 403
    assert Message.objects.get(pk=reply.pk).content == "The answer is 42"


def test_conversation_admin_escapes_titles(admin_client, reply):
    html = admin_client.get(reverse("admin:chat_conversation_changelist")).content.decode()
    assert "&lt;b&gt;Quarterly&lt;/b&gt; numbers" in html
    assert "<b>Quarterly</b>" not in html


def test_export_jsonl(admin_client, reply):
    response = admin_client.post(
        reverse("admin:chat_message_changelist"),
        {"action": "export_jsonl", "_selected_action": [reply.pk, reply.parent_id]},
    )
    assert response["Content-Type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in response.content.decode().splitlines()]
    assert [r["role"] for r in rows] == ["user", "assistant"]
    assert rows[1]["completion_tokens"] == 5
    assert rows[1]["owner"] == "alice"
    assert rows[1]["conversation_title"] == "<b>Quarterly</b> numbers"


def test_export_csv_neutralises_formulas(admin_client, reply):
    response = admin_client.post(
        reverse("admin:chat_conversation_changelist"),
        {"action": "export_csv", "_selected_action": [reply.conversation_id]},
    )
    assert response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert rows[0]["content"] == "'=HYPERLINK(1)"
    assert rows[1]["ttft_ms"] == "150"


def test_a_running_replys_text_is_shown_from_the_journal(admin_client, user):
    conversation = services.conversation_create(owner=user, model="fake")
    _, running = services.message_send(conversation=conversation, content="q", model="fake")
    own = Journal(journal_root())
    try:
        assert own.write(record(SET, running.pk, b"half <i>way</i>"))
        change = admin_client.get(reverse("admin:chat_message_change", args=[running.pk]))
        assert "half &lt;i&gt;way&lt;/i&gt;" in change.content.decode()
        inline = admin_client.get(reverse("admin:chat_conversation_change", args=[conversation.pk]))
        assert "half &lt;i&gt;way&lt;/i&gt;" in inline.content.decode()
        export = admin_client.post(
            reverse("admin:chat_message_changelist"),
            {"action": "export_jsonl", "_selected_action": [running.pk]},
        )
        row = json.loads(export.content.decode())
        assert (row["status"], row["content"]) == ("streaming", "half <i>way</i>")
    finally:
        own.close(clean=True)


def test_lists_show_tokens_errors_and_the_newest_first(admin_client, reply, user):
    # The columns an admin reviews by sit in one screen: a long title is cut, the
    # error and a preview of the text show in the list, the newest row is first.
    conversation = reply.conversation
    conversation.title = "A very long title " * 10
    conversation.save()
    later = services.conversation_create(owner=user, model="fake", title="Later one")
    services.message_send(conversation=later, content="newer question", model="fake")
    messages = admin_client.get(reverse("admin:chat_message_changelist")).content.decode()
    assert "The model server failed (HTTP 500)." in messages
    assert "The answer is 42" in messages
    assert 'field-conversation_title">A very long title A very long title A v…</td>' in messages
    assert messages.index("newer question") < messages.index("The answer is 42")
    conversations = admin_client.get(reverse("admin:chat_conversation_changelist"))
    row = next(r for r in conversations.context["cl"].result_list if r.pk == conversation.pk)
    assert (row.token_count, row.error_count, row.message_count) == (16, 1, 2)
    assert conversations.context["cl"].result_list[0].pk == later.pk
