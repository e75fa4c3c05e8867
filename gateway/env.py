"""Typed readers for environment variables; a bad value fails loudly at start."""

from __future__ import annotations

import os

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from exc
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{name} must be <= {maximum}, got {value}")
    return value


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false, yes/no), got {raw!r}")


def env_choice(name: str, default: str, choices: list[str]) -> str:
    value = env_str(name, default).strip().lower()
    if value not in choices:
        raise ImproperlyConfigured(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_ae_title(name: str, default: str) -> str:
    value = env_str(name, default).strip()
    if not value or len(value) > 16 or "\\" in value or not value.isascii():
        raise ImproperlyConfigured(
            f"{name} must be 1-16 ASCII characters without backslash, got {value!r}"
        )
    return value


def env_uid_root(name: str, default: str) -> str:
    value = env_str(name, default).strip().rstrip(".")
    parts = value.split(".")
    if (
        not value
        or len(value) > 40
        or not all(p.isdigit() and (p == "0" or not p.startswith("0")) for p in parts)
    ):
        raise ImproperlyConfigured(
            f"{name} must be a dotted numeric UID root of at most 40 characters, got {value!r}"
        )
    return value
