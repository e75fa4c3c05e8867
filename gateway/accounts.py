"""Signing in and out: every login, logout and failed login goes to the audit trail, and
repeated failures for one user name or from one address are refused for a while."""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.conf import settings
from django.contrib.auth import signals
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.views import LoginView
from django.db.models import Q
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


def recent_failures(username: str, ip: str) -> int:
    """Failed logins for this user name or from this address within the lockout window."""
    from .models import AuditEvent

    since = timezone.now() - timedelta(minutes=settings.LOGIN_LOCKOUT_MINUTES)
    who = Q(detail__username=username) | Q(detail__ip=ip) if ip else Q(detail__username=username)
    return AuditEvent.objects.filter(who, action="auth.login_failed", at__gte=since).count()


class ThrottledAuthenticationForm(AuthenticationForm):
    error_messages = {
        **AuthenticationForm.error_messages,
        "throttled": "Too many failed sign-ins for this user or from this address. "
                     "Try again in %(minutes)s minutes.",
    }

    def clean(self):
        username = self.cleaned_data.get("username") or ""
        ip = client_ip(self.request) if self.request else ""
        if recent_failures(username, ip) >= settings.LOGIN_FAILURE_LIMIT:
            audit.record("auth.login_throttled", None, {"username": username[:150], "ip": ip},
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
