"""Django settings for LMI.

Every setting that differs between a laptop and a production appliance comes from an LMI_*
environment variable (see lmi/env.py and README.md). The defaults make `make run` work on a
fresh machine with only Python: SQLite under var/, a private Redis on a unix socket under var/.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import dj_database_url
from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured

from lmi.env import env_bool, env_int, env_list, env_path, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = env_path("VAR_DIR", BASE_DIR / "var")

DEBUG = env_bool("DEBUG", False)


def _secret_key() -> str:
    """LMI_SECRET_KEY, or a random key generated once and kept (mode 0600) under var/."""
    configured = env_str("SECRET_KEY")
    if configured:
        return configured
    path = VAR_DIR / "secret_key"
    if path.exists():
        return path.read_text().strip()
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(50)
    path.touch(mode=0o600)
    path.write_text(key)
    return key


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# The appliance this console manages: one root, reached only through the appliance package.
APPLIANCE_ROOT = env_path("APPLIANCE_ROOT", VAR_DIR / "appliance")
# The node name written on every event (a cluster member names itself here).
NODE_NAME = env_str("NODE_NAME", "central")

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.humanize",  # intcomma: counts of a million messages read as 1,000,000
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "appliance",
    "jobs",
    "accounts",
    "events",
    "home",
    "upgrades",
    "backups",
    "mailsecurity",
    "smtp",
    "api",
    "cluster",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "lmi.middleware.HtmxLoginRedirectMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "accounts.middleware.ReadOnlyRoleMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "lmi.middleware.InstallMaintenanceMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "lmi.middleware.SecurityHeadersMiddleware",
]

ROOT_URLCONF = "lmi.urls"
WSGI_APPLICATION = "lmi.wsgi.application"

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
                "lmi.context_processors.console",
                "upgrades.context_processors.install_banner",
            ],
        },
    },
]

# --- Databases ---------------------------------------------------------------------------
_SQLITE_OPTIONS = {
    # WAL lets the web, the worker and beat read while one of them writes; IMMEDIATE takes the
    # write lock at BEGIN so concurrent writers queue instead of failing with "database locked".
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    "transaction_mode": "IMMEDIATE",
    "timeout": 20,
}
_database_url = env_str("DATABASE_URL")
if _database_url:
    DATABASES = {"default": dj_database_url.parse(_database_url, conn_max_age=60)}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "lmi.sqlite3",
        }
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["OPTIONS"] = dict(_SQLITE_OPTIONS)
    # A file, not memory: integration tests share the test database with a real worker process
    # (they hand it its path). Named per test process, so two test runs never share one.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / f"test-lmi-{os.getpid()}.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis and Celery ----------------------------------------------------------------------
# unix:///path or redis://host:port/db. Unset: the private Redis that `make run` starts.
REDIS_URL = env_str("REDIS_URL", f"unix://{VAR_DIR / 'run' / 'redis.sock'}")


def _celery_url(redis_url: str) -> str:
    """Kombu names a unix-socket Redis redis+socket://; redis-py names it unix://."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url.removeprefix("unix://")
    return redis_url


