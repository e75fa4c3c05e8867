"""Celery wrappers of the periodic routing work in :mod:`routing.routing`; the beat schedule
runs them (``system`` is the actor). Both are idempotent and safe to run concurrently."""

from __future__ import annotations

from celery import shared_task

from gateway.audit import acting_as

from .routing import route_pending_instances, route_quiet_studies


@shared_task(name="routing.route_quiet_studies")
def route_quiet_studies_task() -> int:
    """Route the waiting instances of studies that have been quiet long enough."""
    with acting_as("system"):
        return route_quiet_studies()


@shared_task(name="routing.route_pending_instances")
def route_pending_instances_task() -> int:
    """Route instances left PENDING because routing right after storing failed."""
    with acting_as("system"):
        return route_pending_instances()
