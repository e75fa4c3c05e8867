"""What every page of the administrator's UI shares: roles, the access check, paging.

Roles are Django groups (created by a migration):

* **Administrators** change everything (superusers count as administrators);
* **Operators** see everything and act on work (retry, reprocess, cancel a step), but change no
  configuration;
* **Auditors** see everything, the audit trail included, and change nothing.

A signed-in user in none of these groups sees nothing but a page saying so.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime, time
from urllib.parse import urlencode

from django import forms
from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime
from django.utils.http import url_has_allowed_host_and_scheme

ADMINISTRATORS = "Administrators"
OPERATORS = "Operators"
AUDITORS = "Auditors"
ROLES = (ADMINISTRATORS, OPERATORS, AUDITORS)

# What each level of access lets a user do, by role.
VIEW = frozenset(ROLES)
OPERATE = frozenset({ADMINISTRATORS, OPERATORS})
CONFIGURE = frozenset({ADMINISTRATORS})

_LEVEL_NAMES = {VIEW: "view", OPERATE: "operate", CONFIGURE: "configure"}


def roles_of(user) -> frozenset[str]:
    """The roles of ``user`` (cached on the user object for the request)."""
    if not user.is_authenticated or not user.is_active:
        return frozenset()
    cached = getattr(user, "_gateway_roles", None)
    if cached is None:
        if user.is_superuser:
            cached = frozenset({ADMINISTRATORS})
        else:
            cached = frozenset(user.groups.filter(name__in=ROLES).values_list("name", flat=True))
        user._gateway_roles = cached
    return cached


def can(user, level: frozenset[str]) -> bool:
    """True when one of the user's roles grants ``level`` (VIEW, OPERATE or CONFIGURE)."""
    return bool(roles_of(user) & level)


def role_required(level: frozenset[str]) -> Callable:
    """View decorator: sign-in first, then a role that grants ``level``; otherwise 403 with a
    page that says what is missing."""

    def decorator(view):
        @functools.wraps(view)
        def wrapped(request: HttpRequest, *args, **kwargs):
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if not can(request.user, level):
                raise PermissionDenied(_refusal(request.user, level))
            return view(request, *args, **kwargs)

        wrapped.required_level = level
        return wrapped

    return decorator


def _refusal(user, level: frozenset[str]) -> str:
    roles = ", ".join(sorted(roles_of(user))) or "no role"
    needed = " or ".join(sorted(level))
    return f"This needs the {needed} role; {user.get_username()} has {roles}."


def permission_denied(request: HttpRequest, exception=None):
    """The 403 page: says who is signed in and which role the action needs."""
    message = str(exception) if exception and str(exception) else "You may not do this."
    return render(request, "403.html", {"message": message}, status=403)


def access(request: HttpRequest) -> dict:
    """Template context: ``can.view``, ``can.operate``, ``can.configure`` and ``roles``."""
    user = getattr(request, "user", None)
    if user is None:
        return {}
    roles = roles_of(user)
    return {
        "can": {name: bool(roles & level) for level, name in _LEVEL_NAMES.items()},
        "roles": sorted(roles),
    }


class Pager:
    """One page of a queryset without counting the whole table: it fetches one row more than
    it shows to know whether a next page exists, so a page costs the same with 100 rows or
    10 million behind it. ``?page=N`` (1-based); other query parameters are kept in links."""

    # Deeper than this, a page costs a walk past too many rows; filters find it faster.
    MAX_PAGES = 2000

    def __init__(self, request: HttpRequest, queryset, per_page: int = 50):
        try:
            self.number = max(1, int(request.GET.get("page", "1")))
        except ValueError:
            self.number = 1
        self.capped = self.number >= self.MAX_PAGES
        self.number = min(self.number, self.MAX_PAGES)
        self.per_page = per_page
        start = (self.number - 1) * per_page
        if start:
            # A deep page finds its keys first (an index-only walk past the skipped rows),
            # then joins only the rows it shows: OFFSET over the joined query would build
            # every skipped row's joins too.
            keys = list(queryset.values_list("pk", flat=True)[start : start + per_page + 1])
            by_key = {row.pk: row for row in queryset.order_by().filter(pk__in=keys)}
            rows = [by_key[key] for key in keys if key in by_key]
        else:
            rows = list(queryset[: per_page + 1])
        self.has_next = len(rows) > per_page and not self.capped
        self.items = rows[:per_page]
        self.has_previous = self.number > 1
        self.first_index = start + 1 if self.items else 0
        self.last_index = start + len(self.items)
        self._params = request.GET.copy()

    def _url(self, number: int) -> str:
        params = self._params.copy()
        params["page"] = str(number)
        return "?" + params.urlencode()

    @property
    def next_url(self) -> str:
        return self._url(self.number + 1)

    @property
    def previous_url(self) -> str:
        return self._url(self.number - 1)

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def query_string(**params) -> str:
    """``?a=1&b=2`` for links into filtered lists (empty values left out)."""
    kept = {key: value for key, value in params.items() if value not in (None, "")}
    return "?" + urlencode(kept) if kept else ""


def redirect_back(request: HttpRequest, default: str):
    """After an action: back to the page its form was on (POST ``next``, this site only), else
    to ``default`` (a URL or URL name)."""
    target = request.POST.get("next", "")
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return redirect(target)
    return redirect(default)


def posted_switch(request: HttpRequest, current: bool) -> bool:
    """The state an Enable/Disable button asks for: its ``enabled`` value ("1" or "0"); a
    form without it flips ``current``."""
    wanted = request.POST.get("enabled")
    return wanted == "1" if wanted in ("0", "1") else not current


def client_ip(request: HttpRequest) -> str:
    """The browser's address: the socket peer, or behind the TLS proxy
    (``DJANGO_BEHIND_TLS_PROXY``) the address the proxy appended last to X-Forwarded-For; the
    entries before it are whatever the client claimed, so they are not trusted."""
    if settings.BEHIND_TLS_PROXY:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        if hops:
            return hops[-1][:64]
    return request.META.get("REMOTE_ADDR", "")


def parse_when(text: str, end: bool = False) -> datetime | None:
    """A list filter's ``since``/``until``: an ISO date-time (with or without offset) or a date.
    A bare date means its start (for an upper bound, ``end``, its end); naive values are in the
    server's time zone. Anything else is a ValidationError that says what to type."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        # A bare date first: parse_datetime would read it as that day's midnight.
        day = parse_date(text)
        value = None if day else parse_datetime(text)
    except ValueError:
        day = value = None
    if day is not None:
        value = datetime.combine(day, time.max if end else time.min)
    elif value is None:
        raise forms.ValidationError("Use a date (2026-11-27) or a date and time "
                                    "(2026-11-27T14:30).")
    try:
        if timezone.is_naive(value):
            value = timezone.make_aware(value)
        # In UTC: PostgreSQL refuses offsets beyond ±15:59 that Python reads
        # ("2026-11-27T10:00+23:00"), and near year 1 or 9999 an offset can push a time out
        # of the calendar.
        return value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise forms.ValidationError("Use a date between the years 1 and 9999.") from None
