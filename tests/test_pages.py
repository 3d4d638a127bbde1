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


EVIL = "<img src=x onerror=alert(1)>"


class EvilNamedProvider:
    """An upstream whose model id is HTML (ids come from its /v1/models)."""

    name = "evil"

    async def list_models(self) -> list[str]:
        return [EVIL]


def test_html_in_user_and_model_names_is_escaped(client, django_user_model, monkeypatch):
    import chat.llm

    monkeypatch.setattr(chat.llm, "configured_providers", lambda: [EvilNamedProvider()])
    evil_user = django_user_model.objects.create_user(username=EVIL, password="pw-evil-123!")
    chat = services.conversation_create(owner=evil_user, model=EVIL, title="t")
    services.message_send(conversation=chat, content="hi", model=EVIL)
    client.force_login(evil_user)
    html = client.get("/").content.decode()
    assert EVIL not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html  # the user name and the picker

    admin = django_user_model.objects.create_superuser("root", password="pw-root-123!")
    client.force_login(admin)
    for path in ["/admin/chat/conversation/", "/admin/chat/message/", "/admin/auth/user/"]:
        page = client.get(path).content.decode()
        assert EVIL not in page
        assert "&lt;img src=x onerror=alert(1)&gt;" in page, path


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
def test_other_users_ids_get_404_without_writes(
    client, other_user, conversation, route, fake_provider
):
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
    assert fake_provider.started == 0  # no upstream call


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


def _assert_strict_page(response) -> None:
    assert response.status_code == 200
    assert response["X-Frame-Options"] == "DENY"
    csp = response["Content-Security-Policy"]
    script_src = next(part for part in csp.split(";") if part.strip().startswith("script-src"))
    assert script_src.strip() == "script-src 'self'"
    html = response.content.decode()
    for chunk in html.split("<script")[1:]:
        tag = chunk.split(">", 1)[0]
        if 'type="application/json"' in tag:  # data, never executed
            continue
        assert "src=" in tag, f"inline script: <script{tag}>"
        assert chunk.split(">", 1)[1].lstrip().startswith("</script>")


@pytest.mark.parametrize("path", ["/accounts/login/", "/accounts/signup/", "/admin/login/"])
def test_anonymous_pages_have_strict_csp_and_no_inline_scripts(client, path, settings):
    settings.SIGNUP_MODE = "open"
    _assert_strict_page(client.get(path))


def test_signed_in_pages_have_strict_csp_and_no_inline_scripts(client, admin_user, conversation):
    client.force_login(admin_user)
    reply = conversation.messages.get(role="assistant")
    for path in [
        "/keys/",
        "/accounts/password_change/",
        "/admin/",
        "/admin/chat/conversation/",
        f"/admin/chat/conversation/{conversation.pk}/change/",
        "/admin/chat/message/",
        f"/admin/chat/message/{reply.pk}/change/",
    ]:
        _assert_strict_page(client.get(path))


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


# The chat page's own routes: ownership, CSRF, and what each one answers.

HTMX = {"HX-Request": "true"}

OWNED_ROUTES = [
    ("get", "chat:message_list", False),
    ("get", "chat:conversation_item", False),
    ("get", "chat:conversation_rename", False),
    ("post", "chat:conversation_rename", False),
    ("get", "chat:conversation_delete", False),
    ("post", "chat:conversation_delete", False),
    ("post", "chat:conversation_archive", False),
    ("get", "chat:conversation_settings", False),
    ("post", "chat:conversation_settings", False),
    ("get", "chat:conversation_title", False),
    ("get", "chat:conversation_export_markdown", False),
    ("get", "chat:conversation_export_json", False),
    ("post", "chat:message_edit", True),
    ("post", "chat:message_select", True),
]


def _snapshot(conversation):
    conversation.refresh_from_db()
    return (
        conversation.title,
        conversation.archived,
        conversation.system_prompt,
        conversation.current_leaf_id,
        Message.objects.count(),
    )


