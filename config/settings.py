"""Berth's settings, read from the environment (12-factor).

Defaults give the embedded set-up: SQLite under ``var/``, Redis on localhost, a development
secret key generated once into ``var/secret_key``. ``BERTH_ENV=production`` turns on the rules a
real installation needs: ``SECRET_KEY`` and ``ALLOWED_HOSTS`` required, secure cookies, HSTS.
The README's configuration table lists every variable read here.
"""

from __future__ import annotations

import os
import re
import secrets
from datetime import timedelta
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from django.utils.csp import CSP

from config.env import (
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_secret,
    env_str,
    parse_database_url,
)
from config.rq_queues import QueueSettings

BASE_DIR = Path(__file__).resolve().parent.parent

BERTH_ENV = env_choice("BERTH_ENV", ("development", "production"), default="development")
PRODUCTION = BERTH_ENV == "production"
VAR_DIR = Path(env_str("BERTH_VAR_DIR", str(BASE_DIR / "var"))).resolve()

DEBUG = env_bool("DEBUG", default=False)

# Local development keeps one generated key so sessions survive restarts; production must be
# given one, because a key generated per machine would log users out between web replicas.
DEV_SECRET_KEY_FILE = VAR_DIR / "secret_key"


def _development_secret_key() -> str:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: when the web server and the worker start together only one key is written.
        fd = os.open(DEV_SECRET_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return DEV_SECRET_KEY_FILE.read_text(encoding="utf-8").strip()
    key = secrets.token_urlsafe(50)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key + "\n")
    return key


SECRET_KEY = env_secret("SECRET_KEY")
if SECRET_KEY is None:
    if PRODUCTION:
        raise ImproperlyConfigured(
            "SECRET_KEY is required when BERTH_ENV=production; set SECRET_KEY or SECRET_KEY_FILE "
            "to at least 50 random characters (python -c 'import secrets; "
            "print(secrets.token_urlsafe(50))')"
        )
    SECRET_KEY = _development_secret_key()
SECRET_KEY_FALLBACKS = env_list("SECRET_KEY_FALLBACKS")

ALLOWED_HOSTS = env_list(
    "ALLOWED_HOSTS", default=() if PRODUCTION else ("localhost", "127.0.0.1", "[::1]")
)
if PRODUCTION and not ALLOWED_HOSTS:
    raise ImproperlyConfigured(
        "ALLOWED_HOSTS is required when BERTH_ENV=production; "
        "set it to the console's host names, comma-separated"
    )
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_htmx",
    "django_rq",
    "axes",
    "config",
    "agent",
    "core",
    "accounts",
    "audit",
    "models_registry",
    "gpus",
    "deployments",
    "gateway",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "config.middleware.PermissionsPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # Request id and client IP first, so every log line below carries them.
    "core.middleware.RequestContextMiddleware",
    "django.middleware.csp.ContentSecurityPolicyMiddleware",
    # The RQ dashboard's fixed inline snippets, allowed by hash on its pages only.
    "config.rq_dashboard.RqDashboardCspMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # Contention that outlasted a view's retries: 503 + Retry-After, audited (never a 500).
    "audit.contention.ContentionMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last, as django-axes requires: refuses sign-in attempts after repeated failures.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.template.context_processors.csp",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "accounts.context_processors.role",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'berth.sqlite3'}")
