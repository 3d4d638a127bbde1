"""Writes: every change to conversations and messages goes through here."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.db import (
    DEFAULT_DB_ALIAS,
    IntegrityError,
    OperationalError,
    connection,
    connections,
    transaction,
)
from django.utils import timezone

from . import journal
from .db import check_connection
from .llm import ChatMessage, GenerationParams, Provider
from .models import ApiKey, Conversation, Message, Preference, SiteOwner
from .text import clean_text

log = logging.getLogger(__name__)


class SignupClosed(Exception):
    pass


class InputError(ValueError):
    """Bad input from the user; the message is shown to them as it is."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def site_is_fresh() -> bool:
    """No account yet: the next sign-up makes the site's owner. A site whose first
    accounts came from `createsuperuser` or the admin has no SiteOwner row (only
    sign-up makes one), and counted as fresh: anybody could sign up as its admin."""
    return not get_user_model().objects.exists()  # a SiteOwner row has its user


def user_signup(*, username: str, password: str, email: str = ""):
    """Create an account under the sign-up policy.

    The first account of a fresh site becomes the superuser; exactly one does,
    even when two sign up at once (the SiteOwner insert is the arbiter).
    """
    mode = settings.SIGNUP_MODE
    with transaction.atomic():
        site_has_owner = not site_is_fresh()
        if site_has_owner and mode not in {"open", "approval"}:
            raise SignupClosed
        user = get_user_model().objects.create_user(
            username=username, password=password, email=email, is_active=True
        )
        if not site_has_owner:
            try:
                with transaction.atomic():
                    SiteOwner.objects.create(id=1, user=user)
            except IntegrityError:
                site_has_owner = True  # somebody else was first, a moment ago
                if mode not in {"open", "approval"}:
                    raise SignupClosed from None
            else:
                user.is_staff = user.is_superuser = True
                user.save(update_fields=["is_staff", "is_superuser"])
                return user
        if mode == "approval":
            user.is_active = False
            user.save(update_fields=["is_active"])
        return user


def conversation_create(
    *,
    owner,
    model: str,
    title: str = "",
    system_prompt: str = "",
    source: str = Conversation.Source.WEB,
    api_key_name: str = "",
) -> Conversation:
    return Conversation.objects.create(
        owner=owner,
        model=model,
        title=clean_text(title)[:200],
        system_prompt=clean_text(system_prompt),
        source=source,
        api_key_name=api_key_name,
    )


def _typed_text(text: str) -> str:
    """Text a person typed, as stored: browsers send a textarea's line breaks as
    CRLF (HTML's form encoding); stored as "\n", as the model's text is."""
    return clean_text(text).replace("\r\n", "\n").strip()


def validate_message_content(content: str) -> str:
    content = _typed_text(content)
    if not content:
        raise InputError("The message is empty.")
    if len(content) > settings.CHAT_MAX_MESSAGE_CHARS:
        raise InputError(
            f"The message is too long ({len(content):,} characters; "
            f"the limit is {settings.CHAT_MAX_MESSAGE_CHARS:,}).",
            status=413,
        )
    return content


