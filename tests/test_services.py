from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from django.db import IntegrityError, OperationalError, connection
from django.utils import timezone

from chat import services
from chat.journal import SET, Journal, journal_root, record
from chat.models import Conversation, Message
from chat.text import clean_text
from tests.conftest import AsgiStream

pytestmark = pytest.mark.django_db


@pytest.fixture
def conversation(user):
    return services.conversation_create(owner=user, model="fake")


def _exchange(conversation, prompt: str, answer: str, status: str = "complete") -> Message:
    _, reply = services.message_send(conversation=conversation, content=prompt, model="fake")
    services.reply_finish(message_id=reply.pk, content=answer, status=status)
    return reply


def test_message_send_commits_user_message_and_streaming_reply(conversation):
    user_message, reply = services.message_send(
        conversation=conversation, content="  hello  ", model="fake"
    )
    assert Message.objects.get(pk=user_message.pk).content == "hello"
    stored = Message.objects.get(pk=reply.pk)
    assert (stored.role, stored.status, stored.parent_id) == (
        "assistant",
        "streaming",
        user_message.pk,
    )
    conversation.refresh_from_db()
    assert conversation.current_leaf_id == reply.pk


@pytest.mark.parametrize(
    "text",
    ["nul\x00byte", "lone \ud800 surrogate", "rtl \u202e override", "zero\u200bwidth", "emoji 🦀"],
)
def test_odd_unicode_is_stored_and_read_back_the_same(conversation, text):
    user_message, _ = services.message_send(conversation=conversation, content=text, model="fake")
    stored = Message.objects.get(pk=user_message.pk).content
    assert stored == clean_text(text)
    assert "\x00" not in stored
    stored.encode("utf-8")  # storable on PostgreSQL and SQLite alike


def test_clean_text_keeps_ordinary_text():
    assert clean_text("plain ü 中文 \u202e") == "plain ü 中文 \u202e"
    assert clean_text("a\x00b") == "a\ufffdb"


def test_typed_line_breaks_are_stored_as_newlines(conversation):
    # Browsers send a textarea's line breaks as CRLF.
    user_message, _ = services.message_send(
        conversation=conversation, content="one\r\ntwo\r\n", model="fake"
    )
    assert user_message.content == "one\ntwo"
    assert (
        services.conversation_settings_parse({"system_prompt": "a\r\nb"})["system_prompt"] == "a\nb"
    )


def test_reply_finish_stores_nul_from_the_model(conversation):
    _, reply = services.message_send(conversation=conversation, content="x", model="fake")
    services.reply_finish(message_id=reply.pk, content="a\x00b", status="complete")
    assert Message.objects.get(pk=reply.pk).content == "a\ufffdb"


def test_reply_finish_stores_what_the_model_server_sent_whatever_it_is(conversation):
    # As the upstream sent them: PostgreSQL refused each of these, and the row
    # stayed `streaming` through every retry and sweep.
    _, reply = services.message_send(conversation=conversation, content="x", model="fake")
    services.reply_finish(
        message_id=reply.pk,
        content="text",
        status="complete",
        finish_reason="content_filter\x00" + "x" * 50,
        prompt_tokens=-1,
        completion_tokens=2**40,
        ttft_ms=True,
        error="odd\x00error",
    )
    row = Message.objects.get(pk=reply.pk)
    assert (row.status, row.content) == ("complete", "text")
    assert row.finish_reason == ("content_filter\ufffd" + "x" * 50)[:32]
    assert (row.prompt_tokens, row.completion_tokens, row.ttft_ms) == (None, None, None)
    assert row.error == "odd\ufffderror"