CELERY_BROKER_URL = _celery_url(REDIS_URL)
# A worker or beat rides out a broker restart (the private Redis is back within seconds, a
# remote one may take minutes): it keeps retrying, every 2 s growing to 30 s, where Celery's
# default gives up after 100 tries and exits.
CELERY_BROKER_CONNECTION_RETRY = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True  # task state lives in our own models, not a result backend
CELERY_TASK_ACKS_LATE = True  # a killed worker's task is redelivered, not lost
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = env_int("TASK_SOFT_TIME_LIMIT", 3600, minimum=1)
CELERY_TASK_TIME_LIMIT = env_int("TASK_TIME_LIMIT", 3900, minimum=1)
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": CELERY_TASK_TIME_LIMIT + 300,
    # A Redis that vanishes without closing the connection (a remote host, a NAT) fails a
    # command after this long instead of hanging a web request or beat for ever; above BRPOP's
    # 1 s. The connect timeout and keepalive apply to TCP only (a unix socket fails at once).
    "socket_timeout": 10,
    "socket_connect_timeout": 5,
    "socket_keepalive": True,
    # Ping a connection idle this long before using it, and drop a consumer connection whose
    # reply is this overdue: a half-open one is noticed in about 21 s instead of 51.
    "health_check_interval": 10,
}
# The worker's remote-control queue (what /healthz pings) is not auto-deleted. When the broker
# drops the connection, kombu 5.7 closes the worker's channels: the task channel's close fails on
# its pending BRPOP, then deleting an auto-delete queue on a dead connection fails and ends the
# round, so the task channel is closed again only after the transport was detached; its restore
# of unacknowledged messages (an ETA task, a running acks-late task) then raises "AttributeError:
# 'NoneType' object has no attribute 'hostname'", an Unrecoverable error that exits the worker.
# The queue is named after the worker's fixed hostname, so none pile up. Gossip's and mingle's
# queues do the same: the launcher runs the worker without them.
CELERY_CONTROL_QUEUE_DURABLE = True
CELERY_CONTROL_QUEUE_EXCLUSIVE = False
# A broker blip does not cut short a running task (an install phase): it finishes, and the job
# engine's lease, not the broker connection, tells whether its worker is gone.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
CELERY_TASK_DEFAULT_QUEUE = env_str("CELERY_QUEUE", "lmi")
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {
    # The job engine's reconciler: a lost enqueue or a dead worker costs at most this long.
    "jobs-reconcile": {
        "task": "jobs.reconcile",
        "schedule": float(env_int("JOBS_RECONCILE_SECONDS", 10, minimum=1)),
    },
    "events-prune": {
        "task": "events.tasks.events_prune",
        "schedule": crontab(minute=17, hour=3),
    },
    "mailsecurity-retention-purge": {
        "task": "mailsecurity.tasks.retention_purge",
        "schedule": crontab(minute=41, hour=2),
    },
    "home-resources-sample": {
        "task": "home.tasks.resources_sample",
        "schedule": 60.0,
    },
    "upgrades-update-check": {
        "task": "upgrades.tasks.update_check",
        "schedule": crontab(minute=7),
    },
    # Install at a time (issue 18): a due schedule starts within this long of its time.
    "upgrades-install-schedule": {
        "task": "upgrades.tasks.install_schedule_due",
        "schedule": float(env_int("INSTALL_SCHEDULE_SECONDS", 60, minimum=1)),
    },
    # Return to the previous firmware (issue 18): a way back past its period is released.
    "upgrades-return-release": {
        "task": "upgrades.tasks.return_release_due",
        "schedule": crontab(minute=37),
    },
    "backups-scheduled-backup": {
        "task": "backups.tasks.scheduled_backup",
        "schedule": crontab(minute=23),
    },
    "accounts-prune-login-failures": {
        "task": "accounts.tasks.login_failures_prune",
        "schedule": crontab(minute="*/30"),
    },
}
# --- Cluster -------------------------------------------------------------------------------
# standalone (one console, today's single queue), central (Cluster Central) or member. In a
# cluster every node's worker consumes its own queue, lmi.node.<NODE_NAME>, on the shared Redis:
# Central sends a member's work to that member's queue, members report to Central's queue.
CLUSTER_ROLES = ("standalone", "central", "member")
CLUSTER_ROLE = env_str("CLUSTER_ROLE", "standalone").strip().lower()
if CLUSTER_ROLE not in CLUSTER_ROLES:
    raise ImproperlyConfigured(
        f"LMI_CLUSTER_ROLE={CLUSTER_ROLE!r} is not one of {', '.join(CLUSTER_ROLES)}"
    )