def check_reply_quota(owner_id: int) -> None:
    """Refuse a new reply while the user already has too many running."""
    # Raw SQL: this runs before every reply, and the ORM spent ten times
    # longer building the query than the database took to answer it. The status
    # is a literal so that the planner can match it to the partial index of
    # running replies (chat_message_streaming): SQLite never matches a bound
    # parameter (on an empty database it picks the status index instead).
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT COUNT(*) FROM {Message._meta.db_table} m "
            f"JOIN {Conversation._meta.db_table} c ON c.id = m.conversation_id "
            f"WHERE m.status = '{Message.Status.STREAMING.value}' AND c.owner_id = %s",
            [owner_id],
        )
        running = cursor.fetchone()[0]
    if running >= settings.CHAT_MAX_CONCURRENT_REPLIES:
        raise InputError(
            f"You already have {running} replies generating; wait for one to finish.",
            status=429,
        )
    limit = settings.CHAT_MAX_REPLIES_PER_HOUR
    if limit and (cache_or(0, cache.get, _hourly_key(owner_id)) or 0) >= limit:
        minutes = 60 - int(time.time() % 3600 // 60)
        raise InputError(
            f"You have reached the limit of {limit} replies an hour; "
            f"try again in {minutes} minute{'s' if minutes != 1 else ''}.",
            status=429,
        )


def _hourly_key(owner_id: int) -> str:
    return f"replies-per-hour:{owner_id}:{int(time.time() // 3600)}"


def _count_reply(owner_id: int) -> None:
    """Count a started reply against the user's hourly limit (a fixed window)."""
    cache_count(_hourly_key(owner_id), 3700)


def cache_count(key: str, timeout: int) -> None:
    """One more in the counter `key`, which expires `timeout` s after its first count."""

    def count():
        cache.add(key, 0, timeout)
        try:
            cache.incr(key)
        except ValueError:  # expired between add and incr
            cache.set(key, 1, timeout)

    cache_or(None, count)


_cache_failed_at = float("-inf")
_cache_failure_logged_at = float("-inf")
CACHE_RETRY_SECONDS = 10


def cache_or(default, call, *args):
    """`call(*args)` on the cache, or `default` while the cache (Redis) is down.

    The hourly limits count in the cache; with REDIS_URL set it is Redis, and a
    Redis outage made every send a 500 that stored nothing. A limit that does
    not count for a while is the lesser harm; the outage is logged (once a
    minute). After a failure the cache is left alone for CACHE_RETRY_SECONDS:
    a Redis that drops packets costs its timeout once, not on every call.
    """
    global _cache_failed_at, _cache_failure_logged_at
    if time.monotonic() - _cache_failed_at < CACHE_RETRY_SECONDS:
        return default
    try:
        return call(*args)
    except Exception:
        _cache_failed_at = time.monotonic()
        if _cache_failed_at - _cache_failure_logged_at > 60:
            _cache_failure_logged_at = _cache_failed_at
            log.exception("the cache is unreachable; usage limits do not count meanwhile")
        return default


def message_send(
    *,
    conversation: Conversation,
    content: str,
    model: str,
    parent: Message | None = None,
    edit_of: Message | None = None,
) -> tuple[Message, Message]:
    """Save the user's message and an empty streaming assistant row, atomically.

    Both rows are committed before any upstream call. The new message follows
    the conversation's current leaf unless `parent` is given, or `edit_of`: a
    new version of that user message, its sibling (also for the first message,
    whose parent is None). The conversation row is locked so two tabs sending
    at once get a well-defined order: the second message follows the first
    one's reply.
    """
    content = validate_message_content(content)
    check_reply_quota(conversation.owner_id)
    with transaction.atomic():
        locked = Conversation.objects.select_for_update().get(pk=conversation.pk)
        if edit_of is not None:
            parent_id = edit_of.parent_id
        elif parent is not None:
            parent_id = parent.pk
        else:
            parent_id = locked.current_leaf_id
        user_message = _user_message_insert(locked, parent_id, content)
        assistant = _reply_row_create(conversation=locked, parent_id=user_message.pk, model=model)
    conversation.current_leaf = assistant
    conversation.model = model
    return user_message, assistant


def conversation_start(
    *, owner, model: str, content: str, chat_settings: dict
) -> tuple[Conversation, Message, Message]:
    """A new chat with its first message, all or nothing: no empty chat left behind.

    Every new chat from the page pays for this before its first token, so the
    rows go in as plain INSERTs, as in api_conversation_create.
    """
    content = validate_message_content(content)
    check_reply_quota(owner.pk)
    conversation = Conversation(
        owner=owner, model=model, title=clean_text(title_fallback(content))[:200], **chat_settings
    )
    (user_message,), assistant = _conversation_insert(conversation, [("user", content)], model)
    return conversation, user_message, assistant


def _user_message_insert(conversation: Conversation, parent_id: int | None, content: str):
    message = Message(
        conversation=conversation, parent_id=parent_id, role=Message.Role.USER, content=content
    )
    message.pk = _row_insert(message)
    return message


def _reply_row_create(*, conversation: Conversation, parent_id: int | None, model: str) -> Message:
    """The empty `streaming` assistant row a new reply fills, made the current leaf.

    Called inside the caller's transaction, which holds the conversation row.
    """
    assistant = Message(
        conversation=conversation,
        parent_id=parent_id,
        role=Message.Role.ASSISTANT,
        status=Message.Status.STREAMING,
        model=model,
    )
    assistant.pk = _row_insert(assistant)
    conversation.current_leaf = assistant
    conversation.model = model
    conversation.updated = timezone.now()
    _row_update(
        Conversation,
        conversation.pk,
        {"current_leaf": assistant.pk, "model": model, "updated": conversation.updated},
    )
    if settings.CHAT_MAX_REPLIES_PER_HOUR:
        _count_reply(conversation.owner_id)
    return assistant


def api_conversation_create(
    *,
    key: ApiKey,
    model: str,
    messages: list[tuple[str, str]],
    max_tokens: int | None,
    temperature: float | None,
) -> tuple[Conversation, Message]:
    """Store one API call as a conversation: its messages, then a streaming reply row.

    Every API request pays for this before its first token, so the rows go in
    as plain INSERTs (_row_insert, as the reply row always does), not through
    create(), whose statement building cost more than the database's work.
    """
    check_reply_quota(key.owner_id)
    system = "\n\n".join(clean_text(content) for role, content in messages if role == "system")
    turns = [(role, clean_text(content)) for role, content in messages if role != "system"]
    first_user = next((content for role, content in turns if role == "user"), "")
    conversation = Conversation(
        owner_id=key.owner_id,
        model=model,
        title=first_user.strip()[:80],
        system_prompt=system,
        source=Conversation.Source.API,
        api_key_name=key.name,
        max_tokens=max_tokens,
        temperature=temperature,
    )
    _, assistant = _conversation_insert(conversation, turns, model)
    return conversation, assistant


def _conversation_insert(
    conversation: Conversation, turns: list[tuple[str, str]], model: str
) -> tuple[list[Message], Message]:
    """A new conversation, its messages (`turns`: role and content, each the parent of
    the next) and the reply's streaming row after them, the current leaf. All or
    nothing: nobody can send into the conversation before it is there whole."""
    if connections[DEFAULT_DB_ALIAS].vendor == "postgresql":
        return _conversation_insert_pg(conversation, turns, model)
    with transaction.atomic():
        conversation.pk = _row_insert(conversation)
        messages, parent_id = [], None
        for role, content in turns:
            message = Message(
                conversation=conversation, parent_id=parent_id, role=role, content=content
            )
            message.pk = parent_id = _row_insert(message)
            messages.append(message)
        assistant = _reply_row_create(conversation=conversation, parent_id=parent_id, model=model)
    return messages, assistant


_PG_SEQUENCES: dict[tuple, str] = {}


def _conversation_insert_pg(
    conversation: Conversation, turns: list[tuple[str, str]], model: str
) -> tuple[list[Message], Message]:
    """_conversation_insert on PostgreSQL: one statement, one round trip, where the
    generic way takes six (BEGIN, an INSERT a row, the current leaf's UPDATE, COMMIT),
    each a wait on the one database thread before the first token. The ids come from
    the tables' sequences inside the statement, so the conversation names its current
    leaf as it goes in; the foreign keys between the new rows are checked at its end
    (Django makes them DEFERRABLE INITIALLY DEFERRED). One statement is one
    transaction: all or nothing, as the generic way. The messages go in as one array
    a column (unnest), so the statement is the same whatever their number: an API
    call may carry thousands (a UNION of a SELECT a row took PostgreSQL seconds to
    plan at 1,000 and exhausted its memory at 5,000)."""
    db = connections[DEFAULT_DB_ALIAS]
    assistant = Message(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        status=Message.Status.STREAMING,
        model=model,
    )
    messages = [Message(conversation=conversation, role=r, content=c) for r, c in turns]
    rows = [*messages, assistant]
    conversation.model = model
    now = timezone.now()
    params = [_pg_sequence(db, Conversation), _pg_sequence(db, Message), len(rows)]
    for field in _pg_start_fields(Conversation):
        params.append(_insert_value(db, field, conversation, now))
    params.append(len(rows))  # the current leaf: the last message's id
    for field in _pg_start_fields(Message):
        params.append([_insert_value(db, field, row, now) for row in rows])
    # Inside a caller's transaction (tests), a failure must undo only this.
    savepoint = transaction.atomic() if db.in_atomic_block else contextlib.nullcontext()
    with savepoint, db.cursor() as cursor:
        cursor.execute(_pg_start_sql(db), params)
        conversation.pk, ids = cursor.fetchone()
    conversation._state.adding, conversation._state.db = False, db.alias
    parent_id = None
    for row, pk in zip(rows, ids, strict=True):
        row.pk, row.conversation, row.parent_id = pk, conversation, parent_id
        row._state.adding, row._state.db = False, db.alias
        parent_id = pk
    conversation.current_leaf = assistant
    if settings.CHAT_MAX_REPLIES_PER_HOUR:
        _count_reply(conversation.owner_id)
    return messages, assistant


# Columns the statement fills itself, from the ids it draws.
_PG_DRAWN = {"id", "conversation_id", "parent_id", "current_leaf_id"}


def _pg_start_fields(model) -> list:
    return [f for f in model._meta.concrete_fields if f.attname not in _PG_DRAWN]


def _pg_sequence(db, model) -> str:
    key = (db.settings_dict["NAME"], model._meta.db_table)
    if key not in _PG_SEQUENCES:
        with db.cursor() as cursor:
            cursor.execute(
                "SELECT pg_get_serial_sequence(%s, %s)",
                [db.ops.quote_name(model._meta.db_table), model._meta.pk.column],
            )
            _PG_SEQUENCES[key] = cursor.fetchone()[0]
    return _PG_SEQUENCES[key]


def _pg_start_sql(db) -> str:
    """The statement of _conversation_insert_pg; its parameters: the two sequences,
    the number of messages, the conversation's columns (_pg_start_fields), the
    current leaf's index, then one array a message column."""
    sql = _INSERT_SQL.get(("postgresql", "conversation start"))
    if sql is not None:
        return sql
    quote = db.ops.quote_name

    def cast(field) -> str:  # varchar(n) -> varchar: a cast to it would cut, not fail
        return re.sub(r"\(\d+\)", "", field.db_type(db))

    conversation_fields = _pg_start_fields(Conversation)
    message_fields = _pg_start_fields(Message)
    names = [f"v{i}" for i in range(len(message_fields))]
    sql = (
        "WITH ids AS (SELECT nextval(%s::regclass) AS c, ARRAY(SELECT nextval(%s::regclass) "
        "FROM generate_series(1, %s::integer) ORDER BY 1) AS m), "
        f"conversation AS (INSERT INTO {quote(Conversation._meta.db_table)} "
        f"({quote('id')}, {', '.join(quote(f.column) for f in conversation_fields)}, "
        f"{quote('current_leaf_id')}) SELECT ids.c, "
        + ", ".join(f"%s::{cast(f)}" for f in conversation_fields)
        + ", ids.m[%s::integer] FROM ids), "
        f"messages AS (INSERT INTO {quote(Message._meta.db_table)} ({quote('id')}, "
        f"{quote('conversation_id')}, {quote('parent_id')}, "
        f"{', '.join(quote(f.column) for f in message_fields)}) "
        f"SELECT ids.m[v.i], ids.c, ids.m[v.i - 1], {', '.join('v.' + n for n in names)} "
        "FROM ids, unnest("
        + ", ".join(f"%s::{cast(f)}[]" for f in message_fields)
        + f") WITH ORDINALITY AS v({', '.join(names)}, i)) "
        "SELECT ids.c, ids.m FROM ids"
    )
    _INSERT_SQL["postgresql", "conversation start"] = sql
    return sql


_INSERT_SQL: dict[tuple, str] = {}  # built once: _row_insert's, and _pg_start_sql's
_PLAIN_TYPES = (str, int, float, bool)  # what every backend takes as it is


def _insert_value(db, field, obj, now):
    """`obj`'s value for `field` in a new row, as the database takes it; auto_now
    fields are set to `now` first, as save() would."""
    if getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False):
        setattr(obj, field.attname, now)
    return _db_value(field, getattr(obj, field.attname), db)


