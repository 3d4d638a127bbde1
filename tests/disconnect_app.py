"""A tiny ASGI app for tests/test_server.py: its disconnect hook can only run from daphne.

It registers a hook, starts a stream and then never reads `receive`, so the
hook runs only if daphne's lost-connection callback runs it
(chatsite.server_tuning), not when an http.disconnect message is read.
"""

import asyncio
import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
django.setup(set_prefix=False)

from chat.streaming import DISCONNECT_HOOKS  # noqa: E402
from chatsite import server_tuning  # noqa: E402

server_tuning.install()


async def application(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] != "/healthz":
        path = scope["path"]
        scope[DISCONNECT_HOOKS].append(lambda: print(f"hook ran for {path}", flush=True))
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok\n", "more_body": True})
    if scope["path"] == "/healthz":
        await send({"type": "http.response.body", "body": b""})
        return
    await asyncio.sleep(3600)  # never reads receive(): only daphne can run the hook