@pytest.mark.parametrize(("method", "route", "per_message"), OWNED_ROUTES)
def test_new_routes_give_404_for_another_users_conversation(
    client, other_user, conversation, method, route, per_message, fake_provider
):
    client.force_login(other_user)
    message = conversation.messages.get(role="user")
    args = [conversation.pk, message.pk] if per_message else [conversation.pk]
    before = _snapshot(conversation)
    data = {"title": "stolen", "content": "steal", "model": "fake", "system_prompt": "x"}
    response = getattr(client, method)(reverse(route, args=args), data, headers=HTMX)
    assert response.status_code == 404
    assert _snapshot(conversation) == before
    assert Conversation.objects.filter(pk=conversation.pk).exists()
    assert fake_provider.started == 0  # no upstream call


@pytest.mark.parametrize(
    ("route", "per_message"),
    [(route, per_message) for method, route, per_message in OWNED_ROUTES if method == "post"],
)
def test_new_posts_without_csrf_token_are_refused(user, conversation, route, per_message):
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    message = conversation.messages.get(role="user")
    args = [conversation.pk, message.pk] if per_message else [conversation.pk]
    before = _snapshot(conversation)
    response = client.post(reverse(route, args=args), {"title": "x", "content": "x"})
    assert response.status_code == 403
    assert _snapshot(conversation) == before


def test_theme_post_without_csrf_token_is_refused(user):
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.post(reverse("chat:preference_theme"), {"theme": "dark"}).status_code == 403
    assert services.preference_theme(user) == "system"


@pytest.mark.parametrize(
    "route", ["chat:conversation_delete", "chat:conversation_archive", "chat:conversation_rename"]
)
def test_gets_never_change_state(alice, conversation, route):
    before = _snapshot(conversation)
    alice.get(reverse(route, args=[conversation.pk]), {"title": "x", "archived": "1"})
    assert _snapshot(conversation) == before


def test_sidebar_groups_conversations_by_day(alice, conversation):
    html = alice.get("/").content.decode()
    assert '<h2 class="group-label">Today</h2>' in html
    assert "Alice&#x27;s chat" in html


def test_rename_in_place(alice, conversation):
    url = reverse("chat:conversation_rename", args=[conversation.pk])
    form = alice.get(url, headers=HTMX).content.decode()
    assert 'name="title"' in form and "autofocus" in form
    current = {**HTMX, "HX-Current-URL": f"http://testserver/c/{conversation.pk}/"}
    html = alice.post(url, {"title": "<b>Renamed</b>"}, headers=current).content.decode()
    assert "&lt;b&gt;Renamed&lt;/b&gt;" in html and "<b>" not in html
    assert 'id="chat-title" hx-swap-oob="true"' in html  # the header follows
    conversation.refresh_from_db()
    assert (conversation.title, conversation.title_locked) == ("<b>Renamed</b>", True)
    assert alice.post(url, {"title": "  "}, headers=HTMX).status_code == 400


def test_delete_confirms_first_then_removes_everything(alice, conversation):
    url = reverse("chat:conversation_delete", args=[conversation.pk])
    confirm = alice.get(url, headers=HTMX).content.decode()
    assert "Delete “Alice&#x27;s chat” and all its messages?" in confirm
    assert Conversation.objects.filter(pk=conversation.pk).exists()
    other = {**HTMX, "HX-Current-URL": "http://testserver/"}
    response = alice.post(url, headers=other)
    assert response.status_code == 200 and response.content == b""
    assert not Conversation.objects.exists() and not Message.objects.exists()


def test_deleting_the_open_conversation_goes_home(alice, conversation):
    url = reverse("chat:conversation_delete", args=[conversation.pk])
    current = {**HTMX, "HX-Current-URL": f"http://testserver/c/{conversation.pk}/"}
    response = alice.post(url, headers=current)
    assert response["HX-Redirect"] == "/"


def test_archive_and_unarchive(alice, conversation):
    url = reverse("chat:conversation_archive", args=[conversation.pk])
    alice.post(url, headers=HTMX)
    assert "Alice&#x27;s chat" not in alice.get("/").content.decode()
    archived = alice.get(
        "/?archived=1", headers={**HTMX, "HX-Target": "conversation-list"}
    ).content.decode()
    assert "Alice&#x27;s chat" in archived and ">Unarchive</button>" in archived
    alice.post(url, {"archived": "0"}, headers=HTMX)
    conversation.refresh_from_db()
    assert not conversation.archived