def _db_value(field, value, db):
    """`value` as `field` stores it: plain values as they are, the rest (datetimes) prepared."""
    if value is not None and type(value) not in _PLAIN_TYPES:
        return field.get_db_prep_save(value, db)
    return value


def _row_insert(obj) -> int:
    """INSERT `obj` (a new, unsaved model instance) and return its id.

    What `save()` does for a new row, minus its per-call statement building:
    every concrete field's value as the instance holds it (auto_now fields set
    to now), plain values passed as they are, the statement cached per model.
    """
    db = connections[DEFAULT_DB_ALIAS]  # the connection itself, not the per-thread proxy
    now = timezone.now()
    fields = [f for f in obj._meta.concrete_fields if not f.primary_key]
    values = [_insert_value(db, field, obj, now) for field in fields]
    sql = _INSERT_SQL.get((db.vendor, type(obj)))
    if sql is None:
        quote = db.ops.quote_name
        sql = _INSERT_SQL[db.vendor, type(obj)] = (
            f"INSERT INTO {quote(obj._meta.db_table)} "
            f"({', '.join(quote(f.column) for f in fields)}) "
            f"VALUES ({', '.join(['%s'] * len(fields))}) "
            f"RETURNING {quote(obj._meta.pk.column)}"
        )
    with db.cursor() as cursor:
        cursor.execute(sql, values)
        pk = cursor.fetchone()[0]
    obj._state.adding, obj._state.db = False, db.alias  # a stored row, as after save()
    return pk


