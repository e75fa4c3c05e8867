"""Cross-cutting records: the audit trail."""

import json

from django.db import models
from django.utils import timezone


class AuditEvent(models.Model):
    """One thing that happened, with who did it. Append-only: nothing in the app edits or
    deletes these rows (on PostgreSQL a trigger refuses it), and each row's ``hash`` chains it
    to the row before (see :mod:`gateway.audit`). Write through ``audit.record``/``append``."""

    at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.CharField(max_length=200)
    action = models.CharField(max_length=64)
    object_type = models.CharField(max_length=100, blank=True)
    object_id = models.CharField(max_length=64, blank=True)
    object_repr = models.CharField(max_length=200, blank=True)
    detail = models.JSONField(default=dict, blank=True)
    hash = models.CharField(max_length=64, default="", editable=False)

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["object_type", "object_id"]),
            models.Index(fields=["action", "at"]),
            # The trail's filters: an actor or action, or its family by prefix ("hl7.").
            models.Index(fields=["actor"], name="audit_actor_pattern_idx",
                         opclasses=["varchar_pattern_ops"]),
            models.Index(fields=["action"], name="audit_action_pattern_idx",
                         opclasses=["varchar_pattern_ops"]),
        ]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor} {self.action} {self.object_repr}"

    @property
    def detail_text(self) -> str:
        """The details as compact JSON, as the list and the CSV export show them."""
        return json.dumps(self.detail, sort_keys=True, ensure_ascii=False)
