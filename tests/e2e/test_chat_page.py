"""The chat page's conversation features in real Chromium: versions, edit,
retry, the sidebar, settings, titles, theme, paging, exports and the keyboard."""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import expect

from chat import services
from chat.models import Conversation, Message, Preference

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def _last_reply(page):
    return page.locator("article.message-assistant").last


def _send(page, text: str, model: str | None = None):
    if model:
        page.get_by_label("Model").select_option(model)
    box = page.get_by_role("textbox", name="Message")
    box.fill(text)
    box.press("Enter")
    reply = _last_reply(page)
    expect(reply).to_have_attribute("data-status", re.compile("complete|error|stopped"))
    return reply


def _conversation_with(user, exchanges: list[tuple[str, str]], title: str = "") -> Conversation:
    conversation = services.conversation_create(owner=user, model="fake-echo", title=title)
    for prompt, answer in exchanges:
        _, reply = services.message_send(
            conversation=conversation, content=prompt, model="fake-echo"
        )
        services.reply_finish(message_id=reply.pk, content=answer, status="complete")
    return conversation


def test_regenerate_keeps_both_versions_and_switches_between_them(page_for, user):
    page = page_for(user)
    page.goto("/")
    reply = _send(page, "hello versions", "fake-echo")
    expect(reply.locator(".message-body")).to_have_text("Echo: hello versions")
    page.get_by_label("Model").select_option("fake-length")
    reply.get_by_role("button", name="Regenerate").click()
    reply = _last_reply(page)
    expect(reply).to_have_attribute("data-status", "complete")
    expect(reply.locator(".version-count")).to_have_text("2 / 2")
    new_text = reply.locator(".message-body").inner_text()
    assert new_text != "Echo: hello versions"
    assert page.locator("article.message-assistant").count() == 1

    reply.get_by_role("button", name="Previous version").click()
    expect(_last_reply(page).locator(".version-count")).to_have_text("1 / 2")
    expect(_last_reply(page).locator(".message-body")).to_have_text("Echo: hello versions")
    # Focus the arrow of the swapped-in reply, not of the one being replaced.
    expect(page.locator(".htmx-settling, .htmx-request")).to_have_count(0)
    next_version = _last_reply(page).get_by_role("button", name="Next version")
    next_version.focus()
    page.keyboard.press("Enter")
    expect(_last_reply(page).locator(".version-count")).to_have_text("2 / 2")
    # The keyboard user stays on the arrows after the swap.
    expect(_last_reply(page).get_by_role("button", name="Next version")).to_be_focused()
    expect(page.locator(".htmx-settling, .htmx-request")).to_have_count(0)
    page.keyboard.press("Shift+Tab")
    expect(_last_reply(page).get_by_role("button", name="Previous version")).to_be_focused()
    page.keyboard.press("Enter")
    expect(_last_reply(page).locator(".version-count")).to_have_text("1 / 2")
    expect(_last_reply(page).get_by_role("button", name="Previous version")).to_be_focused()

    replies = Message.objects.filter(role="assistant").order_by("id")
    assert [m.model for m in replies] == ["fake-echo", "fake-length"]
    assert replies[0].parent_id == replies[1].parent_id
    page.reload()
    expect(_last_reply(page).locator(".version-count")).to_have_text("1 / 2")


def test_edit_and_resend_branches_and_keeps_the_old_branch(page_for, user):
    page = page_for(user)
    page.goto("/")
    _send(page, "first question", "fake-echo")
    _send(page, "second question")
    first = page.locator("article.message-user").first
    first.get_by_role("button", name="Edit").click()
    editor = first.get_by_role("textbox", name="Edit message")
    expect(editor).to_be_focused()
    expect(editor).to_have_value("first question")
    editor.fill("first, edited")
    page.get_by_role("button", name="Save & send").click()
    reply = _last_reply(page)
    expect(reply).to_have_attribute("data-status", "complete")
    expect(reply.locator(".message-body")).to_have_text("Echo: first, edited")
    expect(page.locator("article.message")).to_have_count(2)
    user_message = page.locator("article.message-user").first
    expect(user_message.locator(".version-count")).to_have_text("2 / 2")
    expect(page.get_by_role("textbox", name="Message")).to_be_focused()

    user_message.get_by_role("button", name="Previous version").click()
    expect(page.locator("article.message")).to_have_count(4)
    expect(page.locator("article.message-assistant").last).to_contain_text("second question")
    assert Message.objects.filter(role="user").count() == 3
    assert Message.objects.filter(role="user", parent=None).count() == 2