_UPDATE_SQL: dict[tuple, str] = {}


def _update_sql(model, columns: tuple[str, ...], only_if: tuple[str, ...]) -> str:
    """UPDATE model SET columns... WHERE pk = %s AND only_if... = %s, built once."""
    db = connections[DEFAULT_DB_ALIAS]
    key = (db.vendor, model, columns, only_if)
    sql = _UPDATE_SQL.get(key)
    if sql is None:
        quote = db.ops.quote_name
        meta = model._meta
        sql = _UPDATE_SQL[key] = (
            f"UPDATE {quote(meta.db_table)} SET "
            + ", ".join(f"{quote(meta.get_field(name).column)} = %s" for name in columns)
            + f" WHERE {quote(meta.pk.column)} = %s"
            + "".join(f" AND {quote(meta.get_field(name).column)} = %s" for name in only_if)
        )
    return sql


def _row_update(model, pk: int, values: dict, only_if: dict | None = None) -> int:
    """UPDATE one row's `values` by primary key (and `only_if` column values);
    how many rows changed.

    What `filter(...).update(...)` does, minus its per-call query building, which
    cost more than the database's work: final saves run for every reply, on the
    one database thread every request shares.
    """
    db = connections[DEFAULT_DB_ALIAS]
    only_if = only_if or {}
    sql = _update_sql(model, tuple(values), tuple(only_if))
    params = [
        _db_value(model._meta.get_field(name), value, db)
        for name, value in (*values.items(), *only_if.items())
    ]
    params.insert(len(values), pk)
    with db.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


def reply_regenerate(*, conversation: Conversation, reply: Message, model: str) -> Message:
    """A new version of an assistant reply, as a sibling of `reply`."""
    check_reply_quota(conversation.owner_id)
    with transaction.atomic():
        locked = Conversation.objects.select_for_update().get(pk=conversation.pk)
        return _reply_row_create(conversation=locked, parent_id=reply.parent_id, model=model)


