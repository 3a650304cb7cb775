"""Settings, all read from the environment.

Production is the default: a deploy must give DJANGO_SECRET_KEY (there is no usable default key), and
DEBUG is refused. Local use (make demo, make up, make test, the scripts) sets DJANGO_ENV=development
explicitly, which allows the development key, plain HTTP and DJANGO_DEBUG; make demo and make up also write it,
with a generated key, to the checkout's .env.local for the manage.py commands run by hand.
The embedded default: SQLite, local files under COMPRESSOR_DATA_DIR, Redis on localhost.
"""

import os
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from jobs import task_names

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# make's set-up targets write .env.local (development mode, a key of its own; git- and docker-ignored) so that the
# README's `.venv/bin/python manage.py ...` commands run as written. The environment wins over the file;
# DJANGO_ENV_FILE names another file, or none when empty (a deploy that wants no file read at all).
_ENV_FILE = os.environ.get("DJANGO_ENV_FILE", str(BASE_DIR / ".env.local"))
if _ENV_FILE:
    environ.Env.read_env(_ENV_FILE, overwrite=False)

# "production" unless DJANGO_ENV=development is set explicitly: forgetting both can never run with a known key.
ENVIRONMENT = env("DJANGO_ENV", default="production")
if ENVIRONMENT not in ("development", "production"):
    raise ImproperlyConfigured(f"DJANGO_ENV must be 'development' or 'production', not {ENVIRONMENT!r}.")
DEVELOPMENT = ENVIRONMENT == "development"
DEBUG = env.bool("DJANGO_DEBUG", default=False)
if DEBUG and not DEVELOPMENT:
    raise ImproperlyConfigured("DJANGO_DEBUG=True is refused in production (it shows settings and code to anyone).")
if DEVELOPMENT:
    SECRET_KEY = env("DJANGO_SECRET_KEY", default="insecure-development-key-not-for-production")
elif not env("DJANGO_SECRET_KEY", default=""):
    raise ImproperlyConfigured(
        "DJANGO_SECRET_KEY is required in production (e.g. openssl rand -hex 32); "
        "for local use set DJANGO_ENV=development."
    )
else:
    SECRET_KEY = env("DJANGO_SECRET_KEY")
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

DATA_DIR = Path(env("COMPRESSOR_DATA_DIR", default=str(BASE_DIR / "var")))
# The engine reads the same variable to find its model store, so both agree.
MODEL_STORE_DIR = Path(env("COMPRESSOR_MODEL_STORE", default=str(DATA_DIR / "models")))
# Each node's cache of hub models (engine.model_cache), shared by the workers of that machine: every revision
# is downloaded once; above the limit (decimal MB, 0: none) the least recently used models no job uses go.
COMPRESSOR_MODEL_CACHE_DIR = Path(env("COMPRESSOR_MODEL_CACHE_DIR", default=str(MODEL_STORE_DIR / "hub-cache")))
COMPRESSOR_MODEL_CACHE_MB = env.int("COMPRESSOR_MODEL_CACHE_MB", default=200_000)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "jobs",
    "frontend",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "compressor_app.middleware.SecurityHeaders",
    *(["whitenoise.middleware.WhiteNoiseMiddleware"] if env.bool("DJANGO_WHITENOISE", default=False) else []),
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "compressor_app.urls"
WSGI_APPLICATION = "compressor_app.wsgi.application"

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

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'db.sqlite3'}")}
# Each web thread keeps its database connection between requests (a new PostgreSQL connection costs more
# than a whole submission), checked before reuse so that a restarted database only costs a reconnect.
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DJANGO_CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # The same backend, its health check without a round trip while the connection is idle.
    DATABASES["default"]["ENGINE"] = "compressor_app.postgresql"
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web and worker write concurrently: wait for the lock instead of failing at once.
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 30
    # WAL lets the pages read while a worker writes progress.
    DATABASES["default"]["OPTIONS"]["init_command"] = "PRAGMA journal_mode=WAL;"
    # A transaction takes the write lock when it begins: the quota check (count, then insert) cannot interleave
    # with another submission's (PostgreSQL gets the same from select_for_update on the user's row).
    DATABASES["default"]["OPTIONS"]["transaction_mode"] = "IMMEDIATE"

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env("DJANGO_STATIC_ROOT", default=str(DATA_DIR / "static")))
MEDIA_ROOT = Path(env("COMPRESSOR_MEDIA_ROOT", default=str(DATA_DIR / "media")))
MEDIA_URL = "media/"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
# Checkpoints and calibration uploads: "local" (MEDIA_ROOT) or "s3" (an S3-compatible bucket shared by the web
# side and every worker). With s3 a worker writes a checkpoint into its own scratch folder and uploads it once
# it is complete (jobs.artifact_store). The keys come from boto3's usual places (AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY in the environment, an instance role), never from these settings.
COMPRESSOR_STORAGE = env("COMPRESSOR_STORAGE", default="local")
COMPRESSOR_SCRATCH_DIR = Path(env("COMPRESSOR_SCRATCH_DIR", default=str(DATA_DIR / "scratch")))
# Uploads of one file go multipart above the threshold (parts of the chunk size, at least 5 MiB); the
# bandwidth cap (bytes/s, unset: none) keeps a worker from filling a shared link.
COMPRESSOR_S3_MULTIPART_THRESHOLD_BYTES = env.int("COMPRESSOR_S3_MULTIPART_THRESHOLD_BYTES", default=64 * 2**20)
COMPRESSOR_S3_MULTIPART_CHUNK_BYTES = env.int("COMPRESSOR_S3_MULTIPART_CHUNK_BYTES", default=64 * 2**20)
COMPRESSOR_S3_MAX_BANDWIDTH = env.int("COMPRESSOR_S3_MAX_BANDWIDTH", default=None)
if COMPRESSOR_STORAGE == "s3":
    from botocore.config import Config as _BotoConfig

    STORAGES["default"] = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": env("COMPRESSOR_S3_BUCKET"),
            "endpoint_url": env("COMPRESSOR_S3_ENDPOINT_URL", default=None),
            "region_name": env("COMPRESSOR_S3_REGION", default=None),
            # Presigned download links stay valid this long (a big shard on a slow line needs a while).
            "querystring_expire": env.int("COMPRESSOR_S3_URL_EXPIRE_S", default=3600),
            "client_config": _BotoConfig(
                signature_version="s3v4",
                s3={"addressing_style": env("COMPRESSOR_S3_ADDRESSING_STYLE", default="auto")},
                retries={"max_attempts": 8, "mode": "standard"},
            ),
        },
    }
