"""ASGI entry point of the gateway for uvicorn's worker processes
(``uvicorn gateway.asgi:create_app --factory``): Django is set up before the app's modules load,
since the refresher reads keys and deployments through the ORM."""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django.setup()

from gateway.app import create_app  # noqa: E402  (needs the app registry populated above)

__all__ = ["create_app"]
