"""Chat pages and the streaming endpoints. Thin: parse, call a service, render or stream."""

from __future__ import annotations

import asyncio

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from . import llm, replies, services
from .models import ApiKey, Conversation, Message
from .streaming import reply_sse, sse_response


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


def _error(message: str, status: int) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


async def _page_context(request: HttpRequest, conversation: Conversation | None) -> dict:
    user = await request.auser()
    query = request.GET.get("q", "").strip()
    sidebar = await sync_to_async(list)(Conversation.objects.for_sidebar(user, query)[:200])
    messages = []
    if conversation is not None:
        messages = await sync_to_async(services.conversation_path)(conversation)
    models = await llm.available_models()
    selected = conversation.model if conversation else await llm.default_model()
    return {
        "conversation": conversation,
        "conversations": sidebar,
        "chat_messages": messages,
        "models": models,
        "selected_model": selected,
        "query": query,
        "max_message_chars": settings.CHAT_MAX_MESSAGE_CHARS,
    }


def _page_template(request: HttpRequest) -> str:
    # The sidebar search swaps only the conversation list.
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
            await sync_to_async(services.check_reply_quota)(user)
            conversation = await sync_to_async(services.conversation_create)(
                owner=user, model=model.id, title=content[:80]
            )
        user_message, assistant = await sync_to_async(services.message_send)(
            conversation=conversation, content=content, model=model.id
        )
    except services.InputError as exc:
        return _error(str(exc), exc.status)
    return await _start_reply(conversation, assistant, model, {"user_message": user_message.pk})


async def _start_reply(
    conversation: Conversation, assistant: Message, model: llm.ModelInfo, start: dict
) -> HttpResponse:
    context = await sync_to_async(services.reply_context)(
        conversation, assistant, model.context_chars
    )
    max_tokens = min(conversation.max_tokens or settings.CHAT_MAX_TOKENS, settings.CHAT_MAX_TOKENS)
    params = llm.GenerationParams(
        model=model.id, max_tokens=max_tokens, temperature=conversation.temperature
    )
    replies.reply_start(
        message_id=assistant.pk, provider=model.provider, messages=context, params=params
    )
    start = {
        **start,
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
    model = await llm.resolve(request.POST.get("model", "").strip() or conversation.model)
    if model is None:
        return _error("That model is not available any more.", 400)
    try:
        assistant = await sync_to_async(services.reply_regenerate)(
            conversation=conversation, reply=message, model=model.id
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
    if message.status == Message.Status.STREAMING and await replies.reply_stop_anywhere(message.pk):
        # Generating in another worker: wait for its final save.
        for _ in range(50):
            await message.arefresh_from_db(fields=["status"])
            if message.status != Message.Status.STREAMING:
                break
            await asyncio.sleep(0.1)
    if message.status == Message.Status.STREAMING:
        return _error("This reply is generating on a server process that cannot be reached.", 409)
    return JsonResponse({"status": message.status})


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