_database = parse_database_url(DATABASE_URL, base_dir=BASE_DIR)
if _database["ENGINE"].endswith("sqlite3"):
    Path(_database["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    _database["OPTIONS"] = {
        # IMMEDIATE takes the write lock at BEGIN: writers queue instead of failing with
        # "database is locked" half-way through, and audit appends are serialized.
        "transaction_mode": "IMMEDIATE",
        "timeout": env_int("SQLITE_TIMEOUT_S", default=20, minimum=1),
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # A file, not memory, so worker and server processes started by tests see the test data.
    _database["TEST"] = {"NAME": str(Path(_database["NAME"]).with_suffix("")) + "-test.sqlite3"}
else:
    # 0 by default: under ASGI each request's sync code runs on a thread of its own, so a kept
    # connection would outlive its thread and close only when garbage-collected (Django's docs
    # say to disable persistent connections in async mode). Workers reconnect per job anyway.
    _database["CONN_MAX_AGE"] = env_int("CONN_MAX_AGE", default=0, minimum=0)
    _database["CONN_HEALTH_CHECKS"] = True
DATABASES = {"default": _database}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis and RQ ---------------------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
# The configured queue, and every host's queue (host:<name>) Redis knows, for the RQ dashboard.
RQ_QUEUES = QueueSettings(
    default={
        "URL": REDIS_URL,
        "DEFAULT_TIMEOUT": env_int("RQ_DEFAULT_TIMEOUT_S", 600, minimum=1),
    },
)
RQ = {"JOB_CLASS": "core.queues.ContextJob"}
RQ_SHOW_ADMIN_LINK = True

# --- Auth -----------------------------------------------------------------------------------
AUTH_USER_MODEL = "accounts.User"
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",  # first: counts failures, refuses locked-out logins
    "django.contrib.auth.backends.ModelBackend",
]
# Login throttling (django-axes; its defaults lock an address permanently): lock a *username from
# one address* after 5
# failures for 15 minutes — locking by address alone would let one attacker behind the proxy
# lock everyone out, and a permanent lockout would need an admin each time.
AXES_ENABLED = env_bool("AXES_ENABLED", default=True)
AXES_FAILURE_LIMIT = env_int("AXES_FAILURE_LIMIT", 5, minimum=1, maximum=100)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("AXES_COOLOFF_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_VERBOSE = False
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
        "OPTIONS": {"min_length": 12},
    },
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

SESSION_COOKIE_AGE = int(timedelta(hours=env_int("SESSION_HOURS", 12, minimum=1)).total_seconds())
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
# An ops console holds root on the GPU hosts: the session ends with the browser too (and after
# SESSION_HOURS in any case), and a new session id is issued at sign-in (Django's default).
SESSION_EXPIRE_AT_BROWSER_CLOSE = env_bool("SESSION_EXPIRE_AT_BROWSER_CLOSE", default=True)
CSRF_COOKIE_SAMESITE = "Lax"

# --- Security headers ------------------------------------------------------------------------
# Number of reverse proxies in front of Berth that append to X-Forwarded-For. 0 means clients
# connect directly and forwarded headers are ignored (a client could forge them).
BERTH_TRUSTED_PROXIES = env_int("BERTH_TRUSTED_PROXIES", default=0, minimum=0, maximum=10)
if BERTH_TRUSTED_PROXIES:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Sign-in throttling counts failures per the address Berth itself derives (the one the audit
# trail records); axes' own AXES_IPWARE_* settings need django-ipware, which Berth does not use.
AXES_CLIENT_IP_CALLABLE = "core.middleware.client_ip_for"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", default=PRODUCTION)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", default=PRODUCTION)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", default=PRODUCTION)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", default=31_536_000 if PRODUCTION else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", default=False)
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("DATA_UPLOAD_MAX_MEMORY_SIZE", 1_048_576, minimum=1024)
# Berth's largest form has ~15 fields; Django's 1,000 would only help a flood of fields.
DATA_UPLOAD_MAX_NUMBER_FIELDS = 200
DATA_UPLOAD_MAX_NUMBER_FILES = 10

# A strict policy: no inline script or style, nothing from another origin. Scripts carry the
# per-response nonce (htmx is vendored and served from 'self').
SECURE_CSP = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF, CSP.NONCE],
    "style-src": [CSP.SELF],
    "img-src": [CSP.SELF, "data:"],
    "font-src": [CSP.SELF],
    "connect-src": [CSP.SELF],
    "form-action": [CSP.SELF],
    "frame-ancestors": [CSP.NONE],
    "base-uri": [CSP.NONE],
    "object-src": [CSP.NONE],
}

# --- Static files ---------------------------------------------------------------------------
STATIC_URL = "static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(VAR_DIR / "static"))).resolve()
if not PRODUCTION:
    STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # whitenoise warns about a missing root
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if PRODUCTION
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
# Outside production whitenoise serves straight from the source folders: no collectstatic step.
WHITENOISE_USE_FINDERS = not PRODUCTION
WHITENOISE_AUTOREFRESH = DEBUG

