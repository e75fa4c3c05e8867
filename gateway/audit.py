"""The actor of every change: a user in the UI, ``hl7:<app>`` or ``dicom:<AE>`` for the
listeners, ``system`` for periodic work. Code sets it with :func:`acting_as`; the web
middleware sets it from the logged-in user."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

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


def record(action: str, obj: Any = None, detail: dict | None = None, actor: str | None = None):
    """Append one audit event (inside the caller's transaction, so it commits with the change)."""
    from .models import AuditEvent

    return AuditEvent.objects.create(
        actor=actor or current_actor(),
        action=action,
        object_type=obj._meta.label if obj is not None else "",
        object_id=str(obj.pk) if obj is not None else "",
        object_repr=str(obj)[:200] if obj is not None else "",
        detail=detail or {},
    )


class ActorMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            with acting_as(f"user:{user.get_username()}"):
                return self.get_response(request)
        return self.get_response(request)
