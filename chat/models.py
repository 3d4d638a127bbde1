from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class ConversationQuerySet(models.QuerySet):
    def owned_by(self, user) -> ConversationQuerySet:
        return self.filter(owner=user)

    def for_sidebar(self, user, query: str = "", archived: bool = False) -> ConversationQuerySet:
        qs = self.owned_by(user).filter(archived=archived)
        if query:
            qs = qs.filter(
                Q(title__icontains=query) | Q(messages__content__icontains=query)
            ).distinct()
        return qs.order_by("-updated", "-id")

    def by_day(self, now: datetime | None = None) -> list[tuple[str, list[Conversation]]]:
        """The conversations in groups by last activity, in the site's time zone."""
        today = timezone.localdate(now)
        groups: dict[str, list[Conversation]] = {}
        for conversation in self:
            age = (today - timezone.localdate(conversation.updated)).days
            if age <= 0:
                label = "Today"
            elif age == 1:
                label = "Yesterday"
            elif age < 7:
                label = "Previous 7 days"
            elif age < 30:
                label = "Previous 30 days"
            else:
                label = "Older"
            groups.setdefault(label, []).append(conversation)
        return list(groups.items())


class Conversation(models.Model):
    class Source(models.TextChoices):
        WEB = "web", "Browser"
        API = "api", "API"

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    title = models.CharField(max_length=200, blank=True)
    # Set once the user names the conversation: automatic titles never overwrite it.
    title_locked = models.BooleanField(default=False)
    model = models.CharField(max_length=200)
    system_prompt = models.TextField(blank=True)
    temperature = models.FloatField(null=True, blank=True)
    max_tokens = models.PositiveIntegerField(null=True, blank=True)
    source = models.CharField(max_length=8, choices=Source.choices, default=Source.WEB)
    api_key_name = models.CharField(max_length=100, blank=True)
    archived = models.BooleanField(default=False)
    # The last message of the path the user is looking at; replies and edits
    # branch from earlier messages, so the conversation is a tree.
    current_leaf = models.ForeignKey(
        "Message", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created = models.DateTimeField(auto_now_add=True, db_index=True)
    updated = models.DateTimeField(auto_now=True)

    objects = ConversationQuerySet.as_manager()

    class Meta:
        indexes = [models.Index(fields=["owner", "archived", "-updated"])]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.pk}"

    @property
    def display_title(self) -> str:
        return self.title or "New chat"


class MessageQuerySet(models.QuerySet):
    def owned_by(self, user) -> MessageQuerySet:
        return self.filter(conversation__owner=user)

    def streaming(self) -> MessageQuerySet:
        return self.filter(status=Message.Status.STREAMING)


class Message(models.Model):
    class Role(models.TextChoices):
        SYSTEM = "system"
        USER = "user"
        ASSISTANT = "assistant"

    class Status(models.TextChoices):
        STREAMING = "streaming"
        COMPLETE = "complete"
        STOPPED = "stopped"
        INTERRUPTED = "interrupted"
        ERROR = "error"

    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    # The message this one answers or follows. Siblings (same parent) are
    # versions: a regenerated reply, an edited prompt.
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="children"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.COMPLETE, db_index=True
    )
    model = models.CharField(max_length=200, blank=True, db_index=True)
    finish_reason = models.CharField(max_length=32, blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    ttft_ms = models.PositiveIntegerField("time to first token (ms)", null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    created = models.DateTimeField(auto_now_add=True, db_index=True)
    updated = models.DateTimeField(auto_now=True)

    objects = MessageQuerySet.as_manager()

    class Meta:
        ordering = ["created", "id"]
        indexes = [
            models.Index(fields=["conversation", "id"]),
            # The replies running now, whatever the history's size: the quota check
            # before every reply counts a user's, the sweeper looks for stale ones.
            # PostgreSQL otherwise walked all of the user's conversations while its
            # statistics were stale (4.7 ms at 440 rows), and the index it replaces,
            # (status, updated), took a new entry at every checkpoint.
            models.Index(
                fields=["conversation"],
                condition=models.Q(status="streaming"),
                name="chat_message_streaming",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.role} #{self.pk}"

    @property
    def is_finished(self) -> bool:
        return self.status != self.Status.STREAMING

    @property
    def total_tokens(self) -> int | None:
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)


class Preference(models.Model):
    """Per-user settings of the chat page."""

    class Theme(models.TextChoices):
        SYSTEM = "system", "Follow the system"
        LIGHT = "light"
        DARK = "dark"

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_preference"
    )
    theme = models.CharField(max_length=8, choices=Theme.choices, default=Theme.SYSTEM)

    def __str__(self) -> str:
        return f"Preferences of {self.user}"


class SiteOwner(models.Model):
    """Exactly one row, claimed by the first account ever created.

    The fixed primary key makes the claim a unique insert, so two sign-ups at
    the same instant cannot both become the superuser, on any database.
    """

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    claimed = models.DateTimeField(auto_now_add=True)


class ApiKeyQuerySet(models.QuerySet):
    def active(self) -> ApiKeyQuerySet:
        return self.filter(revoked=None)


class ApiKey(models.Model):
    """A user's key for the OpenAI-compatible API. Only a hash of the key is stored."""

    PREFIX = "cs-"

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(max_length=100)
    # The first characters, to tell keys apart in lists; not enough to use one.
    hint = models.CharField(max_length=16)
    hashed = models.CharField(max_length=64, unique=True)
    created = models.DateTimeField(auto_now_add=True)
    last_used = models.DateTimeField(null=True, blank=True)
    revoked = models.DateTimeField(null=True, blank=True)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.hint}…)"