# --- I18N -----------------------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = False
USE_TZ = True

# --- Logging --------------------------------------------------------------------------------
_LOG_LEVEL_GIVEN = env_choice("LOG_LEVEL", ("debug", "info", "warning", "error"), default="")
LOG_LEVEL = (_LOG_LEVEL_GIVEN or "info").upper()
# RQ writes two or three INFO lines per job; a serving deployment's watch job runs every
# second, which scrolled make run's first-run admin login off the screen. Its workers log at
# WARNING unless LOG_LEVEL is set.
RQ_LOG_LEVEL = LOG_LEVEL if _LOG_LEVEL_GIVEN else "WARNING"
LOG_FORMAT = env_choice("LOG_FORMAT", ("text", "json"), default="text")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "config.log.ContextFilter"}},
    "formatters": {
        "text": {
            "format": "%(asctime)s %(levelname)-7s [%(request_id)s] %(name)s: %(message)s",
        },
        "json": {"()": "config.log.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "filters": ["context"],
            "formatter": LOG_FORMAT,
        },
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        # RQ adds its own handler unless the logger has one: give it ours, once.
        "rq.worker": {"handlers": ["console"], "level": RQ_LOG_LEVEL, "propagate": False},
        "rq.job": {"handlers": ["console"], "level": RQ_LOG_LEVEL, "propagate": False},
        "rq.scheduler": {"level": RQ_LOG_LEVEL},
    },
}

# --- Berth ----------------------------------------------------------------------------------
BERTH_BIND = env_str("BERTH_BIND", "127.0.0.1")
BERTH_PORT = env_int("BERTH_PORT", default=8000, minimum=1, maximum=65535)
# berth_up runs manage.py berth_demo after migrating (stand-in engine, demo model, team, member).
BERTH_DEMO = env_bool("BERTH_DEMO", default=False)
# Bearer token Prometheus sends to /metrics (staff sessions need none); empty: staff only.
BERTH_METRICS_TOKEN = env_secret("BERTH_METRICS_TOKEN") or ""
if BERTH_METRICS_TOKEN and len(BERTH_METRICS_TOKEN) < 24:
    raise ImproperlyConfigured(
        "BERTH_METRICS_TOKEN is shorter than 24 characters; generate one with "
        "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
    )

# --- GPU inventory ---------------------------------------------------------------------------
# How often each host's agent collects (dcgm-exporter's default is 30 s; NVML calls are cheap
# once nvmlInit has run — it is the init that costs, NVIDIA/mig-parted PR #332).
BERTH_AGENT_INTERVAL_S = env_int("BERTH_AGENT_INTERVAL_S", default=15, minimum=1, maximum=3600)
# A host is offline (and gets no placements) after this many intervals without a heartbeat.
BERTH_AGENT_OFFLINE_AFTER = env_int("BERTH_AGENT_OFFLINE_AFTER", default=3, minimum=2)
# Placement refuses readings older than this many intervals (2: one late reading is tolerated,
# two are not).
BERTH_GPU_STALE_AFTER = env_int("BERTH_GPU_STALE_AFTER", default=2, minimum=1)
# Memory held by processes Berth did not start above which a GPU is flagged and not chosen.
BERTH_GPU_FOREIGN_THRESHOLD_MIB = env_int("BERTH_GPU_FOREIGN_THRESHOLD_MIB", 1024, minimum=0)
BERTH_GPU_RAW_RETENTION_H = env_int("BERTH_GPU_RAW_RETENTION_H", default=48, minimum=1)
BERTH_GPU_ROLLUP_MINUTES = env_int("BERTH_GPU_ROLLUP_MINUTES", default=5, minimum=1, maximum=60)
BERTH_GPU_ROLLUP_RETENTION_D = env_int("BERTH_GPU_ROLLUP_RETENTION_D", default=30, minimum=1)
# The image nvidia-smi runs in when neither NVML nor nvidia-smi work on the agent itself; the
# NVIDIA runtime mounts nvidia-smi into it, so it only needs a C library.
BERTH_GPU_PROBE_IMAGE = env_str("BERTH_GPU_PROBE_IMAGE", "ubuntu:24.04")
BERTH_GPU_PROBE_TIMEOUT_S = env_int("BERTH_GPU_PROBE_TIMEOUT_S", default=60, minimum=5)
# The name berth_up registers the machine it runs on under (default: this host's name).
BERTH_LOCAL_HOST_NAME = env_str("BERTH_LOCAL_HOST_NAME", "")
# berth_up runs the GPU agent for this machine (set 0 on a console host without GPUs).
BERTH_LOCAL_AGENT = env_bool("BERTH_LOCAL_AGENT", default=True)

