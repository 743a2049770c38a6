"""WSGI entry point, for servers that cannot speak ASGI (streaming pages then hold a thread)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
application = get_wsgi_application()
