"""Django settings. Every value comes from the environment (see README's configuration table)."""

from __future__ import annotations

from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from .env import (
    env_ae_title,
    env_bool,
    env_choice,
    env_int,
    env_list,
    env_str,
    env_uid_root,
)

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(env_str("GATEWAY_DATA_DIR", str(BASE_DIR / "var"))).resolve()

DEBUG = env_bool("DJANGO_DEBUG", False)
SECRET_KEY = env_str("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    # The embedded default keeps one random key per data directory so that sessions survive a
    # restart; production sets DJANGO_SECRET_KEY.
    _key_file = DATA_DIR / "secret_key"
    try:
        SECRET_KEY = _key_file.read_text().strip()
    except FileNotFoundError:
        import secrets

        DATA_DIR.mkdir(parents=True, exist_ok=True)
        SECRET_KEY = secrets.token_urlsafe(50)
        _key_file.write_text(SECRET_KEY)
        _key_file.chmod(0o600)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "gateway",
    "worklist",
    "routing",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "gateway.accounts.IdleTimeoutMiddleware",
    "gateway.audit.ActorMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "gateway.urls"
WSGI_APPLICATION = "gateway.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "gateway.web.access",
            ],
        },
    },
]

# --- Database: PostgreSQL from DATABASE_URL, else embedded SQLite (WAL, busy timeout) ---
DATABASE_URL = env_str("DATABASE_URL", "")
if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
    if not DATABASES["default"]["ENGINE"].endswith(("postgresql", "sqlite3")):
        raise ImproperlyConfigured("DATABASE_URL must be a postgres:// or sqlite:// URL")
    # The listeners serve each association or message on a thread that opens and closes its
    # own connection; a per-process pool makes that close a hand-back instead of a ~7 ms
    # reconnect.
    DATABASE_POOL_MAX_SIZE = env_int("DATABASE_POOL_MAX_SIZE", 10, minimum=0)
    if DATABASES["default"]["ENGINE"].endswith("postgresql") and DATABASE_POOL_MAX_SIZE:
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": 1,
            "max_size": DATABASE_POOL_MAX_SIZE,
            # How long a thread waits for a pooled connection; with the database down, the
            # HL7 listener answers AE after this long rather than leaving the sender hanging.
            "timeout": env_int("DATABASE_POOL_TIMEOUT", 5, minimum=1),
        }
    if DATABASES["default"]["ENGINE"].endswith("postgresql"):
        # The statements every HL7 message and received instance runs (gateway.sql's
        # server-binding cursor) are prepared on their connection once run this many times:
        # PostgreSQL then skips parsing and planning them, ~0.1 ms each. 0 turns it off, as a
        # PgBouncer in transaction mode without max_prepared_statements needs.
        prepare = env_int("DATABASE_PREPARE_THRESHOLD", 5, minimum=0)
        DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = prepare or None
else:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DATA_DIR / "gateway.sqlite3",
            "OPTIONS": {
                "timeout": 30,
                "transaction_mode": "IMMEDIATE",
                "init_command": (
                    "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=30000;"
                ),
            },
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TZ", "UTC") or "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
try:  # WhiteNoise looks here at start; an empty folder until someone runs collectstatic
    STATIC_ROOT.mkdir(parents=True, exist_ok=True)
except OSError:
    pass
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"
# After this many failed sign-ins for one user name or from one address within the window,
# sign-in is refused (HTTP 429) until the window has passed.
LOGIN_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5, minimum=1)
LOGIN_LOCKOUT_MINUTES = env_int("LOGIN_LOCKOUT_MINUTES", 15, minimum=1)
SESSION_COOKIE_AGE = env_int("SESSION_COOKIE_AGE", 8 * 3600, minimum=60)
# A session nobody has used for this long is signed out (the dashboard's refreshes don't count).
SESSION_IDLE_MINUTES = env_int("SESSION_IDLE_MINUTES", 30, minimum=1)