def test_settings_are_saved_and_refused_when_invalid(alice, conversation):
    url = reverse("chat:conversation_settings", args=[conversation.pk])
    response = alice.post(url, {"system_prompt": "Be terse.", "temperature": "0.5"})
    assert response.content == b"Saved."
    conversation.refresh_from_db()
    assert (conversation.system_prompt, conversation.temperature) == ("Be terse.", 0.5)
    bad = alice.post(url, {"temperature": "9"})
    assert bad.status_code == 400 and b"Temperature" in bad.content
    page = alice.get(reverse("chat:conversation", args=[conversation.pk])).content.decode()
    assert "Be terse.</textarea>" in page and 'value="0.5"' in page
    panel = alice.get(url).content.decode()
    assert panel.strip().startswith('<details class="chat-settings">')
    assert "Be terse.</textarea>" in panel and "export.json" in panel


def test_new_chat_takes_settings_with_its_first_message(alice):
    form = {"content": "hi", "model": "fake", "system_prompt": "Pirate.", "max_tokens": "9"}
    response = alice.post("/c/send/", form)
    assert response.status_code == 200
    conversation = Conversation.objects.get()
    assert (conversation.system_prompt, conversation.max_tokens) == ("Pirate.", 9)


def test_new_chat_panel_starts_from_the_site_defaults(alice, settings):
    settings.CHAT_DEFAULT_SYSTEM_PROMPT = "Be <brief>."
    settings.CHAT_DEFAULT_TEMPERATURE = "0.3"
    html = alice.get("/").content.decode()
    assert ">Be &lt;brief&gt;.</textarea>" in html
    assert 'name="temperature"' in html and 'value="0.3"' in html
    # A client that leaves the fields out gets the defaults too; a blank field is "none".
    alice.post("/c/send/", {"content": "hi", "model": "fake"})
    alice.post(
        "/c/send/", {"content": "hi", "model": "fake", "system_prompt": "", "temperature": ""}
    )
    first, second = Conversation.objects.order_by("id")
    assert (first.system_prompt, first.temperature) == ("Be <brief>.", 0.3)
    assert (second.system_prompt, second.temperature) == ("", None)


def test_check_refuses_a_bad_default_temperature(settings):
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    settings.CHAT_DEFAULT_TEMPERATURE = "hot"
    with pytest.raises(SystemCheckError, match="chat.E003"):
        call_command("check")


def test_long_conversation_opens_on_its_latest_page(alice, conversation):
    for i in range(60):
        _, reply = services.message_send(conversation=conversation, content=f"q{i}", model="fake")
        services.reply_finish(message_id=reply.pk, content=f"a{i}", status="complete")
    html = alice.get(reverse("chat:conversation", args=[conversation.pk])).content.decode()
    assert html.count('<article class="message') == 50
    assert 'class="load-older"' in html and "a59" in html and ">q34<" not in html
    first = conversation.messages.get(content="q35")
    older = alice.get(
        reverse("chat:message_list", args=[conversation.pk]), {"before": first.pk}
    ).content.decode()
    assert older.count('<article class="message') == 50 and ">q10<" in older
    assert (
        alice.get(reverse("chat:message_list", args=[conversation.pk]), {"before": "x"}).status_code
        == 400
    )


def test_version_switcher_moves_between_versions(alice, conversation):
    first = conversation.messages.get(role="assistant")
    second = services.reply_regenerate(conversation=conversation, reply=first, model="fake")
    services.reply_finish(message_id=second.pk, content="second answer", status="complete")
    html = alice.get(reverse("chat:conversation", args=[conversation.pk])).content.decode()
    assert "2 / 2" in html and 'aria-label="Previous version"' in html
    assert ">Regenerate</button>" in html
    select = reverse("chat:message_select", args=[conversation.pk, first.pk])
    swapped = alice.post(select, headers=HTMX).content.decode()
    assert "1 / 2" in swapped and "**bold** answer" in swapped
    assert "<html" not in swapped
    conversation.refresh_from_db()
    assert conversation.current_leaf_id == first.pk


