from django.urls import path

from . import views

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
]
