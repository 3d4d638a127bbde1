"""Writes: every change to conversations and messages goes through here."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, OperationalError, transaction
from django.utils import timezone

from .llm import ChatMessage
from .models import ApiKey, Conversation, Message, SiteOwner
from .text import clean_text

log = logging.getLogger(__name__)


class SignupClosed(Exception):
    pass


class InputError(ValueError):
    """Bad input from the user; the message is shown to them as it is."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def user_signup(*, username: str, password: str, email: str = ""):
    """Create an account under the sign-up policy.

    The first account of a fresh site becomes the superuser; exactly one does,
    even when two sign up at once (the SiteOwner insert is the arbiter).
    """
    User = get_user_model()
    mode = settings.SIGNUP_MODE
    with transaction.atomic():
        site_has_owner = SiteOwner.objects.exists()
        if site_has_owner and mode not in {"open", "approval"}:
            raise SignupClosed
        user = User.objects.create_user(
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


def validate_message_content(content: str) -> str:
    content = clean_text(content).strip()
    if not content:
        raise InputError("The message is empty.")
    if len(content) > settings.CHAT_MAX_MESSAGE_CHARS:
        raise InputError(
            f"The message is too long ({len(content):,} characters; "
            f"the limit is {settings.CHAT_MAX_MESSAGE_CHARS:,}).",
            status=413,
        )
    return content


def check_reply_quota(owner) -> None:
    """Refuse a new reply while the user already has too many running."""
    running = Message.objects.owned_by(owner).streaming().count()
    if running >= settings.CHAT_MAX_CONCURRENT_REPLIES:
        raise InputError(
            f"You already have {running} replies generating; wait for one to finish.",
            status=429,
        )


def message_send(
    *, conversation: Conversation, content: str, model: str, parent: Message | None = None
) -> tuple[Message, Message]:
    """Save the user's message and an empty streaming assistant row, atomically.

    Both rows are committed before any upstream call. The new message follows
    the conversation's current leaf unless `parent` is given (an edit). The
    conversation row is locked so two tabs sending at once get a well-defined
    order: the second message follows the first one's reply.
    """
    content = validate_message_content(content)
    check_reply_quota(conversation.owner)
    with transaction.atomic():
        locked = Conversation.objects.select_for_update().get(pk=conversation.pk)
        if parent is None:
            parent = locked.current_leaf
        user_message = Message.objects.create(
            conversation=locked,
            parent=parent,
            role=Message.Role.USER,
            content=content,
        )
        assistant = Message.objects.create(
            conversation=locked,
            parent=user_message,
            role=Message.Role.ASSISTANT,
            status=Message.Status.STREAMING,
            model=model,
        )
        locked.current_leaf = assistant
        locked.model = model
        locked.save(update_fields=["current_leaf", "model", "updated"])
    conversation.current_leaf = assistant
    conversation.model = model
    return user_message, assistant


def api_conversation_create(
    *,
    key: ApiKey,
    model: str,
    messages: list[tuple[str, str]],
    max_tokens: int | None,
    temperature: float | None,
) -> tuple[Conversation, Message]:
    """Store one API call as a conversation: its messages, then a streaming reply row."""
    check_reply_quota(key.owner)
    system = "\n\n".join(clean_text(content) for role, content in messages if role == "system")
    turns = [(role, clean_text(content)) for role, content in messages if role != "system"]
    first_user = next((content for role, content in turns if role == "user"), "")
    with transaction.atomic():
        conversation = Conversation.objects.create(
            owner=key.owner,
            model=model,
            title=first_user.strip()[:80],
            system_prompt=system,
            source=Conversation.Source.API,
            api_key_name=key.name,
            max_tokens=max_tokens,
            temperature=temperature,
        )
        parent = None
        for role, content in turns:
            parent = Message.objects.create(
                conversation=conversation, parent=parent, role=role, content=content
            )
        assistant = Message.objects.create(
            conversation=conversation,
            parent=parent,
            role=Message.Role.ASSISTANT,
            status=Message.Status.STREAMING,
            model=model,
        )
        conversation.current_leaf = assistant
        conversation.save(update_fields=["current_leaf"])
    return conversation, assistant


def reply_regenerate(*, conversation: Conversation, reply: Message, model: str) -> Message:
    """A new version of an assistant reply, as a sibling of `reply`."""
    check_reply_quota(conversation.owner)
    with transaction.atomic():
        locked = Conversation.objects.select_for_update().get(pk=conversation.pk)
        assistant = Message.objects.create(
            conversation=locked,
            parent=reply.parent,
            role=Message.Role.ASSISTANT,
            status=Message.Status.STREAMING,
            model=model,
        )
        locked.current_leaf = assistant
        locked.model = model
        locked.save(update_fields=["current_leaf", "model", "updated"])
    return assistant


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

    Trimming policy when the path is longer than the context budget: keep the
    system prompt and the newest messages that fit, dropping the oldest first;
    the user's latest message is always kept (cut to the budget if alone it is
    too long). Failed and empty replies are left out.
    """
    budget = context_chars or settings.CHAT_CONTEXT_CHARS
    path = conversation_path(conversation, reply)[:-1]
    turns = [
        ChatMessage(m.role, m.content)
        for m in path
        if m.content and not (m.role == Message.Role.ASSISTANT and m.status == Message.Status.ERROR)
    ]
    system = (
        [ChatMessage("system", conversation.system_prompt)] if conversation.system_prompt else []
    )
    budget -= sum(len(m.content) for m in system)
    kept: list[ChatMessage] = []
    for turn in reversed(turns):
        if kept and len(turn.content) > budget:
            break
        if not kept and len(turn.content) > budget:
            turn = ChatMessage(turn.role, turn.content[-max(budget, 1000) :])
        kept.append(turn)
        budget -= len(turn.content)
    kept.reverse()
    return system + kept


def reply_checkpoint(*, message_id: int, content: str) -> None:
    """Store the text so far of a running reply (one UPDATE, about once a second)."""
    Message.objects.filter(pk=message_id, status=Message.Status.STREAMING).update(
        content=clean_text(content), updated=timezone.now()
    )


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
    fields = {
        "content": clean_text(content),
        "status": status,
        "finish_reason": finish_reason or "",
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "ttft_ms": ttft_ms,
        "duration_ms": duration_ms,
        "error": error,
        "updated": timezone.now(),
    }
    for attempt in range(attempts):
        try:
            Message.objects.filter(pk=message_id).update(**fields)
            return
        except OperationalError:
            if attempt == attempts - 1:
                raise
            log.warning("database busy saving reply %s; retrying", message_id)
            time.sleep(0.2 * 2**attempt)


def replies_touch(*, ids: list[int]) -> None:
    """Mark running replies alive, so no other process sweeps them."""
    Message.objects.filter(pk__in=ids, status=Message.Status.STREAMING).update(
        updated=timezone.now()
    )


def replies_sweep(*, older_than: timedelta | None = None, exclude_ids=()) -> int:
    """Mark streaming rows nobody is generating any more as `interrupted`.

    A running reply touches its row at least every CHAT_STALE_SECONDS / 3, so
    a row older than that belongs to a process that died.
    """
    if older_than is None:
        older_than = timedelta(seconds=settings.CHAT_STALE_SECONDS)
    stale = Message.objects.streaming().filter(updated__lt=timezone.now() - older_than)
    return stale.exclude(pk__in=list(exclude_ids)).update(
        status=Message.Status.INTERRUPTED,
        error="The server stopped before this reply finished.",
        updated=timezone.now(),
    )


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


def api_key_revoke(*, key: ApiKey) -> None:
    ApiKey.objects.filter(pk=key.pk, revoked=None).update(revoked=timezone.now())