elif COMPRESSOR_STORAGE != "local":
    raise ImproperlyConfigured(f"COMPRESSOR_STORAGE must be 'local' or 's3', not {COMPRESSOR_STORAGE!r}.")

# Failed password sign-ins allowed per account and per address in a window (jobs.auth).
AUTHENTICATION_BACKENDS = ["jobs.auth.RateLimitedModelBackend"]
COMPRESSOR_LOGIN_FAILURE_RATE = env("COMPRESSOR_LOGIN_FAILURE_RATE", default="10/15m")
COMPRESSOR_LOGIN_FAILURE_RATE_PER_ADDRESS = env("COMPRESSOR_LOGIN_FAILURE_RATE_PER_ADDRESS", default="50/15m")
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

# Celery: Redis broker; the database is the truth for job state, so no result backend.
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="redis://127.0.0.1:6379/0")
CELERY_TASK_IGNORE_RESULT = True
# The shared cache (the job-creation and login throttles): on the same Redis, so every web process counts
# together. Tests give each run its own prefix.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": env("COMPRESSOR_CACHE_URL", default=CELERY_BROKER_URL),
        "KEY_PREFIX": env("COMPRESSOR_CACHE_PREFIX", default="compressor"),
    }
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Long GPU jobs: acknowledge only after the job ended, give the message back when the worker dies,
# and never let a busy worker hold a second job (prefetch 1 x concurrency 1).
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = task_names.Queue.LIGHT.value
CELERY_TASK_ROUTES = {
    task_names.COMPRESS: {"queue": task_names.Queue.GPU.value},
    "jobs.*": {"queue": task_names.Queue.LIGHT.value},
}
# Time limits of one compression job: soft (the task records "took too long" and cleans up), then hard
# (the worker kills the child). Both stay below the Redis visibility timeout: a message not acknowledged
# within it is handed to a second worker, which must never happen to a job that is still running.
COMPRESSOR_JOB_SOFT_LIMIT_S = env.int("COMPRESSOR_JOB_SOFT_LIMIT_S", default=6 * 3600)
COMPRESSOR_JOB_HARD_LIMIT_S = env.int("COMPRESSOR_JOB_HARD_LIMIT_S", default=COMPRESSOR_JOB_SOFT_LIMIT_S + 600)
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": env.int("COMPRESSOR_VISIBILITY_TIMEOUT_S", default=COMPRESSOR_JOB_HARD_LIMIT_S + 3600),
    # One Redis list per priority level, polled highest first: priorities really order the queue.
    # With Redis, 0 is the highest broker priority (jobs.services.broker maps the job's 0-9 onto it).
    "queue_order_strategy": "priority",
    "priority_steps": list(range(10)),
    "sep": ":",
    # Tests give each run its own prefix so parallel runs on one Redis never see each other's messages.
    "global_keyprefix": env("CELERY_KEY_PREFIX", default=""),
}
if CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"] <= COMPRESSOR_JOB_HARD_LIMIT_S:
    raise ValueError("The Redis visibility timeout must be longer than the job's hard time limit.")
