"""The baseline: the streaming proxy a competent engineer would write in a few lines.

Starlette + `openai.AsyncOpenAI`, each upstream chunk re-serialised with
`chunk.model_dump_json()`; no database, no auth. Run it with uvicorn::

    OPENAI_BASE_URL=http://127.0.0.1:8100/v1 .venv/bin/python -m uvicorn \\
        --app-dir benchmarks baseline_proxy:app --port 8300 --no-access-log
"""

import os

from openai import AsyncOpenAI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

client = AsyncOpenAI(
    base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ.get("OPENAI_API_KEY", "x")
)


async def chat_completions(request: Request) -> StreamingResponse:
    body = await request.json()
    extra = {"max_tokens": body["max_tokens"]} if body.get("max_tokens") else {}
    stream = await client.chat.completions.create(
        model=body["model"], messages=body["messages"], stream=True, **extra
    )

    async def events():
        try:
            async for chunk in stream:
                yield f"data: {chunk.model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await stream.close()  # the client left: stop the upstream too

    return StreamingResponse(events(), media_type="text/event-stream")


app = Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"])])