def test_reply_finish_retries_when_database_is_busy(conversation, monkeypatch):
    _, reply = services.message_send(conversation=conversation, content="x", model="fake")
    real_update = services._row_update
    failures = {"left": 2}

    def flaky_update(*args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("database is locked")
        return real_update(*args, **kwargs)

    monkeypatch.setattr(services, "_row_update", flaky_update)
    monkeypatch.setattr(services.time, "sleep", lambda s: None)
    services.reply_finish(message_id=reply.pk, content="saved", status="complete")
    assert failures["left"] == 0
    assert Message.objects.get(pk=reply.pk).content == "saved"


def test_reply_finish_stores_every_field(conversation):
    _, reply = services.message_send(conversation=conversation, content="x", model="fake")
    before = Message.objects.get(pk=reply.pk).updated
    services.reply_finish(
        message_id=reply.pk,
        content="done",
        status=Message.Status.ERROR,
        finish_reason="length",
        prompt_tokens=12,
        completion_tokens=34,
        ttft_ms=56,
        duration_ms=789,
        error="The model server failed (HTTP 500).",
    )
    row = Message.objects.get(pk=reply.pk)
    assert (row.content, row.status, row.finish_reason) == ("done", "error", "length")
    assert (row.prompt_tokens, row.completion_tokens) == (12, 34)
    assert (row.ttft_ms, row.duration_ms) == (56, 789)
    assert row.error == "The model server failed (HTTP 500)."
    assert row.updated > before
    services.reply_finish(message_id=reply.pk, content="", status="complete")  # NULLs too
    row = Message.objects.get(pk=reply.pk)
    assert (row.prompt_tokens, row.ttft_ms, row.error) == (None, None, "")


def test_context_is_the_path_with_system_prompt(conversation):
    conversation.system_prompt = "Be brief."
    conversation.save()
    _exchange(conversation, "q1", "a1")
    _exchange(conversation, "q2", "", status="error")
    _, reply = services.message_send(conversation=conversation, content="q3", model="fake")
    context = services.reply_context(conversation, reply)
    assert [(m.role, m.content) for m in context] == [
        ("system", "Be brief."),
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
        ("user", "q3"),
    ]


def test_context_trims_oldest_messages_first(conversation):
    for i in range(10):
        _exchange(conversation, f"question {i} " + "x" * 100, f"answer {i} " + "y" * 100)
    _, reply = services.message_send(conversation=conversation, content="latest", model="fake")
    context = services.reply_context(conversation, reply, context_chars=500)
    assert context[-1].content == "latest"
    assert sum(len(m.content) for m in context) <= 500
    assert "answer 9" in context[-2].content
    assert all("question 0" not in m.content for m in context)


def test_context_keeps_an_overlong_latest_message_cut(conversation):
    _, reply = services.message_send(conversation=conversation, content="z" * 5000, model="fake")
    context = services.reply_context(conversation, reply, context_chars=2000)
    assert len(context) == 1
    assert 1000 <= len(context[0].content) <= 2000


def test_regenerate_keeps_earlier_version(conversation):
    first = _exchange(conversation, "q", "v1")
    second = services.reply_regenerate(conversation=conversation, reply=first, model="fake")
    assert second.parent_id == first.parent_id
    assert Message.objects.filter(parent_id=first.parent_id).count() == 2
    conversation.refresh_from_db()
    assert conversation.current_leaf_id == second.pk


def test_sweep_marks_only_stale_streaming_rows(conversation):
    _, stale = services.message_send(conversation=conversation, content="a", model="fake")
    _, fresh = services.message_send(conversation=conversation, content="b", model="fake")
    Message.objects.filter(pk=stale.pk).update(updated=timezone.now() - timedelta(minutes=5))
    assert services.replies_sweep() == 1
    assert Message.objects.get(pk=stale.pk).status == "interrupted"
    assert Message.objects.get(pk=fresh.pk).status == "streaming"
    assert services.replies_sweep(older_than=timedelta(0), exclude_ids=[fresh.pk]) == 0
    assert services.replies_sweep(older_than=timedelta(0)) == 1


def test_chat_sweep_command(conversation):
    from django.core.management import call_command

    _, reply = services.message_send(conversation=conversation, content="a", model="fake")
    call_command("chat_sweep", "--all")
    assert Message.objects.get(pk=reply.pk).status == "interrupted"


# The chat page: versions, paging, sidebar, settings, titles, exports.


def test_edit_of_first_message_is_a_new_root_version(conversation):
    first = _exchange(conversation, "q1", "a1")
    _exchange(conversation, "q2", "a2")
    original = first.parent
    edited, reply = services.message_send(
        conversation=conversation, content="q1 again", model="fake", edit_of=original
    )
    assert edited.parent_id is None
    assert reply.parent_id == edited.pk
    conversation.refresh_from_db()
    path = services.conversation_path(conversation)
    assert [m.content for m in path] == ["q1 again", ""]
    assert Message.objects.filter(conversation=conversation).count() == 6


def test_thread_shows_versions_of_each_message(conversation):
    first = _exchange(conversation, "q", "v1")
    second = services.reply_regenerate(conversation=conversation, reply=first, model="fake")
    conversation.refresh_from_db()
    thread = services.conversation_thread(conversation)
    user_message, reply = thread.messages
    assert (user_message.version_index, user_message.version_count) == (1, 1)
    assert reply.pk == second.pk
    assert (reply.version_index, reply.version_count) == (2, 2)
    assert (reply.previous_version_id, reply.next_version_id) == (first.pk, None)
    assert thread.last_id == second.pk
    assert not thread.has_older


def test_thread_pages_from_the_end(conversation):
    for i in range(30):
        _exchange(conversation, f"q{i}", f"a{i}")
    conversation.refresh_from_db()
    latest = services.conversation_thread(conversation, limit=50)
    assert latest.has_older
    assert [m.content for m in latest.messages[:2]] == ["q5", "a5"]
    assert latest.messages[-1].content == "a29"
    older = services.conversation_thread(conversation, before=latest.messages[0].pk, limit=50)
    assert not older.has_older
    assert [m.content for m in older.messages] == [
        text for i in range(5) for text in (f"q{i}", f"a{i}")
    ]


def test_thread_reads_a_constant_number_of_queries(conversation, django_assert_max_num_queries):
    for i in range(60):
        _exchange(conversation, f"q{i}", f"a{i}")
    conversation.refresh_from_db()
    with django_assert_max_num_queries(2):
        thread = services.conversation_thread(conversation)
        assert len(thread.messages) == 50
        assert all(m.content for m in thread.messages)


def test_version_select_shows_the_newest_branch_below(conversation):
    first = _exchange(conversation, "q", "v1")
    _exchange(conversation, "follow-up", "deeper")
    second = services.reply_regenerate(conversation=conversation, reply=first, model="fake")
    leaf = services.message_version_select(conversation=conversation, message=first)
    conversation.refresh_from_db()
    assert Message.objects.get(pk=leaf).content == "deeper"
    assert conversation.current_leaf_id == leaf
    assert services.message_version_select(conversation=conversation, message=second) == second.pk


def test_rename_locks_the_title_against_automatic_titles(conversation):
    assert services.conversation_title_auto(conversation_id=conversation.pk, title="Auto")
    services.conversation_rename(conversation=conversation, title="  Mine \n ")
    assert not services.conversation_title_auto(conversation_id=conversation.pk, title="Later")
    conversation.refresh_from_db()
    assert (conversation.title, conversation.title_locked) == ("Mine", True)
    with pytest.raises(services.InputError):
        services.conversation_rename(conversation=conversation, title="   ")


def test_rename_and_archive_keep_the_sidebar_order(conversation):
    before = Conversation.objects.get(pk=conversation.pk).updated
    services.conversation_rename(conversation=conversation, title="New")
    services.conversation_archive(conversation=conversation, archived=True)
    assert Conversation.objects.get(pk=conversation.pk).updated == before


def test_sidebar_groups_by_day_in_the_site_time_zone(user, settings):
    settings.TIME_ZONE = "Europe/Paris"
    now = timezone.now().replace(hour=12)
    ages = {"today": 0, "yesterday": 1, "week": 3, "month": 20, "old": 200}
    for title, days in ages.items():
        c = services.conversation_create(owner=user, model="fake", title=title)
        Conversation.objects.filter(pk=c.pk).update(updated=now - timedelta(days=days))
    groups = Conversation.objects.for_sidebar(user).by_day(now=now)
    assert [(label, [c.title for c in items]) for label, items in groups] == [
        ("Today", ["today"]),
        ("Yesterday", ["yesterday"]),
        ("Previous 7 days", ["week"]),
        ("Previous 30 days", ["month"]),
        ("Older", ["old"]),
    ]


def test_sidebar_lists_archived_apart(user, conversation):
    services.conversation_archive(conversation=conversation, archived=True)
    assert list(Conversation.objects.for_sidebar(user)) == []
    assert list(Conversation.objects.for_sidebar(user, archived=True)) == [conversation]


@pytest.mark.parametrize(
    "data",
    [
        {"temperature": "hot"},
        {"temperature": "2.5"},
        {"max_tokens": "0"},
        {"max_tokens": "999999"},
        {"max_tokens": "1.5"},
    ],
)
def test_settings_parse_refuses_bad_values(data):
    with pytest.raises(services.InputError):
        services.conversation_settings_parse(data)


def test_settings_update_stores_values_and_blank_means_default(conversation):
    fields = services.conversation_settings_parse(
        {"system_prompt": " Be brief. ", "temperature": "0.3", "max_tokens": "100"}
    )
    services.conversation_settings_update(conversation=conversation, **fields)
    conversation.refresh_from_db()
    assert (conversation.system_prompt, conversation.temperature, conversation.max_tokens) == (
        "Be brief.",
        0.3,
        100,
    )
    fields = services.conversation_settings_parse({"temperature": "", "max_tokens": ""})
    assert fields == {"system_prompt": "", "temperature": None, "max_tokens": None}


def test_title_clean_and_fallback():
    assert services.title_clean('Title: "Rust borrow checker tips".\nmore') == (
        "Rust borrow checker tips"
    )
    assert services.title_clean("   \n") == ""
    assert services.title_fallback("one two three four five six seven eight nine") == (
        "one two three four five six seven eight…"
    )
    assert services.title_fallback("short  question") == "short question"
    # Plain text, cut between words: no Markdown, no half word.
    assert services.title_clean("**Bold** and `code` in a title") == "Bold and code in a title"
    assert services.title_clean("Why 5 * 3 is 15") == "Why 5 * 3 is 15"
    long = "Why do the trains in my town always arrive late when it rains on Mondays and Fridays"
    assert services.title_clean(long) == long[:79].rsplit(" ", 1)[0] + "…"
    assert len(services.title_clean(long)) <= services.TITLE_CHARS
    assert services.title_fallback("x" * 100) == "x" * 79 + "…"


async def test_title_suggest_asks_the_model_briefly(scripted):
    await scripted.script.put("**Weather in Paris**")
    await scripted.script.put(None)
    title = await services.title_suggest(
        provider=scripted, model="scripted", first_message="How is the weather in Paris?"
    )
    assert title == "Weather in Paris"
    (messages,) = scripted.calls
    assert messages[0].role == "system"
    assert messages[1].content == "How is the weather in Paris?"
    assert scripted.closed.is_set()


def test_theme_preference(user):
    assert services.preference_theme(user) == "system"
    services.preference_theme_set(user=user, theme="dark")
    assert services.preference_theme(user) == "dark"
    with pytest.raises(services.InputError):
        services.preference_theme_set(user=user, theme="<b>")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<img src=x onerror=alert(1)>", "&lt;img src=x onerror=alert(1)>"),
        ("use `<b>` here <b>", "use `&lt;b>` here &lt;b>"),
        # Code spans that cross lines or table cells: no renderer may see HTML.
        (
            "a `b\nc` <img src=x onerror=alert(1)> `d`",
            "a `b\nc` &lt;img src=x onerror=alert(1)> `d`",
        ),
        (
            "| `x | <img src=x onerror=alert(1)> | y` |",
            "| `x | &lt;img src=x onerror=alert(1)> | y` |",
        ),
        # Code blocks too: what is code depends on the renderer (an indented
        # fence closed by an unindented one, a fence left open by one message).
        ("```html\n<b>x</b>\n```\n<i>", "```html\n&lt;b>x&lt;/b>\n```\n&lt;i>"),
        (
            " ```\n<x>\n```\n<img src=x onerror=alert(1)>",
            " ```\n&lt;x>\n```\n&lt;img src=x onerror=alert(1)>",
        ),
        ("- item\n  ```\n- <img src=x>", "- item\n  ```\n- &lt;img src=x>"),
        # An escaped backtick opens no code span.
        ("\\`<img src=x onerror=alert(1)>`", "\\`&lt;img src=x onerror=alert(1)>`"),
        # Comments, declarations, processing instructions, CDATA, autolinks.
        (
            "<!-- x --><!DOCTYPE x><?php ?><![CDATA[x]]>",
            "&lt;!-- x -->&lt;!DOCTYPE x>&lt;?php ?>&lt;![CDATA[x]]>",
        ),
        ("<javascript:alert(1)> <JaVaScRiPt:x>", "&lt;javascript:alert(1)> &lt;JaVaScRiPt:x>"),
        # What cannot open HTML stays readable.
        ("if a < b and b <= c: print('<3')", "if a < b and b <= c: print('<3')"),
    ],
)
def test_markdown_escape_html(text, expected):
    assert services.markdown_escape_html(text) == expected


