"""The OpenAI-compatible provider against a real local fake upstream (no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest

from chat.llm import fake_upstream, openai_compat
from chat.llm.base import ChatMessage, Delta, GenerationParams, ProviderError
from chat.llm.fake_upstream import MODELS, SECRET_DETAIL, XSS_TEXT, FakeUpstream
from chat.llm.openai_compat import OpenAICompatProvider, validate_base_url

API_KEY = "sk-test-KEY-must-never-leak-1234"
TOKENS = 20


@pytest.fixture(scope="module")
def upstream():
    up = FakeUpstream(tokens=TOKENS, stall_seconds=30).start()
    yield up
    up.stop()


@pytest.fixture
async def provider(upstream):
    p = OpenAICompatProvider(name="fake", base_url=upstream.base_url, api_key=API_KEY)
    yield p
    await p.aclose()


async def collect(
    provider, model: str, text: str = "hello big world", max_tokens: int = 100, system=None
) -> tuple[list[Delta], Delta | None]:
    """All deltas with text, and the final delta (the one with a finish reason or usage)."""
    messages = [ChatMessage("system", system)] if system else []
    messages.append(ChatMessage("user", text))
    texts: list[Delta] = []
    final = None
    async for delta in provider.stream(messages, GenerationParams(model, max_tokens)):
        if delta.text:
            assert final is None, "text after the final delta"
            texts.append(delta)
        else:
            final = delta
    return texts, final


async def wait_for(predicate, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


def assert_safe(message: str, upstream: FakeUpstream) -> None:
    assert SECRET_DETAIL not in message
    assert API_KEY not in message
    assert str(upstream.port) not in message
    assert "127.0.0.1" not in message


# -- streaming ----------------------------------------------------------------------------------
async def test_stream_echo_words_in_order(provider):
    texts, final = await collect(provider, "fake-echo", "hello  big\nworld")
    assert [d.text for d in texts] == ["Echo: ", "hello  ", "big\n", "world"]
    assert final.finish_reason == "stop"


async def test_stream_count_every_token_in_order(provider):
    texts, final = await collect(provider, "fake-count", max_tokens=1000)
    assert [d.text for d in texts] == [f"tok{i} " for i in range(TOKENS)]
    assert final.finish_reason == "stop"
    assert final.completion_tokens == TOKENS


async def test_stream_count_max_tokens_finish_length(provider):
    texts, final = await collect(provider, "fake-count", max_tokens=7)
    assert "".join(d.text for d in texts) == "".join(f"tok{i} " for i in range(7))
    assert final.finish_reason == "length"
    assert final.completion_tokens == 7


async def test_stream_usage_and_finish_reason_captured(provider):
    texts, final = await collect(provider, "fake-echo", "one two three", system="be brief")
    assert final.finish_reason == "stop"
    assert final.prompt_tokens == 5  # all words of all messages
    assert final.completion_tokens == len(texts) == 4


async def test_stream_length_model_finish_length(provider):
    texts, final = await collect(provider, "fake-length")
    assert len(texts) == 5
    assert final.finish_reason == "length"


async def test_stream_odd_chunks_handled(provider):
    texts, final = await collect(provider, "fake-odd")
    assert "".join(d.text for d in texts) == "odd a\x00b end"
    assert final.finish_reason == "stop"


async def _chunks(*parts: bytes):
    for part in parts:
        yield part


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
async def test_sse_events_split_anywhere_are_parsed_whole(newline):
    events = (
        b": a comment" + newline + newline,
        b"event: message" + newline + b"id: 7" + newline + b'data: {"a": 1}' + newline + newline,
        b"data:no-space" + newline + newline,
        b"data: two" + newline + b"data: lines" + newline + newline,
        b"retry: 10" + newline + newline,
        b"data: [DONE]" + newline + newline,
    )
    stream = b"".join(events)
    want = [b'{"a": 1}', b"no-space", b"two\nlines", b"[DONE]"]
    # Every split point of the stream, so a CR LF may be cut between its two bytes.
    for cut in range(1, len(stream)):
        got = [d async for d in openai_compat._sse_data(_chunks(stream[:cut], stream[cut:]))]
        assert got == want, cut
    one_byte_chunks = [stream[i : i + 1] for i in range(len(stream))]
    assert [d async for d in openai_compat._sse_data(_chunks(*one_byte_chunks))] == want


async def test_stream_reads_the_body_straight_from_aiohttp(provider, monkeypatch):
    # The package's aiohttp transport is installed (openai[aiohttp]): the body
    # must come from aiohttp's stream, not through httpx2's generator layers.
    kinds = []
    body_chunks = openai_compat._body_chunks

    def recording(response):
        chunks = body_chunks(response)
        kinds.append(type(chunks).__module__)
        return chunks

    monkeypatch.setattr(openai_compat, "_body_chunks", recording)
    texts, final = await collect(provider, "fake-count")
    assert len(texts) == TOKENS and final.finish_reason == "stop"
    assert kinds == ["aiohttp.streams"]


async def test_stream_xss_passes_through_verbatim(provider):
    texts, final = await collect(provider, "fake-xss")
    assert "".join(d.text for d in texts) == XSS_TEXT
    assert all(len(d.text) <= 3 for d in texts)
    assert final.finish_reason == "stop"


async def test_stream_many_concurrent_streams_complete(provider):
    results = await asyncio.gather(*(collect(provider, "fake-count") for _ in range(50)))
    expected = "".join(f"tok{i} " for i in range(TOKENS))
    for texts, final in results:
        assert "".join(d.text for d in texts) == expected
        assert final.finish_reason == "stop"


# -- failures -----------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [500, 401, 429])
async def test_stream_upstream_error_is_safe_provider_error(provider, upstream, status, caplog):
    with pytest.raises(ProviderError) as info:
        await collect(provider, f"fake-error-{status}")
    message = str(info.value)
    assert f"HTTP {status}" in message
    assert_safe(message, upstream)
    assert info.value.__cause__ is None
    # The log names the error's type and code from its body, never its message.
    _, type_, code = fake_upstream._ERRORS[f"fake-error-{status}"]
    assert f"HTTP {status} from the model server (type={type_!r} code={code!r})" in caplog.text
    assert SECRET_DETAIL not in caplog.text


async def test_stream_request_is_the_packages_with_this_body():
    """What reaches the server: the openai package's URL and headers, and each
    request's own body (the headers are built once per client, the body never kept)."""
    seen: list[tuple[bytes, bytes]] = []

    async def handle(reader, writer):
        while True:  # keep-alive: the second request may come on the same connection
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            seen.append((head, await reader.readexactly(length)))
            body = b'data: {"choices":[{"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\n'
            body += b"data: [DONE]\n\n"
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    provider = OpenAICompatProvider(
        name="raw", base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY
    )
    try:
        for text in ("first question", "second, longer question ü"):
            texts, final = await collect(provider, "m1", text=text, max_tokens=7)
            assert [d.text for d in texts] == ["hi"] and final.finish_reason == "stop"
    finally:
        await provider.aclose()
        server.close()
    questions = ("first question", "second, longer question ü")
    for (head, body), text in zip(seen, questions, strict=True):
        request_line, *lines = head.decode().split("\r\n")
        headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines if line)}
        assert request_line == "POST /v1/chat/completions HTTP/1.1"
        assert headers["authorization"] == f"Bearer {API_KEY}"
        assert headers["content-type"] == "application/json"
        assert headers["user-agent"].startswith("AsyncOpenAI/Python ")
        assert headers["x-stainless-raw-response"] == "stream"
        assert json.loads(body) == {
            "model": "m1",
            "messages": [{"role": "user", "content": text}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 7,
        }


async def test_stream_redirect_is_not_followed(provider, upstream):
    started = upstream.stats["started"]
    with pytest.raises(ProviderError, match="HTTP 307"):
        await collect(provider, "fake-redirect")
    assert upstream.stats["started"] == started + 1  # the redirect target was never asked


async def test_stream_unknown_model_is_provider_error(provider, upstream):
    with pytest.raises(ProviderError, match="HTTP 404") as info:
        await collect(provider, "no-such-model")
    assert_safe(str(info.value), upstream)


async def test_stream_cut_raises_after_first_tokens(provider, upstream):
    seen = []
    with pytest.raises(ProviderError, match="connection to the model server was lost") as info:
        async for delta in provider.stream(
            [ChatMessage("user", "x")], GenerationParams("fake-cut", 100)
        ):
            seen.append(delta.text)
    assert seen == ["tok0 ", "tok1 ", "tok2 "]
    assert_safe(str(info.value), upstream)


async def test_stream_ending_without_finish_or_done_is_an_error(provider, upstream):
    seen = []
    with pytest.raises(ProviderError, match="connection to the model server was lost"):
        async for delta in provider.stream(
            [ChatMessage("user", "x")], GenerationParams("fake-truncated", 100)
        ):
            seen.append(delta.text)
    assert seen == ["tok0 ", "tok1 ", "tok2 "]  # kept by the reply as partial text


async def test_stream_stall_times_out_after_two_tokens(upstream):
    p = OpenAICompatProvider(
        name="fake", base_url=upstream.base_url, api_key=API_KEY, read_timeout=1
    )
    seen = []
    started = time.monotonic()
    try:
        with pytest.raises(ProviderError, match=r"stopped responding \(timed out after 1 s\)"):
            async for delta in p.stream(
                [ChatMessage("user", "x")], GenerationParams("fake-stall", 100)
            ):
                seen.append(delta.text)
    finally:
        await p.aclose()
    assert seen == ["tok0 ", "tok1 "]
    assert time.monotonic() - started < 5


async def test_stream_with_no_response_headers_times_out():
    # A server that accepts the request and never answers: the read deadline
    # covers the wait for the headers too, not only the body.
    accepted = []

    async def silent(reader, writer):
        accepted.append(writer)
        await reader.read(1 << 16)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    p = OpenAICompatProvider(
        name="silent", base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, read_timeout=0.5
    )
    started = time.monotonic()
    try:
        with pytest.raises(ProviderError, match=r"stopped responding \(timed out after 0.5 s\)"):
            await collect(p, "fake-echo")
    finally:
        await p.aclose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    assert 0.4 < time.monotonic() - started < 3
    assert accepted


async def test_stream_kept_alive_by_comments_does_not_time_out():
    # Any bytes are a sign of life: an upstream that sends only SSE comments
    # for 1.2 s before its first token must not trip a 0.5 s read timeout.
    async def keep_alive(reader, writer):
        await reader.read(1 << 16)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )

        def chunk(data: bytes) -> bytes:
            return b"%x\r\n%s\r\n" % (len(data), data)

        for _ in range(6):
            writer.write(chunk(b": keep-alive\n\n"))
            await writer.drain()
            await asyncio.sleep(0.2)
        event = {"choices": [{"index": 0, "delta": {"content": "late"}, "finish_reason": "stop"}]}
        writer.write(chunk(b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n"))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(keep_alive, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    p = OpenAICompatProvider(
        name="slow", base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, read_timeout=0.5
    )
    try:
        texts, final = await collect(p, "fake-echo")
    finally:
        await p.aclose()
        server.close()
        await server.wait_closed()
    assert [d.text for d in texts] == ["late"]
    assert final.finish_reason == "stop"


async def test_abort_hook_after_the_body_is_in_leaves_the_pooled_connection_alone(
    provider, upstream
):
    # aiohttp pools the connection once the whole body is read; an abort that
    # comes late (a client leaving just then) must not shut that connection.
    from chat.llm.base import abort_hooks_open

    hooks = abort_hooks_open()
    texts, final = await collect(provider, "fake-count")
    assert len(texts) == TOKENS and final.finish_reason == "stop"
    assert len(hooks) == 1
    hooks[0]()  # too late: nothing of this response's is left to drop
    texts, final = await collect(provider, "fake-count")  # on the pooled connection
    assert len(texts) == TOKENS and final.finish_reason == "stop"


async def test_stream_aclose_mid_stream_abandons_upstream(provider, upstream):
    assert await wait_for(lambda: upstream.stats["active"] == 0)
    before = upstream.stats["abandoned"]
    gen = provider.stream([ChatMessage("user", "x")], GenerationParams("fake-stall", 100))
    assert (await gen.__anext__()).text == "tok0 "
    assert (await gen.__anext__()).text == "tok1 "
    assert upstream.stats["active"] == 1
    await gen.aclose()
    assert await wait_for(lambda: upstream.stats["abandoned"] == before + 1, timeout=1.0)
    assert upstream.stats["active"] == 0


async def test_stream_cancel_mid_stream_abandons_upstream(provider, upstream):
    assert await wait_for(lambda: upstream.stats["active"] == 0)
    before = upstream.stats["abandoned"]
    seen = []

    async def consume():
        async for delta in provider.stream(
            [ChatMessage("user", "x")], GenerationParams("fake-stall", 100)
        ):
            seen.append(delta.text)

    task = asyncio.create_task(consume())
    assert await wait_for(lambda: len(seen) == 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_for(lambda: upstream.stats["abandoned"] == before + 1, timeout=1.0)
    assert upstream.stats["active"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_stream_connection_refused_is_provider_error():
    port = _free_port()
    p = OpenAICompatProvider(name="down", base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY)
    try:
        with pytest.raises(ProviderError, match="Could not connect to the model server") as info:
            await collect(p, "fake-echo")
    finally:
        await p.aclose()
    assert str(port) not in str(info.value)
    assert API_KEY not in str(info.value)


# -- models and clients -------------------------------------------------------------------------
async def test_list_models_returns_endpoint_ids(provider):
    assert sorted(await provider.list_models()) == sorted(MODELS)


async def test_list_models_configured_list(upstream):
    p = OpenAICompatProvider(
        name="fake", base_url=upstream.base_url, api_key=API_KEY, models=["a-model", "b-model"]
    )
    assert await p.list_models() == ["a-model", "b-model"]


async def test_list_models_unreachable_returns_empty():
    p = OpenAICompatProvider(
        name="down", base_url=f"http://127.0.0.1:{_free_port()}/v1", api_key=API_KEY
    )
    try:
        assert await p.list_models() == []
    finally:
        await p.aclose()


def test_provider_client_per_event_loop(upstream):
    p = OpenAICompatProvider(name="fake", base_url=upstream.base_url, api_key=API_KEY)

    async def run() -> str:
        try:
            texts, _ = await collect(p, "fake-echo", "again")
            return "".join(d.text for d in texts)
        finally:
            await p.aclose()

    assert asyncio.run(run()) == "Echo: again"
    assert asyncio.run(run()) == "Echo: again"


# -- base URL validation ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:11434/v1",
        "https://api.openai.com/v1",
        "http://localhost:8000/v1",
        "http://192.168.1.20:8080/v1",
        "http://[::1]:11434/v1",
        "http://ollama.internal:11434",
    ],
)
def test_validate_base_url_accepts(url):
    assert validate_base_url(url) == url.rstrip("/")


UNICODE_METADATA_URLS = [
    "http://169\u3002254\u3002169\u3002254/v1",  # ideographic full stops
    "http://169\uff0e254\uff0e169\uff0e254/v1",  # fullwidth full stops
    "http://169\uff61254\uff61169\uff61254/v1",  # halfwidth ideographic full stops
    "http://\uff11\uff16\uff19.254.169.254/v1",  # fullwidth digits
    "http://\u2460\u2465\u2468.254.169.254/v1",  # circled digits: 1, 6, 9
    "http://\uff4detadata.google.internal/",  # fullwidth m
]


@pytest.mark.parametrize("url", UNICODE_METADATA_URLS)
def test_the_check_sees_the_host_the_clients_connect_to(url):
    # Each HTTP client either refuses the URL or connects to the ASCII host checked.
    import httpx2
    import yarl

    from chat.llm.openai_compat import _ascii_host

    checked = _ascii_host(urlsplit(url).hostname)
    assert checked.isascii()
    assert yarl.URL(url).host == checked  # aiohttp's: the one that streams
    with contextlib.suppress(httpx2.InvalidURL):
        assert httpx2.URL(url).host == checked


def test_an_international_host_name_is_accepted():
    assert validate_base_url("http://b\u00fccher.example/v1") == "http://b\u00fccher.example/v1"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/v1",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "",
        "http://169.254.169.254/latest/meta-data",
        "http://169.254.169.254./v1",
        "http://2852039166/",
        "http://0xa9fea9fe/",
        "http://0xA9.0xFE.0xA9.0xFE/",
        "http://0251.0376.0251.0376/",
        "http://169.254.43518/",
        "http://[fe80::1]/v1",
        "http://[FE80::1%25eth0]/v1",
        "http://[::ffff:169.254.169.254]/v1",
        "http://[::ffff:a9fe:a9fe]/v1",
        "http://metadata.google.internal/computeMetadata/v1",
        "http://METADATA.google.internal./",
        "http://metadata/",
        "http://localhost:notaport/",
        # Unicode spellings the HTTP clients map to ASCII (IDNA) before connecting.
        *UNICODE_METADATA_URLS,
    ],
)
def test_validate_base_url_rejects(url):
    with pytest.raises(ValueError):
        validate_base_url(url)