# The reaper: jobs whose worker stopped sending heartbeats are re-queued once, then failed.
COMPRESSOR_HEARTBEAT_INTERVAL_S = env.float("COMPRESSOR_HEARTBEAT_INTERVAL_S", default=1.0)
COMPRESSOR_HEARTBEAT_TIMEOUT_S = env.int("COMPRESSOR_HEARTBEAT_TIMEOUT_S", default=120)
COMPRESSOR_REAPER_INTERVAL_S = env.int("COMPRESSOR_REAPER_INTERVAL_S", default=60)
# A cancelled job gets this long to stop by itself before its worker child is terminated.
COMPRESSOR_CANCEL_GRACE_S = env.int("COMPRESSOR_CANCEL_GRACE_S", default=30)
# Housekeeping: queued jobs older than the grace whose message Redis lost are sent again (the sweeper),
# and temporary checkpoint folders of runs that are over are removed.
COMPRESSOR_HOUSEKEEPING_INTERVAL_S = env.int("COMPRESSOR_HOUSEKEEPING_INTERVAL_S", default=60)
COMPRESSOR_SWEEP_GRACE_S = env.int("COMPRESSOR_SWEEP_GRACE_S", default=60)
# Worker memory: a child is kept warm between jobs, but replaced after a job during which its resident
# memory passed this limit (Celery measures the peak), and after any job that did not succeed.
COMPRESSOR_WORKER_MAX_MEMORY_MB = env.int("COMPRESSOR_WORKER_MAX_MEMORY_MB", default=4096)
CELERY_WORKER_MAX_MEMORY_PER_CHILD = COMPRESSOR_WORKER_MAX_MEMORY_MB * 1024  # KiB
CELERY_BEAT_SCHEDULE = {
    "reap-stale-jobs": {
        "task": task_names.REAP_STALE_JOBS,
        "schedule": float(COMPRESSOR_REAPER_INTERVAL_S),
        "options": {"queue": task_names.Queue.LIGHT.value, "expires": float(COMPRESSOR_REAPER_INTERVAL_S)},
    },
    # Retention (COMPRESSOR_RETENTION_DAYS): expired checkpoints and uploads, with their rows.
    "expire-artifacts": {
        "task": task_names.EXPIRE_ARTIFACTS,
        "schedule": 3600.0,
        "options": {"queue": task_names.Queue.LIGHT.value, "expires": 3600.0},
    },
    "housekeeping": {
        "task": task_names.HOUSEKEEPING,
        "schedule": float(COMPRESSOR_HOUSEKEEPING_INTERVAL_S),
        "options": {"queue": task_names.Queue.LIGHT.value, "expires": float(COMPRESSOR_HOUSEKEEPING_INTERVAL_S)},
    },
}

