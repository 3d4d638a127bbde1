"""The provider seam. Nothing outside chat/llm/ imports a vendor package.

`available_models()` lists what the model picker offers; `resolve()` finds the
provider that serves a model id.
"""

from __future__ import annotations

import functools
import logging

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from .base import (
    ChatMessage,
    Delta,
    GenerationParams,
    ModelInfo,
    Provider,
    ProviderError,
    abort_hooks_open,
)

__all__ = [
    "ChatMessage",
    "Delta",
    "GenerationParams",
    "ModelInfo",
    "Provider",
    "ProviderError",
    "abort_hooks_open",
    "available_models",
    "resolve",
]

log = logging.getLogger(__name__)


def configured_providers() -> list[Provider]:
    """The providers the settings ask for, built once per process."""
    return _build_providers()


@functools.cache
def _build_providers() -> list[Provider]:
    providers: list[Provider] = []
    if settings.CHAT_FAKE_MODEL:
        from .fake import FakeProvider

        providers.append(FakeProvider())
    if settings.LOCAL_MODEL_PATH.lower() not in {"off", "none", "0"}:
        from pathlib import Path

        from .local import LocalProvider, default_model_path

        path = (
            Path(settings.LOCAL_MODEL_PATH) if settings.LOCAL_MODEL_PATH else default_model_path()
        )
        if path and path.is_file():
            providers.append(
                LocalProvider(
                    path,
                    context_tokens=settings.LOCAL_MODEL_CONTEXT,
                    threads=settings.LOCAL_MODEL_THREADS,
                )
            )
        else:
            log.warning(
                "no local model file found (LOCAL_MODEL_PATH=%r)", settings.LOCAL_MODEL_PATH
            )
    if settings.OPENAI_API_KEY or settings.OPENAI_BASE_URL:
        from .openai_compat import OpenAICompatProvider

        try:
            provider = OpenAICompatProvider(
                name="openai",
                base_url=settings.OPENAI_BASE_URL or None,
                api_key=settings.OPENAI_API_KEY or None,
                models=settings.OPENAI_MODELS or None,
                connect_timeout=settings.OPENAI_CONNECT_TIMEOUT,
                read_timeout=settings.OPENAI_READ_TIMEOUT,
            )
        except ValueError as exc:  # also reported by the system check chat.E001
            log.error("OPENAI_BASE_URL refused: %s", exc)
        else:
            providers.append(provider)
    return providers


@receiver(setting_changed)
def _reset_providers(*, setting: str, **kwargs) -> None:
    if setting.startswith(("OPENAI_", "LOCAL_MODEL_", "CHAT_FAKE_MODEL")):
        _build_providers.cache_clear()


async def available_models() -> list[ModelInfo]:
    """Every model the picker offers, first provider first; duplicates keep the first."""
    seen: dict[str, ModelInfo] = {}
    for provider in configured_providers():
        for model_id in await provider.list_models():
            if model_id not in seen:
                seen[model_id] = ModelInfo(
                    id=model_id,
                    provider=provider,
                    context_chars=getattr(provider, "context_chars", None),
                )
    return list(seen.values())


async def resolve(model_id: str) -> ModelInfo | None:
    for info in await available_models():
        if info.id == model_id:
            return info
    return None


async def default_model() -> str:
    models = await available_models()
    ids = [m.id for m in models]
    if settings.CHAT_DEFAULT_MODEL in ids:
        return settings.CHAT_DEFAULT_MODEL
    return ids[0] if ids else ""
