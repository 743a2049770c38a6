"""Settings from the environment: typed readers refuse bad values with a clear message."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from config.env import (
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_secret,
    parse_database_url,
)
from tests.conftest import BASE_DIR, clean_environ, run_manage


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("YES", True),
        ("on", True),
        ("0", False),
        ("False", False),
        ("off", False),
        ("", True),
    ],
)
def test_env_bool_reads_the_usual_spellings(raw: str, expected: bool) -> None:
    assert env_bool("X", default=True, environ={"X": raw}) is expected


def test_env_bool_refuses_anything_else_naming_the_variable() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"DEBUG='treu' is not a boolean; use one of"):
        env_bool("DEBUG", environ={"DEBUG": "treu"})


def test_env_int_enforces_bounds_and_syntax() -> None:
    assert env_int("N", 5, environ={}) == 5
    assert env_int("N", 5, environ={"N": " 42 "}) == 42
    with pytest.raises(ImproperlyConfigured, match=r"N='4\.5' is not a whole number"):
        env_int("N", 5, environ={"N": "4.5"})
    with pytest.raises(ImproperlyConfigured, match="N=0 is below the minimum of 1"):
        env_int("N", 5, minimum=1, environ={"N": "0"})
    with pytest.raises(ImproperlyConfigured, match="above the maximum"):
        env_int("N", 5, maximum=10, environ={"N": "11"})


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf"])
def test_env_float_refuses_non_finite_numbers(raw: str) -> None:
    with pytest.raises(ImproperlyConfigured, match="finite"):
        env_float("F", 0.5, environ={"F": raw})


def test_env_list_and_choice() -> None:
    assert env_list("L", environ={"L": "a, b,,c "}) == ["a", "b", "c"]
    assert env_choice("C", ("text", "json"), "text", environ={"C": "JSON"}) == "json"
    with pytest.raises(ImproperlyConfigured, match="C='xml' is not one of: text, json"):
        env_choice("C", ("text", "json"), "text", environ={"C": "xml"})


def test_env_secret_reads_a_file_and_refuses_both_forms(tmp_path: Path) -> None:
    secret_file = tmp_path / "key"
    secret_file.write_text("s3cret\n")
    assert env_secret("KEY", environ={"KEY_FILE": str(secret_file)}) == "s3cret"
    assert env_secret("KEY", environ={"KEY": "direct"}) == "direct"
    with pytest.raises(ImproperlyConfigured, match="both KEY and KEY_FILE are set"):
        env_secret("KEY", environ={"KEY": "a", "KEY_FILE": str(secret_file)})
    with pytest.raises(ImproperlyConfigured, match=r"KEY_FILE=.* cannot be read"):
        env_secret("KEY", environ={"KEY_FILE": str(tmp_path / "absent")})
    (tmp_path / "empty").write_text("")
    with pytest.raises(ImproperlyConfigured, match="is empty"):
        env_secret("KEY", environ={"KEY_FILE": str(tmp_path / "empty")})


def test_database_url_parses_sqlite_and_postgres() -> None:
    relative = parse_database_url("sqlite:///var/db.sqlite3", base_dir=Path("/srv/berth"))
    assert relative == {"ENGINE": "django.db.backends.sqlite3", "NAME": "/srv/berth/var/db.sqlite3"}
    absolute = parse_database_url("sqlite:////data/berth.db", base_dir=Path("/srv"))
    assert absolute["NAME"] == "/data/berth.db"
    pg = parse_database_url(
        "postgres://berth:p%40ss@db.internal:5433/berth?sslmode=require", base_dir=Path("/")
    )
    assert pg == {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "berth",
        "USER": "berth",
        "PASSWORD": "p@ss",
        "HOST": "db.internal",
        "PORT": "5433",
        "OPTIONS": {"sslmode": "require"},
    }


def test_database_url_errors_hide_the_password() -> None:
    with pytest.raises(ImproperlyConfigured) as error:
        parse_database_url("mysql://u:hunter2@h/db", base_dir=Path("/"))
    assert "hunter2" not in str(error.value)
    assert "unsupported scheme 'mysql'" in str(error.value)
    with pytest.raises(ImproperlyConfigured, match="names no database"):
        parse_database_url("postgres://u:hunter2@h:5432/", base_dir=Path("/"))


def _settings_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = clean_environ("SECRET_KEY", "DATABASE_URL", "ALLOWED_HOSTS")
    env.update(
        {"BERTH_VAR_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "config.settings", **extra}
    )
    return env


def test_production_refuses_to_start_without_a_secret_key(tmp_path: Path) -> None:
    result = run_manage(
        "check", env=_settings_env(tmp_path, BERTH_ENV="production", ALLOWED_HOSTS="berth.example")
    )
    assert result.returncode != 0
    assert "SECRET_KEY is required when BERTH_ENV=production" in result.stderr


def test_production_requires_allowed_hosts(tmp_path: Path) -> None:
    result = run_manage(
        "check", env=_settings_env(tmp_path, BERTH_ENV="production", SECRET_KEY="x" * 60)
    )
    assert result.returncode != 0
    assert "ALLOWED_HOSTS is required" in result.stderr


def test_development_secret_key_is_generated_once_and_private(tmp_path: Path) -> None:
    env = _settings_env(tmp_path)
    first = run_manage(
        "shell",
        "--no-imports",
        "-c",
        "from django.conf import settings; print(settings.SECRET_KEY)",
        env=env,
    )
    second = run_manage(
        "shell",
        "--no-imports",
        "-c",
        "from django.conf import settings; print(settings.SECRET_KEY)",
        env=env,
    )
    assert first.returncode == 0, first.stderr
    key_file = tmp_path / "secret_key"
    assert first.stdout.strip() == second.stdout.strip() == key_file.read_text().strip()
    assert len(first.stdout.strip()) >= 50
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_bad_value_stops_start_up_with_the_variable_named(tmp_path: Path) -> None:
    result = run_manage("check", env=_settings_env(tmp_path, DEBUG="maybe"))
    assert result.returncode != 0
    assert "DEBUG='maybe' is not a boolean" in result.stderr


def test_production_settings_pass_check_deploy(tmp_path: Path) -> None:
    env = _settings_env(
        tmp_path,
        BERTH_ENV="production",
        SECRET_KEY="k" * 10 + "-Zq8#x!2vL0p9mN4bR7tY1wE6uI3oA5sD8fG2hJ" * 2,
        ALLOWED_HOSTS="berth.example",
        STATIC_ROOT=str(tmp_path / "static"),
        SECURE_HSTS_INCLUDE_SUBDOMAINS="1",
        SECURE_HSTS_PRELOAD="1",
        BERTH_AUDIT_ANCHOR_DIR=str(tmp_path),
        BERTH_AUDIT_ANCHOR_KEY="anchor-key-" + "x" * 40,
    )
    result = run_manage("check", "--deploy", "--fail-level", "WARNING", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert BASE_DIR.exists()
