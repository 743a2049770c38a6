"""Web hardening: security headers and cookies on real responses, ``check --deploy`` clean with
production settings, and Berth's own system checks (secret key, login throttling, image pins)."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from django.test import Client

from accounts.models import User
from config.checks import check_login_throttling, check_secret_key, secret_key_problem
from deployments.checks import check_images_pinned
from deployments.models import EngineImage
from tests.conftest import PASSWORD, clean_environ, run_manage

PRODUCTION_ENV = {
    "BERTH_ENV": "production",
    "ALLOWED_HOSTS": "berth.example",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "1",
    "SECURE_HSTS_PRELOAD": "1",
    "BERTH_AUDIT_ANCHOR_DIR": "/tmp",  # noqa: S108 (only checked to be set)
    "BERTH_AUDIT_ANCHOR_KEY": "anchor-key-" + "x" * 40,
}


@pytest.mark.django_db
def test_pages_carry_the_security_headers(alice: User) -> None:
    client = Client()
    client.force_login(alice)
    for path in ("/accounts/login/", "/deployments/"):
        response = (Client() if path.startswith("/accounts") else client).get(path)
        assert response.status_code == 200, path
        csp = response["Content-Security-Policy"]
        for directive in ("default-src 'self'", "frame-ancestors 'none'", "object-src 'none'"):
            assert directive in csp, (path, csp)
        assert "'unsafe-inline'" not in csp
        assert response["X-Content-Type-Options"] == "nosniff"
        assert response["Referrer-Policy"] == "same-origin"
        assert response["X-Frame-Options"] == "DENY"
        assert response["Cross-Origin-Opener-Policy"] == "same-origin"
        assert "camera=()" in response["Permissions-Policy"]
        assert "geolocation=()" in response["Permissions-Policy"]


@pytest.mark.django_db
def test_the_session_cookie_is_http_only_same_site_and_ends_with_the_browser(alice: User) -> None:
    response = Client().post("/accounts/login/", {"username": "alice", "password": PASSWORD})
    assert response.status_code == 302
    cookie = response.cookies["sessionid"]
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Lax"
    assert (cookie["expires"], cookie["max-age"]) == ("", "")  # a browser-session cookie


def _production_check(**overrides: str) -> Any:
    env = clean_environ("BERTH_", "SECRET_KEY", "DEBUG", "SECURE_", "SESSION_", "CSRF_")
    env.update({**PRODUCTION_ENV, "SECRET_KEY": secrets.token_urlsafe(50), **overrides})
    return run_manage("check", "--deploy", "--fail-level", "WARNING", env=env)


def test_check_deploy_is_clean_with_production_settings(tmp_path: Any) -> None:
    result = _production_check(
        STATIC_ROOT=str(tmp_path / "static"), DATABASE_URL=f"sqlite:///{tmp_path}/empty.sqlite3"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_fails_on_a_weak_production_key(tmp_path: Any) -> None:
    result = _production_check(SECRET_KEY="changeme-" * 8, STATIC_ROOT=str(tmp_path / "static"))
    assert result.returncode != 0
    assert "berth.E005" in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("short-but-random-Zx81", "characters"),
        ("ab" * 40, "distinct"),
        ("django-insecure-" + secrets.token_urlsafe(50), "placeholder"),
        ("changeme" + secrets.token_urlsafe(50), "placeholder"),
        (secrets.token_urlsafe(50), None),
    ],
    ids=["short", "low-entropy", "django-insecure", "placeholder", "random"],  # keys are random
)
def test_secret_key_strength(key: str, problem: str | None) -> None:
    found = secret_key_problem(key)
    assert (found is None) if problem is None else (problem in found)


def test_the_secret_key_check_covers_fallbacks_in_production(settings: Any) -> None:
    settings.PRODUCTION = True
    settings.SECRET_KEY = secrets.token_urlsafe(50)
    settings.SECRET_KEY_FALLBACKS = ["old-key"]
    errors = check_secret_key(None)
    assert [error.id for error in errors] == ["berth.E005"]
    assert "SECRET_KEY_FALLBACKS[0]" in errors[0].msg
    settings.PRODUCTION = False
    assert check_secret_key(None) == []


def test_login_throttling_must_not_lock_a_whole_address(settings: Any) -> None:
    assert check_login_throttling(None) == []
    settings.AXES_LOCKOUT_PARAMETERS = ["ip_address"]
    settings.AXES_COOLOFF_TIME = None
    messages = [warning.msg for warning in check_login_throttling(None)]
    assert any("whole address" in message for message in messages)
    assert any("until an admin" in message for message in messages)


@pytest.mark.django_db
def test_enabled_vllm_images_should_be_pinned_by_digest() -> None:
    EngineImage.objects.create(name="stand-in", reference="berth/engine:1", is_stand_in=True)
    EngineImage.objects.create(name="old", reference="vllm/vllm-openai:v0.9.0", enabled=False)
    pinned = "vllm/vllm-openai@sha256:" + "c" * 64
    EngineImage.objects.create(name="pinned", reference=pinned)
    assert check_images_pinned(None) == []
    EngineImage.objects.create(name="vllm", reference="vllm/vllm-openai:v0.11.0")
    assert [warning.id for warning in check_images_pinned(None)] == ["berth.W010"]


@pytest.mark.parametrize(
    "reference",
    [
        "vllm/vllm-openai:v0.11.0\n",
        "vllm/vllm-openai:v0.11.0 --privileged",
        "vllm/vllm-openai@sha256:" + "A" * 64,
        "vllm/vllm-openai@sha256:" + "a" * 63,
        "Vllm/vllm-openai:v1",
        "vllm/vllm-openai:-v1",
        "",
    ],
)
def test_image_references_follow_the_grammar(reference: str) -> None:
    from django.core.exceptions import ValidationError

    image = EngineImage(name="vllm", reference=reference)
    with pytest.raises(ValidationError) as error:
        image.clean()
    assert "reference" in error.value.message_dict


def test_a_pinned_reference_names_its_digest_and_repository() -> None:
    image = EngineImage(reference="registry.local:5000/vllm/vllm-openai:v1@sha256:" + "d" * 64)
    image.clean()
    assert image.digest == "sha256:" + "d" * 64
    assert image.repository == "registry.local:5000/vllm/vllm-openai"
    assert EngineImage(reference="vllm/vllm-openai:v1").digest == ""


@pytest.mark.parametrize(
    ("reference", "repo_digest"),
    [
        ("docker.io/vllm/vllm-openai:v0.11.0", "vllm/vllm-openai"),
        ("docker.io/library/ubuntu:24.04", "ubuntu"),
        ("library/ubuntu", "ubuntu"),
    ],
    ids=["docker-io", "docker-io-library", "library"],
)
def test_a_pinned_docker_hub_image_matches_however_the_allow_list_spells_it(
    reference: str, repo_digest: str
) -> None:
    """Docker reports a Docker Hub image's RepoDigests in the short form (``ubuntu@sha256:``,
    ``vllm/vllm-openai@sha256:``); an allow-list entry written with ``docker.io/`` or
    ``library/`` names the same image and must not be refused as another digest."""
    from unittest import mock

    from deployments.runtime import host_checks

    digest = "sha256:" + "b" * 64
    local = mock.Mock(id="sha256:" + "c" * 64, attrs={"RepoDigests": [f"{repo_digest}@{digest}"]})
    client = mock.Mock()
    client.images.get.return_value = local
    client.images.list.return_value = [local]
    deployment = mock.Mock(image=EngineImage(name="hub", reference=f"{reference}@{digest}"))

    with mock.patch.object(host_checks.audit, "record"):  # a refusal would be audited
        assert host_checks.pinned_image(client, deployment) == local.id
