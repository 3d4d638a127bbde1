"""The OpenAI-compatible API, driven by the official `openai` client against live daphne."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time

import openai
import pytest
from django.core.management import call_command
from django.test import Client

from chat import services
from chat.journal import TextReader
from chat.models import ApiKey, Conversation, Message
from tests.conftest import session_cookies, wait_for_reply
from tests.live import LiveServer

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def api_key(user):
    _, raw_key = services.api_key_create(owner=user, name="laptop")
    return raw_key


@pytest.fixture
def client(daphne_server, api_key):
    return openai.OpenAI(base_url=f"{daphne_server.url}/v1", api_key=api_key, max_retries=0)


@pytest.fixture
def async_client(daphne_server, api_key):
    return openai.AsyncOpenAI(base_url=f"{daphne_server.url}/v1", api_key=api_key, max_retries=0)


def _raw(daphne_server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", daphne_server.port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def _send_raw(server, api_key, payload: dict) -> socket.socket:
    """POST /v1/chat/completions on a bare socket, so the test can leave mid-reply."""
    body = json.dumps(payload).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def _open_stall_stream(server, api_key) -> socket.socket:
    """A streaming request to fake-stall, read up to its two tokens (then it is silent)."""
    sock = _send_raw(
        server,
        api_key,
        {"model": "fake-stall", "stream": True, "messages": [{"role": "user", "content": "x"}]},
    )
    received = b""
    while received.count(b'"content":"') < 2:
        received += sock.recv(65536)
    return sock


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert "fake-echo" in ids and "fake-slow" in ids


def test_completion_not_streaming_is_stored(client, user):
    completion = client.chat.completions.create(
        model="fake-echo",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi there"},
        ],
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "Echo: hi there"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 3
    conversation = Conversation.objects.get()
    assert conversation.owner == user
    assert (conversation.source, conversation.api_key_name) == ("api", "laptop")
    assert conversation.system_prompt == "Be brief."
    reply = conversation.messages.get(role="assistant")
    assert (reply.status, reply.content, reply.completion_tokens) == (
        "complete",
        "Echo: hi there",
        3,
    )
    assert completion.id == f"chatcmpl-{reply.pk}"


def test_completion_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model="fake-echo",
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: one two three"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert wait_for_reply({"complete"}).content == "Echo: one two three"


async def test_async_client_streaming_and_not(async_client):
    stream = await async_client.chat.completions.create(
        model="fake-echo", messages=[{"role": "user", "content": "async hello"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Echo: async hello"
    completion = await async_client.chat.completions.create(
        model="fake-echo", messages=[{"role": "user", "content": "again"}]
    )
    assert completion.choices[0].message.content == "Echo: again"


def test_curl_style_raw_stream(daphne_server, api_key):
    status, body = _raw(
        daphne_server,
        "POST",
        "/v1/chat/completions",
        json.dumps(
            {"model": "fake-echo", "stream": True, "messages": [{"role": "user", "content": "raw"}]}
        ),
        {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
    )
    assert status == 200
    frames = [f for f in body.decode().split("\n\n") if f.startswith("data: ")]
    assert frames[-1] == "data: [DONE]"
    chunks = [json.loads(f[6:]) for f in frames[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Echo: raw"


def test_missing_and_wrong_key_get_401(daphne_server):
    for key in ["", "cs-not-a-real-key"]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        status, body = _raw(daphne_server, "GET", "/v1/models", headers=headers)
        assert status == 401
        assert json.loads(body)["error"]["code"] == "invalid_api_key"


def test_key_is_stored_only_as_hash_and_revocation_is_immediate(client, api_key, user):
    key = ApiKey.objects.get(owner=user)
    assert api_key not in (key.hashed, key.hint)
    assert key.hashed == services.api_key_hash(api_key)
    client.models.list()
    key.refresh_from_db()
    assert key.last_used is not None
    services.api_key_revoke(key=key)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_key_page_create_list_revoke(user, daphne_server):
    browser = Client()
    browser.force_login(user)
    created = browser.post("/keys/", {"name": "my script"})
    raw_key = created.context["new_key"]
    assert raw_key.startswith("cs-") and raw_key in created.content.decode()
    listing = browser.get("/keys/").content.decode()
    assert "my script" in listing and raw_key not in listing  # shown once
    api = openai.OpenAI(base_url=f"{daphne_server.url}/v1", api_key=raw_key, max_retries=0)
    assert api.models.list().data
    key = ApiKey.objects.get(name="my script")
    assert browser.post(f"/keys/{key.pk}/revoke/").status_code == 302
    with pytest.raises(openai.AuthenticationError):
        api.models.list()


def test_key_page_cannot_revoke_another_users_key(user, other_user):
    key, _ = services.api_key_create(owner=other_user, name="theirs")
    browser = Client()
    browser.force_login(user)
    assert browser.post(f"/keys/{key.pk}/revoke/").status_code == 404
    assert ApiKey.objects.get(pk=key.pk).revoked is None


def test_create_api_key_command(user, daphne_server, capsys):
    call_command("create_api_key", "alice", "--name", "ci")
    raw_key = capsys.readouterr().out.strip()
    api = openai.OpenAI(base_url=f"{daphne_server.url}/v1", api_key=raw_key, max_retries=0)
    assert (
        api.chat.completions.create(model="fake-echo", messages=[{"role": "user", "content": "x"}])
        .choices[0]
        .message.content
        == "Echo: x"
    )
    assert Conversation.objects.get().api_key_name == "ci"


def test_unknown_model_is_404_in_openai_shape(client, upstream):
    before = upstream.stats["started"]
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"
    assert upstream.stats["started"] == before
    assert not Conversation.objects.exists()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[" * 100_000, None),
        (b"[1, 2]", None),
        (json.dumps({"model": "fake-echo"}), "messages"),
        (json.dumps({"model": "fake-echo", "messages": []}), "messages"),
        (json.dumps({"model": "fake-echo", "messages": "hi"}), "messages"),
        (json.dumps({"model": 3, "messages": [{"role": "user", "content": "x"}]}), "model"),
        (
            json.dumps({"model": "fake-echo", "messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (  # more than the limit of 2,048 (each is stored row by row)
            json.dumps(
                {"model": "fake-echo", "messages": [{"role": "user", "content": "x"}] * 2049}
            ),
            "messages",
        ),
        (
            json.dumps({"model": "fake-echo", "messages": [{"role": "user", "content": 5}]}),
            "messages[0].content",
        ),
        (
            json.dumps(
                {
                    "model": "fake-echo",
                    "stream": "yes",
                    "messages": [{"role": "user", "content": "x"}],
                }
            ),
            "stream",
        ),
        (
            json.dumps(
                {
                    "model": "fake-echo",
                    "max_tokens": -1,
                    "messages": [{"role": "user", "content": "x"}],
                }
            ),
            "max_tokens",
        ),
        (
            json.dumps(
                {
                    "model": "fake-echo",
                    "temperature": "hot",
                    "messages": [{"role": "user", "content": "x"}],
                }
            ),
            "temperature",
        ),
    ],
)
def test_bad_requests_get_400_and_no_upstream_call(daphne_server, api_key, upstream, body, param):
    before = upstream.stats["started"]
    status, data = _raw(
        daphne_server,
        "POST",
        "/v1/chat/completions",
        body,
        {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
    )
    assert status == 400
    error = json.loads(data)["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    assert upstream.stats["started"] == before
    assert not Conversation.objects.exists()


# Every JSON type in every place of the body: a clear 400 or a valid request, never
# another exception (a list as a role was a 500: unhashable).
JSON_VALUES = [None, True, 0, -1, 1.5, float("inf"), "", "x", [], [1], ["user"], {}, {"a": 1}]
BODY_PLACES = [
    ("model",),
    ("messages",),
    ("messages", 0),
    ("messages", 0, "role"),
    ("messages", 0, "content"),
    ("messages", 0, "content", 0),
    ("messages", 0, "content", 0, "type"),
    ("messages", 0, "content", 0, "text"),
    ("stream",),
    ("stream_options",),
    ("stream_options", "include_usage"),
    ("max_tokens",),
    ("max_completion_tokens",),
    ("temperature",),
]


@pytest.mark.parametrize("place", BODY_PLACES, ids=lambda p: ".".join(map(str, p)))
def test_any_json_type_anywhere_is_a_400_or_valid(place):
    from chat.api import ApiError, parse_completion_request

    for value in JSON_VALUES:
        body = {
            "model": "fake-echo",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "stream_options": {"include_usage": True},
        }
        target = body
        for key in place[:-1]:
            target = target[key]
        target[place[-1]] = value
        try:
            parse_completion_request(json.dumps(body).encode())
        except ApiError as exc:
            assert exc.status == 400 and str(exc)
    with pytest.raises(ApiError) as exc:
        parse_completion_request(
            json.dumps({"model": "m", "messages": [{"role": ["user"], "content": "x"}]}).encode()
        )
    assert exc.value.param == "messages[0].role"


def test_the_limit_of_2048_messages_is_accepted_whole():
    from chat.api import MAX_MESSAGES, ApiError, parse_completion_request

    messages = [{"role": "user", "content": "x"}] * MAX_MESSAGES
    body = json.dumps({"model": "fake-echo", "messages": messages}).encode()
    assert len(parse_completion_request(body)["messages"]) == MAX_MESSAGES == 2048
    with pytest.raises(ApiError, match="2,049 items; the limit is 2,048"):
        parse_completion_request(
            json.dumps({"model": "m", "messages": [*messages, messages[0]]}).encode()
        )


def test_oversized_body_and_message_get_413(daphne_server, api_key, upstream):
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    huge = json.dumps(
        {"model": "fake-echo", "messages": [{"role": "user", "content": "x" * 10_000_000}]}
    )
    status, _ = _raw(daphne_server, "POST", "/v1/chat/completions", huge, headers)
    assert status == 413
    long_message = json.dumps(
        {"model": "fake-echo", "messages": [{"role": "user", "content": "x" * 200_000}]}
    )
    status, data = _raw(daphne_server, "POST", "/v1/chat/completions", long_message, headers)
    assert status in {413, 400}
    assert "too" in json.loads(data)["error"]["message"]
    assert not Conversation.objects.exists()


def test_api_conversations_belong_to_the_keys_owner_only(client, user, other_user):
    client.chat.completions.create(
        model="fake-echo", messages=[{"role": "user", "content": "secret plan"}]
    )
    owner_page, other_page = Client(), Client()
    owner_page.force_login(user)
    other_page.force_login(other_user)
    assert "secret plan" in owner_page.get("/").content.decode()
    assert "secret plan" not in other_page.get("/").content.decode()
    conversation = Conversation.objects.get()
    assert other_page.get(f"/c/{conversation.pk}/").status_code == 404


def test_upstream_error_is_502_and_stored(client):
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="fake-error-500", messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.status_code == 502
    assert "UPSTREAM-SECRET-DETAIL" not in str(info.value.body)
    reply = wait_for_reply({"error"})
    assert "HTTP 500" in reply.error


def test_upstream_error_before_first_token_is_502_also_when_streaming(client):
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="fake-error-500", messages=[{"role": "user", "content": "x"}], stream=True
        )
    assert info.value.status_code == 502
    assert info.value.body["type"] == "upstream_error"
    assert "UPSTREAM-SECRET-DETAIL" not in str(info.value.body)
    assert "HTTP 500" in wait_for_reply({"error"}).error


def test_upstream_error_mid_stream_raises_in_client(client):
    stream = client.chat.completions.create(
        model="fake-cut", messages=[{"role": "user", "content": "x"}], stream=True
    )
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    assert wait_for_reply({"error"}).content  # partial text kept


def test_client_disconnect_abandons_reply_and_closes_upstream(daphne_server, api_key, upstream):
    before = upstream.stats["abandoned"]
    _open_stall_stream(daphne_server, api_key).close()
    reply = wait_for_reply({"interrupted"}, timeout=5)
    assert reply.content  # the tokens it had are kept
    deadline = time.monotonic() + 3
    while upstream.stats["abandoned"] == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.stats["abandoned"] == before + 1  # upstream closed although silent


def test_a_10_mb_multipart_body_is_a_413_before_any_view(daphne_server, user, upstream):
    # Django counts only a form's fields against the body limit: files went to disk
    # and the message was sent. The site takes no uploads: the whole body counts.
    started = upstream.stats["started"]
    boundary = "chatsite-test-boundary"
    fields = [("content", b"hi"), ("model", b"fake-echo")]
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        + value
        + b"\r\n"
        for name, value in fields
    )
    body += (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="pad"; filename="x.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + b"x" * 10_000_000
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {
        "Cookie": session_cookies(user),
        "X-CSRFToken": "a" * 32,
        "Content-Type": f"multipart/form-data; boundary={boundary}",
    }
    status, data = _raw(daphne_server, "POST", "/c/send/", body, headers)
    assert status == 413 and b"larger than 1,000,000 bytes" in data
    assert upstream.stats["started"] == started
    assert not Conversation.objects.exists()
    # Under the limit the same form is served.
    small = body.replace(b"x" * 10_000_000, b"x" * 10)
    status, _ = _raw(daphne_server, "POST", "/c/send/", small, headers)
    assert status == 200
    wait_for_reply({"complete"})


def test_chunked_body_without_length_is_cut_off_at_the_limit(daphne_server, api_key, upstream):
    started = upstream.stats["started"]
    sock = socket.create_connection(("127.0.0.1", daphne_server.port), timeout=10)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n".encode()
        + b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 65536
    with contextlib.suppress(OSError):  # the server may close as soon as it has answered
        for _ in range(40):  # 2.6 MB, over the 1 MB limit
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
    response = b""
    while b"\r\n\r\n" not in response:
        data = sock.recv(65536)
        if not data:
            break
        response += data
    sock.close()
    assert response.startswith(b"HTTP/1.1 413")
    assert upstream.stats["started"] == started
    assert not Conversation.objects.exists()


def test_wrong_method_and_unknown_path_answer_in_openai_shape(daphne_server, api_key):
    headers = {"Authorization": f"Bearer {api_key}"}
    for method, path, status in [
        ("GET", "/v1/chat/completions", 405),
        ("POST", "/v1/models", 405),
        ("POST", "/v1/embeddings", 404),
        ("GET", "/v1/", 404),
    ]:
        got, data = _raw(daphne_server, method, path, headers=headers)
        assert got == status, (method, path)
        error = json.loads(data)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert path in error["message"] or method in error["message"]


def test_nul_and_lone_surrogate_reach_upstream_as_stored(daphne_server, api_key):
    body = json.dumps(
        {"model": "fake-echo", "messages": [{"role": "user", "content": "a\x00b \ud800c"}]}
    )
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    status, data = _raw(daphne_server, "POST", "/v1/chat/completions", body, headers)
    assert status == 200
    answer = json.loads(data)["choices"][0]["message"]["content"]
    assert answer == "Echo: a\ufffdb \ufffdc"
    conversation = Conversation.objects.get()
    assert conversation.messages.get(role="user").content == "a\ufffdb \ufffdc"
    assert conversation.messages.get(role="assistant").content == answer


def _sse_payloads(raw: bytes) -> list:
    return [
        json.loads(line[6:])
        for line in raw.decode().split("\n")
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def test_stream_without_include_usage_has_no_usage_field(daphne_server, api_key):
    body = json.dumps(
        {"model": "fake-echo", "stream": True, "messages": [{"role": "user", "content": "a b"}]}
    )
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    status, data = _raw(daphne_server, "POST", "/v1/chat/completions", body, headers)
    assert status == 200
    chunks = _sse_payloads(data)
    assert len(chunks) >= 3
    assert all("usage" not in chunk for chunk in chunks)
    assert data.rstrip().endswith(b"data: [DONE]")


@pytest.fixture
def limited_server(upstream, django_db_blocker):
    with django_db_blocker.unblock():
        server = LiveServer(
            upstream_url=upstream.base_url,
            extra_env={
                "CHAT_MAX_TOKENS": "5",
                "CHAT_MAX_CONCURRENT_REPLIES": "1",
                "CHAT_HEARTBEAT_SECONDS": "0.2",
            },
        )
    yield server
    server.stop()


def test_server_caps_max_tokens_and_concurrent_replies_for_the_api(limited_server, api_key):
    api = openai.OpenAI(base_url=f"{limited_server.url}/v1", api_key=api_key, max_retries=0)
    completion = api.chat.completions.create(
        model="fake-count", max_tokens=1000, messages=[{"role": "user", "content": "count"}]
    )
    assert completion.choices[0].message.content.split() == [f"tok{i}" for i in range(5)]
    assert completion.choices[0].finish_reason == "length"

    held = _open_stall_stream(limited_server, api_key)
    try:
        with pytest.raises(openai.RateLimitError) as info:
            api.chat.completions.create(
                model="fake-echo", messages=[{"role": "user", "content": "second"}]
            )
        assert info.value.status_code == 429
        assert info.value.body["type"] == "rate_limit_error"
    finally:
        held.close()
    wait_for_reply({"interrupted"})


def test_non_streaming_client_that_leaves_abandons_the_reply(daphne_server, api_key, upstream):
    before = upstream.stats["abandoned"]
    sock = _send_raw(
        daphne_server,
        api_key,
        {"model": "fake-stall", "messages": [{"role": "user", "content": "x"}]},
    )
    deadline = time.monotonic() + 5
    while not (reply := Message.objects.filter(role="assistant").first()):
        assert time.monotonic() < deadline, "no reply started"
        time.sleep(0.05)
    journal = TextReader(daphne_server.journal_dir, reply.pk)
    while not journal.read():
        assert time.monotonic() < deadline, "no token checkpointed"
        time.sleep(0.05)
    sock.close()  # the client gives up while the upstream is silent
    reply = wait_for_reply({"interrupted"}, timeout=5)
    assert reply.content  # what it had is kept
    deadline = time.monotonic() + 3
    while upstream.stats["abandoned"] == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.stats["abandoned"] == before + 1


def test_api_reply_stopped_from_the_chat_page(daphne_server, api_key, user):
    sock = _open_stall_stream(daphne_server, api_key)
    reply = Message.objects.get(role="assistant")
    conn = http.client.HTTPConnection("127.0.0.1", daphne_server.port, timeout=10)
    conn.request(
        "POST",
        f"/c/{reply.conversation_id}/m/{reply.pk}/stop/",
        headers={"Cookie": session_cookies(user), "X-CSRFToken": "a" * 32},
    )
    response = conn.getresponse()
    assert (response.status, json.loads(response.read())) == (200, {"status": "stopped"})
    rest = b""
    while b"[DONE]" not in rest:
        data = sock.recv(65536)
        assert data, "the stream closed without [DONE]"
        rest += data
    sock.close()
    reply.refresh_from_db()
    assert reply.status == Message.Status.STOPPED and reply.content


def test_api_conversations_are_listed_in_admin(client, admin_user):
    client.chat.completions.create(model="fake-echo", messages=[{"role": "user", "content": "x"}])
    page = Client()
    page.force_login(admin_user)
    html = page.get("/admin/chat/conversation/", {"source": "api"}).content.decode()
    assert "laptop" in html  # the key's name


def test_stream_starts_with_a_heartbeat_when_the_first_token_is_late(limited_server, api_key):
    """The response waits for the first token, but never past a heartbeat interval."""
    sock = _send_raw(
        limited_server,
        api_key,
        {"model": "fake-late", "stream": True, "messages": [{"role": "user", "content": "x"}]},
    )
    received = b""
    while b": ping" not in received:
        data = sock.recv(65536)
        assert data, received
        received += data
    # Headers and a heartbeat went out first; the token came 1 s after it was asked for.
    assert received.startswith(b"HTTP/1.1 200")
    assert b'"content":"late' not in received
    while b"[DONE]" not in received:
        data = sock.recv(65536)
        assert data, received
        received += data
    sock.close()
    assert b'"content":"late ' in received
