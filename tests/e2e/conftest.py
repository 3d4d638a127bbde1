"""Browser tests: Playwright driving Debian's chromium against a live daphne server
of the project (tests/conftest.py), with the fake OpenAI-compatible upstream behind it."""

from __future__ import annotations

import os
import shutil

import pytest
from django.test import Client

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session", autouse=True)
def _patient_expectations():
    # CI shares two cores between the browser, daphne, the fake upstream and
    # pytest: give assertions the same patience as actions.
    from playwright.sync_api import expect

    expect.set_options(timeout=15_000)


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop running in this thread; Django's
    # ORM, used here only synchronously between browser steps, would refuse to
    # run. Browser tests run last (tests/conftest.py), so no async test sees this.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "1"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def login_cookie(user, daphne_server) -> dict:
    client = Client()
    client.force_login(user)
    return {
        "name": "sessionid",
        "value": client.cookies["sessionid"].value,
        "url": daphne_server.url,
    }


@pytest.fixture
def page_for(browser, daphne_server, transactional_db):
    """A fresh browser page logged in as the given user; closed after the test."""
    contexts = []

    def make(user, **context_options):
        context = browser.new_context(base_url=daphne_server.url, **context_options)
        context.add_cookies([login_cookie(user, daphne_server)])
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        return page

    yield make
    for context in contexts:
        context.close()
