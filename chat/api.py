"""The OpenAI-compatible API: /v1/models and /v1/chat/completions with per-user keys.

Every call is stored as a conversation of the key's owner and served by the
same reply pipeline as the browser. Unlike a browser, an API client that
disconnects has nobody to resume for it, so its reply is abandoned at once
(status `interrupted`) and the upstream closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from . import llm, replies, services
from .db import run_db
from .models import ApiKey, Message
from .replies import HEARTBEAT, ReplyEnd
from .streaming import PING, on_client_disconnect, sse_response
from .text import clean_text

log = logging.getLogger(__name__)

ROLES = {"system", "developer", "user", "assistant"}
# The most messages one request may carry. Every call is stored row by row
# on the one database thread before its first token: 30,000 tiny messages (under
# the 1 MB body limit) held it for 2-3 s, everybody's requests waiting behind.
MAX_MESSAGES = 2048


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code

    def body(self) -> dict:
        return {
            "error": {
                "message": str(self),
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JsonResponse:
        return JsonResponse(self.body(), status=self.status)


async def _authenticate(request: HttpRequest) -> ApiKey:
    header = request.headers.get("Authorization", "")
    scheme, _, raw_key = header.partition(" ")
    if scheme.lower() != "bearer" or not raw_key.strip():
        raise ApiError(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'; "
            "create one on the API keys page.",
            401,
            code="invalid_api_key",
        )
    key = await run_db(services.api_key_authenticate, raw_key.strip())
    if key is None:
        raise ApiError("Incorrect API key provided.", 401, code="invalid_api_key")
    return key


def _api_view(method: str):
    """CSRF-exempt (keys, not cookies), key-authenticated, answering only `method`,
    errors in OpenAI's shape."""

    def decorate(view):
        @csrf_exempt
        async def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            try:
                if request.method != method:
                    raise ApiError(
                        f"{request.method} is not allowed here; use {method}.",
                        405,
                        code="method_not_allowed",
                    )
                key = await _authenticate(request)
                return await view(request, key, *args, **kwargs)
            except ApiError as exc:
                response = exc.response()
                if exc.status == 405:
                    response["Allow"] = method
                return response
            except Exception:  # a client of the API reads JSON, not Django's error page
                log.exception("API request %s failed", request.path)
                return ApiError(
                    "The server failed; try again.", 500, type="server_error"
                ).response()

        wrapped.__name__ = view.__name__
        wrapped.__doc__ = view.__doc__
        return wrapped

    return decorate


@csrf_exempt
async def not_found(request: HttpRequest) -> HttpResponse:
    """Any other /v1/ path: OpenAI's 404, so clients show a useful error."""
    return ApiError(
        f"Unknown request URL: {request.method} {request.path}.", 404, code="unknown_url"
    ).response()


@_api_view("GET")
async def models_list(request: HttpRequest, key: ApiKey) -> HttpResponse:
    created = int(time.time())
    data = [
        {"id": m.id, "object": "model", "created": created, "owned_by": m.provider.name}
        for m in await llm.available_models()
    ]
    return JsonResponse({"object": "list", "data": data})