def test_editing_hides_the_messages_own_actions(page_for, user):
    page = page_for(user)
    page.goto("/")
    _send(page, "first", "fake-echo")
    question = page.locator("article.message-user").last
    question.get_by_role("button", name="Edit").click()
    expect(question.get_by_role("textbox", name="Edit message")).to_be_focused()
    expect(question.locator(".message-meta")).to_be_hidden()
    expect(question.get_by_role("button", name="Copy")).to_be_hidden()
    question.get_by_role("button", name="Cancel").click()
    expect(question.get_by_role("button", name="Edit")).to_be_visible()


def test_a_reply_cut_by_the_token_limit_says_so(page_for, user):
    page = page_for(user)
    page.goto("/")
    reply = _send(page, "count", "fake-length")
    expect(reply.locator(".status")).to_have_text("Cut off at the length limit")
    page.reload()
    expect(_last_reply(page).locator(".status")).to_have_text("Cut off at the length limit")


def test_upstream_rate_limit_shows_retry_which_recovers(page_for, user):
    page = page_for(user)
    page.goto("/")
    reply = _send(page, "please answer", "fake-error-429")
    expect(reply).to_have_attribute("data-status", "error")
    expect(reply.locator(".error-text")).not_to_be_empty()
    page.get_by_label("Model").select_option("fake-echo")
    reply.get_by_role("button", name="Retry").click()
    reply = _last_reply(page)
    expect(reply).to_have_attribute("data-status", "complete")
    expect(reply.locator(".message-body")).to_have_text("Echo: please answer")
    expect(reply.locator(".version-count")).to_have_text("2 / 2")


def test_title_is_generated_after_the_first_reply(page_for, user):
    page = page_for(user)
    page.goto("/")
    _send(page, "tell me a joke", "fake-echo")
    # The fake model echoes its prompt, so its title is recognisable.
    expect(page.locator("#chat-title")).to_have_text("Echo: tell me a joke")
    expect(page.locator("#conversation-list a[aria-current=page]")).to_have_text(
        "Echo: tell me a joke"
    )
    expect(page).to_have_title("Echo: tell me a joke · chatsite")


