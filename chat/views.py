"""Chat pages and the streaming endpoints. Thin: parse, call a service, render or stream."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect

from . import llm, replies, services
from .db import run_db
from .models import ApiKey, Conversation, Message
from .streaming import reply_sse, sse_response

log = logging.getLogger(__name__)


async def _owned_conversation(request: HttpRequest, pk: int) -> Conversation:
    """The user's conversation or 404: another user's id looks like a missing one."""
    user = await request.auser()
    conversation = (
        await Conversation.objects.owned_by(user)
        .select_related("current_leaf")
        .filter(pk=pk)
        .afirst()
    )
    if conversation is None:
        raise Http404("No such conversation.")
    return conversation


async def _owned_message(request: HttpRequest, pk: int, message_id: int) -> Message:
    conversation = await _owned_conversation(request, pk)
    message = await conversation.messages.filter(pk=message_id).afirst()
    if message is None:
        raise Http404("No such message.")
    message.conversation = conversation
    return message


async def _requested_model(request: HttpRequest, conversation: Conversation):
    """The model the page picked, else the conversation's; None if not offered."""
    return await llm.resolve(request.POST.get("model", "").strip() or conversation.model)


def _error(message: str, status: int) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


def _current_conversation_id(request: HttpRequest) -> int | None:
    """The conversation open in the page that sent an htmx request, if any."""
    match = re.fullmatch(r"/c/(\d+)/", request.htmx.current_url_abs_path or "")
    return int(match.group(1)) if match else None


async def _sidebar_context(request: HttpRequest, conversation: Conversation | None) -> dict:
    user = await request.auser()
    query = request.GET.get("q", "").strip()
    archived = request.GET.get("archived") == "1"
    sidebar = Conversation.objects.for_sidebar(user, query, archived=archived)[:200]
    current_id = conversation.pk if conversation else _current_conversation_id(request)
    return {
        "groups": await run_db(sidebar.by_day),
        "current_id": current_id,
        "query": query,
        "archived_view": archived,
    }


async def _page_context(request: HttpRequest, conversation: Conversation | None) -> dict:
    user = await request.auser()
    thread = None
    if conversation is not None:
        thread = await run_db(services.conversation_thread, conversation)
    models = await llm.available_models()
    selected = conversation.model if conversation else await llm.default_model()
    return {
        **await _sidebar_context(request, conversation),
        "conversation": conversation,
        "thread": thread,
        "models": models,
        "selected_model": selected,
        "max_message_chars": settings.CHAT_MAX_MESSAGE_CHARS,
        "max_tokens_limit": settings.CHAT_MAX_TOKENS,
        "default_system_prompt": settings.CHAT_DEFAULT_SYSTEM_PROMPT,
        "default_temperature": settings.CHAT_DEFAULT_TEMPERATURE,
        "theme": await run_db(services.preference_theme, user),
    }


def _page_template(request: HttpRequest) -> str:
    # The sidebar search and the archived view swap only the conversation list.
    if request.htmx and request.htmx.target == "conversation-list":
        return "chat/_conversation_list.html"
    return "chat/chat.html"


@login_required
@require_GET
async def home(request: HttpRequest) -> HttpResponse:
    return TemplateResponse(request, _page_template(request), await _page_context(request, None))


@login_required
@require_GET
async def conversation_detail(request: HttpRequest, pk: int) -> HttpResponse:
    conversation = await _owned_conversation(request, pk)
    context = await _page_context(request, conversation)
    return TemplateResponse(request, _page_template(request), context)


@login_required
@require_POST
async def message_send(request: HttpRequest, pk: int | None = None) -> HttpResponse:
    """Save the user's message, start the reply and stream it back as SSE."""
    user = await request.auser()
    conversation = await _owned_conversation(request, pk) if pk is not None else None
    model_id = request.POST.get("model", "").strip() or (
        conversation.model if conversation else await llm.default_model()
    )
    model = await llm.resolve(model_id)
    if model is None:
        return _error(f"Unknown model: {model_id!r}.", 400)
    try:
        content = services.validate_message_content(request.POST.get("content", ""))
        if conversation is None:
            # A new chat takes the settings panel's values with its first message.
            conversation, user_message, assistant = await run_db(
                services.conversation_start,
                owner=user,
                model=model.id,
                content=content,
                chat_settings=services.conversation_settings_parse(request.POST),
            )
        else:
            user_message, assistant = await run_db(
                services.message_send, conversation=conversation, content=content, model=model.id
            )
    except services.InputError as exc:
        return _error(str(exc), exc.status)
    context = None
    if user_message.parent_id is None:  # a first message: the whole path, no need to read it
        turns = [llm.ChatMessage(user_message.role, user_message.content)]
        context = services.trim_context(conversation.system_prompt, turns, model.context_chars)
    # `parent`: what the message follows, so a page showing less (another tab
    # sent meanwhile) knows to show the conversation again.
    start = {"user_message": user_message.pk, "parent": user_message.parent_id}
    return await _start_reply(conversation, assistant, model, start, user_message, context)


