"""The reply task: generation owned by a task, HTTP responses only subscribe.

A `Reply` runs the provider stream to the end whatever happens to the browser:
a client that disconnects only unsubscribes. Text is checkpointed to the
journal (chat.journal) about once a second, never per token, and saved to the
row once, when it ends, with a truthful status. Stop cancels the task; the
provider closes the upstream.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from django.conf import settings

from . import services
from .db import run_db
from .journal import (
    ADD,
    END,
    FINAL,
    ROTATE_BYTES,
    SET,
    Journal,
    TextReader,
    journal_root,
    record,
)
from .llm import ChatMessage, GenerationParams, Provider, ProviderError, abort_hooks_open
from .models import Message
from .text import clean_text

log = logging.getLogger(__name__)

# Replies generating in this process, by assistant message id.
_running: dict[int, Reply] = {}


@dataclass(slots=True)
class ReplyEnd:
    status: str
    error: str = ""
    finish_reason: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class Inbox:
    """What one subscriber has not read yet: `put` never waits, `take` returns it all.

    An asyncio.Queue per subscriber cost a future, an event and a deque step
    per token for one reader that always wants everything queued anyway.
    """

    __slots__ = ("items", "_waiter")

    def __init__(self):
        self.items: list = []
        self._waiter: asyncio.Future | None = None

    def put(self, item) -> None:
        self.items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list:
        """Everything queued, in order, once there is something."""
        while not self.items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self.items = self.items, []
        return items


class Reply:
    def __init__(
        self,
        message_id: int,
        provider: Provider,
        messages: list[ChatMessage],
        params: GenerationParams,
    ):
        self.message_id = message_id
        self.provider = provider
        self.messages = messages
        self.params = params
        self.parts: list[str] = []
        self.end: ReplyEnd | None = None
        self.stop_requested = False
        self._subscribers: set[Inbox] = set()
        self._task: asyncio.Task | None = None
        self._started = False
        self._streaming = True
        self._cancel_requested = False
        self.unsaved = False  # text that no checkpoint has taken yet
        self.saved_parts = 0  # how many of `parts` the journal has
        self.journalled = False  # its first record is written
        self._abort_hooks: list = []  # the provider's ways to drop its upstream at once

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def start(self) -> None:
        _running[self.message_id] = self
        # A fresh context: the task outlives the request that started it and
        # must not inherit its per-request database thread.
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"reply-{self.message_id}", context=contextvars.Context()
        )

    def stop(self) -> None:
        """The user pressed stop: the reply ends `stopped` with the text so far."""
        self.stop_requested = True
        self.abandon()

    def abandon(self) -> None:
        """Nobody will read this reply (an API client left): it ends `interrupted`."""
        self._cancel_requested = True
        # A task that has not run yet sees the flag when it starts; once the
        # stream is over, the final save must run uncancelled.
        if self._started and self._streaming and self._task and not self._task.done():
            for hook in self._abort_hooks:
                try:
                    hook()  # the upstream hears of it now, not when the task next runs
                except Exception:
                    log.exception("reply %s: upstream abort hook failed", self.message_id)
            self._task.cancel()

    async def wait(self) -> ReplyEnd:
        assert self._task is not None
        await asyncio.shield(self._task)
        assert self.end is not None
        return self.end

    def subscribe(self) -> tuple[str, Inbox]:
        """The text so far and an inbox of what follows (str deltas, then a ReplyEnd)."""
        inbox = Inbox()
        if self.end is not None:
            inbox.put(self.end)
        else:
            self._subscribers.add(inbox)
        return self.text, inbox

    def unsubscribe(self, inbox: Inbox) -> None:
        self._subscribers.discard(inbox)

    def _publish(self, item) -> None:
        for inbox in self._subscribers:
            inbox.put(item)

    async def _run(self) -> None:
        self._started = True
        self._abort_hooks = abort_hooks_open()  # in this task's own context
        plane = None
        try:
            plane = control_plane()
            if plane is not None:
                plane.join(self.message_id)
        except Exception:  # cross-worker stop is a convenience; the reply is not
            log.exception("reply %s: channel layer unavailable", self.message_id)
        try:
            await self._generate()
        finally:
            if plane is not None:
                plane.leave(self.message_id)
            if _running.get(self.message_id) is self:  # cancelled before it could start
                _running.pop(self.message_id, None)
                self.end = self.end or ReplyEnd(
                    status=Message.Status.INTERRUPTED, error="The reply was abandoned."
                )
                self._publish(self.end)
                self._subscribers.clear()

    async def _generate(self) -> None:
        started = time.monotonic()
        ttft_ms = None
        usage: dict = {}
        end = ReplyEnd(status=Message.Status.COMPLETE)
        checkpoints = checkpoint_writer()
        checkpoints.add(self)  # in the journal before any text: see CheckpointWriter
        stream = self.provider.stream(self.messages, self.params)
        try:
            if self._cancel_requested:  # stopped before the task first ran
                raise asyncio.CancelledError
            async for delta in stream:
                if delta.text:
                    if ttft_ms is None:
                        ttft_ms = int((time.monotonic() - started) * 1000)
                    self.parts.append(delta.text)
                    self._publish(delta.text)
                    if not self.unsaved:  # once per batch, not per token
                        checkpoints.add(self)
                if delta.finish_reason:
                    end.finish_reason = delta.finish_reason
                if delta.prompt_tokens is not None:
                    usage["prompt_tokens"] = delta.prompt_tokens
                if delta.completion_tokens is not None:
                    usage["completion_tokens"] = delta.completion_tokens
        except asyncio.CancelledError:
            end = ReplyEnd(
                status=Message.Status.STOPPED
                if self.stop_requested
                else Message.Status.INTERRUPTED,
                finish_reason=end.finish_reason,
                error="" if self.stop_requested else "The reply was abandoned.",
            )
        except ProviderError as exc:
            end = ReplyEnd(status=Message.Status.ERROR, error=str(exc))
        except Exception:
            log.exception("reply %s failed", self.message_id)
            end = ReplyEnd(status=Message.Status.ERROR, error="Internal error while generating.")
        finally:
            self._streaming = False
            checkpoints.discard(self)  # the final save below carries all the text
            # Closing the provider's generator closes the upstream stream now,
            # so a stopped reply stops spending tokens.
            with contextlib.suppress(Exception):
                await stream.aclose()
        end.prompt_tokens = usage.get("prompt_tokens")
        end.completion_tokens = usage.get("completion_tokens")
        self.end = end
        final = {
            "message_id": self.message_id,
            "content": self.text,
            "status": end.status,
            "finish_reason": end.finish_reason,
            "prompt_tokens": end.prompt_tokens,
            "completion_tokens": end.completion_tokens,
            "ttft_ms": ttft_ms,
            "duration_ms": int((time.monotonic() - started) * 1000),
            "error": end.error,
        }
        try:
            try:
                await run_db(services.reply_finish, **final, attempts=1)
            except Exception:
                # Its text and end go to the journal before the retries, which
                # may take long (a locked database): a crash meanwhile loses
                # nothing, and if they all fail the sweep saves it from there.
                log.warning("reply %s: its final save failed; retrying", self.message_id)
                checkpoints.unfinished_add(self, final)
                await run_db(services.reply_finish, **final)
                checkpoints.unfinished.pop(self.message_id, None)
        except Exception:
            log.exception("could not save reply %s; the sweep will try again", self.message_id)
        else:
            checkpoints.finished(self.message_id)
        finally:
            _running.pop(self.message_id, None)
            self._publish(end)
            self._subscribers.clear()


class CheckpointWriter:
    """Saves the text of this process's running replies to the journal, all at once.

    A reply joins the next batch when it starts (so the journal has it even
    while its model is silent, and no other process takes it for abandoned)
    and whenever it has new text. The first addition after a save arms a timer
    of CHAT_CHECKPOINT_SECONDS; when it fires, every reply's unsaved text goes
    into one append to this worker's log (chat.journal). So each reply is saved
    at most once per interval and its text is due at most an interval after it
    arrived, also when the upstream then falls silent: a killed process loses
    about that much. The database is not involved: its writes per reply stay
    constant, whatever the reply's length.

    The append runs on the event loop: a few µs for all replies. A thread would
    not be cheaper: its system calls wait for the busy loop to hand over the GIL.
    A failed append is made good at once by a rotation, which rewrites every
    running reply whole (tried again every interval until it works).
    """

    def __init__(self):
        self.journal = Journal(journal_root())
        self.pending: dict[int, Reply] = {}
        self.live: dict[int, Reply] = {}  # in the journal and not ended
        # Replies whose final save failed, with its fields: the sweep tries again,
        # and the journal holds them (FINAL) in case this process dies first.
        self.unfinished: dict[int, dict] = {}
        self._finals_due: list[int] = []  # unfinished ones not journalled yet
        self._ended: list[int] = []  # final save done: an END record each
        self._timer: asyncio.TimerHandle | None = None
        self.failing = False  # the journal cannot be written: rotate until it can
        self._failures_logged_at = float("-inf")
        atexit.register(self.close)

    def add(self, reply: Reply) -> None:
        reply.unsaved = True
        self.pending[reply.message_id] = reply
        self._arm()

    def discard(self, reply: Reply) -> None:
        self.pending.pop(reply.message_id, None)

    def unfinished_add(self, reply: Reply, final: dict) -> None:
        """The reply's final save failed: journal all its text and its end, now
        (not with the next batch: the retries that follow may take long)."""
        self.unfinished[reply.message_id] = final
        self._finals_due.append(reply.message_id)
        self.add(reply)
        self._flush()

    def finished(self, message_id: int) -> None:
        """The reply's final save is done: the journal can forget it."""
        self.pending.pop(message_id, None)
        self._ended.append(message_id)
        self._arm()

    def close(self) -> None:
        """Its loop has closed or the process exits: what is due goes to the
        journal now, and the log goes too if nothing in it is still needed."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.pending or self._ended or self._finals_due:
            self._flush()
        self.journal.close(clean=not self.live)

    def _arm(self) -> None:
        if self._timer is not None:
            return  # a batch is due: this joins it
        delay = settings.CHAT_CHECKPOINT_SECONDS
        self._timer = asyncio.get_running_loop().call_later(delay, self._save)

    def _save(self) -> None:
        self._timer = None
        self._flush()
        if self.failing:
            if time.monotonic() - self._failures_logged_at > 60:
                self._failures_logged_at = time.monotonic()
                log.error("could not write the reply journal %s", self.journal.log_path)
            self._arm()  # try again: a rotation rewrites everything

    def _flush(self) -> None:
        batch, self.pending = list(self.pending.values()), {}
        ended, self._ended = self._ended, []
        finals, self._finals_due = self._finals_due, []
        for message_id in ended:
            self.live.pop(message_id, None)
        for reply in batch:
            reply.unsaved = False  # from here on new text joins the next batch
            self.live[reply.message_id] = reply
        if self.failing or self._outgrown():
            self.failing = not self._rewrite()
            return
        written = []
        for reply in batch:
            upto = len(reply.parts)
            text = clean_text("".join(reply.parts[reply.saved_parts : upto])).encode()
            kind = ADD if reply.journalled else SET
            written.append((reply, upto, record(kind, reply.message_id, text)))
        data = b"".join(
            [r for _, _, r in written]
            + [self._final_record(message_id) for message_id in finals]
            + [record(END, message_id, b"") for message_id in ended]
        )
        if self.journal.write(data):
            for reply, upto, _ in written:
                reply.saved_parts, reply.journalled = upto, True
        else:
            self.failing = not self._rewrite()

    def _final_record(self, message_id: int) -> bytes:
        final = self.unfinished.get(message_id)
        if final is None:
            return b""  # saved by the sweep meanwhile
        end = {key: value for key, value in final.items() if key not in ("message_id", "content")}
        return record(FINAL, message_id, json.dumps(end).encode())

    def _outgrown(self) -> bool:
        if self.journal.size < ROTATE_BYTES:
            return False
        return self.journal.size > 4 * sum(len(r.text) for r in self.live.values())

    def _rewrite(self) -> bool:
        """A fresh log with every running reply's whole text (and unsaved ends)."""
        uptos = {reply: len(reply.parts) for reply in self.live.values()}
        data = b"".join(
            [
                record(SET, reply.message_id, clean_text("".join(reply.parts[:upto])).encode())
                for reply, upto in uptos.items()
            ]
            + [self._final_record(message_id) for message_id in self.unfinished]
        )
        if not self.journal.rotate(data):
            return False
        for reply, upto in uptos.items():
            reply.saved_parts, reply.journalled = upto, True
        return True