def test_rename_search_archive_and_delete_from_the_sidebar(page_for, user):
    keep = _conversation_with(user, [("about otters", "Otters hold hands.")], "Otters")
    other = _conversation_with(user, [("about bees", "Bees dance.")], "Bees")
    page = page_for(user)
    page.goto(f"/c/{keep.pk}/")
    sidebar = page.locator("#conversation-list")
    expect(sidebar.locator(".group-label").first).to_have_text("Today")

    item = page.locator(f"#conv-{keep.pk}")
    item.locator("summary").click()
    item.get_by_role("button", name="Rename").click()
    title = page.locator(f"#conv-{keep.pk}").get_by_role("textbox", name="Title")
    expect(title).to_be_focused()
    title.fill("Sea otters <b>")
    title.press("Enter")
    expect(page.locator(f"#conv-{keep.pk}-link")).to_have_text("Sea otters <b>")
    expect(page.locator(f"#conv-{keep.pk}-link")).to_be_focused()  # the keyboard stays here
    expect(page.locator("#chat-title")).to_have_text("Sea otters <b>")
    keep.refresh_from_db()
    assert (keep.title, keep.title_locked) == ("Sea otters <b>", True)

    search = page.get_by_role("searchbox", name="Search")
    search.fill("dance")  # message text, not a title
    expect(sidebar.locator("li")).to_have_count(1)
    expect(sidebar.locator("li a")).to_have_text("Bees")
    search.fill("")
    expect(sidebar.locator("li")).to_have_count(2)

    item = page.locator(f"#conv-{other.pk}")
    item.locator("summary").click()
    item.get_by_role("button", name="Archive").click()
    expect(page.locator(f"#conv-{other.pk}")).to_have_count(0)
    page.get_by_role("link", name="Archived").click()
    archived = page.locator(f"#conv-{other.pk}")
    expect(archived).to_be_visible()
    archived.locator("summary").click()
    archived.get_by_role("button", name="Unarchive").click()
    expect(page.locator(f"#conv-{other.pk}")).to_have_count(0)
    page.get_by_role("link", name="Back to chats").click()
    expect(page.locator(f"#conv-{other.pk}")).to_be_visible()

    item = page.locator(f"#conv-{other.pk}")
    item.locator("summary").click()
    item.get_by_role("button", name="Delete").click()
    confirm = page.locator(f"#conv-{other.pk}")
    expect(confirm).to_contain_text("Delete “Bees” and all its messages?")
    confirm.get_by_role("button", name="Cancel").click()
    assert Conversation.objects.filter(pk=other.pk).exists()
    item = page.locator(f"#conv-{other.pk}")
    item.locator("summary").click()
    item.get_by_role("button", name="Delete").click()
    confirm = page.locator(f"#conv-{other.pk}.confirming")
    # The safe answer has the focus: Enter or Escape keeps the conversation.
    expect(confirm.get_by_role("button", name="Cancel")).to_be_focused()
    page.keyboard.press("Escape")
    expect(page.locator(f"#conv-{other.pk}-link")).to_be_focused()
    assert Conversation.objects.filter(pk=other.pk).exists()
    item.locator("summary").click()
    item.get_by_role("button", name="Delete").click()
    expect(confirm.get_by_role("button", name="Cancel")).to_be_focused()
    page.keyboard.press("Shift+Tab")
    expect(confirm.get_by_role("button", name="Delete")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator(f"#conv-{other.pk}")).to_have_count(0)
    expect(page.locator(f"#conv-{keep.pk}-link")).to_be_focused()  # its neighbour
    assert not Conversation.objects.filter(pk=other.pk).exists()
    assert not Message.objects.filter(conversation_id=other.pk).exists()

    # Deleting the open conversation leads back to a new chat.
    item = page.locator(f"#conv-{keep.pk}")
    item.locator("summary").click()
    item.get_by_role("button", name="Delete").click()
    page.locator(f"#conv-{keep.pk}.confirming").get_by_role("button", name="Delete").click()
    expect(page).to_have_url(re.compile(r"/$"))
    expect(page.locator("#chat-title")).to_have_text("New chat")


def test_settings_are_saved_per_conversation(page_for, user):
    conversation = _conversation_with(user, [("hi", "hello")], "Settings test")
    page = page_for(user)
    page.goto(f"/c/{conversation.pk}/")
    page.locator("summary", has_text="Settings").click()
    page.get_by_label("System prompt").fill("Answer like a pirate.")
    page.get_by_label("Temperature").fill("0.4")
    page.get_by_label("Maximum reply length (tokens)").fill("64")
    page.get_by_role("button", name="Save settings").click()
    expect(page.locator("#settings-status")).to_have_text("Saved.")
    conversation.refresh_from_db()
    assert conversation.system_prompt == "Answer like a pirate."
    assert (conversation.temperature, conversation.max_tokens) == (0.4, 64)
    # Out of range: the browser refuses before the server has to.
    page.get_by_label("Temperature").fill("7")
    page.get_by_role("button", name="Save settings").click()
    assert page.get_by_label("Temperature").evaluate("el => !el.validity.valid")
    conversation.refresh_from_db()
    assert conversation.temperature == 0.4


