"""ASGI entry point: daphne serves this (`make run`, or several workers behind nginx)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")

from django.conf import settings  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402

application = get_asgi_application()

if settings.SERVE_STATIC:
    # One machine, no nginx: daphne serves /static/ itself.
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    application = ASGIStaticFilesHandler(application)