def test_markdown_export_has_no_live_html(conversation):
    conversation.title = "<script>alert(1)</script>"
    conversation.system_prompt = "<img src=x onerror=alert(2)>"
    conversation.save()
    # A fence one message leaves open must not carry the next one's HTML through.
    _exchange(conversation, "<svg onload=alert(3)>\n```", "```\n<img src=x onerror=alert(4)>")
    conversation.refresh_from_db()
    text = services.conversation_export_markdown(conversation)
    assert text.startswith("# &lt;script>alert(1)&lt;/script>\n")
    assert "&lt;img src=x" in text and "&lt;svg onload" in text
    assert "&lt;img src=x onerror=alert(4)>" in text
    assert "<img" not in text and "<svg" not in text and "<script" not in text
    assert "## User" in text and "## Assistant" in text


def test_json_export_holds_every_version_with_metadata(conversation):
    first = _exchange(conversation, "q", "v1")
    services.reply_regenerate(conversation=conversation, reply=first, model="fake")
    conversation.refresh_from_db()
    data = services.conversation_export_data(conversation)
    assert len(data["messages"]) == 3
    assert len(data["current_path"]) == 2
    assert set(services.MESSAGE_EXPORT_FIELDS) <= set(data["messages"][0])
    assert data["messages"][1]["parent_id"] == data["messages"][0]["id"]


