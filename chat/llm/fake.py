"""A deterministic in-process provider for tests and development.

Replies "Echo: <last user message>" one word at a time. Model ids select
behaviours so tests can reach every path of the reply pipeline without a
network: `fake` (echo), `fake-slow` (echo, 50 ms a word), `fake-fail-first`
(fails before the first token), `fake-fail-mid` (fails after three words),
`fake-hang` (two words, then silence until cancelled).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from .base import ChatMessage, Delta, GenerationParams, ProviderError

FAKE_MODELS = ["fake", "fake-slow", "fake-fail-first", "fake-fail-mid", "fake-hang"]


class FakeProvider:
    name = "fake"

    def __init__(self, gap_seconds: float = 0.0):
        self.gap_seconds = gap_seconds
        self.started = 0
        self.closed = 0

    async def list_models(self) -> list[str]:
        return list(FAKE_MODELS)

    async def stream(
        self, messages: list[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[Delta]:
        self.started += 1
        try:
            if params.model == "fake-fail-first":
                raise ProviderError("The model server failed (HTTP 500).")
            last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
            words = f"Echo: {last_user}".split(" ")
            tokens = [w + " " for w in words[:-1]] + [words[-1]]
            gap = 0.05 if params.model == "fake-slow" else self.gap_seconds
            sent = 0
            for index, token in enumerate(tokens[: params.max_tokens]):
                if params.model == "fake-fail-mid" and index == 3:
                    raise ProviderError("The connection to the model server was lost.")
                if params.model == "fake-hang" and index == 2:
                    await asyncio.Event().wait()
                if gap:
                    await asyncio.sleep(gap)
                sent += 1
                yield Delta(text=token)
            finish = "length" if len(tokens) > params.max_tokens else "stop"
            prompt_words = sum(len(m.content.split()) for m in messages)
            yield Delta(finish_reason=finish, prompt_tokens=prompt_words, completion_tokens=sent)
        finally:
            self.closed += 1