def conversation_path(conversation: Conversation, leaf: Message | None = None) -> list[Message]:
    """The messages from the first one to `leaf` (default: the current leaf), in order."""
    leaf = leaf or conversation.current_leaf
    if leaf is None:
        return []
    by_id = {
        m.pk: m
        for m in conversation.messages.only(
            "id", "parent_id", "role", "content", "status", "conversation_id"
        )
    }
    path = []
    node = by_id.get(leaf.pk)
    while node is not None:
        path.append(node)
        node = by_id.get(node.parent_id)
    path.reverse()
    return path


def reply_context(
    conversation: Conversation, reply: Message, context_chars: int | None = None
) -> list[ChatMessage]:
    """What the model sees for `reply`: the system prompt and the path before it.

    Failed and empty replies are left out; see trim_context for the budget.
    """
    path = conversation_path(conversation, reply)[:-1]
    turns = [
        ChatMessage(m.role, m.content)
        for m in path
        if m.content and not (m.role == Message.Role.ASSISTANT and m.status == Message.Status.ERROR)
    ]
    return trim_context(conversation.system_prompt, turns, context_chars)


def trim_context(
    system_prompt: str, turns: list[ChatMessage], context_chars: int | None = None
) -> list[ChatMessage]:
    """Fit a conversation into the model's context, by a stated policy.

    The system prompt keeps at most half the budget (its beginning); then the
    newest messages that fit, dropping the oldest first. The latest message is
    always kept, cut to what is left (its end) if alone it is too long, so a
    conversation never becomes too long to answer.
    """
    budget = context_chars or settings.CHAT_CONTEXT_CHARS
    system_prompt = system_prompt[: budget // 2]
    system = [ChatMessage("system", system_prompt)] if system_prompt else []
    budget -= len(system_prompt)
    kept: list[ChatMessage] = []
    for turn in reversed(turns):
        if kept and len(turn.content) > budget:
            break
        if not kept and len(turn.content) > budget:
            turn = ChatMessage(turn.role, turn.content[-max(budget, 1) :])
        kept.append(turn)
        budget -= len(turn.content)
    kept.reverse()
    return system + kept


def reply_finish(
    *,
    message_id: int,
    content: str,
    status: str,
    finish_reason: str = "",
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    ttft_ms: int | None = None,
    duration_ms: int | None = None,
    error: str = "",
    attempts: int = 5,
) -> None:
    """The final save of a reply. Retried when the database is busy: never lose a reply."""
    fields = _final_fields(
        content=content,
        status=status,
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        ttft_ms=ttft_ms,
        duration_ms=duration_ms,
        error=error,
    )
    for attempt in range(attempts):
        try:
            _row_update(Message, message_id, fields)
            return
        except OperationalError:
            if attempt == attempts - 1:
                raise
            log.warning("database busy saving reply %s; retrying", message_id)
            time.sleep(0.2 * 2**attempt)
            # A connection the server dropped (a restart, an idle timeout) is replaced
            # before the next try; a busy SQLite keeps its connection.
            check_connection()


# PositiveIntegerField: PostgreSQL's integer with a CHECK >= 0 (SQLite has the CHECK too).
_MAX_STORED_COUNT = 2**31 - 1
_FINISH_REASON_LENGTH = Message._meta.get_field("finish_reason").max_length


def _stored_count(value) -> int | None:
    """A count or a duration as the column can hold it; None for what it cannot."""
    if isinstance(value, float) and value.is_integer():  # some servers send 12.0
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_STORED_COUNT:
        return value
    return None


def _final_fields(*, content: str, status: str, finish_reason: str = "", **fields) -> dict:
    """The end of a reply as every backend stores it. The finish reason and the
    usage come from the model server as it sent them: a NUL, a 40-character
    reason or a negative count was refused by PostgreSQL, and the final save of
    such a reply failed on every retry and every sweep, the row left streaming."""
    return {
        "content": clean_text(content),
        "status": status,
        "finish_reason": clean_text(finish_reason or "")[:_FINISH_REASON_LENGTH],
        "prompt_tokens": _stored_count(fields.get("prompt_tokens")),
        "completion_tokens": _stored_count(fields.get("completion_tokens")),
        "ttft_ms": _stored_count(fields.get("ttft_ms")),
        "duration_ms": _stored_count(fields.get("duration_ms")),
        "error": clean_text(fields.get("error") or ""),
        "updated": timezone.now(),
    }


def replies_touch(*, ids) -> None:
    """Mark running replies alive in their rows: only while this process cannot
    write its journal (replies.sweep_once), so no other process sweeps them."""
    Message.objects.filter(pk__in=list(ids), status=Message.Status.STREAMING).update(
        updated=timezone.now()
    )


REPLY_KILLED = "The server stopped before this reply finished."


def replies_sweep(*, older_than: timedelta | None = None, exclude_ids=()) -> int:
    """Mark streaming rows nobody is generating any more `interrupted`.

    1. Workers that died (chat.journal: their lock is free): their rows get the
       journalled text (and the journalled end of a failed final save).
    2. Rows in no worker's journal (dead workers' included: theirs are step 1's,
       also when one dies meanwhile) that have not changed for `older_than`
       (CHAT_STALE_SECONDS, from the row's insert or a touch): a worker that
       died before its first journal write, or a server of an older version.
       `exclude_ids` (the caller's own replies) are kept.

    Its file work runs on the database thread: a directory listing, and reading
    logs only when a worker died or stale rows need checking.
    """
    root = journal.journal_root()
    swept = 0
    dead_workers = journal.claim_dead(root)
    try:
        while dead_workers:
            swept += _replies_recover(dead_workers[0])
            dead_workers.pop(0).remove()
    finally:
        for dead in dead_workers:  # not stored: the next sweep tries again
            dead.release()
    if older_than is None:
        older_than = timedelta(seconds=settings.CHAT_STALE_SECONDS)
    stale = Message.objects.streaming().filter(updated__lt=timezone.now() - older_than)
    candidates = set(stale.exclude(pk__in=list(exclude_ids)).values_list("pk", flat=True))
    if candidates:
        candidates -= journal.live_ids(root)
    if not candidates:
        return swept
    return swept + stale.filter(pk__in=list(candidates)).update(
        status=Message.Status.INTERRUPTED, error=REPLY_KILLED, updated=timezone.now()
    )


def _replies_recover(dead: journal.DeadWorker) -> int:
    """Store a dead worker's journalled replies in their rows. A reply whose
    final save had failed gets the end it had (its status, usage, timings);
    the others end `interrupted`. Rows that have ended meanwhile keep theirs."""
    recovered = 0
    streaming = {"status": Message.Status.STREAMING}
    with transaction.atomic():
        for message_id, text in dead.texts.items():
            final = dead.finals.get(message_id)
            if final is not None:
                fields = _final_fields(content=text, **final)
            else:
                fields = {
                    "status": Message.Status.INTERRUPTED,
                    "error": REPLY_KILLED,
                    "updated": timezone.now(),
                }
                if text:
                    fields["content"] = clean_text(text)
            recovered += _row_update(Message, message_id, fields, only_if=streaming)
    return recovered


def api_key_hash(raw_key: str) -> str:
    # Keys are 256 random bits, so a fast hash is enough: nothing to brute-force.
    return hashlib.sha256(raw_key.encode()).hexdigest()


def api_key_create(*, owner, name: str) -> tuple[ApiKey, str]:
    """A new key for `owner`; the raw key is returned once and never stored."""
    raw_key = ApiKey.PREFIX + secrets.token_urlsafe(32)
    key = ApiKey.objects.create(
        owner=owner,
        name=clean_text(name).strip()[:100] or "default",
        hint=raw_key[:10],
        hashed=api_key_hash(raw_key),
    )
    return key, raw_key


def api_key_authenticate(raw_key: str) -> ApiKey | None:
    """The active key matching `raw_key` (its owner as owner_id only), or None."""
    now = timezone.now()
    # Raw SQL: this runs on every API request (see check_reply_quota).
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT k.id, k.name, k.owner_id, (k.last_used IS NULL OR k.last_used < %s) "
            f"FROM {ApiKey._meta.db_table} k "
            f"JOIN {get_user_model()._meta.db_table} u ON u.id = k.owner_id "
            "WHERE k.hashed = %s AND k.revoked IS NULL AND u.is_active",
            [
                connection.ops.adapt_datetimefield_value(now - timedelta(seconds=60)),
                api_key_hash(raw_key),
            ],
        )
        row = cursor.fetchone()
    if row is None:
        return None
    key_id, name, owner_id, last_used_stale = row
    if last_used_stale:
        # At most one write a minute per key, not one per request.
        ApiKey.objects.filter(pk=key_id).update(last_used=now)
    return ApiKey(id=key_id, name=name, owner_id=owner_id)