# --- Security (production sets these; `manage.py check --deploy` reads them) ---
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", False)
SESSION_COOKIE_SECURE = env_bool("DJANGO_SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = env_bool("DJANGO_CSRF_COOKIE_SECURE", False)
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", False)
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
SECURE_REFERRER_POLICY = "same-origin"
BEHIND_TLS_PROXY = env_bool("DJANGO_BEHIND_TLS_PROXY", False)
if BEHIND_TLS_PROXY:
    # The proxy says the request came over HTTPS, and appends the browser's address to
    # X-Forwarded-For (sign-in throttling and the audit trail use it).
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# --- Celery: Redis from REDIS_URL, else a filesystem broker that needs no server ---
REDIS_URL = env_str("REDIS_URL", "")
if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    CELERY_BROKER_TRANSPORT_OPTIONS: dict = {}
else:
    _broker_dir = DATA_DIR / "broker"
    for _sub in ("queue", "processed", "control"):
        (_broker_dir / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_URL = "filesystem://"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
        "polling_interval": 0.05,
    }
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE: dict = {}

# --- Listeners ---
HTTP_PORT = env_int("HTTP_PORT", 8000, minimum=1, maximum=65535)
HL7_HOST = env_str("HL7_HOST", "0.0.0.0")
HL7_PORT = env_int("HL7_PORT", 2575, minimum=0, maximum=65535)
HL7_MAX_MESSAGE_BYTES = env_int("HL7_MAX_MESSAGE_BYTES", 10 * 1024 * 1024, minimum=1024)
HL7_IDLE_TIMEOUT = env_int("HL7_IDLE_TIMEOUT", 600, minimum=1)
HL7_WORKERS = env_int("HL7_WORKERS", 1, minimum=1, maximum=64)
HL7_THREADS = env_int("HL7_THREADS", 2, minimum=1, maximum=64)
DICOM_HOST = env_str("DICOM_HOST", "0.0.0.0")
DICOM_AE_TITLE = env_ae_title("DICOM_AE_TITLE", "GATEWAY")
DICOM_PORT = env_int("DICOM_PORT", 11112, minimum=0, maximum=65535)
DICOM_MAX_ASSOCIATIONS = env_int("DICOM_MAX_ASSOCIATIONS", 50, minimum=1)

# --- Worklist ---
# Root under which the gateway makes Study Instance UIDs the RIS did not send; 2.25 is the
# UUID-derived root that needs no registration (PS3.5 B.2).
GATEWAY_UID_ROOT = env_uid_root("GATEWAY_UID_ROOT", "2.25")
# When a modality sends no ScheduledStationAETitle, restrict its query to its own station.
MWL_RESTRICT_TO_CALLING_STATION = env_bool("MWL_RESTRICT_TO_CALLING_STATION", False)
MWL_MAX_RESULTS = env_int("MWL_MAX_RESULTS", 5000, minimum=1)

# --- Storage and routing ---
# Below this much free space under GATEWAY_DATA_DIR, C-STORE is refused with 0xA700.
GATEWAY_MIN_FREE_MB = env_int("GATEWAY_MIN_FREE_MB", 1024, minimum=0)
# A received file is deleted once every delivery for it is done and it is this old.
GATEWAY_RETENTION_HOURS = env_int("GATEWAY_RETENTION_HOURS", 24, minimum=0)
# The same SOP Instance UID received again: "replace" (store it and route it again), "keep"
# (keep the first, answer Success, route nothing) or "reject" (answer a failure status).
GATEWAY_DUPLICATE_POLICY = env_choice(
    "GATEWAY_DUPLICATE_POLICY", "replace", ["replace", "keep", "reject"]
)
DELIVERY_RETRY_BASE_SECONDS = env_int("DELIVERY_RETRY_BASE_SECONDS", 30, minimum=1)
DELIVERY_RETRY_MAX_SECONDS = env_int("DELIVERY_RETRY_MAX_SECONDS", 3600, minimum=1)
DELIVERY_GIVE_UP_HOURS = env_int("DELIVERY_GIVE_UP_HOURS", 24, minimum=1)
# A delivery claimed (SENDING) longer than this is taken back by the sweep (worker died).
DELIVERY_LEASE_SECONDS = env_int("DELIVERY_LEASE_SECONDS", 300, minimum=10)
# How often beat runs the sweep that re-enqueues due deliveries whose task was lost.
DELIVERY_SWEEP_SECONDS = env_int("DELIVERY_SWEEP_SECONDS", 30, minimum=1)
# Periodic work of the routing stage (beat runs it; a worker executes it as actor "system").
CELERY_BEAT_SCHEDULE.update({
    "sweep-deliveries": {
        "task": "routing.tasks.sweep_deliveries",
        "schedule": float(DELIVERY_SWEEP_SECONDS),
    },
    "echo-nodes": {"task": "routing.tasks.echo_nodes", "schedule": 300.0},
    "purge-delivered-files": {"task": "routing.tasks.purge_delivered_files", "schedule": 3600.0},
})

LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # pynetdicom logs every identifier at DEBUG/INFO: that is PHI and costs 10-20% per item.
        "pynetdicom": {"level": "WARNING"},
        "celery": {"level": "INFO"},
    },
}