# Jobs and the API.
COMPRESSOR_DEFAULT_DEVICE_CLASS = env("COMPRESSOR_DEFAULT_DEVICE_CLASS", default="gpu")
COMPRESSOR_JOB_LOG_MAX_LINES = env.int("COMPRESSOR_JOB_LOG_MAX_LINES", default=2000)
# Per-user limits, enforced in jobs.services.policy for the API, the form and retries alike: created jobs per window
# (counted in the shared cache), and quotas counted in the database (queued + running jobs, stored bytes).
COMPRESSOR_JOB_CREATE_RATE = env("COMPRESSOR_JOB_CREATE_RATE", default="30/hour")
COMPRESSOR_USER_MAX_ACTIVE_JOBS = env.int("COMPRESSOR_USER_MAX_ACTIVE_JOBS", default=20)
COMPRESSOR_USER_MAX_STORED_BYTES = env.int("COMPRESSOR_USER_MAX_STORED_BYTES", default=500 * 10**9)
# Checkpoints and uploads are deleted this many days after their job ended (0: kept forever).
COMPRESSOR_RETENTION_DAYS = env.int("COMPRESSOR_RETENTION_DAYS", default=30)
# The highest priority a user who is not staff may ask for (staff and the admin go up to 9).
COMPRESSOR_USER_MAX_PRIORITY = env.int("COMPRESSOR_USER_MAX_PRIORITY", default=5)
COMPRESSOR_MAX_UPLOAD_BYTES = env.int("COMPRESSOR_MAX_UPLOAD_BYTES", default=200 * 1024 * 1024)
# A calibration upload is parsed once, while it streams in, and refused past this many rows (a job calibrates on
# at most a few thousand) or this much of the web thread's CPU spent parsing it (a million short rows take 0.6 s).
COMPRESSOR_MAX_UPLOAD_ROWS = env.int("COMPRESSOR_MAX_UPLOAD_ROWS", default=500_000)
COMPRESSOR_UPLOAD_CHECK_CPU_S = env.float("COMPRESSOR_UPLOAD_CHECK_CPU_S", default=0.8)
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
# An upload over COMPRESSOR_MAX_UPLOAD_BYTES is stopped while it streams in, before it fills the disk; each file
# is written to a temporary file while it is hashed and parsed (jobs.uploads).
FILE_UPLOAD_HANDLERS = ["jobs.uploads.UploadSizeLimit", "jobs.uploads.CheckedUploadHandler"]
# Warm GPU workers: import torch and llm-compressor in each worker child before its first job.
COMPRESSOR_WORKER_PRELOAD = env.bool("COMPRESSOR_WORKER_PRELOAD", default=True)
# The memory plan (engine.plan) weighs what the worker measures: host memory available, each GPU's free
# memory, the GPUs, the disk free where checkpoints go. These caps lower those figures (decimal MB; unset:
# as measured): a worker that shares its machine, or a test that makes a small worker of a big one.
COMPRESSOR_WORKER_HOST_RAM_MB = env.int("COMPRESSOR_WORKER_HOST_RAM_MB", default=None)
COMPRESSOR_WORKER_GPU_MEMORY_MB = env.int("COMPRESSOR_WORKER_GPU_MEMORY_MB", default=None)
COMPRESSOR_WORKER_GPUS = env.int("COMPRESSOR_WORKER_GPUS", default=None)
COMPRESSOR_WORKER_DISK_MB = env.int("COMPRESSOR_WORKER_DISK_MB", default=None)
# The most GPUs one job may ask for (vLLM's tensor parallelism stays within one node).
# Data-parallel calibration (llm-compressor's distributed GPTQ/SparseGPT under torchrun): unset, the memory plan
# uses one rank per GPU of a job with several; 1 turns it off; N > 1 asks for N ranks (gloo on a CPU worker).
COMPRESSOR_WORKER_DATA_PARALLEL = env.int("COMPRESSOR_WORKER_DATA_PARALLEL", default=None)
COMPRESSOR_MAX_GPUS_PER_JOB = env.int("COMPRESSOR_MAX_GPUS_PER_JOB", default=8)

# Pushing a checkpoint to a hub (jobs.hub_push) with the user's own token, stored encrypted (jobs.hub_tokens).
# COMPRESSOR_ENCRYPTION_KEY: Fernet keys, comma-separated (the first encrypts, each decrypts: put a new key first
# to rotate). Unset, the key is derived from SECRET_KEY with HKDF-SHA256, so a new DJANGO_SECRET_KEY makes the
# stored tokens unreadable: their owners set them again.
COMPRESSOR_ENCRYPTION_KEY = env.list("COMPRESSOR_ENCRYPTION_KEY", default=[])
COMPRESSOR_HUB_ENDPOINT = env("COMPRESSOR_HUB_ENDPOINT", default=env("HF_ENDPOINT", default="https://huggingface.co"))
# The hubs a user may name for their token (the worker sends the checkpoint and the token there).
COMPRESSOR_HUB_ENDPOINTS = env.list("COMPRESSOR_HUB_ENDPOINTS", default=[COMPRESSOR_HUB_ENDPOINT])
# One push on the light queue: soft (recorded as "took too long"), then hard, both below the visibility timeout.
COMPRESSOR_HUB_PUSH_SOFT_LIMIT_S = env.int("COMPRESSOR_HUB_PUSH_SOFT_LIMIT_S", default=6 * 3600)
COMPRESSOR_HUB_PUSH_HARD_LIMIT_S = env.int(
    "COMPRESSOR_HUB_PUSH_HARD_LIMIT_S", default=COMPRESSOR_HUB_PUSH_SOFT_LIMIT_S + 600
)

