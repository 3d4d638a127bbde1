"""The provider seam: every LLM backend streams `Delta`s through this interface."""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system", "user" or "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class GenerationParams:
    model: str
    max_tokens: int
    temperature: float | None = None


@dataclass(slots=True)
class Delta:
    """A piece of a streamed reply.

    `text` is new content; the last delta of a stream usually carries
    `finish_reason` and, where the backend reports them, the token counts.
    """

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class ProviderError(Exception):
    """An upstream failure, with a reason that is safe to show to the user.

    The message never contains keys, endpoint URLs or upstream error bodies.
    """


@dataclass
class ModelInfo:
    id: str
    provider: Provider = field(repr=False)
    label: str = ""
    context_chars: int | None = None


class Provider(Protocol):
    name: str

    async def list_models(self) -> list[str]:
        """Model ids this provider serves now (may ask the upstream)."""
        ...

    def stream(self, messages: list[ChatMessage], params: GenerationParams) -> AsyncIterator[Delta]:
        """Stream the reply to `messages`.

        An async generator: closing it (aclose, or cancelling the task awaiting
        it) must release the upstream at once, so a stopped reply stops costing
        tokens. Failures raise ProviderError.
        """
        ...


# -- dropping an upstream at once -----------------------------------------------------------------
# Cancelling the task that runs a stream closes its upstream only when that task
# next runs, behind every callback already queued: with 50 API clients leaving
# at once that was up to 44 ms for the last one. A provider may also register a
# synchronous hook that drops its connection on the spot; whoever owns the task
# (chat.replies.Reply) opens a list for the hooks and calls them before cancelling.
_abort_hooks: contextvars.ContextVar[list[Callable[[], None]] | None] = contextvars.ContextVar(
    "upstream_abort_hooks", default=None
)


def abort_hooks_open() -> list[Callable[[], None]]:
    """The hooks the streams run in the current context will register (call them to abort)."""
    hooks: list[Callable[[], None]] = []
    _abort_hooks.set(hooks)
    return hooks


def on_abort(hook: Callable[[], None]) -> None:
    """Register how to drop the current stream's upstream connection at once (sync, no I/O wait)."""
    hooks = _abort_hooks.get()
    if hooks is not None:
        hooks.append(hook)