_writers: dict[asyncio.AbstractEventLoop, CheckpointWriter] = {}


def checkpoint_writer() -> CheckpointWriter:
    """The running event loop's checkpoint writer (one per loop: a process, or a test).

    Writers of loops that have closed (tests') are dropped when a new one is made.
    """
    loop = asyncio.get_running_loop()
    writer = _writers.get(loop)
    if writer is None:
        for closed in [other for other in _writers if other.is_closed()]:
            _writers.pop(closed).close()
        writer = _writers[loop] = CheckpointWriter()
    return writer


def reply_start(
    *, message_id: int, provider: Provider, messages: list[ChatMessage], params: GenerationParams
) -> Reply:
    sweeper_ensure()
    reply = Reply(message_id, provider, messages, params)
    reply.start()
    return reply


def reply_get(message_id: int) -> Reply | None:
    return _running.get(message_id)


def reply_unsaved_end(message_id: int) -> dict | None:
    """The end of a reply of this process that has ended but whose final save
    failed: the sweep saves it (sweep_once). None for any other reply. Only looks:
    no writer is made for a loop that has none."""
    writer = _writers.get(asyncio.get_running_loop())
    return writer.unfinished.get(message_id) if writer is not None else None


def reply_stop(message_id: int) -> bool:
    """Stop a reply generating in this process; False if it is not running here."""
    reply = _running.get(message_id)
    if reply is None:
        return False
    reply.stop()
    return True