@login_required
@require_POST
async def message_edit(request: HttpRequest, pk: int, message_id: int) -> HttpResponse:
    """Send a new version of a user message (the old one and its replies stay)."""
    message = await _owned_message(request, pk, message_id)
    conversation = message.conversation
    if message.role != Message.Role.USER:
        return _error("Only your own messages can be edited.", 400)
    model = await _requested_model(request, conversation)
    if model is None:
        return _error("That model is not available any more.", 400)
    try:
        user_message, assistant = await run_db(
            services.message_send,
            conversation=conversation,
            content=request.POST.get("content", ""),
            model=model.id,
            edit_of=message,
        )
    except services.InputError as exc:
        return _error(str(exc), exc.status)
    start = {"user_message": user_message.pk, "replaces": message.pk}
    return await _start_reply(conversation, assistant, model, start, user_message)


# Title tasks outlive their request; a reference keeps them from being collected.
_title_tasks: set[asyncio.Task] = set()


async def _title_after_reply(
    reply: replies.Reply, conversation_id: int, model: llm.ModelInfo, first_message: str
) -> None:
    """Name the conversation once its first reply is complete, without delaying it."""
    end = await reply.wait()
    if end.status != Message.Status.COMPLETE:
        return
    title = ""
    try:
        title = await services.title_suggest(
            provider=model.provider, model=model.id, first_message=first_message
        )
    except Exception as exc:  # any failure: the first words of the message stay
        log.info("no title for conversation %s: %r", conversation_id, exc)
    await run_db(
        services.conversation_title_auto,
        conversation_id=conversation_id,
        title=title or services.title_fallback(first_message),
    )


async def _start_reply(
    conversation: Conversation,
    assistant: Message,
    model: llm.ModelInfo,
    start: dict,
    user_message: Message | None = None,
    context: list[llm.ChatMessage] | None = None,
) -> HttpResponse:
    """Start the reply (its `context` read from the database unless given) and stream it."""
    if context is None:
        context = await run_db(services.reply_context, conversation, assistant, model.context_chars)
    max_tokens = min(conversation.max_tokens or settings.CHAT_MAX_TOKENS, settings.CHAT_MAX_TOKENS)
    params = llm.GenerationParams(
        model=model.id, max_tokens=max_tokens, temperature=conversation.temperature
    )
    reply = replies.reply_start(
        message_id=assistant.pk, provider=model.provider, messages=context, params=params
    )
    # The first exchange names the conversation (unless the user already did).
    title_pending = (
        user_message is not None
        and user_message.parent_id is None
        and not conversation.title_locked
    )
    if title_pending:
        task = asyncio.get_running_loop().create_task(
            _title_after_reply(reply, conversation.pk, model, user_message.content),
            context=contextvars.Context(),
        )
        _title_tasks.add(task)
        task.add_done_callback(_title_tasks.discard)
    start = {
        **start,
        "title_pending": title_pending,
        "conversation": conversation.pk,
        "title": conversation.display_title,
        "assistant_message": assistant.pk,
        "model": model.id,
    }
    return sse_response(reply_sse(replies.reply_follow(assistant), start=start))


@login_required
@require_POST
async def reply_regenerate(request: HttpRequest, pk: int, message_id: int) -> HttpResponse:
    """Generate a new version of an assistant reply (the old one stays)."""
    message = await _owned_message(request, pk, message_id)
    conversation = message.conversation
    if message.role != Message.Role.ASSISTANT:
        return _error("Only a reply can be regenerated.", 400)
    model = await _requested_model(request, conversation)
    if model is None:
        return _error("That model is not available any more.", 400)
    try:
        assistant = await run_db(
            services.reply_regenerate, conversation=conversation, reply=message, model=model.id
        )
    except services.InputError as exc:
        return _error(str(exc), exc.status)
    return await _start_reply(conversation, assistant, model, {"replaces": message.pk})


