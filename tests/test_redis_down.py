"""REDIS_URL set and Redis down: the site keeps storing and answering (a real
client against a port nobody listens on, not a mock)."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from chat import replies, services
from chat.models import Message
from tests.conftest import AsgiStream
from tests.live import free_port

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def redis_down(settings):
    url = f"redis://127.0.0.1:{free_port()}/0"
    caches = settings.CACHES
    settings.REDIS_URL = url
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url}
    }
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [{"address": url, "socket_timeout": 30}]},
        }
    }
    yield url
    settings.CACHES = caches  # the other fixtures' clean-up clears the cache
    services._cache_failed_at = float("-inf")  # the next test's cache is up


async def test_a_message_is_stored_and_answered_while_redis_is_down(
    user, fake_provider, asgi_login, redis_down, settings
):
    # The hourly limit counts in the cache: every send was a 500 that stored nothing.
    settings.CHAT_MAX_REPLIES_PER_HOUR = 5
    cookie = await asgi_login(user)
    stream = AsgiStream("POST", "/c/send/", cookie=cookie, form={"content": "hi", "model": "fake"})
    assert await stream.start() == 200
    events = [event async for event in stream.events()]
    assert events[-1] == ("end", {"status": "complete", "error": "", "finish_reason": "stop"})
    reply = await Message.objects.aget(role="assistant")
    assert reply.content == "Echo: hi"


async def test_stop_across_workers_while_redis_is_down_is_unreachable_not_a_500(redis_down):
    assert await replies.reply_stop_anywhere(123456) is False
    await replies.control_plane_close()


def test_a_silent_redis_costs_its_timeout_once_not_on_every_call(redis_down, settings):
    # A Redis that accepts connections and never answers: each call would wait for
    # the socket timeout, on the one database thread; after one failure the cache is
    # left alone for a while.
    import socket
    import time

    from django.core.cache import cache

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": url,
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
        }
    }
    try:
        started = time.monotonic()
        assert services.cache_or("fallback", cache.get, "k") == "fallback"
        first = time.monotonic() - started
        started = time.monotonic()
        for _ in range(20):
            assert services.cache_or("fallback", cache.get, "k") == "fallback"
        assert first >= 0.4 and time.monotonic() - started < 0.1
    finally:
        silent.close()


def test_login_works_while_redis_is_down(user, redis_down):
    client = Client()
    wrong = client.post("/accounts/login/", {"username": "alice", "password": "wrong"})
    assert wrong.status_code == 200 and b"correct username and password" in wrong.content
    right = client.post("/accounts/login/", {"username": "alice", "password": "pw-alice-123!"})
    assert right.status_code == 302 and "_auth_user_id" in client.session


def test_an_api_failure_answers_json_not_an_error_page(user, monkeypatch):
    _, raw_key = services.api_key_create(owner=user, name="k")

    def broken(**kwargs):
        raise RuntimeError("something unexpected")

    monkeypatch.setattr(services, "api_conversation_create", broken)
    response = Client().post(
        "/v1/chat/completions",
        json.dumps({"model": "fake", "messages": [{"role": "user", "content": "x"}]}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {raw_key}"},
    )
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "something unexpected" not in error["message"]