def test_exports_show_a_running_replys_text_from_the_journal(conversation):
    _, running = services.message_send(conversation=conversation, content="q", model="fake")
    conversation.refresh_from_db()
    own = Journal(journal_root())
    try:
        assert own.write(record(SET, running.pk, b"half <i>way</i>"))
        markdown = services.conversation_export_markdown(conversation)
        assert "half &lt;i>way&lt;/i>\n\n*(streaming)*" in markdown
        data = services.conversation_export_data(conversation)
        assert data["messages"][-1]["content"] == "half <i>way</i>"
        assert data["messages"][-1]["status"] == "streaming"
    finally:
        own.close(clean=True)


def test_an_export_of_a_reply_that_just_ended_reads_its_row_again(conversation):
    # Read as running, but gone from the journal by the time its text is looked up:
    # it ended in between, and the export shows its saved end, status and text alike.
    _, running = services.message_send(conversation=conversation, content="q", model="fake")
    stale = Message.objects.get(pk=running.pk)
    services.reply_finish(
        message_id=running.pk, content="all of it", status="complete", finish_reason="stop"
    )
    assert services.message_text(stale) == "all of it"
    assert stale.status == "complete" and stale.finish_reason == "stop"


async def _drain(stream) -> list[tuple[str, dict]]:
    return [event async for event in stream.events()]