# The node name of Cluster Central (what a member reports to).
CLUSTER_CENTRAL = env_str("CLUSTER_CENTRAL", "central")
# A member: the web address of Central's console (e.g. https://central.example.com:8000).
# Set, the member fetches firmware bundles Central has verified from there instead of the feed.
CLUSTER_CENTRAL_URL = env_str("CLUSTER_CENTRAL_URL")
# A member started with a join token joins Central at start (also: manage.py cluster_join TOKEN).
CLUSTER_JOIN_TOKEN = env_str("CLUSTER_JOIN_TOKEN")
# Members report (firmware, health, install progress, new events) this often; Central marks a
# member unreachable after CLUSTER_UNREACHABLE_REPORTS missed reports.
CLUSTER_REPORT_SECONDS = env_int("CLUSTER_REPORT_SECONDS", 30, minimum=1)
CLUSTER_UNREACHABLE_REPORTS = env_int("CLUSTER_UNREACHABLE_REPORTS", 3, minimum=1)
CLUSTER_EVENT_BATCH = env_int("CLUSTER_EVENT_BATCH", 200, minimum=1)
# A member that neither starts nor finishes its part of a rolling upgrade within this time
# stops the rolling upgrade (clear state) instead of holding it for ever.
CLUSTER_NODE_UPGRADE_TIMEOUT = env_int("CLUSTER_NODE_UPGRADE_TIMEOUT", 4 * 3600, minimum=10)
if CLUSTER_ROLE != "standalone":
    CELERY_TASK_DEFAULT_QUEUE = f"lmi.node.{NODE_NAME}"
if CLUSTER_ROLE == "member":
    CELERY_BEAT_SCHEDULE["cluster-member-report"] = {
        "task": "cluster.tasks.member_tick",
        "schedule": float(CLUSTER_REPORT_SECONDS),
    }
if CLUSTER_ROLE == "central":
    CELERY_BEAT_SCHEDULE["cluster-central-tick"] = {
        "task": "cluster.tasks.central_tick",
        "schedule": float(CLUSTER_REPORT_SECONDS),
    }