# The workers' registry (jobs.nodes): each worker announces its resources when it starts and beats every
# COMPRESSOR_NODE_HEARTBEAT_S; one silent for COMPRESSOR_NODE_OFFLINE_AFTER_S counts as offline.
COMPRESSOR_NODE_HEARTBEAT_S = env.float("COMPRESSOR_NODE_HEARTBEAT_S", default=15.0)
COMPRESSOR_NODE_OFFLINE_AFTER_S = env.float("COMPRESSOR_NODE_OFFLINE_AFTER_S", default=60.0)
if COMPRESSOR_NODE_OFFLINE_AFTER_S <= COMPRESSOR_NODE_HEARTBEAT_S:
    raise ImproperlyConfigured("COMPRESSOR_NODE_OFFLINE_AFTER_S must be longer than COMPRESSOR_NODE_HEARTBEAT_S.")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "jobs.api.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "jobs.api.pagination.StrictPageNumberPagination",
    "PAGE_SIZE": 25,
    "DEFAULT_SCHEMA_CLASS": "jobs.api.schema.ErrorAnswersSchema",
    # DRF's three, the JSON one answering a body nested too deeply with a 400 (not a RecursionError's 500).
    "DEFAULT_PARSER_CLASSES": [
        "jobs.api.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    # Refused requests answer in JSON, also a body over DATA_UPLOAD_MAX_MEMORY_SIZE (Django's page is HTML).
    "EXCEPTION_HANDLER": "jobs.api.exceptions.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "LLM compression service API",
    "DESCRIPTION": "Submit and follow compression jobs, download checkpoints. Authenticate with "
    "`Authorization: Token <key>` (programs) or a session (pages).",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/api/v1",
    # The docs page's assets are served from this server (drf-spectacular-sidecar), never from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # drf-spectacular's own hook, then the rule no serializer field states (exactly one of preset and recipe_yaml).
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "jobs.api.schema.job_create_needs_one_recipe",
    ],
    "ENUM_NAME_OVERRIDES": {
        "HubPushStatusEnum": "jobs.models.HubPush.Status",
        "JobStatusEnum": "jobs.models.Job.Status",
        "PresetEnum": "jobs.api.serializers.PRESET_CHOICES",
    },
}

# Operator safety switches for model sources.
COMPRESSOR_ALLOW_PICKLE = env.bool("COMPRESSOR_ALLOW_PICKLE", default=False)
COMPRESSOR_ALLOW_REMOTE_CODE = env.bool("COMPRESSOR_ALLOW_REMOTE_CODE", default=False)
COMPRESSOR_ALLOW_LOCAL_PATHS = env.bool("COMPRESSOR_ALLOW_LOCAL_PATHS", default=False)

# HTTPS: on in production (HSTS, redirect to https, cookies only over https). A local trial of the production
# settings over plain HTTP sets DJANGO_HTTPS=False. Behind a TLS proxy, DJANGO_SECURE_PROXY_SSL_HEADER names
# the header the proxy sets (e.g. HTTP_X_FORWARDED_PROTO); only set it when the proxy always overwrites it.
HTTPS = env.bool("DJANGO_HTTPS", default=not DEVELOPMENT)
SECURE_SSL_REDIRECT = HTTPS
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SECURE_HSTS_SECONDS = env.int("DJANGO_HSTS_SECONDS", default=31536000) if HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", default=True)
SECURE_HSTS_PRELOAD = env.bool("DJANGO_HSTS_PRELOAD", default=True)
_proxy_header = env("DJANGO_SECURE_PROXY_SSL_HEADER", default="")
SECURE_PROXY_SSL_HEADER = (_proxy_header, "https") if _proxy_header else None
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"

# Errors: every 500's traceback goes to stderr (the container log), and by mail to ADMINS when set
# (DJANGO_ADMINS="ops@example.org,alice@example.org"; the mail server comes from DJANGO_EMAIL_URL).
ADMINS = [(address, address) for address in env.list("DJANGO_ADMINS", default=[])]
SERVER_EMAIL = env("DJANGO_SERVER_EMAIL", default="compressor@localhost")
vars().update(env.email_url("DJANGO_EMAIL_URL", default="smtp://localhost:25"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "filters": {"require_debug_false": {"()": "django.utils.log.RequireDebugFalse"}},
    "handlers": {
        "stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "plain"},
        "mail_admins": {
            "class": "django.utils.log.AdminEmailHandler",
            "level": "ERROR",
            "filters": ["require_debug_false"],
        },
    },
    "root": {"handlers": ["stderr"], "level": env("DJANGO_LOG_LEVEL", default="WARNING")},
    "loggers": {
        # django.request logs each 500 with its traceback at ERROR.
        "django": {"handlers": ["stderr", "mail_admins"], "level": "INFO", "propagate": False},
    },
}