def api_key_revoke(*, key: ApiKey) -> None:
    ApiKey.objects.filter(pk=key.pk, revoked=None).update(revoked=timezone.now())


# The chat page: the visible path and its versions, sidebar actions, settings,
# titles, exports.

THREAD_PAGE_SIZE = 50


@dataclass
class Thread:
    """A page of the path the user is looking at, oldest first.

    Each message carries `version_index` / `version_count` (its place among
    its siblings, 1-based) and `previous_version_id` / `next_version_id`.
    """

    messages: list[Message]
    has_older: bool
    last_id: int | None


def _message_tree(conversation: Conversation) -> tuple[dict[int, int | None], dict]:
    """Parent of every message and the children of every message (and of None), by id."""
    parents: dict[int, int | None] = {}
    children: dict[int | None, list[int]] = defaultdict(list)
    for pk, parent_id in conversation.messages.order_by("id").values_list("id", "parent_id"):
        parents[pk] = parent_id
        children[parent_id].append(pk)
    return parents, children


def conversation_thread(
    conversation: Conversation, *, before: int | None = None, limit: int = THREAD_PAGE_SIZE
) -> Thread:
    """The latest `limit` messages of the current path, or those just before `before`.

    Reads two id columns of the whole tree and the full rows of one page only,
    so a conversation of thousands of messages opens as fast as a short one.
    """
    parents, children = _message_tree(conversation)
    leaf = conversation.current_leaf_id
    if leaf not in parents:
        leaf = max(parents, default=None)
    path: list[int] = []
    while leaf is not None:
        path.append(leaf)
        leaf = parents[leaf]
    path.reverse()
    end = len(path)
    if before is not None:
        end = path.index(before) if before in path else 0
    start = max(0, end - limit)
    page_ids = path[start:end]
    rows = Message.objects.in_bulk(page_ids)
    messages = [rows[pk] for pk in page_ids]
    for message in messages:
        siblings = children[message.parent_id]
        index = siblings.index(message.pk)
        message.version_index = index + 1
        message.version_count = len(siblings)
        message.previous_version_id = siblings[index - 1] if index > 0 else None
        message.next_version_id = siblings[index + 1] if index + 1 < len(siblings) else None
    return Thread(messages=messages, has_older=start > 0, last_id=path[-1] if path else None)


