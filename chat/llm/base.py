"""The provider seam: every LLM backend streams `Delta`s through this interface."""

from __future__ import annotations

from collections.abc import AsyncIterator
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