async def reply_stop_anywhere(message_id: int) -> bool:
    """Stop a reply in this process or, over the channel layer, in another one.

    False when no other process can be reached (no REDIS_URL, or Redis down).
    """
    if reply_stop(message_id):
        return True
    plane = control_plane()
    if plane is None:
        return False
    try:
        await plane.request_stop(message_id)
    except Exception:  # Redis is down: as unreachable as with no Redis at all
        log.warning("stop of reply %s: the channel layer failed", message_id, exc_info=True)
        return False
    return True


class ControlPlane:
    """Stop requests between server processes, over the Redis channel layer.

    Each process listens on one channel of its own; the group `reply.<id>`
    holds the channel of the process generating that reply, so a stop sent to
    the group reaches it from any worker.
    """

    def __init__(self, layer):
        self.layer = layer
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.channel: asyncio.Future[str] = loop.create_future()
        self._listener = loop.create_task(self._listen(), context=contextvars.Context())
        self._pending: set[asyncio.Task] = set()

    async def _listen(self) -> None:
        channel = await self.layer.new_channel()
        self.channel.set_result(channel)
        while True:
            try:
                message = await self.layer.receive(channel)
            except Exception:
                log.exception("channel layer receive failed; retrying")
                await asyncio.sleep(1)
                continue
            if message.get("type") == "reply.stop":
                reply_stop(int(message["id"]))
            elif message.get("type") == "plane.close":
                return

    async def close(self) -> None:
        """Stop listening and release the layer's connections.

        The listener is woken by a message of its own, not cancelled: a cancel
        that lands in redis-py's socket read can be lost, and channels_redis
        then polls Redis forever, so the event loop never finishes closing.
        """
        woken = False
        if self.channel.done():
            try:
                await self.layer.send(self.channel.result(), {"type": "plane.close"})
                woken = True
            except Exception:  # Redis is down: the listener is between retries
                log.warning("control plane: could not wake the listener; cancelling it")
        if not woken:
            self._listener.cancel()
        await asyncio.wait([self._listener], timeout=5)
        if not self._listener.done():
            log.error("control plane listener did not stop")
        if self._pending:
            await asyncio.wait(self._pending, timeout=5)
        await self.layer.close_pools()

    def _spawn(self, coro) -> None:
        # Group membership is bookkeeping: never hold up a reply for it.
        task = self.loop.create_task(coro, context=contextvars.Context())
        self._pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("channel layer call failed: %r", task.exception())

    def join(self, message_id: int) -> None:
        async def join():
            await self.layer.group_add(f"reply.{message_id}", await self.channel)

        self._spawn(join())

    def leave(self, message_id: int) -> None:
        async def leave():
            await self.layer.group_discard(f"reply.{message_id}", await self.channel)

        self._spawn(leave())

    async def request_stop(self, message_id: int) -> None:
        await self.layer.group_send(f"reply.{message_id}", {"type": "reply.stop", "id": message_id})