@pytest.mark.django_db(transaction=True)
async def test_first_reply_names_the_conversation_after_it_ends(user, asgi_login):

    cookie = await asgi_login(user)
    stream = AsgiStream("POST", "/c/send/", cookie=cookie, form={"content": "hello there"})
    assert await stream.start() == 200
    events = await _drain(stream)
    start = events[0][1]
    assert start["title_pending"] is True and start["title"] == "hello there"
    assert events[-1] == ("end", {"status": "complete", "error": "", "finish_reason": "stop"})
    for _ in range(100):
        conversation = await Conversation.objects.aget(pk=start["conversation"])
        if conversation.title != "hello there":
            break
        await asyncio.sleep(0.02)
    # The fake model echoes its prompt: proof the title came from the model.
    assert conversation.title == "Echo: hello there"
    assert not conversation.title_locked

    # Later replies in the conversation start no title task.
    url = f"/c/{conversation.pk}/send/"
    second = AsgiStream("POST", url, cookie=cookie, form={"content": "more"})
    assert await second.start() == 200
    assert (await _drain(second))[0][1]["title_pending"] is False


@pytest.mark.django_db(transaction=True)
async def test_a_failing_title_falls_back_to_the_first_words(user, asgi_login, monkeypatch):
    async def broken(**kwargs):
        raise RuntimeError("model gone")

    monkeypatch.setattr(services, "title_suggest", broken)
    stream = AsgiStream(
        "POST",
        "/c/send/",
        cookie=await asgi_login(user),
        form={"content": "  please   explain monads to me like I am five years old"},
    )
    assert await stream.start() == 200
    start = (await _drain(stream))[0][1]
    for _ in range(50):
        await asyncio.sleep(0.02)
        conversation = await Conversation.objects.aget(pk=start["conversation"])
    assert conversation.title == "please explain monads to me like I am…"


