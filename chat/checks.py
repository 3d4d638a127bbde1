from django.conf import settings
from django.core.checks import Error, register


@register()
def openai_base_url_check(app_configs, **kwargs):
    """Refuse a configured upstream URL that could reach metadata or non-http services."""
    if not settings.OPENAI_BASE_URL:
        return []
    from .llm.openai_compat import validate_base_url

    try:
        validate_base_url(settings.OPENAI_BASE_URL)
    except ValueError as exc:
        return [Error(f"OPENAI_BASE_URL is not allowed: {exc}", id="chat.E001")]
    return []


@register()
def signup_mode_check(app_configs, **kwargs):
    if settings.SIGNUP_MODE not in {"closed", "open", "approval"}:
        return [
            Error(
                f"CHAT_SIGNUP must be closed, open or approval, not {settings.SIGNUP_MODE!r}.",
                id="chat.E002",
            )
        ]
    return []


@register()
def default_chat_settings_check(app_configs, **kwargs):
    """CHAT_DEFAULT_TEMPERATURE must be what the settings form itself accepts."""
    from .services import InputError, conversation_settings_parse

    try:
        conversation_settings_parse({})
    except InputError as exc:
        return [Error(f"CHAT_DEFAULT_SYSTEM_PROMPT / _TEMPERATURE: {exc}", id="chat.E003")]
    return []
