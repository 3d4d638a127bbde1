from django.urls import path

from . import api, views

app_name = "chat"

urlpatterns = [
    path("", views.home, name="home"),
    path("c/send/", views.message_send, name="send_new"),
    path("c/<int:pk>/", views.conversation_detail, name="conversation"),
    path("c/<int:pk>/send/", views.message_send, name="send"),
    path("c/<int:pk>/m/<int:message_id>/stream/", views.reply_stream, name="reply_stream"),
    path("c/<int:pk>/m/<int:message_id>/stop/", views.reply_stop, name="reply_stop"),
    path(
        "c/<int:pk>/m/<int:message_id>/regenerate/",
        views.reply_regenerate,
        name="reply_regenerate",
    ),
    path("keys/", views.api_keys, name="api_keys"),
    path("keys/<int:key_id>/revoke/", views.api_key_revoke, name="api_key_revoke"),
    path("v1/models", api.models_list, name="api_models"),
    path("v1/chat/completions", api.chat_completions, name="api_chat_completions"),
]
