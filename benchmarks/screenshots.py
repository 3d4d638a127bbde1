"""Screenshots of the chat page for the README: light, dark and phone.

    .venv/bin/python benchmarks/screenshots.py     # writes docs/screenshots/chat-*.png

A throwaway SQLite database, a live daphne and Debian's Chromium; the
conversation shown is stored directly, with two versions of the last reply.
"""

from __future__ import annotations

import os
from datetime import timedelta

import scratch_django  # noqa: E402

ROOT = scratch_django.ROOT
scratch_django.setup("chatsite-screens-")

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.test import Client  # noqa: E402
from django.utils import timezone  # noqa: E402

from chat import services  # noqa: E402
from chat.llm.fake_upstream import FakeUpstream  # noqa: E402
from chat.models import Conversation  # noqa: E402
from tests.live import LiveServer  # noqa: E402

OUT = ROOT / "docs" / "screenshots"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")

QUESTION = "How do I read a large CSV file in Python without loading it all into memory?"
ANSWER_1 = """Stream it row by row with the standard library's `csv` module:

```python
import csv

with open("big.csv", newline="") as f:
    for row in csv.DictReader(f):
        process(row)
```

| approach | memory | speed |
| --- | --- | --- |
| `csv.DictReader` | constant | good |
| `pandas.read_csv(chunksize=…)` | per chunk | fast |

- Open the file with `newline=""` so quoted newlines survive.
- Process each row as it arrives; keep nothing you do not need."""
ANSWER_2 = """Use `pandas` with `chunksize`, which hands you the file in pieces:

```python
import pandas as pd

for chunk in pd.read_csv("big.csv", chunksize=100_000):
    totals = chunk.groupby("region")["amount"].sum()
```

Each chunk is an ordinary DataFrame, so the usual operations work."""


def seed(user) -> Conversation:
    now = timezone.now()
    for title, days in [
        ("Trip plan for Lisbon", 0),
        ("Regex for ISO dates", 1),
        ("Explain Raft consensus", 3),
        ("SQL window functions", 12),
        ("Birthday poem for Sam", 60),
    ]:
        other = services.conversation_create(owner=user, model="fake-echo", title=title)
        Conversation.objects.filter(pk=other.pk).update(updated=now - timedelta(days=days))
    conversation = services.conversation_create(
        owner=user, model="fake-echo", title="Reading big CSV files in Python"
    )
    _, first = services.message_send(conversation=conversation, content=QUESTION, model="fake-echo")
    services.reply_finish(message_id=first.pk, content=ANSWER_2, status="complete")
    second = services.reply_regenerate(conversation=conversation, reply=first, model="fake-echo")
    services.reply_finish(message_id=second.pk, content=ANSWER_1, status="complete")
    return conversation


def main() -> None:
    call_command("migrate", verbosity=0)
    user = get_user_model().objects.create_user("ada", password="screenshot-password-1")
    conversation = seed(user)
    client = Client()
    client.force_login(user)
    cookie = client.cookies["sessionid"].value
    upstream = FakeUpstream(gap_ms=0).start()
    server = LiveServer(upstream_url=upstream.base_url)
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
            )
            shots = [
                ("chat-light.png", {"color_scheme": "light"}),
                ("chat-dark.png", {"color_scheme": "dark"}),
                (
                    "chat-phone.png",
                    {
                        "color_scheme": "light",
                        "viewport": {"width": 390, "height": 844},
                        "is_mobile": True,
                        "has_touch": True,  # a phone: no Shift+Enter hint, no focused composer
                        "device_scale_factor": 2,
                    },
                ),
            ]
            for name, options in shots:
                options.setdefault("viewport", {"width": 1280, "height": 800})
                context = browser.new_context(**options)
                context.add_cookies([{"name": "sessionid", "value": cookie, "url": server.url}])
                page = context.new_page()
                page.goto(f"{server.url}/c/{conversation.pk}/")
                page.locator("article.message-assistant [data-markdown-rendered]").wait_for()
                page.locator("#messages").evaluate("el => { el.scrollTop = 0; }")
                page.screenshot(path=str(OUT / name))
                print("wrote", OUT / name)
                context.close()
            browser.close()
    finally:
        server.stop()
        upstream.stop()


if __name__ == "__main__":
    main()
