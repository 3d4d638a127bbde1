"""The chat page in real headless Chromium, followed from the browser into the database."""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import expect

from chat.models import Message
from tests.conftest import wait_for_reply

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

WORDS = " ".join(f"w{i}" for i in range(20))


def _send(page, text: str, model: str):
    page.goto("/")
    page.get_by_label("Model").select_option(model)
    page.get_by_role("textbox", name="Message").fill(text)
    page.get_by_role("textbox", name="Message").press("Enter")
    return page.locator("article.message-assistant").last


def test_reply_streams_token_by_token_and_is_stored(page_for, user):
    page = page_for(user)
    reply = _send(page, WORDS, "fake-slow")
    states = set()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        states.add(reply.locator(".message-body").inner_text())
        if reply.get_attribute("data-status") == "complete":
            break
        time.sleep(0.05)
    assert len(states) >= 4, states  # watched it grow through intermediate states
    expect(reply).to_have_attribute("data-status", "complete")
    row = wait_for_reply({"complete"})
    assert row.content == f"Echo: {WORDS}"
    assert row.model == "fake-slow"
    assert row.completion_tokens == 21
    assert reply.locator(".message-body").inner_text().strip() == row.content
    assert page.url.endswith(f"/c/{row.conversation_id}/")
    expect(page.locator("#conversation-list a[aria-current=page]")).to_have_count(1)


def test_stop_keeps_what_was_shown(page_for, user):
    page = page_for(user)
    reply = _send(page, WORDS, "fake-slow")
    expect(reply.locator(".message-body")).to_contain_text("w2")
    page.get_by_role("button", name="Stop").click()
    expect(reply).to_have_attribute("data-status", "stopped")
    expect(reply.locator(".status")).to_have_text("Stopped")
    row = wait_for_reply({"stopped"})
    shown = reply.locator(".message-body").inner_text().strip()
    assert row.content.strip() == shown
    assert "w19" not in row.content
    expect(page.get_by_role("button", name="Send")).to_be_visible()


def test_escape_stops(page_for, user):
    page = page_for(user)
    reply = _send(page, WORDS, "fake-slow")
    expect(reply.locator(".message-body")).to_contain_text("w1")
    page.keyboard.press("Escape")
    expect(reply).to_have_attribute("data-status", "stopped")


def test_escape_elsewhere_does_not_stop(page_for, user):
    # Escape clears the search box or closes the settings: the reply goes on.
    page = page_for(user)
    reply = _send(page, WORDS, "fake-slow")
    expect(reply.locator(".message-body")).to_contain_text("w1")
    search = page.get_by_role("searchbox", name="Search")
    search.fill("w")
    search.press("Escape")
    page.locator("summary", has_text="Settings").click()
    page.get_by_label("Temperature").press("Escape")
    expect(page.locator("details.chat-settings")).not_to_have_attribute("open", "")
    expect(reply).to_have_attribute("data-status", "complete", timeout=15_000)


def test_a_dropped_stream_is_followed_again_without_a_reload(page_for, user):
    # The send's response is cut after a few tokens, as a phone changing networks
    # would see it: the page reconnects to the reply's stream URL by itself.
    page = page_for(user)

    def cut_short(route):
        response = route.fetch()
        frames = response.body().split(b"\n\n")
        route.fulfill(response=response, body=b"\n\n".join(frames[:5]) + b"\n\n")

    page.route("**/c/send/", cut_short)
    streams = []

    def proxy_restarting_once(route):  # the first try meets a proxy's 502: try again
        streams.append(route.request.url)
        if len(streams) == 1:
            route.fulfill(status=502, body="Bad Gateway")
        else:
            route.continue_()

    page.route("**/stream/", proxy_restarting_once)
    reply = _send(page, WORDS, "fake-slow")
    expect(reply).to_have_attribute("data-status", "complete", timeout=15_000)
    expect(reply.locator(".message-body")).to_have_text(f"Echo: {WORDS}")
    assert len(streams) == 2
    assert wait_for_reply({"complete"}).content == f"Echo: {WORDS}"


def test_reload_mid_reply_resumes_and_completes(page_for, user):
    page = page_for(user)
    reply = _send(page, WORDS, "fake-slow")
    expect(reply.locator(".message-body")).to_contain_text("w3")
    page.reload()
    resumed = page.locator("article.message-assistant").last
    expect(resumed).to_have_attribute("data-status", "complete", timeout=15_000)
    row = wait_for_reply({"complete"})
    assert row.content == f"Echo: {WORDS}"
    assert resumed.locator(".message-body").inner_text().strip() == row.content


def test_closed_tab_reply_finishes_and_shows_later(page_for, user):
    page = page_for(user)
    reply = _send(page, WORDS, "fake-slow")
    expect(reply.locator(".message-body")).to_contain_text("w1")
    page.close()
    row = wait_for_reply({"complete"}, timeout=15)
    later = page_for(user)
    later.goto(f"/c/{row.conversation_id}/")
    expect(later.locator("article.message-assistant .message-body")).to_have_text(row.content)


