from django.contrib import admin
from django.urls import include, path

from chat import accounts

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/login/", accounts.ThrottledLoginView.as_view(), name="login"),
    path("accounts/signup/", accounts.signup, name="signup"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("healthz", accounts.healthz, name="healthz"),
    path("", include("chat.urls")),
]