_planes: dict[asyncio.AbstractEventLoop, ControlPlane] = {}


def control_plane() -> ControlPlane | None:
    """This event loop's control plane; None without a cross-process channel layer."""
    if not settings.REDIS_URL:
        return None
    loop = asyncio.get_running_loop()
    plane = _planes.get(loop)
    if plane is None:
        from channels import DEFAULT_CHANNEL_LAYER
        from channels.layers import channel_layers

        # A layer of its own: channels_redis keeps locks and buffers that
        # belong to the event loop that first used them.
        layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
        plane = _planes[loop] = ControlPlane(layer)
    return plane


async def control_plane_close() -> None:
    """Close this event loop's control plane, if it has one (before the loop closes)."""
    plane = _planes.pop(asyncio.get_running_loop(), None)
    if plane is not None:
        await plane.close()


# Yielded by reply_follow when nothing happened for CHAT_HEARTBEAT_SECONDS.
HEARTBEAT = object()


async def reply_follow(message: Message) -> AsyncIterator[str | ReplyEnd | object]:
    """What a page showing `message` receives: the text so far, then the tail.

    Yields the text so far first (a str, possibly empty), then str deltas
    (whatever has arrived, joined: batching costs nothing when idle and saves
    writes under load), HEARTBEAT when idle, and finally one ReplyEnd. For a
    reply running in another process it follows the journal (and the row, for its end).
    """
    reply = _running.get(message.pk)
    unsaved = reply_unsaved_end(message.pk) if reply is None else None
    if unsaved is not None:  # it has ended here; its row waits for the sweep
        yield unsaved["content"]
        yield ReplyEnd(
            status=unsaved["status"],
            error=unsaved["error"],
            finish_reason=unsaved["finish_reason"],
            prompt_tokens=unsaved["prompt_tokens"],
            completion_tokens=unsaved["completion_tokens"],
        )
        return
    if reply is None:
        async for item in _follow_row(message.pk):
            yield item
        return
    loop = asyncio.get_running_loop()
    text, inbox = reply.subscribe()
    interval = settings.CHAT_HEARTBEAT_SECONDS
    timer = None

    def beat() -> None:
        nonlocal timer
        inbox.put(HEARTBEAT)
        timer = loop.call_later(interval, beat)

    timer = loop.call_later(interval, beat)
    try:
        yield text
        while True:
            items = await inbox.take()
            texts = [item for item in items if isinstance(item, str)]
            if texts:
                # A heartbeat queued behind text is dropped: the text is the sign of life.
                yield "".join(texts)
            elif any(item is HEARTBEAT for item in items):
                yield HEARTBEAT
            for item in items:
                if isinstance(item, ReplyEnd):  # the last thing a reply publishes
                    yield item
                    return
    finally:
        timer.cancel()
        reply.unsubscribe(inbox)


