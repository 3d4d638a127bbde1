from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import middleware as auth_middleware
from django.contrib.messages import middleware as messages_middleware
from django.contrib.sessions import middleware as sessions_middleware
from django.http import HttpResponseBadRequest
from django.middleware import clickjacking, common, csrf, security
from django.utils.deprecation import MiddlewareMixin

# Django's built-in middleware run their hooks through sync_to_async under
# ASGI: a thread hop each, a dozen per request, and most of a request's CPU
# under load. Their hooks only read and write headers and cookies, so
# `run_hooks_inline` (called once at start-up) makes them run on the event loop
# instead. The classes stay Django's own, so `check --deploy` still sees them.
# Only a session that must be saved (a database write) still takes a thread.


async def _inline_acall(self, request):
    response = None
    if hasattr(self, "process_request"):
        response = self.process_request(request)
    response = response or await self.get_response(request)
    if hasattr(self, "process_response"):
        response = self.process_response(request, response)
    return response


async def _session_acall(self, request):
    self.process_request(request)  # a lazy session object: no I/O yet
    response = await self.get_response(request)
    if request.session.modified or settings.SESSION_SAVE_EVERY_REQUEST:
        return await sync_to_async(self.process_response)(request, response)
    return self.process_response(request, response)  # headers only


class ContentSecurityPolicyMiddleware(MiddlewareMixin):
    """Sets the Content-Security-Policy header (no inline scripts) on every response."""

    __acall__ = _inline_acall  # no thread hop for a header

    def process_response(self, request, response):
        response.headers.setdefault("Content-Security-Policy", settings.CONTENT_SECURITY_POLICY)
        return response


class RefuseNulMiddleware(MiddlewareMixin):
    """Answers 400 to a NUL character in the query string or a cookie.

    PostgreSQL cannot hold NUL in text, and psycopg refuses to send it: a search
    for "%00" (the sidebar's, the admin's) or a session cookie holding one ended
    in a 500 there and worked on SQLite. Bodies are not checked here: message
    text keeps its NUL as U+FFFD (chat.text.clean_text), and Django's form
    fields refuse it.
    """

    __acall__ = _inline_acall

    def process_request(self, request) -> HttpResponseBadRequest | None:
        query = request.META.get("QUERY_STRING", "")
        if "%00" in query or "\x00" in query or any("\x00" in v for v in request.COOKIES.values()):
            return HttpResponseBadRequest(
                "The request holds a NUL character.", content_type="text/plain"
            )
        return None


def run_hooks_inline() -> None:
    for cls in (
        security.SecurityMiddleware,
        common.CommonMiddleware,
        csrf.CsrfViewMiddleware,
        auth_middleware.AuthenticationMiddleware,
        messages_middleware.MessageMiddleware,
        clickjacking.XFrameOptionsMiddleware,
    ):
        cls.__acall__ = _inline_acall
    sessions_middleware.SessionMiddleware.__acall__ = _session_acall
