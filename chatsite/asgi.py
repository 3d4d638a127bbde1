"""ASGI entry point: daphne serves this (`make run`, or several workers behind nginx)."""

import gc
import io
import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")

import django  # noqa: E402
from asgiref.sync import ThreadSensitiveContext  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.http import HttpResponse, JsonResponse  # noqa: E402

# Sync views doing slow work (password hashing, admin exports) keep a thread
# of their own per request, away from the shared database thread.
SYNC_VIEW_PREFIXES = ("/admin/", "/accounts/", "/keys/")


class ChatASGIHandler(ASGIHandler):
    """Django's ASGI handler without a new thread for every request.

    Django runs each request in its own ThreadSensitiveContext, so the first
    sync call of every request (its request_started signal, at least) starts a
    new thread. The chat and API paths are async and do their database work
    through chat.db.run_db, so their few sync calls share asgiref's one
    long-lived sync thread instead; only SYNC_VIEW_PREFIXES keep Django's way.

    It also runs the hooks of chat.streaming.on_client_disconnect the moment
    the client's disconnect message is read, and starts a response marked
    `start_with_first_frame` only with its first frame
    (chat.streaming.start_on_first_frame).
    """

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        sweeper_ensure()
        hooks = scope.setdefault(DISCONNECT_HOOKS, [])  # daphne's list (server_tuning), or new

        async def receive_and_notify():
            message = await receive()
            if message["type"] == "http.disconnect":
                run_disconnect_hooks(hooks)
            return message

        if scope["path"].startswith(SYNC_VIEW_PREFIXES):
            async with ThreadSensitiveContext():
                await self.handle(scope, receive_and_notify, send)
        else:
            await self.handle(scope, receive_and_notify, send)

    async def read_body(self, receive):
        """The body, as Django reads it, but no more of it than the site accepts.

        Django counts only a form's fields against DATA_UPLOAD_MAX_MEMORY_SIZE:
        a multipart body's files (10 MB, say) were read whole, spooled to disk
        and the request served. Nothing here takes uploads, so past the limit
        the rest is read and dropped, and create_request answers 413 before any
        view runs.
        """
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is None:
            return await super().read_body(receive)
        size = 0

        async def receive_within_limit():
            nonlocal size
            message = await receive()
            body = message.get("body")
            if body:
                size += len(body)
                if size > limit:
                    message = {**message, "body": b""}
            return message

        body_file = await super().read_body(receive_within_limit)
        if size > limit:
            body_file.close()
            return _DroppedBody()  # create_request answers 413
        return body_file

    def create_request(self, scope, body_file):
        if isinstance(body_file, _DroppedBody):
            return None, _body_too_large(scope)
        return super().create_request(scope, body_file)

    async def send_response(self, response, send):
        if getattr(response, "start_with_first_frame", False):
            await start_on_first_frame(response)  # the status may change until then
        await super().send_response(response, send)


class _DroppedBody(io.BytesIO):
    """Stands for a body over the limit: Django's handler closes it like any other."""


def _body_too_large(scope) -> HttpResponse:
    message = f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE:,} bytes."
    if scope["path"].startswith("/v1/"):  # the API answers in OpenAI's shape
        return ApiError(message, 413).response()
    return JsonResponse({"error": message}, status=413)  # the chat page reads `error`


django.setup(set_prefix=False)

from chat import llm  # noqa: E402  (needs the apps loaded)
from chat.api import ApiError  # noqa: E402
from chat.replies import sweeper_ensure  # noqa: E402
from chat.streaming import (  # noqa: E402
    DISCONNECT_HOOKS,
    run_disconnect_hooks,
    start_on_first_frame,
)

# Build the model providers now: importing the openai package alone takes ~2 s
# here, which would otherwise be paid by the first user's request.
llm.configured_providers()

application = ChatASGIHandler()

if "daphne.server" in sys.modules:  # served by daphne: tune its hot path
    from chatsite import server_tuning

    server_tuning.install()

if settings.SERVE_STATIC:
    # One machine, no nginx: daphne serves /static/ itself.
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    application = ASGIStaticFilesHandler(application)

# Everything imported so far lives as long as the process: keep it out of the
# garbage collector's full passes, which otherwise stall a burst for 45-90 ms.
gc.collect()
gc.freeze()
# A young-generation pass every 10,000 allocations rather than 700. At 500
# streams Python's default ran ~300 young passes a second over the live request
# objects, and a full pass (68 ms here) in the middle of the burst; with these
# thresholds, ~20 young passes of 4-8 ms and no full one (docs/performance-
# profile.md). Cycles are still collected; peak memory did not change.
gc.set_threshold(10_000, 20, 20)
