"""Typed readers for settings taken from the environment.

Every reader names the variable and the fix when a value is wrong, so a typo in a deployment
manifest stops start-up with one clear line instead of surfacing later as odd behaviour::

    DEBUG = env_bool("DEBUG", default=False)
    CONN_MAX_AGE = env_int("CONN_MAX_AGE", default=60, minimum=0)
    SECRET_KEY = env_secret("SECRET_KEY")          # SECRET_KEY or SECRET_KEY_FILE

Secrets may come from ``<NAME>_FILE`` (a path whose contents are the value, as Docker and
Kubernetes mount them); setting both ``NAME`` and ``NAME_FILE`` is an error.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _raw(name: str, environ: Mapping[str, str] | None) -> str | None:
    value = (os.environ if environ is None else environ).get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def env_str(
    name: str, default: str | None = None, *, environ: Mapping[str, str] | None = None
) -> str | None:
    """The variable's value, stripped, or ``default`` when unset or blank."""
    value = _raw(name, environ)
    return default if value is None else value


def env_bool(name: str, default: bool = False, *, environ: Mapping[str, str] | None = None) -> bool:
    """1/0, true/false, yes/no, on/off (any case); anything else is refused."""
    value = _raw(name, environ)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ImproperlyConfigured(
        f"{name}={value!r} is not a boolean; use one of 1/0, true/false, yes/no, on/off"
    )


def env_int(
    name: str,
    default: int,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """A whole number, optionally bounded."""
    value = _raw(name, environ)
    if value is None:
        return default
    try:
        number = int(value, 10)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not a whole number") from None
    _check_bounds(name, number, minimum, maximum)
    return number


def env_float(
    name: str,
    default: float,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> float:
    """A finite number, optionally bounded (NaN and infinities are refused)."""
    value = _raw(name, environ)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise ImproperlyConfigured(f"{name}={value!r} must be a finite number")
    _check_bounds(name, number, minimum, maximum)
    return number


def _check_bounds(name: str, number: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={number} is below the minimum of {minimum}")
    if maximum is not None and number > maximum:
        raise ImproperlyConfigured(f"{name}={number} is above the maximum of {maximum}")


def env_list(
    name: str, default: Sequence[str] = (), *, environ: Mapping[str, str] | None = None
) -> list[str]:
    """A comma-separated list; blank items are dropped."""
    value = _raw(name, environ)
    if value is None:
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]


def env_choice(
    name: str, choices: Sequence[str], default: str, *, environ: Mapping[str, str] | None = None
) -> str:
    """One of a fixed set of words (case-insensitive)."""
    value = _raw(name, environ)
    if value is None:
        return default
    if value.lower() not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} is not one of: {', '.join(choices)}")
    return value.lower()


def env_secret(
    name: str, default: str | None = None, *, environ: Mapping[str, str] | None = None
) -> str | None:
    """A secret from ``NAME`` or from the file named by ``NAME_FILE`` (trailing newline dropped)."""
    direct = _raw(name, environ)
    file_name = _raw(f"{name}_FILE", environ)
    if direct is not None and file_name is not None:
        raise ImproperlyConfigured(f"both {name} and {name}_FILE are set; keep only one of them")
    if file_name is None:
        return default if direct is None else direct
    try:
        content = Path(file_name).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ImproperlyConfigured(
            f"{name}_FILE={file_name!r} cannot be read ({exc.strerror}); "
            "point it at a readable file holding the secret"
        ) from None
    if not content:
        raise ImproperlyConfigured(f"{name}_FILE={file_name!r} is empty; put the secret in it")
    return content


_POSTGRES_SCHEMES = frozenset({"postgres", "postgresql", "pgsql"})


def parse_database_url(url: str, *, base_dir: Path, name: str = "DATABASE_URL") -> dict:
    """Turn ``sqlite:///relative.db``, ``sqlite:////abs/path.db`` or
    ``postgres://user:pass@host:5432/db?sslmode=require`` into a Django ``DATABASES`` entry.

    Query parameters of a PostgreSQL URL become connection ``OPTIONS`` (libpq keywords).
    """
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = unquote(parts.path)
        if parts.netloc or not path.startswith("/") or path == "/":
            raise ImproperlyConfigured(
                f"{name}={url!r}: write sqlite:///relative/path.sqlite3 or sqlite:////absolute/path"
            )
        file_path = Path(path[1:])
        if not file_path.is_absolute():
            file_path = base_dir / file_path
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": str(file_path)}
    if parts.scheme in _POSTGRES_SCHEMES:
        database = unquote(parts.path.lstrip("/"))
        if not database:
            raise ImproperlyConfigured(f"{name}={_redact(url)!r} names no database; add /<dbname>")
        try:
            port = parts.port
        except ValueError:
            raise ImproperlyConfigured(f"{name}={_redact(url)!r} has an invalid port") from None
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": database,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": unquote(parts.hostname or ""),
            "PORT": str(port or ""),
            "OPTIONS": dict(parse_qsl(parts.query)),
        }
    raise ImproperlyConfigured(
        f"{name}={_redact(url)!r} has an unsupported scheme {parts.scheme!r}; "
        "use sqlite:///path or postgres://user:password@host:port/dbname"
    )


def _redact(url: str) -> str:
    """The URL with any password replaced, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
