"""Django settings for the AI agent server, read from the environment.

Every value that differs between a laptop and a deployment comes from an
environment variable through the typed helpers in ``aiagentserver.env``; see
doc/operations.md for the full list.
"""

from __future__ import annotations

import re
import secrets
import shutil
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from aiagentserver.env import (
    env_bool,
    env_choice,
    env_int,
    env_list,
    env_path,
    env_rate,
    env_redis_url,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = env_path("VAR_DIR", BASE_DIR / "var", base=BASE_DIR)

DEBUG = env_bool("DEBUG", False)


def _secret_key() -> str:
    key = env_str("SECRET_KEY")
    if key:
        return key
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off")
    # A development key, generated once and kept under var/ so that every
    # process of the same checkout (web, worker, Flower) shares it.
    key_file = VAR_DIR / "dev_secret_key"
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    return key_file.read_text().strip()


def _allowed_hosts() -> list[str]:
    hosts = env_list("ALLOWED_HOSTS", [])
    if hosts:
        return hosts
    if not DEBUG:
        raise ImproperlyConfigured(
            "ALLOWED_HOSTS must be set when DEBUG is off: the host names the server is reached by, "
            "comma-separated (for example ALLOWED_HOSTS=agents.example.com)"
        )
    return ["localhost", "127.0.0.1", "[::1]"]


def _proxy_ssl_header() -> tuple[str, str] | None:
    """The header by which a TLS-terminating proxy says that the client used HTTPS, as Django names it."""
    header = (env_str("SECURE_PROXY_SSL_HEADER") or "").strip()
    if not header:
        return None
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", header):
        raise ImproperlyConfigured(
            f"SECURE_PROXY_SSL_HEADER={header!r} is not a header name: use the header your proxy sets to "
            "'https', such as X-Forwarded-Proto"
        )
    return "HTTP_" + header.upper().replace("-", "_"), "https"


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = _allowed_hosts()
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# --- HTTPS, cookies and headers ---------------------------------------------------
# Off DEBUG the session and CSRF cookies go over HTTPS only; a deployment that serves plain HTTP
# (on a private network) turns that off with SECURE_COOKIES=0, or its admin login cannot work.
SECURE_COOKIES = env_bool("SECURE_COOKIES", not DEBUG)
SESSION_COOKIE_SECURE = SECURE_COOKIES
CSRF_COOKIE_SECURE = SECURE_COOKIES
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
# Behind a reverse proxy that terminates TLS, the request Django sees is plain HTTP: the proxy's
# header tells it that the client used HTTPS. Only set it when the proxy always sets (or strips) it.
SECURE_PROXY_SSL_HEADER = _proxy_ssl_header()
# Opt-in: usually the proxy redirects to HTTPS. /healthz stays reachable over HTTP for probes.
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
# Opt-in, once HTTPS works for good: browsers then refuse plain HTTP to the host for this long.
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)