# --- Deployments -----------------------------------------------------------------------------
# Host ports engines are published on (one per live deployment per host) and the address they
# bind: 127.0.0.1 keeps vLLM's unauthenticated routes off the network unless a proxy fronts it.
BERTH_ENGINE_PORT_MIN = env_int("BERTH_ENGINE_PORT_MIN", 30000, minimum=1024, maximum=65535)
BERTH_ENGINE_PORT_MAX = env_int("BERTH_ENGINE_PORT_MAX", 30999, minimum=1024, maximum=65535)
BERTH_ENGINE_BIND = env_str("BERTH_ENGINE_BIND", "127.0.0.1")
# How often the watcher job looks at a loading or serving engine (seconds; the target is that
# Berth says "ready" within 2 s of the engine answering).
BERTH_MONITOR_INTERVAL_S = env_float("BERTH_MONITOR_INTERVAL_S", 1.0, minimum=0.2, maximum=60)
# Names this console's containers, volumes and labels, so two consoles (or two test runs) can
# share one Docker engine without touching each other's engines.
BERTH_INSTANCE = env_str("BERTH_INSTANCE", "berth")
if not re.fullmatch(r"[a-z][a-z0-9-]{0,19}", BERTH_INSTANCE):
    raise ImproperlyConfigured(
        f"BERTH_INSTANCE={BERTH_INSTANCE!r}: use 1-20 lowercase letters, digits and hyphens"
    )
# Docker garbage collection on each GPU host (builder cache, stopped engines, dangling images).
BERTH_GC_INTERVAL_H = env_int("BERTH_GC_INTERVAL_H", 24, minimum=0, maximum=24 * 30)
BERTH_RECONCILE_INTERVAL_S = env_int("BERTH_RECONCILE_INTERVAL_S", 60, minimum=5, maximum=3600)
# The scaler (deployments.scaling): how often it looks at autoscaled deployments, and how long a
# replica being scaled down may take to finish its requests before it is stopped anyway.
BERTH_SCALER_INTERVAL_S = env_float("BERTH_SCALER_INTERVAL_S", 10.0, minimum=0.2, maximum=600)
BERTH_SCALE_DRAIN_TIMEOUT_S = env_int(
    "BERTH_SCALE_DRAIN_TIMEOUT_S", default=300, minimum=0, maximum=3600
)
BERTH_STOP_TIMEOUT_S = env_int("BERTH_STOP_TIMEOUT_S", 30, minimum=1, maximum=600)

