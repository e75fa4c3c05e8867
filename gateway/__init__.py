"""Radiology workflow gateway: project package (settings, Celery app, audit trail, composition)."""

from .celery import app as celery_app

__all__ = ["celery_app"]
