from django.urls import path

from . import views

app_name = "chat"

urlpatterns = [
    path("", views.home, name="home"),
    path("c/send/", views.message_send, name="send_new"),
    path("c/<int:pk>/", views.conversation_detail, name="conversation"),
    path("c/<int:pk>/send/", views.message_send, name="send"),
    path("c/<int:pk>/messages/", views.message_list, name="message_list"),
    path("c/<int:pk>/item/", views.conversation_item, name="conversation_item"),
    path("c/<int:pk>/rename/", views.conversation_rename, name="conversation_rename"),
    path("c/<int:pk>/delete/", views.conversation_delete, name="conversation_delete"),
    path("c/<int:pk>/archive/", views.conversation_archive, name="conversation_archive"),
    path("c/<int:pk>/settings/", views.conversation_settings, name="conversation_settings"),
    path("c/<int:pk>/title/", views.conversation_title, name="conversation_title"),
    path(
        "c/<int:pk>/export.md",
        views.conversation_export_markdown,
        name="conversation_export_markdown",
    ),
    path("c/<int:pk>/export.json", views.conversation_export_json, name="conversation_export_json"),
    path("c/<int:pk>/m/<int:message_id>/stream/", views.reply_stream, name="reply_stream"),
    path("c/<int:pk>/m/<int:message_id>/stop/", views.reply_stop, name="reply_stop"),
    path(
        "c/<int:pk>/m/<int:message_id>/regenerate/",
        views.reply_regenerate,
        name="reply_regenerate",
    ),
    path("c/<int:pk>/m/<int:message_id>/edit/", views.message_edit, name="message_edit"),
    path("c/<int:pk>/m/<int:message_id>/select/", views.message_select, name="message_select"),
    path("preferences/theme/", views.preference_theme, name="preference_theme"),
    path("keys/", views.api_keys, name="api_keys"),
    path("keys/<int:key_id>/revoke/", views.api_key_revoke, name="api_key_revoke"),
]