def message_version_select(*, conversation: Conversation, message: Message) -> int:
    """Show `message`'s branch: the current leaf becomes the newest message below it."""
    _, children = _message_tree(conversation)
    newest, stack = message.pk, [message.pk]
    while stack:
        node = stack.pop()
        newest = max(newest, node)  # ids grow with time, so the newest is a leaf
        stack.extend(children.get(node, ()))
    # A view change, not an edit: `updated` (the sidebar order) stays.
    Conversation.objects.filter(pk=conversation.pk).update(current_leaf_id=newest)
    conversation.current_leaf_id = newest
    return newest


def conversation_rename(*, conversation: Conversation, title: str) -> str:
    """The user's own title; automatic titles never replace it afterwards."""
    title = " ".join(clean_text(title).split())[:200]
    if not title:
        raise InputError("The title is empty.")
    Conversation.objects.filter(pk=conversation.pk).update(title=title, title_locked=True)
    conversation.title, conversation.title_locked = title, True
    return title


def conversation_archive(*, conversation: Conversation, archived: bool) -> None:
    Conversation.objects.filter(pk=conversation.pk).update(archived=archived)
    conversation.archived = archived


def conversation_delete(*, conversation: Conversation) -> list[int]:
    """Delete the conversation and all its messages; returns the ids of replies still running."""
    running = list(conversation.messages.streaming().values_list("id", flat=True))
    conversation.delete()
    return running


def _optional_number(raw: str, kind: type, name: str, low, high):
    raw = (raw or "").strip()
    if not raw:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise InputError(f"{name} must be a number.") from None
    if not low <= value <= high:
        raise InputError(f"{name} must be between {low} and {high}.")
    return value


def conversation_settings_parse(data) -> dict:
    """The generation settings from a form, validated.

    A field the form leaves out takes the site's default (CHAT_DEFAULT_*); an
    empty one means the model's own default (or no system prompt).
    """
    system_prompt = data.get("system_prompt", settings.CHAT_DEFAULT_SYSTEM_PROMPT)
    system_prompt = _typed_text(system_prompt)
    if len(system_prompt) > settings.CHAT_MAX_MESSAGE_CHARS:
        raise InputError("The system prompt is too long.", status=413)
    temperature = data.get("temperature", settings.CHAT_DEFAULT_TEMPERATURE)
    return {
        "system_prompt": system_prompt,
        "temperature": _optional_number(temperature, float, "Temperature", 0.0, 2.0),
        "max_tokens": _optional_number(
            data.get("max_tokens"), int, "Maximum reply length", 1, settings.CHAT_MAX_TOKENS
        ),
    }


def conversation_settings_update(*, conversation: Conversation, **fields) -> None:
    """Store the fields conversation_settings_parse() returned."""
    Conversation.objects.filter(pk=conversation.pk).update(**fields)
    for name, value in fields.items():
        setattr(conversation, name, value)


TITLE_PROMPT = (
    "Write a short title, at most six words, for a conversation that begins with the "
    "user's message below. Reply with the title only: no quotes, no punctuation at the end."
)


TITLE_CHARS = 80


def _title_cut(title: str, more: bool = False) -> str:
    """At most TITLE_CHARS, cut between words with an ellipsis (`more`: words were left out)."""
    if len(title) > TITLE_CHARS:
        title = title[: TITLE_CHARS - 1]
        title = title.rsplit(" ", 1)[0] if " " in title else title
        more = True
    return title.rstrip(" ,;:.") + "…" if more else title


def title_fallback(first_message: str) -> str:
    """The first words of the message, when the model gives no usable title."""
    words = " ".join(clean_text(first_message).split()).split(" ")
    return _title_cut(" ".join(words[:8]), more=len(words) > 8)