def test_theme_toggle_is_remembered(page_for, user):
    page = page_for(user, color_scheme="light")
    page.goto("/")
    toggle = page.get_by_role("button", name="Dark mode")
    expect(toggle).to_have_attribute("aria-pressed", "false")
    light_bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
    toggle.click()
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    expect(toggle).to_have_attribute("aria-pressed", "true")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") != light_bg
    page.wait_for_function("document.cookie !== null")
    for _ in range(50):
        if Preference.objects.filter(user=user, theme="dark").exists():
            break
        page.wait_for_timeout(50)
    page.reload()
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    # Back to light, which is what this system shows: follow the system again.
    page.get_by_role("button", name="Dark mode").click()
    expect(page.locator("html")).not_to_have_attribute("data-theme", re.compile("."))


def test_system_dark_theme_is_followed_without_a_choice(page_for, user):
    page = page_for(user, color_scheme="dark")
    page.goto("/")
    expect(page.get_by_role("button", name="Dark mode")).to_have_attribute("aria-pressed", "true")


def test_long_conversation_loads_older_messages_on_scroll(page_for, user):
    conversation = _conversation_with(
        user, [(f"question {i}", f"answer {i}\n\n" + "line\n" * 3) for i in range(80)], "Long"
    )
    page = page_for(user)
    page.goto(f"/c/{conversation.pk}/")
    messages = page.locator("#messages article.message")
    expect(messages).to_have_count(50)
    expect(page.get_by_text("answer 79")).to_be_in_viewport()
    first = page.locator("article.message-user").first
    expect(first).to_have_text(re.compile("question 55"))
    anchor = page.locator(f"#{first.get_attribute('id')}")
    page.locator("#messages").evaluate("el => { el.scrollTop = 0; }")
    expect(messages).to_have_count(100)
    # The reader stays at the message they were looking at.
    expect(anchor).to_be_in_viewport()
    for _ in range(20):
        page.locator("#messages").evaluate("el => { el.scrollTop = 0; }")
        page.wait_for_timeout(100)
        if messages.count() == 160:
            break
    expect(messages).to_have_count(160)
    expect(page.locator(".load-older")).to_have_count(0)
    page.locator("#messages").evaluate("el => { el.scrollTop = 0; }")
    expect(page.get_by_text("question 0", exact=True)).to_be_in_viewport()


def test_keyboard_shift_enter_new_line_and_new_chat_shortcut(page_for, user):
    conversation = _conversation_with(user, [("hi", "hello")], "Keys")
    page = page_for(user)
    page.goto(f"/c/{conversation.pk}/")
    box = page.get_by_role("textbox", name="Message")
    box.click()
    box.type("line one")
    box.press("Shift+Enter")
    box.type("line two")
    expect(box).to_have_value("line one\nline two")
    box.press("Enter")
    expect(_last_reply(page)).to_have_attribute("data-status", "complete")
    expect(box).to_be_focused()
    expect(box).to_have_value("")
    page.keyboard.press("Control+Shift+O")
    expect(page).to_have_url(re.compile(r"/$"))
    expect(page.locator("#chat-title")).to_have_text("New chat")


def test_copy_buttons_copy_the_message_source(page_for, user, daphne_server):
    conversation = _conversation_with(
        user, [("show code", "Here:\n\n```python\nprint('hi')\n```\n\n**done**")], "Copy"
    )
    page = page_for(user, permissions=["clipboard-read", "clipboard-write"])
    page.goto(f"/c/{conversation.pk}/")
    reply = _last_reply(page)
    reply.locator("footer").get_by_role("button", name="Copy").click()
    expect(reply.locator("footer").get_by_role("button", name="Copied")).to_be_visible()
    copied = page.evaluate("navigator.clipboard.readText()")
    assert "```python" in copied and "**done**" in copied
    reply.locator("pre").get_by_role("button", name="Copy").click()
    assert page.evaluate("navigator.clipboard.readText()").strip() == "print('hi')"


