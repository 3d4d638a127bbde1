"""Cases of cases.md that cut across routes: secrets, origins, usage limits."""

from __future__ import annotations

import pytest
from django.test import Client

from chat import services
from chat.models import Message

pytestmark = pytest.mark.django_db

SECRET_KEY = "sk-test-NEVER-SHOWN-0123456789"
SECRET_URL = "http://127.0.0.1:9/secret-path/v1"


@pytest.fixture
def configured_upstream(settings):
    settings.OPENAI_API_KEY = SECRET_KEY
    settings.OPENAI_BASE_URL = SECRET_URL
    settings.OPENAI_MODELS = ["gpt-test"]  # no request to the endpoint


# The API reads keys on chat.db's thread: it must see committed rows.
@pytest.mark.django_db(transaction=True)
def test_pages_never_show_upstream_key_or_url(client, user, configured_upstream):
    client.force_login(user)
    conversation = services.conversation_create(owner=user, model="gpt-test")
    _, raw_key = services.api_key_create(owner=user, name="k")
    c = conversation.pk
    pages = [
        client.get("/"),
        client.get(f"/c/{c}/"),
        client.get("/keys/"),
        client.get(f"/c/{c}/messages/"),
        client.get(f"/c/{c}/item/"),
        client.get(f"/c/{c}/settings/", headers={"HX-Request": "true"}),
        client.get(f"/c/{c}/export.md"),
        client.get(f"/c/{c}/export.json"),
        client.get("/accounts/password_change/"),
        Client().get("/v1/models", headers={"Authorization": f"Bearer {raw_key}"}),
    ]
    for response in pages:
        assert response.status_code == 200
        body = response.content.decode()
        assert SECRET_KEY not in body
        assert "secret-path" not in body
    assert "gpt-test" in pages[0].content.decode()  # the model itself is offered


def test_post_from_another_origin_is_refused(user):
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    client.get("/")  # sets the csrftoken cookie
    token = client.cookies["csrftoken"].value
    response = client.post(
        "/c/send/",
        {"content": "hi", "model": "fake", "csrfmiddlewaretoken": token},
        headers={"Origin": "http://evil.example"},
    )
    assert response.status_code == 403
    assert not Message.objects.exists()


def test_hourly_reply_limit(user, settings):
    settings.CHAT_MAX_REPLIES_PER_HOUR = 2
    conversation = services.conversation_create(owner=user, model="fake")
    for _ in range(2):
        _, reply = services.message_send(conversation=conversation, content="x", model="fake")
        services.reply_finish(message_id=reply.pk, content="y", status="complete")
    with pytest.raises(services.InputError) as info:
        services.message_send(conversation=conversation, content="x", model="fake")
    assert info.value.status == 429
    assert "2 replies an hour" in str(info.value)
    assert Message.objects.filter(role="user").count() == 2  # nothing half-written


def test_hourly_limit_answers_the_page_with_429(client, user, settings):
    settings.CHAT_MAX_REPLIES_PER_HOUR = 1
    conversation = services.conversation_create(owner=user, model="fake")
    _, reply = services.message_send(conversation=conversation, content="x", model="fake")
    services.reply_finish(message_id=reply.pk, content="y", status="complete")
    client.force_login(user)
    response = client.post(f"/c/{conversation.pk}/send/", {"content": "again", "model": "fake"})
    assert response.status_code == 429
    assert "replies an hour" in response.json()["error"]


@pytest.mark.django_db(transaction=True)
def test_hourly_limit_applies_to_the_api(user, settings):
    settings.CHAT_MAX_REPLIES_PER_HOUR = 1
    _, raw_key = services.api_key_create(owner=user, name="k")
    api = Client()
    headers = {"Authorization": f"Bearer {raw_key}"}
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    key = services.api_key_authenticate(raw_key)
    _, reply = services.api_conversation_create(
        key=key, model="fake", messages=[("user", "hi")], max_tokens=10, temperature=None
    )
    services.reply_finish(message_id=reply.pk, content="y", status="complete")
    response = api.post(
        "/v1/chat/completions", body, content_type="application/json", headers=headers
    )
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded"


# PostgreSQL cannot hold NUL in text and psycopg refuses to send it: each of these
# was a 500 there (and worked on SQLite). CI runs this on both.
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "path",
    [
        "/?q=%00",
        "/?q=a%00b&archived=1",
        "/admin/chat/message/?q=%00",
        "/admin/chat/conversation/?q=x%00",
    ],
)
def test_nul_in_a_query_string_is_a_400_on_every_backend(client, django_user_model, path):
    admin = django_user_model.objects.create_superuser("root", password="pw-root-123!")
    client.force_login(admin)
    response = client.get(path)
    assert response.status_code == 400
    assert b"NUL" in response.content
    assert client.get(path.replace("%00", "")).status_code == 200


@pytest.mark.django_db(transaction=True)
def test_nul_in_a_cookie_is_a_400_not_a_session_lookup(client):
    client.cookies["sessionid"] = "abcdefghij\x00klmnop"  # sent as "\000", which Django unquotes
    response = client.get("/accounts/login/")
    assert response.status_code == 400
    client.cookies["sessionid"] = "abcdefghijklmnop"
    assert client.get("/accounts/login/").status_code == 200