def title_clean(text: str) -> str:
    line = next((line for line in text.strip().splitlines() if line.strip()), "")
    line = re.sub(r"^\s*title\s*:\s*", "", line, flags=re.IGNORECASE)
    # Models like to dress titles up: quotes, bold, code, a final full stop. A
    # title is plain text wherever it shows (sidebar, tab, admin).
    line = re.sub(r"(\*{1,2}|`+)(\S(?:.*?\S)?)\1", r"\2", clean_text(line))
    line = " ".join(line.split()).strip("\"'“”‘’#_ .")
    return _title_cut(line)


async def title_suggest(
    *, provider: Provider, model: str, first_message: str, timeout: float = 30
) -> str:
    """Ask the conversation's model for a title; "" when it gives none."""
    messages = [ChatMessage("system", TITLE_PROMPT), ChatMessage("user", first_message[:2000])]
    params = GenerationParams(model=model, max_tokens=24, temperature=0.2)
    parts: list[str] = []
    stream = provider.stream(messages, params)
    try:
        async with asyncio.timeout(timeout):
            async for delta in stream:
                parts.append(delta.text)
    finally:
        await stream.aclose()
    return title_clean("".join(parts))


def conversation_title_auto(*, conversation_id: int, title: str) -> bool:
    """Set an automatic title, unless the user has named the conversation."""
    title = title_clean(title)
    if not title:
        return False
    # `update()` leaves `updated` alone: a title is no new activity.
    return bool(
        Conversation.objects.filter(pk=conversation_id, title_locked=False).update(title=title)
    )


def preference_theme_set(*, user, theme: str) -> str:
    if theme not in Preference.Theme.values:
        raise InputError("Unknown theme.")
    Preference.objects.update_or_create(user=user, defaults={"theme": theme})
    return theme


def preference_theme(user) -> str:
    theme = Preference.objects.filter(user=user).values_list("theme", flat=True).first()
    return theme or Preference.Theme.SYSTEM


# What can begin raw HTML in CommonMark: a tag, closing tag, comment, declaration,
# processing instruction or CDATA, and the autolinks `<scheme:...>`.
_HTML_START = re.compile(r"<(?=[A-Za-z/!?])")


def markdown_escape_html(text: str) -> str:
    """Make `text` safe to hand to any Markdown renderer: no raw HTML survives.

    Every `<` that could open HTML becomes `&lt;`, wherever it stands, code
    blocks and spans included. Deciding what is code depends on the renderer
    (fences indented inside list items, spans across lines or table cells) and
    one message's unclosed fence would run into the next: a first version that
    kept fenced code as it was could be made, by such a mismatch, to keep an
    `<img onerror>` live. Showing `&lt;` in code is the safe mistake. A `<`
    before a space, digit or `=` (`a < b`, `<3`, `<=`) opens nothing and stays.
    """
    return _HTML_START.sub("&lt;", text)


def message_text(message: Message) -> str:
    """What a message says now. A running reply's row holds no text until its final
    save; its text so far is in its worker's journal. If the journal has none, the
    reply may have just ended: the message is then read again, whole (status, end
    fields and text), so what is shown stays consistent."""
    if message.status != Message.Status.STREAMING:
        return message.content
    text = journal.text_so_far(message.pk)
    if not text:
        try:
            message.refresh_from_db()
        except Message.DoesNotExist:
            return ""
        text = message.content
    return text


def conversation_export_markdown(conversation: Conversation) -> str:
    """The path the user is looking at, as Markdown with no live HTML in it."""
    title = markdown_escape_html(" ".join(conversation.display_title.split()))
    parts = [f"# {title}", "", f"Model: {markdown_escape_html(conversation.model)}"]
    if conversation.system_prompt:
        prompt = markdown_escape_html(conversation.system_prompt)
        parts += ["", "## System prompt", "", prompt]
    for message in conversation_path(conversation):
        heading = "User" if message.role == Message.Role.USER else message.role.capitalize()
        parts += ["", f"## {heading}", "", markdown_escape_html(message_text(message))]
        if message.status != Message.Status.COMPLETE:  # streaming: still being written
            parts += ["", f"*({message.status})*"]
    return "\n".join(parts) + "\n"


MESSAGE_EXPORT_FIELDS = [
    "id",
    "parent_id",
    "role",
    "content",
    "status",
    "model",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "ttft_ms",
    "duration_ms",
    "error",
]


def conversation_export_data(conversation: Conversation) -> dict:
    """Everything about the conversation, every version of every message included."""
    messages = []
    for m in conversation.messages.order_by("id"):
        content = message_text(m)  # first: a reply that just ended updates its status
        messages.append(
            {
                **{name: getattr(m, name) for name in MESSAGE_EXPORT_FIELDS},
                "content": content,
                "created": m.created.isoformat(),
                "updated": m.updated.isoformat(),
            }
        )
    return {
        "id": conversation.pk,
        "title": conversation.title,
        "model": conversation.model,
        "system_prompt": conversation.system_prompt,
        "temperature": conversation.temperature,
        "max_tokens": conversation.max_tokens,
        "archived": conversation.archived,
        "created": conversation.created.isoformat(),
        "updated": conversation.updated.isoformat(),
        "current_path": [m.pk for m in conversation_path(conversation)],
        "messages": messages,
    }
