"""The actor of every change: a user in the UI, ``hl7:<app>`` or ``dicom:<AE>`` for the
listeners, ``system`` for periodic work. Code sets it with :func:`acting_as`; the web
middleware sets it from the logged-in user."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
from collections.abc import Iterator
from datetime import UTC
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

_actor: contextvars.ContextVar[str] = contextvars.ContextVar("gateway_actor", default="system")


def current_actor() -> str:
    return _actor.get()


@contextlib.contextmanager
def acting_as(actor: str) -> Iterator[None]:
    token = _actor.set(actor)
    try:
        yield
    finally:
        _actor.reset(token)


# --- the chained, append-only trail -----------------------------------------------------
#
# Each event carries ``hash = sha256(previous event's hash + the event's canonical form)``,
# in id order. Appending takes a lock that the transaction holds until it commits (on
# PostgreSQL a transaction-level advisory lock; SQLite's IMMEDIATE transactions already
# serialise writers), so the previous hash read under it is the last committed one and ids
# are handed out in chain order. A changed, removed or reordered row breaks the chain at
# that row; `manage.py verify_audit` finds the first break. On PostgreSQL a trigger refuses
# UPDATE and DELETE on the table.

GENESIS = "0" * 64
_LOCK_KEY = 0x41554454  # "AUDT": the advisory lock every appender takes


def canonical(event: dict) -> bytes:
    """The bytes an event's hash covers (everything but its id and hash)."""
    at = event["at"].astimezone(UTC).isoformat(timespec="microseconds")
    fields = [at, event["actor"], event["action"], event["object_type"], event["object_id"],
              event["object_repr"], event["detail"]]
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str).encode()


def chain_hash(previous: str, event: dict) -> str:
    return hashlib.sha256(previous.encode() + canonical(event)).hexdigest()


def _normalised(detail: dict | None) -> dict:
    # Stored as JSON and read back as JSON: hash what will be read back (tuples become
    # lists, dates strings).
    return json.loads(json.dumps(detail or {}, default=str))


def append(events: list[dict]) -> None:
    """Append events (dicts with actor, action, object_type, object_id, object_repr, detail;
    ``at`` defaults to now) to the trail, inside the caller's transaction."""
    if not events:
        return
    from . import sql
    from .models import AuditEvent

    now = timezone.now()
    # No savepoint: an event that cannot be appended fails the caller's whole transaction.
    with transaction.atomic(savepoint=False):
        with sql.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_KEY])
            cursor.execute(f"SELECT hash FROM {AuditEvent._meta.db_table} "
                           "ORDER BY id DESC LIMIT 1")
            row = cursor.fetchone()
        previous = row[0] if row else GENESIS
        rows = []
        for event in events:
            row = {"at": now, "object_type": "", "object_id": "", "object_repr": "", **event}
            row["detail"] = _normalised(row.get("detail"))
            row["object_repr"] = row["object_repr"][:200]
            previous = row["hash"] = chain_hash(previous, row)
            rows.append(row)
        sql.insert(AuditEvent, rows)


def record(action: str, obj: Any = None, detail: dict | None = None,
           actor: str | None = None) -> None:
    """Append one audit event (inside the caller's transaction, so it commits with the
    change)."""
    append([{
        "actor": actor or current_actor(),
        "action": action,
        "object_type": obj._meta.label if obj is not None else "",
        "object_id": str(obj.pk) if obj is not None else "",
        "object_repr": str(obj)[:200] if obj is not None else "",
        "detail": detail or {},
    }])


def snapshot(obj: Any, fields: list[str]) -> dict:
    """The values of ``fields`` of ``obj`` as the audit trail shows them (many-to-many as
    sorted lists of names)."""
    values = {}
    for name in fields:
        value = getattr(obj, name)
        if hasattr(value, "all"):
            value = sorted(str(getattr(item, "name", item)) for item in value.all())
        values[name] = value
    return _normalised(values)


def record_change(action: str, obj: Any, before: dict | None, after: dict | None,
                  **detail) -> None:
    """A configuration change with the values before and after (only the fields that
    changed, unless the object was created or deleted)."""
    if before is not None and after is not None:
        changed = sorted(k for k in after if before.get(k) != after.get(k))
        before = {k: before.get(k) for k in changed}
        after = {k: after[k] for k in changed}
    record(action, obj, {"before": before, "after": after, **detail})


def last_event() -> tuple[int, Any, str] | None:
    """(id, time, hash) of the newest event: the anchor to keep outside the database."""
    from .models import AuditEvent

    return AuditEvent.objects.order_by("-id").values_list("id", "at", "hash").first()


def verify() -> tuple[int, dict | None]:
    """Walk the trail in id order. Returns (events checked, None) when every hash follows from
    the one before, else (events checked, the first event whose hash does not)."""
    from .models import AuditEvent

    previous, count, previous_id = GENESIS, 0, None
    columns = ("id", "at", "actor", "action", "object_type", "object_id", "object_repr",
               "detail", "hash")
    for values in AuditEvent.objects.order_by("id").values(*columns).iterator(chunk_size=5000):
        count += 1
        expected = chain_hash(previous, values)
        if values["hash"] != expected:
            return count, {**values, "previous_id": previous_id, "expected": expected}
        previous, previous_id = values["hash"], values["id"]
    return count, None


class ActorMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            with acting_as(f"user:{user.get_username()}"):
                return self.get_response(request)
        return self.get_response(request)


# --- Django's admin (superusers only): its changes go to the same trail --------------------


def _admin_value(value: Any) -> Any:
    if hasattr(value, "all") and hasattr(value, "model"):  # a queryset from a m2m field
        return sorted(str(item) for item in value)
    if hasattr(value, "_meta"):
        return str(value)
    return value


class AuditedAdmin:
    """Mixin for a ModelAdmin: every save and delete through the admin is recorded as
    ``<app>.<model>.created / updated / deleted`` with the changed fields' values before and
    after, in the admin's own transaction."""

    def save_model(self, request, obj, form, change):
        # A password (hashed or not) never goes into the trail; that it changed does.
        fields = [f for f in form.changed_data if "password" not in f]
        before = ({f: _admin_value(form.initial.get(f)) for f in fields} if change else None)
        super().save_model(request, obj, form, change)
        request._audited_form = (obj, fields, before, change)

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        obj, fields, before, change = request._audited_form
        after = {f: _admin_value(form.cleaned_data.get(f)) for f in fields}
        label = obj._meta.label_lower
        record_change(f"{label}.{'updated' if change else 'created'}", obj, before, after,
                      source="admin")

    def delete_model(self, request, obj):
        record(f"{obj._meta.label_lower}.deleted", obj, {"source": "admin"})
        super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            record(f"{obj._meta.label_lower}.deleted", obj, {"source": "admin"})
        super().delete_queryset(request, queryset)


class ReadOnlyAdmin:
    """Mixin for a ModelAdmin of records (messages, queries, associations): viewable only."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
