"""Pages, ownership and the security cases of cases.md for the chat routes."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from chat import services
from chat.models import Conversation, Message

pytestmark = pytest.mark.django_db


@pytest.fixture
def conversation(user):
    conversation = services.conversation_create(owner=user, model="fake", title="Alice's chat")
    user_message, reply = services.message_send(
        conversation=conversation, content="hi there", model="fake"
    )
    services.reply_finish(message_id=reply.pk, content="**bold** answer", status="complete")
    return conversation


@pytest.fixture
def alice(client, user):
    client.force_login(user)
    return client


def test_home_requires_login(client):
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_home_shows_controls_with_accessible_names(alice):
    html = alice.get("/").content.decode()
    assert 'aria-label="Message"' in html
    assert ">Send</button>" in html
    assert ">Stop</button>" in html
    assert ">New chat</button>" in html
    assert '<label class="model-picker">Model' in html
    assert '<option value="fake" selected>fake</option>' in html


def test_conversation_page_lists_messages(alice, conversation):
    response = alice.get(reverse("chat:conversation", args=[conversation.pk]))
    html = response.content.decode()
    assert response.status_code == 200
    assert "hi there" in html
    assert "**bold** answer" in html  # raw text; rendered by the one sanitiser in the browser
    assert "Alice&#x27;s chat" in html


def test_sidebar_search_matches_titles_and_message_text(alice, conversation, user):
    services.conversation_create(owner=user, model="fake", title="Unrelated")
    response = alice.get(
        "/?q=answer", headers={"HX-Request": "true", "HX-Target": "conversation-list"}
    )
    html = response.content.decode()
    assert "Alice&#x27;s chat" in html
    assert "Unrelated" not in html
    assert "<html" not in html  # only the list is swapped


def test_html_in_titles_is_escaped(alice, user):
    evil = services.conversation_create(
        owner=user, model="fake", title="<img src=x onerror=alert(1)>"
    )
    html = alice.get(reverse("chat:conversation", args=[evil.pk])).content.decode()
    assert "<img src=x" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


@pytest.mark.parametrize(
    "route",
    [
        "chat:conversation",
        "chat:send",
        "chat:reply_stream",
        "chat:reply_stop",
        "chat:reply_regenerate",
    ],
)
def test_other_users_ids_get_404_without_writes(client, other_user, conversation, route):
    client.force_login(other_user)
    reply = conversation.messages.get(role="assistant")
    args = (
        [conversation.pk]
        if route in {"chat:conversation", "chat:send"}
        else [conversation.pk, reply.pk]
    )
    before = Message.objects.count()
    method = client.get if route in {"chat:conversation", "chat:reply_stream"} else client.post
    response = method(reverse(route, args=args), {"content": "steal", "model": "fake"})
    assert response.status_code == 404
    assert Message.objects.count() == before
    assert Conversation.objects.filter(owner=other_user).count() == 0


def test_message_id_from_another_conversation_gets_404(alice, user, conversation):
    mine = services.conversation_create(owner=user, model="fake")
    reply = conversation.messages.get(role="assistant")
    response = alice.get(reverse("chat:reply_stream", args=[mine.pk, reply.pk]))
    assert response.status_code == 404


def test_post_without_csrf_token_is_refused(user):
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    response = client.post("/c/send/", {"content": "hi", "model": "fake"})
    assert response.status_code == 403
    assert not Message.objects.exists()


def test_get_never_sends(alice):
    response = alice.get("/c/send/?content=hi&model=fake")
    assert response.status_code == 405
    assert not Message.objects.exists()


def test_security_headers_on_pages(alice):
    response = alice.get("/")
    assert response["X-Frame-Options"] == "DENY"
    csp = response["Content-Security-Policy"]
    script_src = next(part for part in csp.split(";") if part.strip().startswith("script-src"))
    assert "unsafe-inline" not in script_src
    assert "frame-ancestors 'none'" in csp
    assert "img-src 'self' data:" in csp


def test_pages_have_no_inline_scripts(alice, conversation):
    html = alice.get(reverse("chat:conversation", args=[conversation.pk])).content.decode()
    for chunk in html.split("<script")[1:]:
        tag = chunk.split(">", 1)[0]
        assert "src=" in tag, f"inline script: <script{tag}>"
        assert chunk.split(">", 1)[1].startswith("</script>")


def test_malformed_body_is_a_clear_400(alice, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = alice.post(
        "/c/send/", data="content=" + "x" * 5000, content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 400
    assert not Message.objects.exists()


def test_empty_message_is_refused(alice):
    response = alice.post("/c/send/", {"content": "   ", "model": "fake"})
    assert response.status_code == 400
    assert response.json() == {"error": "The message is empty."}
    assert not Conversation.objects.exists()


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_check_refuses_metadata_upstream_url(settings):
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    settings.OPENAI_BASE_URL = "http://169.254.169.254/v1"
    with pytest.raises(SystemCheckError, match="chat.E001"):
        call_command("check")


def test_check_deploy_is_clean_with_production_settings():
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "DJANGO_DEBUG": "0",
        "DJANGO_HTTPS": "1",
        "DJANGO_SECRET_KEY": "x" * 20 + "production-secret-key-for-the-check-9f8e7d6c5b4a",
        "DJANGO_ALLOWED_HOSTS": "chat.example.com",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
