"""Accounts: sign-up under the site's policy, and throttled login (site and admin)."""

from __future__ import annotations

import hashlib
import unicodedata

from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import login
from django.contrib.auth.forms import AuthenticationForm, UserCreationForm
from django.contrib.auth.views import LoginView
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.views.decorators.http import require_GET, require_http_methods

from . import services


def throttle_name(username: str) -> str:
    """The name failures are counted under: every spelling Django signs in as one.

    Django's login form turns the username into its NFKC form before looking it
    up, so "\uff41lice" (fullwidth a) signs in as "alice": counting the raw
    string gave each look-alike spelling a fresh allowance. Case-folded too, so
    "Alice" and "alice" share one count (stricter than the lookup, never looser).
    """
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", username).casefold()).strip()


class LoginThrottle:
    """Counts failed logins in the cache.

    Two counters: one per (username, client address) pair, with the limit,
    so nobody else's failures lock a user out; and one per username with ten
    times the limit, so guessing one account's password from many addresses
    is throttled too. Behind a proxy, CHAT_CLIENT_IP_HEADER names the header
    holding the client's address (e.g. HTTP_X_REAL_IP).
    """

    def __init__(self, request: HttpRequest | None, username: str):
        meta = request.META if request else {}
        address = meta.get(settings.CHAT_CLIENT_IP_HEADER) or meta.get("REMOTE_ADDR", "")
        user = hashlib.sha256(throttle_name(username).encode()).hexdigest()[:32]
        pair = hashlib.sha256(f"{user}|{address}".encode()).hexdigest()[:32]
        self.limits = {
            f"login-fail:pair:{pair}": settings.LOGIN_FAILURE_LIMIT,
            f"login-fail:user:{user}": settings.LOGIN_FAILURE_LIMIT * 10,
        }

    # While the cache (Redis) is down nobody is throttled rather than nobody
    # let in (services.cache_or logs it).
    def blocked(self) -> bool:
        counts = services.cache_or({}, cache.get_many, list(self.limits))
        return any(count >= self.limits[key] for key, count in counts.items())

    def record_failure(self) -> None:
        for key in self.limits:
            services.cache_count(key, settings.LOGIN_FAILURE_WINDOW)

    def record_success(self) -> None:
        services.cache_or(None, cache.delete_many, list(self.limits)[:1])  # the pair starts afresh


class ThrottledLoginMixin:
    """Refuse logins after repeated failures, with one answer for every cause."""

    throttled_message = "Too many failed sign-in attempts. Wait a few minutes and try again."

    def clean(self):
        throttle = LoginThrottle(self.request, self.data.get("username", ""))
        if throttle.blocked():
            raise forms.ValidationError(self.throttled_message, code="throttled")
        try:
            cleaned = super().clean()
        except forms.ValidationError:
            throttle.record_failure()
            raise
        # Django's clean() also returns, without a user, when a field is blank: that
        # is no success, and resetting the count on it let one address guess on
        # for ever, a blank try after every few wrong ones.
        if self.get_user() is not None:
            throttle.record_success()
        return cleaned


class ThrottledAuthenticationForm(ThrottledLoginMixin, AuthenticationForm):
    pass


class ThrottledAdminAuthenticationForm(ThrottledLoginMixin, AdminAuthenticationForm):
    pass


class ThrottledLoginView(LoginView):
    form_class = ThrottledAuthenticationForm

    def get_context_data(self, **kwargs):
        return {**super().get_context_data(**kwargs), "signup_open": signup_open()}


def signup_open() -> bool:
    return settings.SIGNUP_MODE in {"open", "approval"} or services.site_is_fresh()


class SignupForm(UserCreationForm):
    email = forms.EmailField(required=False)


@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    if not signup_open():
        return TemplateResponse(request, "registration/signup_closed.html", status=403)
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            user = services.user_signup(
                username=form.cleaned_data["username"],
                password=form.cleaned_data["password1"],
                email=form.cleaned_data.get("email", ""),
            )
        except services.SignupClosed:
            return TemplateResponse(request, "registration/signup_closed.html", status=403)
        if not user.is_active:
            return TemplateResponse(request, "registration/signup_pending.html")
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect(settings.LOGIN_REDIRECT_URL)
    return TemplateResponse(
        request, "registration/signup.html", {"form": form, "first": services.site_is_fresh()}
    )


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})