INSTALLED_APPS = [
    # The admin's modules are registered by aiagentserver/urls.py (admin.autodiscover()), which only the
    # web processes load: a Celery worker then imports neither them nor what they import (DRF).
    "django.contrib.admin.apps.SimpleAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_results",
    "balancer",
    "orchestration",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "orchestration.middleware.BodySizeLimitMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "aiagentserver.urls"
WSGI_APPLICATION = "aiagentserver.wsgi.application"
ASGI_APPLICATION = "aiagentserver.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database() -> dict:
    url = env_str("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'db.sqlite3'}"
    try:
        # Connections are kept between requests and between a worker's jobs: opening one costs a
        # request or a job more than the rest of its database work (SQLite: a new connection sets
        # its pragmas and reads the schema, and the last one to close checkpoints the WAL).
        # A kept connection is checked before a request or job reuses it (no query with SQLite, a
        # "SELECT 1" with PostgreSQL), so that a database restart costs no failed request.
        config = dj_database_url.parse(
            url, conn_max_age=env_int("DB_CONN_MAX_AGE", 60, minimum=0), conn_health_checks=True
        )
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is not a valid database URL: {exc}") from None
    # How long a statement waits for a lock before it fails, on either database. A task's store write
    # holds the task's file lock while it writes the row: without a bound, a row or table lock held
    # elsewhere (a migration, a session left open) would hold the task, and its request or job, for as
    # long. A mirror write that fails leaves the task marked, and the recovery sweep writes the row.
    lock_timeout_s = env_int("DB_LOCK_TIMEOUT_SECONDS", 20, minimum=1)
    if config["ENGINE"] == "django.db.backends.postgresql":
        options = config.setdefault("OPTIONS", {})
        options["options"] = f"{options.get('options', '')} -c lock_timeout={lock_timeout_s * 1000}".strip()
    if config["ENGINE"] == "django.db.backends.sqlite3":
        # Several processes write (web, workers, the chord counter of
        # django-celery-results): WAL lets readers go on during a write,
        # IMMEDIATE takes the write lock at BEGIN so that two writers queue on
        # the busy timeout instead of failing with "database is locked".
        config["OPTIONS"] = {
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": lock_timeout_s,
        }
        # pytest-django uses this file, so that Celery workers started by the
        # tests in other processes see the same test database.
        config["TEST"] = {"NAME": str(Path(config["NAME"]).with_name("test_" + Path(config["NAME"]).name))}
        Path(config["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    return config


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"

# --- the agent server ---------------------------------------------------------

REDIS_URL = env_redis_url("REDIS_URL", "redis://127.0.0.1:6379/0")
TASKS_STATE_DIR = env_path("TASKS_STATE_DIR", VAR_DIR / "tasks_state", base=BASE_DIR)
AIAGENT_CONFIG = env_path("AIAGENT_CONFIG", BASE_DIR / "balancer" / "configuration.json", base=BASE_DIR)
# A worker renews its lease on a running step every third of this; a step whose
# worker died is taken over by its returning job once the lease expires.
TASK_LEASE_SECONDS = env_int("TASK_LEASE_SECONDS", 15, minimum=2)
# An LLM call's slot (the balancer's rule 4) is renewed every third of this while
# the call runs; a killed worker's slot comes back after it.
LLM_SLOT_LEASE_SECONDS = env_int("LLM_SLOT_LEASE_SECONDS", 30, minimum=2)
# How often each worker checks every LLM's health (a failed check counts against its breaker).
LLM_HEALTH_CHECK_SECONDS = env_int("LLM_HEALTH_CHECK_SECONDS", 30, minimum=1)
# A step whose engines all failed transiently (after the balancer's failover) is run again this
# many times, after STEP_RETRY_BACKOFF_SECONDS, then twice that, and so on.
STEP_RETRIES = env_int("STEP_RETRIES", 2, minimum=0)
STEP_RETRY_BACKOFF_SECONDS = env_int("STEP_RETRY_BACKOFF_SECONDS", 5, minimum=1)
# The largest request body the API accepts, in bytes (413 above it).
API_MAX_BODY_BYTES = env_int("API_MAX_BODY_BYTES", 1024 * 1024, minimum=1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = API_MAX_BODY_BYTES
# Requests per client (a user with a token) to the authenticated endpoints, and, counted apart,
# the task submissions, feedback and chat completions among them, which start model work (orchestration/throttling.py).
API_THROTTLE_RATE = env_rate("API_THROTTLE_RATE", "1200/min")
API_SUBMIT_THROTTLE_RATE = env_rate("API_SUBMIT_THROTTLE_RATE", "120/min")

# How long a web process keeps a token's lookup (orchestration/authentication.py): a revoked token
# still opens other processes for this long. 0: look every request's token up.
API_TOKEN_CACHE_SECONDS = env_int("API_TOKEN_CACHE_SECONDS", 5, minimum=0)
# The OpenAI-compatible API (/v1/chat/completions) runs its engine calls in the web process: a call
# that names an LLM waits for a slot and generates for this long at most (a role's model has the
# role's time limit).
OPENAI_API_TIME_LIMIT_SECONDS = env_int("OPENAI_API_TIME_LIMIT_SECONDS", 300, minimum=1)
# Completions each web process runs at once, each holding one of its WEB_THREADS threads (with
# EVENTS_MAX_STREAMS, 4 + 3 of the 8, one is left for the rest at worst); past them,
# 503 with Retry-After (the REST API and /healthz keep threads of their own).
OPENAI_API_MAX_CALLS = env_int("OPENAI_API_MAX_CALLS", 3, minimum=1)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "orchestration.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["orchestration.parsers.JSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "PAGE_SIZE": env_int("API_PAGE_SIZE", 50, minimum=1),
    "EXCEPTION_HANDLER": "orchestration.exceptions.api_exception_handler",
    "DEFAULT_THROTTLE_CLASSES": [
        "orchestration.throttling.ClientRateThrottle",
    ],
    "UNAUTHENTICATED_USER": None,
}

# --- Celery -------------------------------------------------------------------

CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "ai-agent-server.default"
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A publish must not hang an API request when Redis is away: a few quick
# retries, then the error reaches the caller.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5}
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # An unacknowledged job comes back after this long (acks_late): it must
    # outlive the longest step.
    "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 3600, minimum=60),
    "socket_connect_timeout": 3,
    "socket_timeout": 10,
}
# A worker that loses Redis stops its running steps rather than let Redis hand
# their jobs to another worker while they go on.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
# Celery's task events (a job sent, received, started, done), which Flower's Tasks page is made of
# (its worker list comes from the heartbeats, sent either way). They cost a third of a worker main
# process's work per job and a second publish per submitted task: where no Flower runs they can be
# turned off (a running Flower turns the workers' task events back on).
CELERY_WORKER_SEND_TASK_EVENTS = env_bool("CELERY_TASK_EVENTS", True)
CELERY_TASK_SEND_SENT_EVENT = CELERY_WORKER_SEND_TASK_EVENTS
# Celery's Django fix-up closes every database connection before and after each job unless this is
# set; a job then pays for a new connection. It is set out of reach: orchestration/tasks.py closes a
# job's connections as Django closes a request's (broken, or older than DB_CONN_MAX_AGE).
CELERY_DB_REUSE_MAX = 2**62

LOG_LEVEL = env_choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
}

# --- The sandbox for generated code (agents/sandbox.py) -----------------------

# bubblewrap runs generated code without network, with a read-only system and
# these limits. Without it a run fails, unless unsandboxed runs are allowed here
# explicitly: then the code runs as a plain subprocess with the same limits but
# with the network and the file system open to it (doc/operations.md, "The sandbox").
SANDBOX_BWRAP = env_str("SANDBOX_BWRAP", shutil.which("bwrap") or "/usr/bin/bwrap")
SANDBOX_ALLOW_UNSANDBOXED = env_bool("SANDBOX_ALLOW_UNSANDBOXED", False)
SANDBOX_WALL_SECONDS = env_int("SANDBOX_WALL_SECONDS", 10, minimum=1)
SANDBOX_CPU_SECONDS = env_int("SANDBOX_CPU_SECONDS", 10, minimum=1)
SANDBOX_MEMORY_MB = env_int("SANDBOX_MEMORY_MB", 512, minimum=64)
# Processes and threads together, counted inside the sandbox's own user namespace.
SANDBOX_PROCESSES = env_int("SANDBOX_PROCESSES", 64, minimum=4)
# Kept of stdout and of stderr each; the rest is discarded and the result says so.
SANDBOX_OUTPUT_BYTES = env_int("SANDBOX_OUTPUT_BYTES", 65536, minimum=1024)
# The largest file the code may write, and the size of its /tmp and /dev/shm.
SANDBOX_FILE_SIZE_MB = env_int("SANDBOX_FILE_SIZE_MB", 16, minimum=1)

# --- The MCP channels (orchestration/mcp_handler.py) --------------------------

# Each Redis Stream keeps about this many entries; older ones are trimmed as new ones come.
MCP_STREAM_MAXLEN = env_int("MCP_STREAM_MAXLEN", 100_000, minimum=1000)
# A message that a consumer read and did not acknowledge for this long (it died) is taken over by another.
MCP_CLAIM_IDLE_SECONDS = env_int("MCP_CLAIM_IDLE_SECONDS", 60, minimum=1)
# A message delivered this many times without being handled is answered as rejected and dropped.
MCP_MAX_DELIVERIES = env_int("MCP_MAX_DELIVERIES", 5, minimum=1)

# --- The OpenAPI schema (/api/schema/) and Swagger UI (/api/docs/) --------------

SPECTACULAR_SETTINGS = {
    "TITLE": "AI-Agent-Server API",
    "DESCRIPTION": (
        "Runs LLM agents as a service: submit a task packet to a profile's role, follow it, cancel it, "
        "give feedback to the feedback loop; read the configuration and the LLMs' health. "
        "Every endpoint but /healthz needs `Authorization: Token <key>` (or an admin session). "
        "A client over its rate gets 429 with `Retry-After`. "
        "Every error has the body of the `Error` component. Any request whose body is over "
        "API_MAX_BODY_BYTES is refused with 413 before it reaches its endpoint. See doc/api_endpoints.md."
    ),
    "VERSION": "1.0.0",
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "orchestration.throttling.document_throttling",
    ],
    # The schema and the docs page are for clients of the API: the same authentication as the API.
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI's files come from drf-spectacular-sidecar, as static files: no CDN, no internet needed.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Two fields named "status" with different choices: each enum gets a name of its own.
    "ENUM_NAME_OVERRIDES": {
        "TaskStatusEnum": "orchestration.packets.STATUSES",
        "HealthStatusEnum": ["ok", "unavailable"],
    },
    "APPEND_COMPONENTS": {
        "securitySchemes": {
            # The scheme drf-spectacular derives from TokenAuthentication, with the header spelt out.
            "tokenAuth": {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": (
                    "`Authorization: Token <key>` (or `Bearer <key>`); in Swagger UI's Authorize dialog, "
                    "type `Token <key>`. "
                    "Create a key with `python manage.py create_token NAME`."
                ),
            }
        }
    },
}