def test_context_caps_a_huge_system_prompt(user):
    from chat.llm import ChatMessage

    context = services.trim_context(
        "s" * 100_000, [ChatMessage("user", "q" * 5000)], context_chars=3072
    )
    assert len(context[0].content) == 1536  # half the budget
    assert context[-1].role == "user" and context[-1].content
    assert sum(len(m.content) for m in context) <= 3072


def test_new_chat_is_all_or_nothing(user, settings):
    settings.CHAT_MAX_CONCURRENT_REPLIES = 0  # message_send refuses
    with pytest.raises(services.InputError):
        services.conversation_start(owner=user, model="fake", content="hi", chat_settings={})
    assert not Conversation.objects.exists()
    assert not Message.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_new_conversation_that_cannot_be_stored_leaves_nothing(user):
    # The owner's row is gone: the foreign key fails when the rows are committed.
    key, _ = services.api_key_create(owner=user, name="script")
    ghost = services.ApiKey(id=key.pk, name="script", owner_id=user.pk + 1000)
    with pytest.raises(IntegrityError):
        services.api_conversation_create(
            key=ghost,
            model="fake",
            messages=[("user", "a"), ("assistant", "b"), ("user", "c")],
            max_tokens=None,
            temperature=None,
        )
    assert not Conversation.objects.exists()
    assert not Message.objects.exists()