# The mail processing service (SMTP): loopback by default; LMI_SMTP_HOST=0.0.0.0 to serve others.
SMTP_HOST = env_str("SMTP_HOST", "127.0.0.1")
SMTP_PORT = env_int("SMTP_PORT", 2525, minimum=1)
# Firmware updates. The console trusts only these Ed25519 public keys (base64 of the raw 32
# bytes): those listed in LMI_TRUSTED_KEYS and those in *.pub files of TRUSTED_KEYS_DIR (where
# init_appliance puts the demo vendor's key).
TRUSTED_KEYS = env_list("TRUSTED_KEYS", [])
TRUSTED_KEYS_DIR = env_path("TRUSTED_KEYS_DIR", VAR_DIR / "trusted-keys")
# Where the console learns of new firmware: an http(s) URL of a feed.json, or a local directory
# holding one. The default is the demo feed init_appliance publishes.
UPDATE_FEED_URL = env_str("UPDATE_FEED_URL", str(VAR_DIR / "update-feed"))
# The firmware install (issue 6). One executor holds a run; one silent for the lease is gone
# (a dead pid on this host is gone at once). Past INSTALL_MAX_ATTEMPTS phase starts (a crash
# loop) the run rolls back. Phase 2 writes the new slot at INSTALL_RATE_LIMIT bytes/s (0: no
# limit) and pauses INSTALL_MIGRATE_PAUSE_MS between message-store batches, so mail keeps its
# throughput. INSTALL_PHASE_DELAY_MS is for the kill tests only: a pause inside every phase (or
# only in phase INSTALL_PHASE_DELAY_PHASE).
INSTALL_LEASE_SECONDS = env_int("INSTALL_LEASE_SECONDS", 30, minimum=2)
INSTALL_MAX_ATTEMPTS = env_int("INSTALL_MAX_ATTEMPTS", 25, minimum=10)
INSTALL_RATE_LIMIT = env_int("INSTALL_RATE_LIMIT", 0, minimum=0)
INSTALL_MIGRATE_PAUSE_MS = env_int("INSTALL_MIGRATE_PAUSE_MS", 2, minimum=0)
# ...or this share of each batch's own time, whichever is longer (300: the copy and its
# verification take at most a quarter of the time; phase 2 runs longer, and mail keeps its
# throughput on two cores: bench/upgrade.py, docs/performance.md).
INSTALL_MIGRATE_YIELD_PERCENT = env_int("INSTALL_MIGRATE_YIELD_PERCENT", 300, minimum=0)
# Phase 3 waits for the mail service to say its last transaction in flight ended (a few ms when
# idle), at most this long: a DATA still arriving, or a service that is down and says nothing.
INSTALL_DRAIN_MS = env_int("INSTALL_DRAIN_MS", 5000, minimum=0)
INSTALL_PHASE_DELAY_MS = env_int("INSTALL_PHASE_DELAY_MS", 0, minimum=0)
INSTALL_PHASE_DELAY_PHASE = env_int("INSTALL_PHASE_DELAY_PHASE", 0, minimum=0)  # 0: every phase
# For the kill tests of the job engine only: "kind:step:milliseconds" (several: comma-separated)
# pauses a job of that kind when it reports that step (0 is the first), so a kill lands inside it.
JOB_PAUSE = env_str("JOB_PAUSE", "")
# A queued job whose task has not arrived after this long lost its message (a broker restart
# between the commit and the enqueue): the reconciler sends it again.
JOBS_ENQUEUE_GRACE_SECONDS = env_int("JOBS_ENQUEUE_GRACE_SECONDS", 30, minimum=1)
# The guide's rule: a firmware upgrade needs this much free space on the disks of the console's
# database and of the message store. Lower it only on a development host whose disk also holds
# unrelated data; Home, the reclaim planner and the install's preflight all use this figure.
UPGRADE_MIN_FREE_PERCENT = env_int("UPGRADE_MIN_FREE_PERCENT", 50, minimum=1)
# After a successful upgrade the previous system and configuration are kept this many days for
# "Return to <previous firmware>" (issue 18), then released with their disk space.
UPGRADE_RETURN_DAYS = env_int("UPGRADE_RETURN_DAYS", 7, minimum=0)
# Events older than this are deleted by the daily prune.
EVENT_RETENTION_DAYS = env_int("EVENT_RETENTION_DAYS", 365, minimum=1)

# --- Authentication and security ----------------------------------------------------------
LOGIN_URL = "accounts:login"
LOGIN_REDIRECT_URL = "home:index"
LOGOUT_REDIRECT_URL = "accounts:login"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
# Failed logins: after LOGIN_FAILURE_LIMIT for one user name from one client address, further
# attempts of that user from that address are refused until the window has passed without a
# failure; after LOGIN_ADDRESS_FAILURE_LIMIT from one address (whatever the user names), all of
# that address's attempts are. Never per user name alone: a stranger cannot lock an
# administrator out from another address.
LOGIN_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5, minimum=1)
LOGIN_ADDRESS_FAILURE_LIMIT = env_int(
    "LOGIN_ADDRESS_FAILURE_LIMIT", max(20, LOGIN_FAILURE_LIMIT), minimum=LOGIN_FAILURE_LIMIT
)
LOGIN_FAILURE_WINDOW_SECONDS = env_int("LOGIN_FAILURE_WINDOW", 900, minimum=1)

_https = env_bool("HTTPS", False)  # set behind TLS: cookies become Secure, HSTS is sent
SESSION_COOKIE_SECURE = _https
CSRF_COOKIE_SECURE = _https
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Strict"
CSRF_COOKIE_SAMESITE = "Strict"
SESSION_COOKIE_AGE = env_int("SESSION_AGE", 8 * 3600, minimum=60)
SESSION_EXPIRE_AT_BROWSER_CLOSE = True
SECURE_HSTS_SECONDS = 31536000 if _https else 0
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if _https else None
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

# --- Static files, i18n ----------------------------------------------------------------------
STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True  # tests and a fresh checkout serve static files without collectstatic
LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = False
USE_TZ = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
