from django.contrib import admin
from django.urls import include, path, re_path

from chat import accounts, api

urlpatterns = [
    # The API first: the hottest routes resolve without trying every other one.
    path("v1/chat/completions", api.chat_completions, name="api_chat_completions"),
    path("v1/models", api.models_list, name="api_models"),
    re_path(r"^v1/", api.not_found),
    path("admin/", admin.site.urls),
    path("accounts/login/", accounts.ThrottledLoginView.as_view(), name="login"),
    path("accounts/signup/", accounts.signup, name="signup"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("healthz", accounts.healthz, name="healthz"),
    path("", include("chat.urls")),
]