def test_a_new_conversation_that_fails_inside_a_transaction_undoes_only_itself(user):
    # As in these tests, which run inside one: the caller's transaction goes on.
    key, _ = services.api_key_create(owner=user, name="script")
    with pytest.raises(IntegrityError):  # max_tokens is a positive integer column
        services.api_conversation_create(
            key=key, model="fake", messages=[("user", "a")], max_tokens=-1, temperature=None
        )
    assert not Conversation.objects.exists()
    assert services.api_conversation_create(
        key=key, model="fake", messages=[("user", "a")], max_tokens=None, temperature=None
    )


def test_a_new_conversation_takes_thousands_of_messages(user):
    # An API call resends its whole history: one statement whatever its length.
    key, _ = services.api_key_create(owner=user, name="script")
    turns = [("user" if i % 2 == 0 else "assistant", f"turn {i}") for i in range(3001)]
    conversation, reply = services.api_conversation_create(
        key=key, model="fake", messages=turns, max_tokens=None, temperature=None
    )
    rows = list(Message.objects.filter(conversation=conversation).order_by("id"))
    assert [(m.role, m.content) for m in rows[:-1]] == turns
    assert [m.parent_id for m in rows] == [None] + [m.pk for m in rows[:-1]]
    assert rows[-1].pk == reply.pk and reply.parent_id == rows[-2].pk
    assert Conversation.objects.get(pk=conversation.pk).current_leaf_id == reply.pk


@pytest.mark.django_db(transaction=True)
def test_a_new_conversation_is_one_statement_on_postgresql(user):
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's path (SQLite has no round trip to save)")
    statements = []

    def counting(execute, sql, params, many, context):
        statements.append(sql)
        return execute(sql, params, many, context)

    services.conversation_start(owner=user, model="fake", content="warm", chat_settings={})
    with connection.execute_wrapper(counting):
        conversation, first, reply = services.conversation_start(
            owner=user, model="fake", content="hi", chat_settings={"temperature": 0.2}
        )
    assert len([sql for sql in statements if "INSERT" in sql]) == 1
    assert not [sql for sql in statements if sql.lstrip().upper().startswith("UPDATE")]
    assert Message.conversation.is_cached(reply) and reply.conversation is conversation
    assert first.conversation is conversation and conversation.current_leaf is reply
    stored = Conversation.objects.get(pk=conversation.pk)
    assert (stored.current_leaf_id, stored.model, stored.temperature) == (reply.pk, "fake", 0.2)
    assert [(m.pk, m.parent_id, m.role, m.status) for m in stored.messages.order_by("id")] == [
        (first.pk, None, "user", "complete"),
        (reply.pk, first.pk, "assistant", "streaming"),
    ]


@pytest.mark.django_db
def test_api_conversation_rows_are_stored_whole(user):
    key, _ = services.api_key_create(owner=user, name="script")
    before = timezone.now()
    conversation, reply = services.api_conversation_create(
        key=key,
        model="fake",
        messages=[
            ("system", "Be terse."),
            ("user", "first\x00"),
            ("assistant", "an earlier answer"),
            ("user", "second"),
        ],
        max_tokens=7,
        temperature=0.5,
    )
    stored = Conversation.objects.get(pk=conversation.pk)
    assert (stored.owner, stored.source, stored.api_key_name) == (user, "api", "script")
    assert (stored.system_prompt, stored.max_tokens, stored.temperature) == ("Be terse.", 7, 0.5)
    assert (stored.title, stored.archived, stored.title_locked) == ("first\ufffd", False, False)
    assert stored.current_leaf_id == reply.pk and stored.created >= before
    rows = list(stored.messages.order_by("id"))
    assert [(m.role, m.content, m.status) for m in rows] == [
        ("user", "first\ufffd", "complete"),
        ("assistant", "an earlier answer", "complete"),
        ("user", "second", "complete"),
        ("assistant", "", "streaming"),
    ]
    assert [m.parent_id for m in rows] == [None, rows[0].pk, rows[1].pk, rows[2].pk]
    assert rows[-1].pk == reply.pk and rows[-1].model == "fake"
    assert all(m.created >= before and m.updated == m.created for m in rows)
