"""Django admin: review every conversation and reply; filter, search, export."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator

from django.contrib import admin
from django.db.models import Count, F, Q, QuerySet, Sum
from django.db.models.functions import Coalesce
from django.http import HttpResponse
from django.utils import timezone
from django.utils.text import Truncator

from .accounts import ThrottledAdminAuthenticationForm
from .models import Conversation, Message, Preference
from .services import message_text

admin.site.login_form = ThrottledAdminAuthenticationForm
admin.site.site_header = "chatsite administration"

EXPORT_FIELDS = [
    "id",
    "conversation_id",
    "owner",
    "conversation_title",
    "role",
    "model",
    "status",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "ttft_ms",
    "duration_ms",
    "error",
    "created",
    "content",
]


def export_rows(messages: QuerySet[Message]) -> Iterator[dict]:
    for m in messages.select_related("conversation__owner").order_by("conversation_id", "id"):
        content = message_text(m)  # first: a reply that just ended updates its status
        yield {
            "id": m.pk,
            "conversation_id": m.conversation_id,
            "owner": m.conversation.owner.get_username(),
            "conversation_title": m.conversation.title,
            "role": m.role,
            "model": m.model,
            "status": m.status,
            "finish_reason": m.finish_reason,
            "prompt_tokens": m.prompt_tokens,
            "completion_tokens": m.completion_tokens,
            "ttft_ms": m.ttft_ms,
            "duration_ms": m.duration_ms,
            "error": m.error,
            "created": m.created.isoformat(),
            "content": content,
        }


def _csv_safe(value):
    # A cell starting with = + - @ is a formula in spreadsheets (CSV injection).
    if isinstance(value, str) and value[:1] in {"=", "+", "-", "@", "\t", "\r"}:
        return "'" + value
    return value


def jsonl_response(rows: Iterable[dict], name: str) -> HttpResponse:
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    response = HttpResponse(body, content_type="application/x-ndjson; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{name}.jsonl"'
    return response


def csv_response(rows: Iterable[dict], name: str) -> HttpResponse:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EXPORT_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_safe(value) for key, value in row.items()})
    response = HttpResponse(buffer.getvalue(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{name}.csv"'
    return response


def _export_name(kind: str) -> str:
    return f"chatsite-{kind}-{timezone.now():%Y%m%d-%H%M%S}"


class ReadOnlyAdmin(admin.ModelAdmin):
    """Conversations are the users' records: admins review them, never rewrite them."""

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


def _short(text: str, chars: int) -> str:
    """One line of `text`, cut at a word with an ellipsis: list columns stay narrow."""
    return Truncator(" ".join(text.split())).chars(chars)


class MessageInline(admin.TabularInline):
    model = Message
    fields = [
        "id",
        "role",
        "status",
        "model",
        "short_content",
        "error",
        "completion_tokens",
        "ttft_ms",
        "duration_ms",
        "created",
    ]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True
    ordering = ["id"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="content")
    def short_content(self, obj: Message) -> str:
        return _short(message_text(obj), 200)


@admin.register(Conversation)
class ConversationAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "short_title",
        "owner",
        "model",
        "source",
        "api_key_name",
        "message_count",
        "tokens",
        "errors",
        "archived",
        "created",
        "updated",
    ]
    ordering = ["-updated", "-id"]  # the latest activity first
    list_filter = [
        "model",
        "source",
        "archived",
        "title_locked",
        "created",
        ("owner", admin.RelatedOnlyFieldListFilter),
    ]
    search_fields = ["title", "owner__username", "api_key_name", "messages__content"]
    date_hierarchy = "created"
    list_select_related = ["owner"]
    inlines = [MessageInline]
    actions = ["export_jsonl", "export_csv"]
    exclude = ["current_leaf"]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                message_count=Count("messages"),
                token_count=Coalesce(
                    Sum(
                        Coalesce(F("messages__prompt_tokens"), 0)
                        + Coalesce(F("messages__completion_tokens"), 0)
                    ),
                    0,
                ),
                error_count=Count("messages", filter=Q(messages__status=Message.Status.ERROR)),
            )
        )

    @admin.display(description="title", ordering="title")
    def short_title(self, obj) -> str:
        return _short(obj.display_title, 60)

    @admin.display(description="messages", ordering="message_count")
    def message_count(self, obj) -> int:
        return obj.message_count

    @admin.display(description="tokens (prompt + completion)", ordering="token_count")
    def tokens(self, obj) -> int:
        return obj.token_count

    @admin.display(description="failed replies", ordering="error_count")
    def errors(self, obj) -> int:
        return obj.error_count

    @admin.action(description="Export messages of selected conversations as JSONL")
    def export_jsonl(self, request, queryset):
        messages = Message.objects.filter(conversation__in=queryset)
        return jsonl_response(export_rows(messages), _export_name("conversations"))

    @admin.action(description="Export messages of selected conversations as CSV")
    def export_csv(self, request, queryset):
        messages = Message.objects.filter(conversation__in=queryset)
        return csv_response(export_rows(messages), _export_name("conversations"))


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "owner",
        "role",
        "model",
        "status",
        "prompt_tokens",
        "completion_tokens",
        "ttft_ms",
        "duration_ms",
        "created",
        "preview",
        "short_error",
        "conversation_title",
    ]
    ordering = ["-created", "-id"]  # the newest first
    list_filter = [
        "status",
        "role",
        "model",
        "finish_reason",
        "created",
        ("conversation__owner", admin.RelatedOnlyFieldListFilter),
    ]
    search_fields = ["content", "error", "conversation__title", "conversation__owner__username"]
    date_hierarchy = "created"
    list_select_related = ["conversation__owner"]
    actions = ["export_jsonl", "export_csv"]
    fields = [
        "conversation",
        "parent",
        "role",
        "status",
        "model",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "ttft_ms",
        "duration_ms",
        "error",
        "created",
        "updated",
        "content",
        "text_so_far",
    ]

    @admin.display(description="text so far (running reply)")
    def text_so_far(self, obj: Message) -> str:
        return message_text(obj) if obj.status == Message.Status.STREAMING else "–"

    @admin.display(ordering="conversation__owner__username")
    def owner(self, obj: Message):
        return obj.conversation.owner

    @admin.display(description="content")
    def preview(self, obj: Message) -> str:
        return _short(message_text(obj), 80)

    @admin.display(description="error", ordering="error")
    def short_error(self, obj: Message) -> str:
        return _short(obj.error, 80)

    @admin.display(description="conversation", ordering="conversation__title")
    def conversation_title(self, obj: Message) -> str:
        return _short(obj.conversation.display_title, 40)

    @admin.action(description="Export selected messages as JSONL")
    def export_jsonl(self, request, queryset):
        return jsonl_response(export_rows(queryset), _export_name("messages"))

    @admin.action(description="Export selected messages as CSV")
    def export_csv(self, request, queryset):
        return csv_response(export_rows(queryset), _export_name("messages"))


@admin.register(Preference)
class PreferenceAdmin(admin.ModelAdmin):
    list_display = ["user", "theme"]
    list_filter = ["theme"]
    search_fields = ["user__username"]