async def _follow_row(message_id: int) -> AsyncIterator[str | ReplyEnd | object]:
    """Follow a reply running in another process: its text through the journal,
    its end through the row. Slower (a look a checkpoint interval), but works
    across the processes of a machine."""
    loop = asyncio.get_running_loop()
    reader = TextReader(journal_root(), message_id)
    sent = 0
    idle = 0.0
    first = True  # the text so far is always sent first, even if empty
    while True:
        row = await run_db(Message.objects.filter(pk=message_id).first)
        if row is None:
            yield ReplyEnd(status=Message.Status.ERROR, error="The reply was deleted.")
            return
        # The row's final text starts with what the journal gave: the same text,
        # cleaned the same way.
        if row.is_finished:
            text = row.content[sent:]
        else:
            text = await loop.run_in_executor(None, reader.read)
        if first or text:
            yield text
            sent += len(text)
            idle = 0.0
            first = False
        elif idle >= settings.CHAT_HEARTBEAT_SECONDS:
            yield HEARTBEAT
            idle = 0.0
        if row.is_finished:
            yield ReplyEnd(
                status=row.status,
                error=row.error,
                finish_reason=row.finish_reason,
                prompt_tokens=row.prompt_tokens,
                completion_tokens=row.completion_tokens,
            )
            return
        await asyncio.sleep(settings.CHAT_CHECKPOINT_SECONDS)
        idle += settings.CHAT_CHECKPOINT_SECONDS


