"""The reply pipeline through the real ASGI application (design.md, the reply pipeline)."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from chat import journal, replies, services
from chat.db import run_db
from chat.journal import Journal, LogState, journal_root, live_ids, text_so_far
from chat.llm import Delta, ProviderError
from chat.models import Conversation, Message
from tests.conftest import AsgiStream

pytestmark = pytest.mark.django_db(transaction=True)


async def _wait_finished(message_id: int, timeout: float = 5) -> Message:
    for _ in range(int(timeout / 0.02)):
        message = await Message.objects.aget(pk=message_id)
        if message.status != Message.Status.STREAMING and replies.reply_get(message_id) is None:
            return message
        await asyncio.sleep(0.02)
    raise AssertionError(f"reply {message_id} still streaming")


async def _send(cookie: str, content: str = "hello", model: str = "scripted", path="/c/send/"):
    stream = AsgiStream("POST", path, cookie=cookie, form={"content": content, "model": model})
    assert await stream.start() == 200
    return stream


async def _until_end(events) -> None:
    async for name, _data in events:
        if name == "end":
            return


async def _count_writes(monkeypatch) -> dict:
    counts = {"checkpoint": 0, "finish": 0}
    record, finish = replies.record, services.reply_finish

    def counting_record(kind, message_id, text):
        # Texts written to the journal, whatever the batching (b"" registers a reply).
        if text:
            counts["checkpoint"] += 1
        return record(kind, message_id, text)

    def counting_finish(**kwargs):
        counts["finish"] += 1
        return finish(**kwargs)

    monkeypatch.setattr(replies, "record", counting_record)
    monkeypatch.setattr(services, "reply_finish", counting_finish)
    return counts


def _journalled_ids(data: bytes) -> list[int]:
    state = LogState(Path("unused"))
    state._apply(data)
    return list(state.texts)


async def test_send_streams_deltas_in_order_before_upstream_finishes(
    user, scripted, asgi_login, monkeypatch
):
    writes = await _count_writes(monkeypatch)
    stream = await _send(await asgi_login(user))
    assert stream.headers["content-type"] == "text/event-stream"
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    assert await stream.chunk() == b": stream open\n\n"
    events = stream.events()
    name, start = await anext(events)
    assert name == "start"
    user_message = await Message.objects.aget(pk=start["user_message"])
    assert user_message.content == "hello"  # committed before the upstream was called
    assert (await anext(events)) == ("snapshot", {"t": ""})

    received = []
    for token in ["Hel", "lo ", "world"]:
        await scripted.script.put(token)
        name, data = await anext(events)  # arrives while the upstream is still open
        received.append(data["t"])
    assert received == ["Hel", "lo ", "world"]
    assert not scripted.closed.is_set()

    await scripted.script.put(Delta(finish_reason="stop", prompt_tokens=7, completion_tokens=3))
    await scripted.script.put(None)
    name, end = await anext(events)
    assert name == "end"
    assert end["status"] == "complete"

    reply = await _wait_finished(start["assistant_message"])
    assert reply.content == "Hello world"
    assert reply.status == Message.Status.COMPLETE
    assert reply.finish_reason == "stop"
    assert (reply.prompt_tokens, reply.completion_tokens) == (7, 3)
    assert reply.ttft_ms is not None and reply.duration_ms is not None
    assert writes["finish"] == 1
    assert writes["checkpoint"] == 0  # a 0.1 s reply needs no checkpoint


async def test_long_reply_writes_a_bounded_number_of_checkpoints(
    user, scripted, asgi_login, monkeypatch, settings
):
    settings.CHAT_CHECKPOINT_SECONDS = 0.2
    writes = await _count_writes(monkeypatch)
    stream = await _send(await asgi_login(user))
    events = stream.events()
    _, start = await anext(events)
    # 2,000 tokens over ~1 s: at most ~1 s / 0.2 s checkpoints, never one per token.
    for i in range(2000):
        await scripted.script.put(f"t{i} ")
        if i % 200 == 0:
            await asyncio.sleep(0.1)
    await scripted.script.put(None)
    await _until_end(events)
    reply = await _wait_finished(start["assistant_message"])
    assert reply.content == "".join(f"t{i} " for i in range(2000))
    assert writes["finish"] == 1
    assert 1 <= writes["checkpoint"] <= 8


async def test_checkpoint_stores_text_while_streaming(user, scripted, asgi_login, settings):
    settings.CHAT_CHECKPOINT_SECONDS = 0.05
    stream = await _send(await asgi_login(user))
    events = stream.events()
    _, start = await anext(events)
    reply_id = start["assistant_message"]
    await scripted.script.put("partial ")
    await anext(events)
    await asyncio.sleep(0.1)
    await scripted.script.put("text")
    await anext(events)
    for _ in range(100):
        if text_so_far(reply_id) == "partial text":
            break
        await asyncio.sleep(0.02)
    assert text_so_far(reply_id) == "partial text"
    row = await Message.objects.aget(pk=reply_id)
    assert (row.status, row.content) == (Message.Status.STREAMING, "")  # one write, at the end
    await scripted.script.put(None)
    assert (await _wait_finished(reply_id)).content == "partial text"
    for _ in range(100):  # the journal lets go of it in the next batch
        if reply_id not in live_ids(journal_root()):
            break
        await asyncio.sleep(0.02)
    assert reply_id not in live_ids(journal_root())


def _final_save_fails(monkeypatch, times: int = 2, before_retry=None) -> None:
    """The reply's final save fails `times` times (its first try and its retries,
    by default); `before_retry()` runs on the database thread before the second."""
    finish = services.reply_finish
    calls = []

    def failing(**kwargs):
        calls.append(kwargs)
        if len(calls) == 2 and before_retry is not None:
            before_retry()
        if len(calls) <= times:
            raise services.OperationalError("disk I/O error")
        return finish(**kwargs)

    monkeypatch.setattr(services, "reply_finish", failing)


async def test_a_failed_final_save_is_journalled_before_it_is_retried(
    user, scripted, asgi_login, monkeypatch
):
    # A crash while the retries wait for a locked database (up to ~100 s) lost the
    # reply's last second of text and its end: they are in the journal first.
    seen = {}

    def journal_meanwhile():  # on the database thread, before the retry
        state = LogState(log_path[0])
        state.feed()
        seen.update(text=state.texts.get(reply_id[0]), final=state.finals.get(reply_id[0]))

    reply_id, log_path = [], []
    _final_save_fails(monkeypatch, times=1, before_retry=journal_meanwhile)
    cookie = await asgi_login(user)
    stream = await _send(cookie)
    events = stream.events()
    _, start = await anext(events)
    reply_id.append(start["assistant_message"])
    log_path.append(replies.checkpoint_writer().journal.log_path)
    await scripted.script.put("every word")
    await scripted.script.put(Delta(finish_reason="stop"))
    await scripted.script.put(None)
    await _until_end(events)
    row = await _wait_finished(reply_id[0])
    assert (row.status, row.content) == (Message.Status.COMPLETE, "every word")
    assert seen["text"] == b"every word" and seen["final"]["status"] == "complete"
    assert reply_id[0] not in replies.checkpoint_writer().unfinished


async def test_a_reply_whose_final_save_failed_is_saved_by_the_sweep(
    user, scripted, asgi_login, monkeypatch, settings
):
    settings.CHAT_CHECKPOINT_SECONDS = 0.05
    _final_save_fails(monkeypatch)
    cookie = await asgi_login(user)
    stream = await _send(cookie)
    events = stream.events()
    _, start = await anext(events)
    reply_id = start["assistant_message"]
    await scripted.script.put("all of it")
    await scripted.script.put(Delta(finish_reason="stop"))
    await scripted.script.put(None)
    await _until_end(events)
    # Stop, meanwhile, tells the reply's true end, not that it cannot be reached.
    stop = AsgiStream("POST", f"/c/{start['conversation']}/m/{reply_id}/stop/", cookie=cookie)
    assert await stop.start() == 200
    assert json.loads(await stop.chunk()) == {"status": "complete"}
    # A reloaded page gets its whole text and its end at once, not the row's "streaming".
    follow = AsgiStream("GET", f"/c/{start['conversation']}/m/{reply_id}/stream/", cookie=cookie)
    assert await follow.start() == 200
    assert [event async for event in follow.events()] == [
        ("snapshot", {"t": "all of it"}),
        ("end", {"status": "complete", "error": "", "finish_reason": "stop"}),
    ]
    writer = replies.checkpoint_writer()
    for _ in range(100):  # meanwhile its whole text and its end are journalled
        if text_so_far(reply_id) == "all of it" and not writer.pending:
            break
        await asyncio.sleep(0.02)
    state = LogState(writer.journal.log_path)
    state.feed()
    assert state.texts[reply_id] == b"all of it"
    assert state.finals[reply_id]["status"] == "complete"
    assert (await Message.objects.aget(pk=reply_id)).status == Message.Status.STREAMING
    assert await replies.sweep_once() == 1
    row = await Message.objects.aget(pk=reply_id)
    assert (row.status, row.content, row.finish_reason) == (
        Message.Status.COMPLETE,
        "all of it",
        "stop",
    )
    assert await replies.sweep_once() == 0
    await asyncio.sleep(0.1)  # the next batch ends it in the journal
    assert reply_id not in writer.live and reply_id not in live_ids(journal_root())


async def test_the_sweep_leaves_a_final_save_its_reply_is_still_retrying(
    user, scripted, asgi_login, monkeypatch
):
    # The sweep saw the reply in `unfinished` while its own retry waited, saved it
    # too, and then failed on the entry the reply had already removed (KeyError).
    import threading

    release = threading.Event()
    _final_save_fails(monkeypatch, times=1, before_retry=lambda: release.wait(5))
    stream = await _send(await asgi_login(user))
    events = stream.events()
    _, start = await anext(events)
    await scripted.script.put("text")
    await scripted.script.put(None)
    writer = replies.checkpoint_writer()
    reply_id = start["assistant_message"]
    for _ in range(200):
        if reply_id in writer.unfinished:
            break
        await asyncio.sleep(0.01)
    sweep = asyncio.ensure_future(replies.sweep_once())  # queued behind the retry
    await asyncio.sleep(0.05)
    release.set()
    assert await sweep == 0
    await _until_end(events)
    row = await _wait_finished(reply_id)
    assert (row.status, row.content) == (Message.Status.COMPLETE, "text")
    assert reply_id not in writer.unfinished


async def test_a_final_save_the_sweep_retried_leaves_the_journal(
    user, scripted, asgi_login, monkeypatch, settings
):
    settings.CHAT_CHECKPOINT_SECONDS = 0.05
    _final_save_fails(monkeypatch)
    stream = await _send(await asgi_login(user))
    events = stream.events()
    _, start = await anext(events)
    await scripted.script.put("text")
    await scripted.script.put(None)
    await _until_end(events)
    writer = replies.checkpoint_writer()
    reply_id = start["assistant_message"]
    assert reply_id in writer.unfinished and reply_id not in writer.pending  # journalled at once
    assert await replies.sweep_once() == 1
    await asyncio.sleep(0.1)
    assert writer.live == {} and writer.pending == {}


async def test_replies_are_touched_while_the_journal_cannot_be_written(
    user, scripted, asgi_login, settings
):
    settings.CHAT_CHECKPOINT_SECONDS = 0.05
    stream = await _send(await asgi_login(user))
    _, start = await anext(stream.events())
    reply_id = start["assistant_message"]
    await Message.objects.filter(pk=reply_id).aupdate(updated=timezone.now() - timedelta(hours=1))
    writer = replies.checkpoint_writer()
    writer.failing = True  # as after a failed rotation: the reply is in no log
    assert await replies.sweep_once() == 0
    row = await Message.objects.aget(pk=reply_id)
    assert row.status == Message.Status.STREAMING
    assert row.updated > timezone.now() - timedelta(minutes=1)
    writer.failing = False
    await scripted.script.put(None)
    await _wait_finished(reply_id)


async def test_stop_closes_upstream_and_keeps_text(user, scripted, asgi_login, monkeypatch):
    writes = await _count_writes(monkeypatch)
    cookie = await asgi_login(user)
    stream = await _send(cookie)
    events = stream.events()
    _, start = await anext(events)
    await anext(events)  # snapshot
    await scripted.script.put("kept text")
    await anext(events)

    stop = AsgiStream(
        "POST", f"/c/{start['conversation']}/m/{start['assistant_message']}/stop/", cookie=cookie
    )
    assert await stop.start() == 200
    assert b'"stopped"' in await stop.chunk()
    assert scripted.closed.is_set()  # the upstream stream was closed at once

    name, end = await anext(events)
    assert (name, end["status"]) == ("end", "stopped")
    reply = await _wait_finished(start["assistant_message"])
    assert reply.status == Message.Status.STOPPED
    assert reply.content == "kept text"
    assert writes["finish"] == 1  # exactly one final save


async def test_stop_of_a_reply_that_ended_meanwhile_answers_its_end(user, asgi_login, monkeypatch):
    # Read as running, then ended (in another worker, with no Redis to reach it) before
    # Stop could look: the answer is the end, not "cannot be reached".
    cookie = await asgi_login(user)
    conversation = await Conversation.objects.acreate(owner=user, model="scripted")
    reply = await Message.objects.acreate(
        conversation=conversation, role="assistant", status="streaming", model="scripted"
    )

    async def ends_meanwhile(message_id):
        await Message.objects.filter(pk=message_id).aupdate(status="complete")
        return False  # no other worker can be reached

    monkeypatch.setattr(replies, "reply_stop_anywhere", ends_meanwhile)
    stop = AsgiStream("POST", f"/c/{conversation.pk}/m/{reply.pk}/stop/", cookie=cookie)
    assert await stop.start() == 200
    assert json.loads(await stop.chunk()) == {"status": "complete"}


async def test_client_disconnect_lets_reply_finish_and_save(
    user, scripted, asgi_login, monkeypatch
):
    writes = await _count_writes(monkeypatch)
    stream = await _send(await asgi_login(user))
    events = stream.events()
    _, start = await anext(events)
    await anext(events)
    await scripted.script.put("before ")
    await anext(events)
    await stream.disconnect()  # tab closed

    await scripted.script.put("after")
    await scripted.script.put(None)
    reply = await _wait_finished(start["assistant_message"])
    assert reply.status == Message.Status.COMPLETE
    assert reply.content == "before after"
    assert writes["finish"] == 1  # exactly one final save


async def test_resume_replays_stored_text_then_tails(user, scripted, asgi_login):
    cookie = await asgi_login(user)
    stream = await _send(cookie)
    events = stream.events()
    _, start = await anext(events)
    await anext(events)
    await scripted.script.put("first ")
    await anext(events)
    await stream.disconnect()  # reload

    resumed = AsgiStream(
        "GET", f"/c/{start['conversation']}/m/{start['assistant_message']}/stream/", cookie=cookie
    )
    assert await resumed.start() == 200
    tail = resumed.events()
    assert await anext(tail) == ("snapshot", {"t": "first "})
    await scripted.script.put("second")
    assert await anext(tail) == ("message", {"t": "second"})
    await scripted.script.put(None)
    name, end = await anext(tail)
    assert (name, end["status"]) == ("end", "complete")


async def test_resume_of_finished_reply_sends_stored_text_and_end(user, scripted, asgi_login):
    cookie = await asgi_login(user)
    stream = await _send(cookie)
    events = stream.events()
    _, start = await anext(events)
    await scripted.script.put("all done")
    await scripted.script.put(None)
    await _wait_finished(start["assistant_message"])
    resumed = AsgiStream(
        "GET", f"/c/{start['conversation']}/m/{start['assistant_message']}/stream/", cookie=cookie
    )
    await resumed.start()
    got = [e async for e in resumed.events()]
    assert got == [
        ("snapshot", {"t": "all done"}),
        ("end", {"status": "complete", "error": "", "finish_reason": ""}),
    ]


async def test_upstream_error_before_first_token_saves_error_row(
    user, scripted, asgi_login, monkeypatch
):
    writes = await _count_writes(monkeypatch)
    stream = await _send(await asgi_login(user))
    events = stream.events()
    _, start = await anext(events)
    await anext(events)
    await scripted.script.put(ProviderError("The model server failed (HTTP 500)."))
    name, end = await anext(events)
    assert (name, end["status"]) == ("end", "error")
    assert "HTTP 500" in end["error"]
    reply = await _wait_finished(start["assistant_message"])
    assert reply.status == Message.Status.ERROR
    assert reply.error == "The model server failed (HTTP 500)."
    assert reply.content == ""
    assert writes["finish"] == 1  # exactly one final save
    # The user's message is kept and the conversation stays usable.
    assert await Message.objects.filter(pk=start["user_message"]).aexists()
    cookie = dict(stream.communicator.scope["headers"])[b"cookie"].decode()
    again = await _send(cookie, "retry", path=f"/c/{start['conversation']}/send/")
    _, start2 = await anext(again.events())
    await scripted.script.put("works")
    await scripted.script.put(None)
    assert (await _wait_finished(start2["assistant_message"])).content == "works"


async def test_upstream_cut_mid_reply_keeps_partial_text(user, scripted, asgi_login, monkeypatch):
    writes = await _count_writes(monkeypatch)
    stream = await _send(await asgi_login(user))
    events = stream.events()
    _, start = await anext(events)
    await anext(events)
    await scripted.script.put("partial")
    await anext(events)
    await scripted.script.put(ProviderError("The connection to the model server was lost."))
    name, end = await anext(events)
    assert (name, end["status"]) == ("end", "error")
    reply = await _wait_finished(start["assistant_message"])
    assert (reply.status, reply.content) == (Message.Status.ERROR, "partial")
    assert "lost" in reply.error
    assert writes["finish"] == 1  # exactly one final save


async def test_heartbeat_while_upstream_is_silent(user, scripted, asgi_login, settings):
    settings.CHAT_HEARTBEAT_SECONDS = 0.1
    stream = await _send(await asgi_login(user))
    await stream.chunk()  # open
    await stream.chunk()  # start
    await stream.chunk()  # snapshot
    assert await stream.chunk(timeout=2) == b": ping\n\n"
    await scripted.script.put(None)


async def test_two_sends_in_one_conversation_keep_order(user, scripted, asgi_login):
    cookie = await asgi_login(user)
    first = await _send(cookie, "one")
    events = first.events()
    _, start = await anext(events)
    conversation = start["conversation"]
    second = await _send(cookie, "two", path=f"/c/{conversation}/send/")
    second_events = second.events()
    _, start2 = await anext(second_events)
    await scripted.script.put(None)
    await scripted.script.put(None)
    await _wait_finished(start["assistant_message"])
    await _wait_finished(start2["assistant_message"])
    rows = [m async for m in Message.objects.filter(conversation_id=conversation).order_by("id")]
    assert [(m.role, m.content) for m in rows if m.role == "user"] == [
        ("user", "one"),
        ("user", "two"),
    ]
    second_user = next(m for m in rows if m.content == "two")
    # The second prompt follows the first reply; each reply answers its own prompt.
    assert second_user.parent_id == start["assistant_message"]
    reply2 = await Message.objects.aget(pk=start2["assistant_message"])
    assert reply2.parent_id == second_user.pk


async def test_unknown_model_is_refused_before_any_write(user, scripted, asgi_login):
    stream = AsgiStream(
        "POST", "/c/send/", cookie=await asgi_login(user), form={"content": "x", "model": "nope"}
    )
    assert await stream.start() == 400
    assert not await Conversation.objects.aexists()
    assert scripted.calls == []


async def test_oversized_message_is_refused_before_any_write(user, scripted, asgi_login, settings):
    settings.CHAT_MAX_MESSAGE_CHARS = 1000
    stream = AsgiStream(
        "POST",
        "/c/send/",
        cookie=await asgi_login(user),
        form={"content": "x" * 200_000, "model": "scripted"},
    )
    assert await stream.start() == 413
    assert not await Conversation.objects.aexists()
    assert not await Message.objects.aexists()
    assert scripted.calls == []


async def test_the_server_caps_max_tokens_on_the_chat_page_too(
    user, fake_provider, asgi_login, settings
):
    # A chat keeps the max_tokens it was given; a lower server cap still wins.
    conversation = await Conversation.objects.acreate(owner=user, model="fake", max_tokens=1000)
    settings.CHAT_MAX_TOKENS = 2
    cookie = await asgi_login(user)
    stream = await _send(cookie, "one two three four", "fake", f"/c/{conversation.pk}/send/")
    events = stream.events()
    _, start = await anext(events)
    await _until_end(events)
    reply = await _wait_finished(start["assistant_message"])
    assert (reply.content, reply.finish_reason) == ("Echo: one ", "length")


async def test_concurrent_reply_limit(user, scripted, asgi_login, settings):
    settings.CHAT_MAX_CONCURRENT_REPLIES = 1
    cookie = await asgi_login(user)
    first = await _send(cookie)
    _, start = await anext(first.events())
    refused = AsgiStream(
        "POST", "/c/send/", cookie=cookie, form={"content": "x", "model": "scripted"}
    )
    assert await refused.start() == 429
    await scripted.script.put(None)
    await _wait_finished(start["assistant_message"])


async def test_abandon_drops_the_upstream_before_the_reply_task_runs(user, upstream):
    # Reply.abandon() runs the provider's abort hook on the spot: the upstream
    # sees the connection end even while this event loop is blocked, so the
    # reply's task cannot have run its cleanup yet.
    import time

    from chat.llm import ChatMessage, GenerationParams
    from chat.llm.openai_compat import OpenAICompatProvider

    provider = OpenAICompatProvider(name="fake", base_url=upstream.base_url, api_key="k")
    conversation = await Conversation.objects.acreate(owner=user, model="fake-stall")
    _, assistant = await run_db(
        services.message_send, conversation=conversation, content="x", model="fake-stall"
    )
    reply = replies.reply_start(
        message_id=assistant.pk,
        provider=provider,
        messages=[ChatMessage("user", "x")],
        params=GenerationParams("fake-stall", 100),
    )
    try:
        for _ in range(250):  # fake-stall sends two tokens, then nothing
            if reply.text == "tok0 tok1 ":
                break
            await asyncio.sleep(0.02)
        assert reply.text == "tok0 tok1 "
        before = upstream.stats["abandoned"]
        reply.abandon()
        deadline = time.monotonic() + 2
        while upstream.stats["abandoned"] == before and time.monotonic() < deadline:
            time.sleep(0.01)  # blocking on purpose: the reply task must not run
        assert upstream.stats["abandoned"] == before + 1
        end = await reply.wait()
        assert end.status == Message.Status.INTERRUPTED
        row = await _wait_finished(assistant.pk)
        assert (row.status, row.content) == (Message.Status.INTERRUPTED, "tok0 tok1 ")
    finally:
        await provider.aclose()


async def test_disconnect_hooks_run_when_the_disconnect_message_is_read():
    from chat.streaming import DISCONNECT_HOOKS
    from chatsite.asgi import ChatASGIHandler

    calls = []

    class Probe(ChatASGIHandler):
        async def handle(self, scope, receive, send):
            scope[DISCONNECT_HOOKS].append(lambda: calls.append("hook"))
            calls.append((await receive())["type"])  # the request body: no hook
            calls.append((await receive())["type"])

    messages = [{"type": "http.disconnect"}, {"type": "http.request", "body": b""}]

    async def receive():
        return messages.pop()

    scope = {"type": "http", "path": "/v1/chat/completions", "headers": []}
    await Probe()(scope, receive, None)
    assert calls == ["http.request", "hook", "http.disconnect"]


async def test_inbox_hands_over_everything_queued_in_order():
    inbox = replies.Inbox()
    inbox.put("a")
    inbox.put("b")
    assert await inbox.take() == ["a", "b"]
    waiting = asyncio.ensure_future(inbox.take())
    await asyncio.sleep(0)
    assert not waiting.done()  # nothing queued: it waits
    inbox.put("c")
    inbox.put(replies.HEARTBEAT)
    assert await asyncio.wait_for(waiting, 1) == ["c", replies.HEARTBEAT]
    assert inbox.items == []


async def test_sse_response_hands_the_server_its_own_generator():
    """Django's handler iterates the frames generator itself (no wrapping layers) and
    closes it when it stops early."""
    from django.core.handlers.asgi import ASGIHandler

    from chat.streaming import sse_response

    closed = []

    async def frames():
        try:
            yield b"data: 1\n\n"
            yield b"data: 2\n\n"
            yield b"data: 3\n\n"
        finally:
            closed.append(True)

    events = frames()
    response = sse_response(events)
    assert aiter(response) is events
    sent = []

    async def send(message):
        sent.append(message)
        if message.get("body") == b"data: 2\n\n":
            raise OSError("the client went away")  # the server stops mid-stream

    with pytest.raises(OSError):
        await ASGIHandler().send_response(response, send)
    assert sent[0]["type"] == "http.response.start"
    assert [m["body"] for m in sent[1:]] == [b"data: 1\n\n", b"data: 2\n\n"]
    assert closed == [True]  # closed at once, not when garbage-collected


async def test_a_response_can_start_with_its_first_frame():
    """chatsite.asgi holds the start until the first frame, so the generator may still
    set the status and headers; the frames then go out in order, and it is closed."""
    from chat.streaming import sse_response
    from chatsite.asgi import ChatASGIHandler

    closed = []
    response = sse_response(())

    async def frames():
        try:
            await asyncio.sleep(0.01)  # the model server's first token
            response.status_code = 502
            response["Content-Type"] = "application/json"
            yield b'{"error": 1}'
            yield b"more"
        finally:
            closed.append(True)

    response.streaming_content = frames()
    response.start_with_first_frame = True
    sent = []

    async def send(message):
        sent.append(message)

    await ChatASGIHandler().send_response(response, send)
    start = sent[0]
    assert start["type"] == "http.response.start" and start["status"] == 502
    assert (b"Content-Type", b"application/json") in start["headers"]
    assert [m.get("body") for m in sent[1:]] == [b'{"error": 1}', b"more", None]  # None: the end
    assert closed == [True]


async def test_checkpoints_of_concurrent_replies_share_one_journal_batch(
    user, scripted, monkeypatch, settings
):
    settings.CHAT_CHECKPOINT_SECONDS = 0.1
    settings.CHAT_MAX_CONCURRENT_REPLIES = 10
    calls: list[list[int]] = []
    write = Journal.write

    def counting(self, data):
        calls.append(_journalled_ids(data))
        return write(self, data)

    monkeypatch.setattr(Journal, "write", counting)
    conversation = await Conversation.objects.acreate(owner=user, model="scripted")

    async def running_reply(text: str) -> replies.Reply:
        _, row = await run_db(
            services.message_send, conversation=conversation, content="q", model="scripted"
        )
        reply = replies.Reply(row.pk, scripted, [], None)
        reply.parts.append(text)
        reply.unsaved = True
        return reply

    writer = replies.checkpoint_writer()
    one, two, three = [await running_reply(t) for t in ("one ", "two ", "three ")]
    for reply in (one, two, three):
        writer.add(reply)
    writer.discard(three)  # it ended: its final save carries the text
    await asyncio.sleep(0.05)
    assert calls == []  # not before the interval is up
    await asyncio.sleep(0.15)
    assert calls == [[one.message_id, two.message_id]]
    assert not one.unsaved and not two.unsaved

    one.parts.append("more")
    one.unsaved = True
    writer.add(one)
    await asyncio.sleep(0.2)
    assert calls == [[one.message_id, two.message_id], [one.message_id]]
    texts = {r.message_id: text_so_far(r.message_id) for r in (one, two, three)}
    assert texts == {one.message_id: "one more", two.message_id: "two ", three.message_id: ""}
    stored = {
        m.content
        async for m in Message.objects.filter(
            pk__in=[one.message_id, two.message_id, three.message_id]
        )
    }
    assert stored == {""}  # the database is not written until the end


async def test_the_model_sees_the_new_chats_system_prompt_then_the_whole_path(
    user, scripted, asgi_login
):
    from chat.llm import ChatMessage

    cookie = await asgi_login(user)
    form = {"content": "first", "model": "scripted", "system_prompt": "Pirate."}
    stream = AsgiStream("POST", "/c/send/", cookie=cookie, form=form)
    assert await stream.start() == 200
    events = stream.events()
    _, start = await anext(events)
    await scripted.script.put("arr")
    await scripted.script.put(None)
    await _wait_finished(start["assistant_message"])
    assert scripted.calls[0] == [ChatMessage("system", "Pirate."), ChatMessage("user", "first")]
    for _ in range(250):  # the new chat's title is asked for next, from the same script
        if len(scripted.calls) == 2:
            break
        await asyncio.sleep(0.02)
    await scripted.script.put("A title")
    await scripted.script.put(None)
    for _ in range(250):
        conversation = await Conversation.objects.aget(pk=start["conversation"])
        if conversation.title == "A title":
            break
        await asyncio.sleep(0.02)

    second = await _send(cookie, "second", path=f"/c/{start['conversation']}/send/")
    _, start2 = await anext(second.events())
    await scripted.script.put(None)
    await _wait_finished(start2["assistant_message"])
    assert scripted.calls[-1] == [
        ChatMessage("system", "Pirate."),
        ChatMessage("user", "first"),
        ChatMessage("assistant", "arr"),
        ChatMessage("user", "second"),
    ]


async def test_a_failed_journal_write_is_made_good_by_a_rotation(
    user, scripted, monkeypatch, settings
):
    settings.CHAT_CHECKPOINT_SECONDS = 0.05
    settings.CHAT_MAX_CONCURRENT_REPLIES = 10
    real_write = os.write
    failures = []

    def disk_full_once(fd, data):
        if b"second" in bytes(data) and not failures:
            failures.append(fd)
            real_write(fd, bytes(data[:7]))  # part of it made it
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(journal.os, "write", disk_full_once)
    conversation = await Conversation.objects.acreate(owner=user, model="scripted")
    batch = []
    for i in range(3):
        _, row = await run_db(
            services.message_send, conversation=conversation, content="q", model="scripted"
        )
        reply = replies.Reply(row.pk, scripted, [], None)
        reply.parts.append(f"first {i} ")
        reply.unsaved = True
        batch.append(reply)
    writer = replies.checkpoint_writer()
    for reply in batch:
        writer.add(reply)
    await asyncio.sleep(0.15)
    for reply in batch:
        reply.parts.append("second")
        reply.unsaved = True
        writer.add(reply)
    await asyncio.sleep(0.15)  # the upstream is silent: no new text brings them back
    assert failures
    assert {r.message_id: text_so_far(r.message_id) for r in batch} == {
        r.message_id: r.text for r in batch
    }
    state = LogState(writer.journal.log_path)
    state.feed()
    assert state.texts == {r.message_id: bytearray(r.text.encode()) for r in batch}