@login_required
@require_GET
async def reply_stream(request: HttpRequest, pk: int, message_id: int) -> HttpResponse:
    """Resume a reply: what is stored so far, then the live tail."""
    message = await _owned_message(request, pk, message_id)
    return sse_response(reply_sse(replies.reply_follow(message)))


@login_required
@require_POST
async def reply_stop(request: HttpRequest, pk: int, message_id: int) -> HttpResponse:
    message = await _owned_message(request, pk, message_id)
    reply = replies.reply_get(message.pk)
    if reply is not None:
        reply.stop()
        end = await reply.wait()
        return JsonResponse({"status": end.status})
    unsaved = replies.reply_unsaved_end(message.pk)
    if unsaved is not None:  # it has ended here; its row waits for the sweep
        return JsonResponse({"status": unsaved["status"]})
    if message.status == Message.Status.STREAMING and await replies.reply_stop_anywhere(message.pk):
        # Generating in another worker: wait for its final save.
        for _ in range(50):
            await message.arefresh_from_db(fields=["status"])
            if message.status != Message.Status.STREAMING:
                break
            await asyncio.sleep(0.1)
    elif message.status == Message.Status.STREAMING:
        await message.arefresh_from_db(fields=["status"])  # it may have just ended
    if message.status == Message.Status.STREAMING:
        return _error("This reply is generating on a server process that cannot be reached.", 409)
    return JsonResponse({"status": message.status})


@login_required
@require_GET
async def message_list(request: HttpRequest, pk: int) -> HttpResponse:
    """A page of the current path: older messages (`before`), or the latest `limit`."""
    conversation = await _owned_conversation(request, pk)
    try:
        before = int(request.GET["before"]) if "before" in request.GET else None
        limit = min(max(int(request.GET.get("limit", services.THREAD_PAGE_SIZE)), 1), 200)
    except ValueError:
        return _error("before and limit must be numbers.", 400)
    thread = await run_db(services.conversation_thread, conversation, before=before, limit=limit)
    context = {"conversation": conversation, "thread": thread}
    return TemplateResponse(request, "chat/_messages.html", context)


@login_required
@require_POST
async def message_select(request: HttpRequest, pk: int, message_id: int) -> HttpResponse:
    """Show another version of a message: its newest branch becomes the visible path."""
    message = await _owned_message(request, pk, message_id)
    conversation = message.conversation
    await run_db(services.message_version_select, conversation=conversation, message=message)
    thread = await run_db(services.conversation_thread, conversation)
    context = {"conversation": conversation, "thread": thread}
    return TemplateResponse(request, "chat/_messages.html", context)


async def _item_response(
    request: HttpRequest, conversation: Conversation, template: str, focus: bool = False
):
    """A sidebar entry in one of its states; `focus`: its link takes the focus
    (back from a rename or a delete confirmation, so the keyboard stays there)."""
    context = {
        "item": conversation,
        "current_id": _current_conversation_id(request),
        "title_changed": True,
        "focus_link": focus,
    }
    return TemplateResponse(request, template, context)


@login_required
@require_GET
async def conversation_item(request: HttpRequest, pk: int) -> HttpResponse:
    """The sidebar entry (to cancel a rename or a delete)."""
    conversation = await _owned_conversation(request, pk)
    return await _item_response(request, conversation, "chat/_conversation_item.html", focus=True)


@login_required
@require_http_methods(["GET", "POST"])
async def conversation_rename(request: HttpRequest, pk: int) -> HttpResponse:
    """GET: the sidebar entry as a rename form; POST: save the user's title."""
    conversation = await _owned_conversation(request, pk)
    if request.method == "GET":
        return await _item_response(request, conversation, "chat/_conversation_rename.html")
    try:
        await run_db(
            services.conversation_rename,
            conversation=conversation,
            title=request.POST.get("title", ""),
        )
    except services.InputError as exc:
        return _error(str(exc), exc.status)
    if not request.htmx:
        return redirect("chat:conversation", pk)
    return await _item_response(request, conversation, "chat/_conversation_item.html", focus=True)