def test_provider_constructor_validates_base_url():
    with pytest.raises(ValueError, match="metadata"):
        OpenAICompatProvider(name="x", base_url="http://169.254.169.254/v1", api_key=None)


# -- the fake upstream itself -------------------------------------------------------------------
def _post(upstream, body: bytes):
    req = urllib.request.Request(
        upstream.base_url + "/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    return urllib.request.urlopen(req, timeout=5)


def test_fake_upstream_non_streaming_completion(upstream):
    body = {"model": "fake-echo", "messages": [{"role": "user", "content": "hi there"}]}
    with _post(upstream, json.dumps(body).encode()) as resp:
        assert resp.status == 200
        data = json.load(resp)
    assert data["object"] == "chat.completion"
    assert data["model"] == "fake-echo"
    choice = data["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Echo: hi there", "refusal": None}
    assert choice["finish_reason"] == "stop"
    assert data["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_fake_upstream_bad_json_is_400(upstream):
    with pytest.raises(urllib.error.HTTPError) as info:
        _post(upstream, b"{not json")
    assert info.value.code == 400
    assert set(json.load(info.value)["error"]) == {"message", "type", "param", "code"}


def test_fake_upstream_unknown_model_is_404(upstream):
    with pytest.raises(urllib.error.HTTPError) as info:
        _post(upstream, json.dumps({"model": "nope", "messages": []}).encode())
    assert info.value.code == 404
    assert json.load(info.value)["error"]["code"] == "model_not_found"


def test_fake_upstream_models_and_stats(upstream):
    with urllib.request.urlopen(upstream.base_url + "/models", timeout=5) as resp:
        data = json.load(resp)
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == list(MODELS)
    with urllib.request.urlopen(f"http://127.0.0.1:{upstream.port}/stats", timeout=5) as resp:
        stats = json.load(resp)
    assert set(stats) == {"started", "completed", "abandoned", "active"}
    assert all(isinstance(v, int) for v in stats.values())


async def test_list_models_keeps_the_last_good_list_when_the_endpoint_fails(upstream):
    p = OpenAICompatProvider(name="fake", base_url=upstream.base_url, api_key=API_KEY)
    first = await p.list_models()
    assert "fake-echo" in first

    class Broken:
        class models:  # noqa: N801 - mimics client.models
            @staticmethod
            async def list(**kwargs):
                raise OSError("endpoint down")

    p._models_cache = None  # the cached answer expired
    p._client = lambda: Broken
    assert await p.list_models() == first


@pytest.mark.parametrize(
    "payload",
    [
        b'{"choices":[{"delta":{"content":"tok1 "},"finish_reason":null}]}',
        b'  {"a": 1}  ',
        b'{"a": "\\u00fc \\ud83d\\ude00", "b": [1, 2.5, null, true]}',
        '{"a": "ü"}'.encode("utf-16"),
        b"[1, 2]",
        b'"text"',
        b"42",
    ],
)
def test_chunk_json_is_parsed_as_json_loads_does(payload):
    assert openai_compat._json_loads(payload) == json.loads(payload)


@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b'{"a": 1} x', b'{"a": 1}{"b": 2}', b"\xff\xfe{", b"nope", b'{"a":"\x01"}'],
)
def test_chunk_json_errors_are_json_loads_errors(payload):
    with pytest.raises(ValueError) as expected:
        json.loads(payload)
    with pytest.raises(ValueError) as got:
        openai_compat._json_loads(payload)
    assert type(got.value) is type(expected.value)
