"""Signing in and out: every login, logout and failed login goes to the audit trail, and
repeated failures for one user name or from one address are refused for a while."""

from __future__ import annotations

import time
from datetime import timedelta

from django import forms
from django.conf import settings
from django.contrib.auth import logout, signals
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.views import LoginView, redirect_to_login
from django.utils import timezone

from . import audit
from .web import client_ip


def _on_login(sender, request, user, **kwargs):
    audit.record("auth.login", user, {"ip": client_ip(request)},
                 actor=f"user:{user.get_username()}")


def _on_logout(sender, request, user, **kwargs):
    if user is not None:
        audit.record("auth.logout", user, {"ip": client_ip(request)},
                     actor=f"user:{user.get_username()}")


def _on_login_failed(sender, credentials, request=None, **kwargs):
    username = str(credentials.get("username", ""))[:150]
    ip = client_ip(request) if request is not None else ""
    audit.record("auth.login_failed", None, {"username": username, "ip": ip},
                 actor=f"anonymous:{ip}" if ip else "anonymous")


def connect_signals() -> None:
    signals.user_logged_in.connect(_on_login, dispatch_uid="gateway_audit_login")
    signals.user_logged_out.connect(_on_logout, dispatch_uid="gateway_audit_logout")
    signals.user_login_failed.connect(_on_login_failed, dispatch_uid="gateway_audit_failed")


# One address may fail this many times more than one user name from it (a shared
# workstation's several users, or one attacker trying many names).
ADDRESS_FACTOR = 4


def throttled(username: str, ip: str) -> bool:
    """Whether sign-in is refused: LOGIN_FAILURE_LIMIT failures for this user name from this
    address, or ADDRESS_FACTOR times as many from the address, within the window. Counting per
    user name alone would let anyone lock an administrator out from anywhere."""
    from .models import AuditEvent

    since = timezone.now() - timedelta(minutes=settings.LOGIN_LOCKOUT_MINUTES)
    failures = AuditEvent.objects.filter(action="auth.login_failed", at__gte=since,
                                         detail__ip=ip)
    limit = settings.LOGIN_FAILURE_LIMIT
    if failures.filter(detail__username=username).count() >= limit:
        return True
    return failures.count() >= limit * ADDRESS_FACTOR


def _throttle_recorded(username: str, ip: str) -> bool:
    from .models import AuditEvent

    since = timezone.now() - timedelta(minutes=settings.LOGIN_LOCKOUT_MINUTES)
    return AuditEvent.objects.filter(action="auth.login_throttled", at__gte=since,
                                     detail__ip=ip, detail__username=username).exists()


class ThrottledAuthenticationForm(AuthenticationForm):
    error_messages = {
        **AuthenticationForm.error_messages,
        "throttled": "Too many failed sign-ins for this user or from this address. "
                     "Try again in %(minutes)s minutes.",
    }

    def clean(self):
        username = self.cleaned_data.get("username") or ""
        ip = client_ip(self.request) if self.request else ""
        if throttled(username[:150], ip):
            # Once per window: refused attempts are not each worth a row in the trail.
            if not _throttle_recorded(username[:150], ip):
                audit.record("auth.login_throttled", None,
                             {"username": username[:150], "ip": ip},
                             actor=f"anonymous:{ip}" if ip else "anonymous")
            raise forms.ValidationError(
                self.error_messages["throttled"], code="throttled",
                params={"minutes": settings.LOGIN_LOCKOUT_MINUTES})
        return super().clean()


class GatewayLoginView(LoginView):
    template_name = "registration/login.html"
    authentication_form = ThrottledAuthenticationForm
    redirect_authenticated_user = True

    def form_invalid(self, form):
        response = super().form_invalid(form)
        if any(e.code == "throttled" for e in form.non_field_errors().as_data()):
            response.status_code = 429
        return response


class IdleTimeoutMiddleware:
    """Signs out a session nobody has used for SESSION_IDLE_MINUTES (automatic log-off of an
    unattended workstation). The dashboard's own refreshes don't count as use."""

    KEY = "gateway_last_activity"
    BACKGROUND = {"/dashboard.json"}

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            now = int(time.time())
            last = request.session.get(self.KEY, now)
            if now - last > settings.SESSION_IDLE_MINUTES * 60:
                audit.record("auth.logout", user, {"ip": client_ip(request), "idle": True},
                             actor=f"user:{user.get_username()}")
                logout(request)
                return redirect_to_login(request.get_full_path())
            # Noted at most once a minute: a session write on every page would cost queries.
            if request.path not in self.BACKGROUND and (self.KEY not in request.session
                                                        or now - last >= 60):
                request.session[self.KEY] = now
        return self.get_response(request)