def _text_content(content, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(
                    "Only text content parts are supported.", param=f"messages[{index}].content"
                )
            if not isinstance(part.get("text"), str):
                raise ApiError(
                    "A text content part needs a string 'text'.",
                    param=f"messages[{index}].content",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(
        "'content' must be a string or a list of text parts.", param=f"messages[{index}].content"
    )


def parse_completion_request(body: bytes) -> dict:
    """Validate a chat-completions body; every problem is a 400 naming the field."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError("The request body is not valid JSON.") from None
    except RecursionError:  # [[[[… nested deeper than the parser goes
        raise ApiError("The request body is nested too deeply.") from None
    if not isinstance(data, dict):
        raise ApiError("The request body must be a JSON object.")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError("'model' is required and must be a string.", param="model")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty array.", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(
            f"'messages' has {len(messages):,} items; the limit is {MAX_MESSAGES:,}.",
            param="messages",
        )
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError("Each message must be an object.", param=f"messages[{index}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a list is not even hashable
            raise ApiError(
                f"Unsupported role {role!r}; use system, developer, user or assistant.",
                param=f"messages[{index}].role",
            )
        # Cleaned once, here: the upstream gets exactly the text that is stored.
        content = clean_text(_text_content(message.get("content"), index))
        if len(content) > settings.CHAT_MAX_MESSAGE_CHARS:
            raise ApiError(
                f"Message {index} is too long ({len(content):,} characters; the limit is "
                f"{settings.CHAT_MAX_MESSAGE_CHARS:,}).",
                413,
                param=f"messages[{index}].content",
            )
        parsed.append(("system" if role == "developer" else role, content))
    if not any(role == "user" for role, _ in parsed):
        raise ApiError("'messages' must contain at least one user message.", param="messages")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError("'stream' must be a boolean.", param="stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError("'stream_options' must be an object.", param="stream_options")
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise ApiError("'max_tokens' must be a positive integer.", param="max_tokens")
    temperature = data.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0 <= temperature <= 2
    ):
        raise ApiError("'temperature' must be a number from 0 to 2.", param="temperature")
    return {
        "model": model,
        "messages": parsed,
        "stream": stream,
        "include_usage": bool(options.get("include_usage", False)),
        "max_tokens": min(max_tokens or settings.CHAT_MAX_TOKENS, settings.CHAT_MAX_TOKENS),
        "temperature": temperature,
    }


@_api_view("POST")
async def chat_completions(request: HttpRequest, key: ApiKey) -> HttpResponse:
    try:
        body = request.body
    except RequestDataTooBig:
        raise ApiError(
            f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE:,} bytes.", 413
        ) from None
    req = parse_completion_request(body)
    model = await llm.resolve(req["model"])
    if model is None:
        raise ApiError(
            f"The model '{req['model']}' does not exist.",
            404,
            param="model",
            code="model_not_found",
        )
    try:
        conversation, assistant = await run_db(
            services.api_conversation_create,
            key=key,
            model=model.id,
            messages=req["messages"],
            max_tokens=req["max_tokens"],
            temperature=req["temperature"],
        )
    except services.InputError as exc:
        raise ApiError(
            str(exc),
            exc.status,
            type="rate_limit_error" if exc.status == 429 else "invalid_request_error",
            code="rate_limit_exceeded" if exc.status == 429 else None,
        ) from None
    # The request's own messages are the context; no need to read them back.
    context = services.trim_context(
        conversation.system_prompt,
        [llm.ChatMessage(role, content) for role, content in req["messages"] if role != "system"],
        model.context_chars,
    )
    params = llm.GenerationParams(
        model=model.id, max_tokens=req["max_tokens"], temperature=req["temperature"]
    )
    reply = replies.reply_start(
        message_id=assistant.pk, provider=model.provider, messages=context, params=params
    )
    completion_id = f"chatcmpl-{assistant.pk}"
    on_client_disconnect(request, reply.abandon)  # nobody to resume for: stop at once
    if req["stream"]:
        # The response goes back through the middleware now, while the model
        # server works on the first token; it starts when that token is in.
        response = sse_response(())
        response.streaming_content = _completion_chunks(
            response,
            reply,
            replies.reply_follow(assistant),
            completion_id,
            model.id,
            req["include_usage"],
        )
        response.start_with_first_frame = True
        return response
    try:
        end = await reply.wait()
    except asyncio.CancelledError:
        reply.abandon()  # the client went away: nobody will read this reply
        raise
    row = await run_db(Message.objects.get, pk=assistant.pk)
    if end.status == Message.Status.ERROR:
        raise _upstream_error(end.error)
    return JsonResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(row.created.timestamp()),
            "model": model.id,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": row.content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": row.finish_reason or "stop",
                }
            ],
            "usage": _usage(row),
        }
    )


def _upstream_error(message: str) -> ApiError:
    """A reply that failed upstream, as OpenAI reports it (HTTP 502)."""
    return ApiError(message, 502, type="upstream_error", code="upstream_error")


def _usage(row: Message) -> dict:
    prompt, completion = row.prompt_tokens or 0, row.completion_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def _first_event(follow: AsyncIterator) -> str | ReplyEnd | object:
    """The first token, the end, or a heartbeat (the upstream is silent) of a new reply.

    The response starts only then (`start_with_first_frame`), so an upstream
    that fails before its first token gets an error status instead of a 200
    stream holding an error. This delays no token: the headers go out with the
    first one.
    """
    so_far = await anext(follow)  # a new reply has no text yet
    return so_far if so_far else await anext(follow)


async def _completion_chunks(
    response: HttpResponse,
    reply: replies.Reply,
    follow: AsyncIterator,
    completion_id: str,
    model: str,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """OpenAI's chunk stream for one reply; leaving early abandons the reply.

    The response starts with this generator's first frame (chatsite.asgi), so
    a reply that fails before its first token can still turn `response` into
    HTTP 502 with OpenAI's error body, as OpenAI answers.
    """
    created = int(time.time())
    usage_field = ',"usage":null' if include_usage else ""
    head = json.dumps(
        {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
    )[:-1]
    # Each token costs one json.dumps of its text: the frame around it is fixed.
    prefix = f'data: {head},"system_fingerprint":null,"choices":[{{"index":0,"delta":'.encode()
    suffix = f',"logprobs":null,"finish_reason":null}}]{usage_field}}}\n\n'.encode()

    def content(text: str) -> bytes:
        return prefix + b'{"content":' + json.dumps(text).encode() + b"}" + suffix

    try:
        item = await _first_event(follow)
        if isinstance(item, ReplyEnd) and item.status == Message.Status.ERROR:
            response.status_code = 502
            response["Content-Type"] = "application/json"
            yield json.dumps(_upstream_error(item.error).body()).encode()
            return
        role = prefix + b'{"role":"assistant","content":""}' + suffix
        if isinstance(item, str) and item:  # the first token rides with the role: one write
            yield role + content(item)
            item = await anext(follow)
        else:
            yield role
        while True:
            if isinstance(item, str):
                if item:
                    yield content(item)
            elif item is HEARTBEAT:
                yield PING
            elif isinstance(item, ReplyEnd):
                if item.status == Message.Status.ERROR:
                    yield f"data: {json.dumps(_upstream_error(item.error).body())}\n\n".encode()
                    return
                yield _final_chunks(head, item, include_usage)
                yield b"data: [DONE]\n\n"
                return
            item = await anext(follow)
    finally:
        # A client that left before the end: stop generating for nobody.
        if reply.end is None:
            reply.abandon()
        await follow.aclose()


def _final_chunks(head: str, end: ReplyEnd, include_usage: bool) -> bytes:
    finish = end.finish_reason or "stop"
    usage_field = ',"usage":null' if include_usage else ""
    out = (
        f'data: {head},"system_fingerprint":null,"choices":[{{"index":0,"delta":{{}},'
        f'"logprobs":null,"finish_reason":{json.dumps(finish)}}}]{usage_field}}}\n\n'
    )
    if include_usage:
        usage = {
            "prompt_tokens": end.prompt_tokens or 0,
            "completion_tokens": end.completion_tokens or 0,
            "total_tokens": (end.prompt_tokens or 0) + (end.completion_tokens or 0),
        }
        out += (
            f'data: {head},"system_fingerprint":null,"choices":[],"usage":{json.dumps(usage)}}}\n\n'
        )
    return out.encode()