@login_required
@require_http_methods(["GET", "POST"])
async def conversation_delete(request: HttpRequest, pk: int) -> HttpResponse:
    """GET: the confirmation step in the sidebar; POST: delete, with every message."""
    conversation = await _owned_conversation(request, pk)
    if request.method == "GET":
        return await _item_response(request, conversation, "chat/_conversation_delete.html")
    running = await run_db(services.conversation_delete, conversation=conversation)
    for message_id in running:
        await replies.reply_stop_anywhere(message_id)
    if not request.htmx:
        return redirect("chat:home")
    if _current_conversation_id(request) == pk:
        return HttpResponseClientRedirect(reverse("chat:home"))
    return HttpResponse("")


@login_required
@require_POST
async def conversation_archive(request: HttpRequest, pk: int) -> HttpResponse:
    """Archive (or, with archived=0, unarchive): the entry leaves the list it was in."""
    conversation = await _owned_conversation(request, pk)
    archived = request.POST.get("archived", "1") != "0"
    await run_db(services.conversation_archive, conversation=conversation, archived=archived)
    if not request.htmx:
        return redirect("chat:conversation", pk)
    return HttpResponse("")


@login_required
@require_http_methods(["GET", "POST"])
async def conversation_settings(request: HttpRequest, pk: int) -> HttpResponse:
    """System prompt, temperature and maximum reply length of one conversation.

    GET: the settings panel (for a page whose new chat has just become this one).
    """
    conversation = await _owned_conversation(request, pk)
    if request.method == "GET":
        context = {
            "conversation": conversation,
            "max_message_chars": settings.CHAT_MAX_MESSAGE_CHARS,
            "max_tokens_limit": settings.CHAT_MAX_TOKENS,
        }
        return TemplateResponse(request, "chat/_settings.html", context)
    try:
        fields = services.conversation_settings_parse(request.POST)
    except services.InputError as exc:
        return HttpResponse(str(exc), status=exc.status, content_type="text/plain")
    await run_db(services.conversation_settings_update, conversation=conversation, **fields)
    return HttpResponse("Saved.", content_type="text/plain")


@login_required
@require_GET
async def conversation_title(request: HttpRequest, pk: int) -> HttpResponse:
    conversation = await _owned_conversation(request, pk)
    return JsonResponse({"title": conversation.display_title})


def _download(body: str, content_type: str, filename: str) -> HttpResponse:
    response = HttpResponse(body, content_type=f"{content_type}; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@login_required
@require_GET
async def conversation_export_markdown(request: HttpRequest, pk: int) -> HttpResponse:
    conversation = await _owned_conversation(request, pk)
    body = await run_db(services.conversation_export_markdown, conversation)
    return _download(body, "text/markdown", f"conversation-{pk}.md")


@login_required
@require_GET
async def conversation_export_json(request: HttpRequest, pk: int) -> HttpResponse:
    conversation = await _owned_conversation(request, pk)
    data = await run_db(services.conversation_export_data, conversation)
    body = json.dumps(data, ensure_ascii=False, indent=2)
    return _download(body, "application/json", f"conversation-{pk}.json")


@login_required
@require_POST
async def preference_theme(request: HttpRequest) -> HttpResponse:
    """Remember the user's theme: light, dark or system."""
    try:
        theme = await run_db(
            services.preference_theme_set,
            user=await request.auser(),
            theme=request.POST.get("theme", ""),
        )
    except services.InputError as exc:
        return _error(str(exc), exc.status)
    return JsonResponse({"theme": theme})


@login_required
@require_http_methods(["GET", "POST"])
def api_keys(request: HttpRequest) -> HttpResponse:
    """List, create (shown once) and revoke the user's API keys."""
    new_key = None
    if request.method == "POST":
        _, new_key = services.api_key_create(owner=request.user, name=request.POST.get("name", ""))
    keys = ApiKey.objects.filter(owner=request.user)
    return TemplateResponse(
        request,
        "chat/api_keys.html",
        {"keys": keys, "new_key": new_key, "base_url": request.build_absolute_uri("/v1")},
    )


@login_required
@require_POST
def api_key_revoke(request: HttpRequest, key_id: int) -> HttpResponse:
    key = get_object_or_404(ApiKey, pk=key_id, owner=request.user)
    services.api_key_revoke(key=key)
    return redirect("chat:api_keys")