def test_exports_download_markdown_and_json(page_for, user):
    conversation = _conversation_with(user, [("<b>hi</b>", "hello")], "Export <me>")
    page = page_for(user)
    page.goto(f"/c/{conversation.pk}/")
    page.locator("summary", has_text="Settings").click()
    with page.expect_download() as download:
        page.get_by_role("link", name="Markdown").click()
    text = download.value.path().read_text(encoding="utf-8")
    assert text.startswith("# Export &lt;me>") and "&lt;b>hi&lt;/b>" in text
    with page.expect_download() as download:
        page.get_by_role("link", name="JSON").click()
    data = json.loads(download.value.path().read_text(encoding="utf-8"))
    assert [m["content"] for m in data["messages"]] == ["<b>hi</b>", "hello"]


def test_html_in_titles_and_prompts_stays_text(page_for, user, daphne_server):
    evil = "<img src=x onerror=alert(1)>"
    conversation = _conversation_with(user, [(evil, "ok")], evil)
    conversation.system_prompt = evil
    conversation.save()
    page = page_for(user)
    dialogs, foreign = [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("request", lambda r: None if r.url.startswith(daphne_server.url) else foreign.append(r))
    page.goto(f"/c/{conversation.pk}/")
    expect(page.locator("#chat-title")).to_have_text(evil)
    expect(page.locator(f"#conv-{conversation.pk}-link")).to_have_text(evil)
    assert page.locator("img").count() == 0
    page.wait_for_timeout(200)
    assert dialogs == [] and foreign == []


def test_every_control_has_a_name_and_works_by_keyboard(page_for, user):
    conversation = _conversation_with(user, [("hi", "hello")], "Named")
    page = page_for(user)
    page.goto(f"/c/{conversation.pk}/")
    unnamed = page.evaluate(
        """() => Array.from(
                document.querySelectorAll('button, a, input, select, textarea, summary'))
            .filter(el => el.offsetParent !== null)
            .filter(el => !(el.getAttribute('aria-label') || el.textContent.trim() ||
                            (el.labels && el.labels.length) || el.title))
            .map(el => el.outerHTML)"""
    )
    assert unnamed == []
    # Tab from the composer reaches the Send button; the reply's actions are reachable too.
    page.get_by_role("button", name="Regenerate").focus()
    page.keyboard.press("Enter")
    expect(_last_reply(page).locator(".version-count")).to_have_text("2 / 2")


def test_view_follows_the_reply_unless_the_reader_scrolls_up(page_for, user):
    conversation = _conversation_with(
        user, [(f"q{i}", "a long answer\n\n" * 6) for i in range(8)], "Scroll"
    )
    page = page_for(user, viewport={"width": 900, "height": 600})
    page.goto(f"/c/{conversation.pk}/")
    transcript = page.locator("#messages")
    words = " ".join(f"w{i}\n\n" for i in range(30))
    page.get_by_label("Model").select_option("fake-slow")
    page.get_by_role("textbox", name="Message").fill(words)
    page.get_by_role("textbox", name="Message").press("Enter")
    reply = _last_reply(page)
    expect(reply.locator(".message-body")).to_contain_text("w3")
    at_bottom = "el => el.scrollHeight - el.scrollTop - el.clientHeight < 80"
    assert transcript.evaluate(at_bottom)
    transcript.evaluate("el => { el.scrollTop = 0; el.dispatchEvent(new Event('scroll')); }")
    expect(reply.locator(".message-body")).to_contain_text("w8")
    assert transcript.evaluate("el => el.scrollTop") == 0
    page.get_by_role("button", name="Stop").click()
    expect(reply).to_have_attribute("data-status", "stopped")
    expect(reply.locator(".status")).to_have_text("Stopped")


def test_no_csp_violations_or_script_errors_through_the_main_flows(page_for, user):
    page = page_for(user)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.add_init_script(
        "window.__csp = []; document.addEventListener('securitypolicyviolation',"
        " (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
    )
    page.goto("/")
    box = page.get_by_role("textbox", name="Message")
    box.fill("| a | b |\n|:-|-:|\n| 1 | 2 |\n\n```python\nprint(1)\n```")
    box.press("Enter")
    reply = _last_reply(page)
    expect(reply).to_have_attribute("data-status", "complete")
    expect(reply).not_to_have_attribute("aria-live", "polite")
    reply.get_by_role("button", name="Regenerate").click()
    expect(_last_reply(page).locator(".version-count")).to_have_text("2 / 2")
    _last_reply(page).get_by_role("button", name="Previous version").click()
    expect(_last_reply(page).locator(".version-count")).to_have_text("1 / 2")
    page.locator("summary", has_text="Settings").click()
    page.get_by_role("button", name="Save settings").click()
    expect(page.locator("#settings-status")).to_have_text("Saved.")
    page.get_by_role("button", name="Dark mode").click()
    page.reload()
    expect(_last_reply(page)).to_have_attribute("data-status", "complete")
    assert page.evaluate("window.__csp") == []
    assert errors == []


def test_live_reply_is_announced_politely(page_for, user):
    page = page_for(user)
    page.goto("/")
    page.get_by_label("Model").select_option("fake-slow")
    page.get_by_role("textbox", name="Message").fill("one two three four five six")
    page.get_by_role("textbox", name="Message").press("Enter")
    reply = _last_reply(page)
    expect(reply).to_have_attribute("aria-live", "polite")
    expect(reply.locator(".message-body")).to_contain_text("one")
    page.reload()  # the resumed reply is a live region too
    expect(_last_reply(page)).to_have_attribute("aria-live", "polite")
    expect(_last_reply(page)).to_have_attribute("data-status", "complete")


CONTRAST = """(selectors) => {
  const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
  const lum = ([r, g, b]) => {
    const f = (v) => ((v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = (el) => {
    for (; el; el = el.parentElement) {
      const c = rgb(getComputedStyle(el).backgroundColor);
      if (c.length < 4 || c[3] > 0) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const result = {};
  for (const selector of selectors) {
    const el = document.querySelector(selector);
    const a = lum(rgb(getComputedStyle(el).color)), b = lum(background(el));
    result[selector] = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  }
  return result;
}"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_text_contrast_meets_wcag_aa(page_for, user, scheme):
    conversation = _conversation_with(user, [("hi", "hello")], "Contrast")
    Message.objects.filter(role="assistant").update(status="error", error="Upstream timed out.")
    page = page_for(user, color_scheme=scheme)
    page.goto(f"/c/{conversation.pk}/")
    ratios = page.evaluate(
        CONTRAST,
        [
            ".message-assistant .message-body",
            ".message-user .message-body",
            ".message-meta .action",
            ".error-text",
            ".group-label",
            ".sidebar-user .user",
            "button.send",
            "button.new-chat",
            "#conversation-list a",
        ],
    )
    assert all(ratio >= 4.5 for ratio in ratios.values()), ratios


def test_only_the_newest_reply_offers_regenerate(page_for, user):
    page = page_for(user)
    page.goto("/")
    _send(page, "one", "fake-echo")
    _send(page, "two")
    expect(page.get_by_role("button", name="Regenerate")).to_have_count(1)
    _last_reply(page).get_by_role("button", name="Regenerate").click()
    expect(_last_reply(page)).to_have_attribute("data-status", "complete")
    expect(page.locator("article.message")).to_have_count(4)
    expect(_last_reply(page).locator(".message-body")).to_have_text("Echo: two")


@pytest.fixture
def faulty_servers(upstream, django_db_blocker):
    """Two more daphnes: one whose model server is down, one that times out in 1 s."""
    from tests.live import LiveServer, free_port

    with django_db_blocker.unblock():
        down = LiveServer(
            upstream_url=f"http://127.0.0.1:{free_port()}/v1",  # nothing listens there
            extra_env={"OPENAI_MODELS": "fake-echo", "OPENAI_CONNECT_TIMEOUT": "2"},
        )
        slow = LiveServer(upstream_url=upstream.base_url, extra_env={"OPENAI_READ_TIMEOUT": "1"})
    yield down, slow
    down.stop()
    slow.stop()


def test_upstream_down_and_timeout_show_inline_with_retry(browser, faulty_servers, user):
    from tests.e2e.conftest import login_cookie

    for server, model, reason in [
        (faulty_servers[0], "fake-echo", "Could not connect to the model server"),
        (faulty_servers[1], "fake-stall", "timed out after 1 s"),
    ]:
        context = browser.new_context(base_url=server.url)
        context.add_cookies([login_cookie(user, server)])
        page = context.new_page()
        page.goto("/")
        reply = _send(page, "anyone there?", model)
        expect(reply).to_have_attribute("data-status", "error")
        expect(reply.locator(".status")).to_have_text("Error")
        expect(reply.locator(".error-text")).to_contain_text(reason)
        expect(reply.get_by_role("button", name="Retry")).to_be_visible()
        assert Message.objects.filter(role="user", content="anyone there?").exists()
        context.close()


def test_interrupted_reply_says_so_and_offers_retry(page_for, user):
    conversation = services.conversation_create(owner=user, model="fake-echo", title="cut")
    _, reply = services.message_send(conversation=conversation, content="q", model="fake-echo")
    services.reply_finish(
        message_id=reply.pk,
        content="half an ans",
        status="interrupted",
        error="The server stopped before this reply finished.",
    )
    page = page_for(user)
    page.goto(f"/c/{conversation.pk}/")
    article = _last_reply(page)
    expect(article).to_have_attribute("data-status", "interrupted")
    expect(article.locator(".status")).to_have_text("Interrupted")
    expect(article.locator(".message-body")).to_have_text("half an ans")
    expect(article.get_by_role("button", name="Retry")).to_be_visible()


def test_the_last_entrys_menu_opens_upwards_in_sight(page_for, user):
    for i in range(30):
        services.conversation_create(owner=user, model="fake-echo", title=f"Chat {i}")
    page = page_for(user)
    page.goto("/")
    items = page.locator("#conversation-list li.conversation-item")
    expect(items).to_have_count(30)
    last = items.last
    last.scroll_into_view_if_needed()
    last.locator("summary").click()
    delete = last.get_by_role("button", name="Delete")
    expect(delete).to_be_visible()
    bottom = page.evaluate(
        "document.getElementById('conversation-list').getBoundingClientRect().bottom"
    )
    box = delete.bounding_box()
    assert box["y"] + box["height"] <= bottom + 1


def test_a_tab_left_behind_shows_what_another_tab_sent_once_its_reply_is_in(page_for, user):
    # The model sees the other tab's exchange as context: this page shows it too.
    conversation = _conversation_with(user, [("first", "Echo: first")])
    a, b = page_for(user), page_for(user)
    a.goto(f"/c/{conversation.pk}/")
    b.goto(f"/c/{conversation.pk}/")
    _send(b, "from tab b", "fake-echo")
    reply = _send(a, "from tab a", "fake-echo")
    expect(reply.locator(".message-body")).to_have_text("Echo: from tab a")
    bodies = a.locator("article.message .message-body")
    expect(bodies).to_have_text(
        ["first", "Echo: first", "from tab b", "Echo: from tab b", "from tab a", "Echo: from tab a"]
    )
    # A tab that was up to date keeps its page as it is (no refetch of the list).
    requests = []
    b.on("request", lambda r: requests.append(r.url) if "/messages/" in r.url else None)
    b.reload()
    _send(b, "again", "fake-echo")
    assert not [url for url in requests if "limit=2" not in url]