# --- Audit trail -----------------------------------------------------------------------------
# The whole hash chain is verified this often (an agent books it, the default worker runs it)
# and the result audited (0: never; "Verify chain" on the review page still works).
BERTH_AUDIT_VERIFY_INTERVAL_H = env_int(
    "BERTH_AUDIT_VERIFY_INTERVAL_H", default=24, minimum=0, maximum=24 * 30
)
# Audit events older than this may be removed with ``manage.py prune_audit`` (0: keep forever,
# the default; prune_audit then refuses without --force). GPU snapshot retention is
# BERTH_GPU_RAW_RETENTION_H / BERTH_GPU_ROLLUP_RETENTION_D above, applied hourly by each agent.
BERTH_AUDIT_RETENTION_DAYS = env_int("BERTH_AUDIT_RETENTION_DAYS", default=0, minimum=0)
# Signed anchors of the chain outside the database (audit/anchors.py): the directory they are
# written to (the database's role must not be able to write it; empty: anchors off) and the
# HMAC key, which only the console's web and default worker hold — never a host agent.
BERTH_AUDIT_ANCHOR_DIR = env_str("BERTH_AUDIT_ANCHOR_DIR", "") or ""
BERTH_AUDIT_ANCHOR_KEY = env_secret("BERTH_AUDIT_ANCHOR_KEY") or ""
# Page-cache prewarm of a model's weights while its container starts
# (deployments/runtime/prewarm.py): auto = on for network and object storage mounts; skipped when
# the weights exceed this fraction of the host's available memory (vLLM's own auto-prefetch stops
# at 90% of RAM, vllm/model_executor/model_loader/weight_utils.py).
BERTH_PREWARM = env_choice("BERTH_PREWARM", ("auto", "on", "off"), "auto")
BERTH_PREWARM_RAM_FRACTION = env_float(
    "BERTH_PREWARM_RAM_FRACTION", 0.8, minimum=0.05, maximum=0.95
)
BERTH_PREWARM_THREADS = env_int("BERTH_PREWARM_THREADS", 4, minimum=1, maximum=64)

# --- Gateway (the OpenAI-compatible front door, ``manage.py berth_gateway``) --------------------
BERTH_GATEWAY_BIND = env_str("BERTH_GATEWAY_BIND", "127.0.0.1")
BERTH_GATEWAY_PORT = env_int("BERTH_GATEWAY_PORT", default=8001, minimum=1, maximum=65535)
# How long a request for a model whose replicas are still loading waits before a 503.
BERTH_GATEWAY_HOLD_S = env_int("BERTH_GATEWAY_HOLD_S", default=60, minimum=0, maximum=3600)
# Longest silence from an engine (between streamed tokens, or before a non-streamed answer).
BERTH_GATEWAY_UPSTREAM_TIMEOUT_S = env_int(
    "BERTH_GATEWAY_UPSTREAM_TIMEOUT_S", default=600, minimum=1, maximum=3600
)
# Per-minute usage rows kept for pages, /metrics and the CSV export.
BERTH_GATEWAY_USAGE_RETENTION_D = env_int(
    "BERTH_GATEWAY_USAGE_RETENTION_D", default=90, minimum=1, maximum=3650
)
# The address users reach the gateway at, for the curl lines on the pages.
BERTH_GATEWAY_URL = env_str(
    "BERTH_GATEWAY_URL", f"http://{BERTH_GATEWAY_BIND}:{BERTH_GATEWAY_PORT}"
)

# The real CPU engine image (manage.py build_engine_image vllm-cpu, docker/vllm-cpu/): where its
# packages come from. Empty pip URLs mean pip's own configuration (pip.conf, PIP_INDEX_URL);
# elsewhere than here the torch ...+cpu pin needs PyTorch's CPU index as the torch URL.
BERTH_ENGINE_DEBIAN_MIRROR = env_str("BERTH_ENGINE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BERTH_ENGINE_PIP_INDEX_URL = env_str("BERTH_ENGINE_PIP_INDEX_URL", "")
BERTH_ENGINE_TORCH_INDEX_URL = env_str("BERTH_ENGINE_TORCH_INDEX_URL", "")
BERTH_ENGINE_WHEELHOUSE = env_str("BERTH_ENGINE_WHEELHOUSE", str(VAR_DIR / "engine-wheels"))
# The share of a host's memory (as its agent reports it) that CPU deployments may reserve in
# all; the rest stays for the system, Berth's agent and the page cache.
BERTH_CPU_MEMORY_FRACTION = env_float("BERTH_CPU_MEMORY_FRACTION", 0.8, minimum=0.1, maximum=0.95)
# Which engine manage.py berth_demo uses: auto = the real CPU vLLM when its image is here or can
# be built (docker/vllm-cpu/), else the stand-in; vllm = the real one or fail; stand-in.
BERTH_DEMO_ENGINE = env_choice("BERTH_DEMO_ENGINE", ("auto", "vllm", "stand-in"), "auto")