def test_failed_reply_offers_retry(alice, conversation):
    reply = conversation.messages.get(role="assistant")
    Message.objects.filter(pk=reply.pk).update(status="error", error="Rate limited (HTTP 429).")
    html = alice.get(reverse("chat:conversation", args=[conversation.pk])).content.decode()
    assert ">Retry</button>" in html and "Rate limited (HTTP 429)." in html


def test_edit_refuses_a_reply(alice, conversation):
    reply = conversation.messages.get(role="assistant")
    response = alice.post(
        reverse("chat:message_edit", args=[conversation.pk, reply.pk]), {"content": "x"}
    )
    assert response.status_code == 400


def test_exports(alice, conversation):
    md = alice.get(reverse("chat:conversation_export_markdown", args=[conversation.pk]))
    assert md["Content-Type"] == "text/markdown; charset=utf-8"
    assert md["Content-Disposition"] == f'attachment; filename="conversation-{conversation.pk}.md"'
    assert "## User\n\nhi there" in md.content.decode()
    data = alice.get(reverse("chat:conversation_export_json", args=[conversation.pk])).json()
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert data["messages"][1]["status"] == "complete"


def test_title_endpoint(alice, conversation):
    response = alice.get(reverse("chat:conversation_title", args=[conversation.pk]))
    assert response.json() == {"title": "Alice's chat"}


def test_theme_is_remembered_and_set_on_the_page(alice, user):
    assert "data-theme" not in alice.get("/").content.decode()
    assert alice.post(reverse("chat:preference_theme"), {"theme": "dark"}).json() == {
        "theme": "dark"
    }
    html = alice.get("/").content.decode()
    assert '<html lang="en" data-theme="dark">' in html
    assert 'aria-pressed="true"' in html
    assert alice.post(reverse("chat:preference_theme"), {"theme": "x"}).status_code == 400


def test_every_control_is_named(alice, conversation):
    html = alice.get(reverse("chat:conversation", args=[conversation.pk])).content.decode()
    for name in [">Copy<", ">Edit<", ">Regenerate<", ">Rename<", ">Delete<", ">Archive<"]:
        assert name in html, name
    assert 'aria-label="Search"' in html and ">Dark mode</button>" in html


def _every_route(resolver=None, prefix=""):
    """Every URL pattern of the site, as (path template, pattern name), admin's excepted."""
    from django.urls import URLPattern, URLResolver, get_resolver

    for entry in (resolver or get_resolver()).url_patterns:
        route = prefix + str(entry.pattern)
        if isinstance(entry, URLResolver):
            if not route.startswith("admin/"):  # Django's own, CSRF-checked as a whole
                yield from _every_route(entry, route)
        elif isinstance(entry, URLPattern):
            yield route, entry.name


def test_every_post_without_a_csrf_token_is_refused(user, conversation):
    # Every route the site has, present and future: only /v1/ (bearer keys, no
    # cookies) is exempt. A route that does not take POST answers 405, also fine.
    import re as _re

    message = conversation.messages.get(role="user")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    checked = 0
    for route, name in _every_route():
        if route.startswith(("v1/", "^v1/")):
            continue
        ids = [str(conversation.pk), str(message.pk)]
        path = "/" + _re.sub(r"<int:\w+>", lambda _, ids=ids: ids.pop(0), route).lstrip("^")
        before = _snapshot(conversation)
        response = client.post(path, {"content": "x", "title": "x", "model": "fake", "name": "k"})
        assert response.status_code in {403, 405}, (name, path, response.status_code)
        assert _snapshot(conversation) == before, name
        checked += 1
    assert checked >= 25  # the walk found the site's routes


def test_an_open_archived_chat_says_so_and_can_be_unarchived(alice, conversation):
    url = reverse("chat:conversation", args=[conversation.pk])
    assert b"Unarchive" not in alice.get(url).content
    services.conversation_archive(conversation=conversation, archived=True)
    page = alice.get(url).content.decode()
    assert '<span class="badge">Archived</span>' in page and ">Unarchive</button>" in page
    response = alice.post(
        reverse("chat:conversation_archive", args=[conversation.pk]), {"archived": "0"}
    )
    assert response.status_code == 302 and response["Location"] == url
    conversation.refresh_from_db()
    assert not conversation.archived
