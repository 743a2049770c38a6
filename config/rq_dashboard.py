"""The RQ dashboard (django-rq's admin pages) under the console's Content Security Policy.

Its templates inline a few fixed snippets — a ``<style>`` rule, the admin's actions
initialisation in a ``<script>``, two ``style`` attributes — which the console's policy
(scripts by nonce, no inline styles) blocks, leaving console errors and broken checkboxes. For
those pages only, the policy also allows exactly those snippets by their SHA-256 hash, read from
django-rq's own templates: nothing else inline runs, and a snippet a later django-rq changes is
blocked (and its browser test fails) instead of silently allowed.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import django_rq
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils.csp import CSP

TEMPLATES = Path(django_rq.__file__).parent / "templates" / "django_rq"
INLINE_BLOCK = re.compile(r"<(script|style)\b([^>]*)>(.*?)</\1>", re.S)
STYLE_ATTRIBUTE = re.compile(r'\sstyle="([^"]*)"')
TEMPLATE_SYNTAX = ("{{", "{%")


def _hash(text: str) -> str:
    digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
    return f"'sha256-{digest}'"


@cache
def inline_hashes() -> dict[str, list[str]]:
    """``{"script": [...], "style": [...], "attribute": [...]}``: hashes of the fixed inline
    snippets of django-rq's templates (those holding template syntax could not be hashed)."""
    found: dict[str, set[str]] = {"script": set(), "style": set(), "attribute": set()}
    for template in sorted(TEMPLATES.glob("*.html")):
        text = template.read_text(encoding="utf-8")
        for tag, attributes, body in INLINE_BLOCK.findall(text):
            if "src=" not in attributes and not any(mark in body for mark in TEMPLATE_SYNTAX):
                found[tag].add(_hash(body))
        for value in STYLE_ATTRIBUTE.findall(text):
            if not any(mark in value for mark in TEMPLATE_SYNTAX):
                found["attribute"].add(_hash(value))
    return {kind: sorted(hashes) for kind, hashes in found.items()}


def policy() -> dict[str, Any]:
    """The console's policy plus django-rq's fixed snippets."""
    hashes = inline_hashes()
    config = dict(settings.SECURE_CSP)
    config["script-src"] = [*config.get("script-src", [CSP.SELF]), *hashes["script"]]
    styles = [*hashes["style"], *hashes["attribute"]]
    if hashes["attribute"]:
        styles.append(CSP.UNSAFE_HASHES)  # style="" attributes are allowed by hash only so
    config["style-src"] = [*config.get("style-src", [CSP.SELF]), *styles]
    return config


class RqDashboardCspMiddleware:
    """Sets :func:`policy` on the RQ dashboard's responses (listed after Django's CSP
    middleware, which then writes it)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if request.path.startswith(reverse("admin:index") + "django_rq/"):
            response._csp_config = policy()
        return response