_sweeper: asyncio.Task | None = None


def sweeper_ensure() -> None:
    """Start this process's periodic sweep of stale streaming rows (once per loop).

    Called for every request (chatsite.asgi), so a worker that starts after
    another died retires that worker's rows at once, before anyone waits on them.
    """
    global _sweeper
    loop = asyncio.get_running_loop()
    if _sweeper is not None and not _sweeper.done() and _sweeper.get_loop() is loop:
        return
    _sweeper = loop.create_task(_sweep_forever(), context=contextvars.Context())


async def sweep_once() -> int:
    """This process's final saves that failed, tried again; then the replies of
    processes that died (services.replies_sweep). How many rows it saved."""
    writer = checkpoint_writer()
    saved = 0
    for message_id, final in list(writer.unfinished.items()):
        if message_id in _running:
            continue  # its own task is still retrying the save
        try:
            await run_db(services.reply_finish, **final, attempts=1)
        except Exception:
            log.warning("reply %s: its final save failed again", message_id, exc_info=True)
            continue
        if writer.unfinished.pop(message_id, None) is not None:
            writer.finished(message_id)
            saved += 1
    ours = set(_running) | set(writer.live) | set(writer.pending)
    if writer.failing and ours:
        # Not in any log: the rows themselves must say that they are alive.
        await run_db(services.replies_touch, ids=ours)
    return saved + await run_db(services.replies_sweep, exclude_ids=ours)


async def _sweep_forever() -> None:
    interval = max(5, settings.CHAT_STALE_SECONDS // 3)
    while True:
        try:
            swept = await sweep_once()
            if swept:
                log.warning("marked %d abandoned replies interrupted", swept)
        except Exception:
            log.exception("reply sweep failed")
        await asyncio.sleep(interval)
