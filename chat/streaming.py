"""Server-sent events over StreamingHttpResponse (the rules of design.md, rule 4)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from django.http import StreamingHttpResponse

from .replies import HEARTBEAT, ReplyEnd

log = logging.getLogger(__name__)

# The scope key of the hooks chatsite.asgi runs the moment the client disconnects.
DISCONNECT_HOOKS = "chatsite.disconnect_hooks"

# daphne sends the headers with the first body chunk, so one goes out at once.
STREAM_OPEN = b": stream open\n\n"
PING = b": ping\n\n"


def on_client_disconnect(request, hook) -> None:
    """Run `hook()` as soon as the server hears the client left.

    Django learns of a disconnect in its own task, then cancels the response's
    task, which only then runs the response generator's cleanup: several event
    loop turns, each behind everything else queued. Under daphne the hook runs
    when the socket reports the close (chatsite.server_tuning); otherwise when
    chatsite.asgi.ChatASGIHandler reads the disconnect message.
    """
    hooks = request.scope.get(DISCONNECT_HOOKS)
    if hooks is not None:
        hooks.append(hook)


def run_disconnect_hooks(hooks: list | None) -> None:
    """Run each hook once: the server and the handler may both report one disconnect."""
    while hooks:
        hook = hooks.pop(0)
        try:
            hook()
        except Exception:
            log.exception("disconnect hook %r failed", hook)


def sse_event(data: dict, event: str | None = None) -> bytes:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


class SSEResponse(StreamingHttpResponse):
    """A StreamingHttpResponse over an async generator of bytes, handed to the server as it is.

    Django's ASGI handler iterates `aiter(response)`: two async generators of
    Django's around ours (one re-yields, one converts to bytes what already is
    bytes), a few microseconds per frame of every stream. This one gives the
    handler our generator itself, which the handler also closes when it stops.
    """

    # Set by a view whose generator may still change the status and headers
    # until its first frame (see start_on_first_frame).
    start_with_first_frame = False

    def __aiter__(self):
        return self._iterator  # what StreamingHttpResponse stored for `events`


class _FirstThen:
    """An async iterator: `first`, then the rest of `frames` (closed with it)."""

    __slots__ = ("first", "frames")

    def __init__(self, first: bytes, frames):
        self.first, self.frames = first, frames

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        first = self.first
        if first is None:
            return await self.frames.__anext__()
        self.first = None
        return first

    async def aclose(self) -> None:
        await self.frames.aclose()


async def start_on_first_frame(response: StreamingHttpResponse) -> None:
    """Hold a response's start until its generator gives its first frame.

    chatsite.asgi calls this before Django sends the response. The view can
    then return at once, so the response's trip back through the middleware
    overlaps the wait for the model server, and the generator can still set
    the status (an API stream whose upstream fails first gets HTTP 502).
    """
    frames = response._iterator
    first = await anext(frames, None)
    if first is not None:
        response._iterator = _FirstThen(first, frames)


def sse_response(events: AsyncIterator[bytes], status: int = 200) -> StreamingHttpResponse:
    response = SSEResponse(events, content_type="text/event-stream", status=status)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


async def reply_sse(follow: AsyncIterator, start: dict | None = None) -> AsyncIterator[bytes]:
    """Frame a reply for the chat page.

    `start` (ids of the new rows) goes first, then `snapshot` (the text so far,
    for a resumed page), then one `data:` frame per batch of deltas, then `end`
    with the final status. A client disconnect cancels this generator at its
    await; the reply itself goes on (rule 1).
    """
    yield STREAM_OPEN
    if start is not None:
        yield sse_event(start, "start")
    first = True
    async for item in follow:
        if item is HEARTBEAT:
            yield PING
        elif isinstance(item, ReplyEnd):
            yield sse_event(
                {"status": item.status, "error": item.error, "finish_reason": item.finish_reason},
                "end",
            )
            return
        elif first:
            yield sse_event({"t": item}, "snapshot")
        elif item:
            yield sse_event({"t": item})
        first = False
