"""Deployment settings: what `manage.py check --deploy` says with production's environment."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

from tests.servers import ROOT

PRODUCTION = {
    "DJANGO_SECRET_KEY": secrets.token_urlsafe(60),
    "DJANGO_DEBUG": "false",
    "DJANGO_ALLOWED_HOSTS": "gateway.example.org",
    "DJANGO_CSRF_TRUSTED_ORIGINS": "https://gateway.example.org",
    "DJANGO_SECURE_SSL_REDIRECT": "true",
    "DJANGO_SESSION_COOKIE_SECURE": "true",
    "DJANGO_CSRF_COOKIE_SECURE": "true",
    "DJANGO_SECURE_HSTS_SECONDS": "31536000",
    "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS": "true",
    "DJANGO_SECURE_HSTS_PRELOAD": "true",
    "DJANGO_BEHIND_TLS_PROXY": "true",
}


def _check_deploy(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "check", "--deploy", "--fail-level", "WARNING"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )


def test_check_deploy_is_clean_with_production_settings():
    done = _check_deploy(PRODUCTION)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


def test_check_deploy_names_what_is_missing_without_them():
    done = _check_deploy({"DJANGO_SECRET_KEY": PRODUCTION["DJANGO_SECRET_KEY"]})
    assert done.returncode != 0
    assert "SESSION_COOKIE_SECURE" in done.stderr and "SECURE_HSTS_SECONDS" in done.stderr
