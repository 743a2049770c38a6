"""The base pages: headers every response carries, the audit review, and the health probe."""

from __future__ import annotations

import pytest
from django.test import Client

import audit
from accounts.models import User
from audit.actions import Action
from audit.models import AuditEvent

pytestmark = pytest.mark.django_db


def test_every_response_has_a_strict_csp_and_a_request_id(alice: User) -> None:
    client = Client()
    client.force_login(alice)
    response = client.get("/")
    policy = response["Content-Security-Policy"]
    assert "default-src 'self'" in policy
    assert "script-src 'self' 'nonce-" in policy
    assert "unsafe-inline" not in policy
    assert "frame-ancestors 'none'" in policy
    assert len(response["X-Request-ID"]) == 32
    assert response["X-Frame-Options"] == "DENY"
    nonce = policy.split("'nonce-")[1].split("'")[0]
    assert f'nonce="{nonce}"' in response.content.decode()  # htmx is loaded with the nonce


def test_htmx_is_vendored_not_from_a_cdn(alice: User) -> None:
    client = Client()
    client.force_login(alice)
    html = client.get("/").content.decode()
    assert 'src="/static/django_htmx/htmx-2.min.js"' in html
    assert "https://" not in html


def test_login_page_is_public_and_dashboard_is_not() -> None:
    assert Client().get("/accounts/login/").status_code == 200
    assert Client().get("/").status_code == 302


@pytest.mark.redis
def test_healthz_reports_database_and_redis() -> None:
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "redis": "ok"}


def test_healthz_is_503_when_redis_is_down(settings) -> None:
    from core import queues

    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    queues.redis_connection.cache_clear()
    try:
        response = Client().get("/healthz")
    finally:
        queues.redis_connection.cache_clear()
    assert response.status_code == 503
    assert response.json()["redis"].startswith("error: ")


def test_audit_review_filters_and_pages_with_bounded_queries(
    carol: User, django_assert_max_num_queries
) -> None:
    for index in range(120):
        audit.record(Action.GC_RAN if index % 2 else Action.GPU_RESERVED, index=index)
    client = Client()
    client.force_login(carol)
    with django_assert_max_num_queries(6):
        first = client.get("/audit/")
    html = first.content.decode()
    assert html.count('<tr>\n      <td data-label="#"><a href="/audit/events/') == 50
    newest, oldest_shown = AuditEvent.objects.order_by("-seq").values_list("seq", flat=True)[
        0:50:49
    ]
    assert f"/audit/events/{newest}/" in html
    assert f'href="?before={oldest_shown}"' in html
    older = client.get(f"/audit/?before={oldest_shown}", headers={"HX-Request": "true"})
    assert "<html" not in older.content.decode()  # the htmx partial only
    assert f"/audit/events/{oldest_shown - 1}/" in older.content.decode()
    assert f"/audit/events/{oldest_shown}/" not in older.content.decode()
    filtered = client.get("/audit/?action=gpu.reserved").content.decode()
    assert "gc.ran</code>" not in filtered
    assert "gpu.reserved</code>" in filtered


def test_audit_event_page_shows_payload_and_hashes(carol: User) -> None:
    event = audit.record(Action.GC_RAN, bytes_reclaimed=4096)
    client = Client()
    client.force_login(carol)
    html = client.get(f"/audit/events/{event.seq}/").content.decode()
    assert "&quot;bytes_reclaimed&quot;: 4096" in html
    assert event.hash in html


def test_user_supplied_text_is_escaped(carol: User) -> None:
    audit.record(Action.AUTH_LOGIN_FAILED, attempted_username="<script>alert(1)</script>")
    client = Client()
    client.force_login(carol)
    html = client.get("/audit/events/1/").content.decode()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;" in html