# Each web process streams at most this many tasks' events (GET /api/v1/tasks/{id}/events) at
# once, each holding one of its threads; more get 503 with Retry-After.
EVENTS_MAX_STREAMS = env_int("EVENTS_MAX_STREAMS", 4, minimum=1)

# --- Recovery (orchestration/recovery.py) -------------------------------------

# How often one of the workers sweeps for tasks whose jobs were lost (and catches the database
# mirror up); the first sweep runs when a worker starts.
RECOVERY_SWEEP_SECONDS = env_int("RECOVERY_SWEEP_SECONDS", 30, minimum=1)
# A queued or running task is looked at only once it has not changed for this long. At least
# RECOVERY_MIN_GRACE_SECONDS, here and in recover_tasks --grace: a task that changed more recently may
# look lost and be queued again needlessly, its submit still queueing its job, or its job on its way
# from the queue to a worker (in neither). The copy finds its step done, but the recovery counts towards
# the task's RECOVERY_RETRIES. The tests sweep with less, on tasks they hold still.
RECOVERY_MIN_GRACE_SECONDS = 10
RECOVERY_GRACE_SECONDS = env_int("RECOVERY_GRACE_SECONDS", 60, minimum=RECOVERY_MIN_GRACE_SECONDS)
# A task whose jobs were lost is queued again this many times in a run; the next time it fails.
RECOVERY_RETRIES = env_int("RECOVERY_RETRIES", 3, minimum=0)

# --- Retention (orchestration/retention.py) -----------------------------------

# The recovery sweep removes the finished tasks (a plan with all its children) that last changed this
# many days ago: their state files, lock files and rows. 0: every task is kept for ever. At most
# retention.MAX_DAYS.
TASK_RETENTION_DAYS = env_int("TASK_RETENTION_DAYS", 0, minimum=0, maximum=36500)