def test_upstream_error_shows_readable_reason(page_for, user):
    page = page_for(user)
    reply = _send(page, "hello", "fake-error-500")
    expect(reply).to_have_attribute("data-status", "error")
    expect(reply.locator(".error-text")).to_contain_text("HTTP 500")
    assert "UPSTREAM-SECRET-DETAIL" not in page.content()
    row = wait_for_reply({"error"})
    assert "UPSTREAM-SECRET-DETAIL" not in row.error
    # The user's message is kept and the conversation stays usable.
    assert Message.objects.filter(role="user", content="hello").exists()
    page.get_by_label("Model").select_option("fake-echo")
    page.get_by_role("textbox", name="Message").fill("again")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("article.message-assistant").last).to_have_attribute(
        "data-status", "complete"
    )


def test_model_xss_payload_is_inert_live_and_after_reload(page_for, user, daphne_server):
    page = page_for(user)
    dialogs, foreign = [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on(
        "request",
        lambda r: foreign.append(r.url) if not r.url.startswith(daphne_server.url) else None,
    )
    reply = _send(page, "hi", "fake-xss")
    expect(reply).to_have_attribute("data-status", "complete")
    for _ in range(2):
        body = reply.locator(".message-body")
        assert body.locator("img, script, svg, iframe").count() == 0
        assert body.locator("[onerror], [onload]").count() == 0
        hrefs = [a.get_attribute("href") or "" for a in body.locator("a").all()]
        assert all(h.startswith(("http:", "https:", "mailto:")) for h in hrefs if h)
        assert "javascript" not in " ".join(hrefs).lower()
        page.reload()
        reply = page.locator("article.message-assistant").last
        expect(reply).to_have_attribute("data-status", "complete")
    page.wait_for_timeout(300)
    assert dialogs == []
    assert foreign == []


def test_model_picker_lists_upstream_models(page_for, user):
    page = page_for(user)
    page.goto("/")
    options = page.get_by_label("Model").locator("option").all_inner_texts()
    assert "fake-echo" in options and "fake-slow" in options


def test_phone_viewport_sidebar_collapses(page_for, user):
    page = page_for(user, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page.goto("/")
    expect(page.get_by_role("button", name="New chat")).not_to_be_in_viewport()
    page.get_by_role("button", name="Conversations").click()
    expect(page.get_by_role("button", name="New chat")).to_be_in_viewport()
    page.get_by_role("button", name="Close sidebar").click()
    expect(page.get_by_role("button", name="New chat")).not_to_be_in_viewport()
    # Open, the sidebar keeps the focus (the chat behind is inert), and a tap on
    # the dimmed chat beside it closes it.
    page.get_by_role("button", name="Conversations").click()
    for _ in range(12):
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.closest('#chat') === null")
    page.mouse.click(375, 400)
    expect(page.get_by_role("button", name="New chat")).not_to_be_in_viewport()
    expect(page.get_by_role("button", name="Conversations")).to_be_focused()
    # Turned to a wide layout with the sidebar open: the chat must not stay inert.
    page.get_by_role("button", name="Conversations").click()
    page.set_viewport_size({"width": 1024, "height": 768})
    page.wait_for_function("!document.getElementById('chat').inert")
    page.set_viewport_size({"width": 390, "height": 844})
    page.get_by_label("Model").select_option("fake-echo")
    box = page.get_by_role("textbox", name="Message")
    # A phone keyboard has no Shift: Enter types a new line, the Send button sends.
    box.fill("hello")
    box.press("Enter")
    box.press_sequentially("from a phone")
    expect(box).to_have_value("hello\nfrom a phone")
    assert page.locator("article.message-assistant").count() == 0
    page.get_by_role("button", name="Send").click()
    reply = page.locator("article.message-assistant").last
    expect(reply).to_have_attribute("data-status", "complete")
    expect(reply.locator(".message-body")).to_have_text("Echo: hello\nfrom a phone")
    # The composer is not focused again by itself: that would pop the keyboard up.
    expect(box).not_to_be_focused()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390


def test_small_controls_are_finger_sized_on_a_touch_screen(page_for, user):
    page = page_for(user, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page.goto("/")
    page.get_by_label("Model").select_option("fake-echo")
    page.get_by_role("textbox", name="Message").fill("hi")
    page.get_by_role("button", name="Send").click()
    reply = page.locator("article.message-assistant").last
    expect(reply).to_have_attribute("data-status", "complete")
    page.get_by_role("button", name="Conversations").click()
    for control in (
        reply.get_by_role("button", name="Copy"),
        page.locator("#conversation-list summary").first,
    ):
        box = control.bounding_box()
        assert box["height"] >= 40 and box["width"] >= 40, box
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
