"""The audit trail: every change with its actor, searchable, exportable, never editable."""

from __future__ import annotations

import csv
import json

from django import forms
from django.db.models import Q
from django.http import StreamingHttpResponse
from django.shortcuts import get_object_or_404, render
from django.utils import timezone

from .. import audit
from ..models import AuditEvent
from ..web import VIEW, Pager, parse_when, role_required

# The actions the gateway records, for the filter's suggestions (any text can be typed).
KNOWN_ACTIONS = [
    "auth.login", "auth.logout", "auth.login_failed", "auth.login_throttled",
    "hl7.message.received", "hl7.message.reprocessed", "hl7.order.created",
    "hl7.order.updated", "hl7.order.status", "hl7.patient.updated", "hl7.patient.merged",
    "dicom.association", "dicom.worklist.query",
    "delivery.delivered", "delivery.failed", "delivery.dead", "delivery.retry",
    "delivery.abandon", "retention.purge",
    "routing.node.created", "routing.node.updated", "routing.node.deleted",
    "routing.node.verified", "routing.rule.created", "routing.rule.updated",
    "routing.rule.deleted", "routing.rule.moved",
    "worklist.step.cancelled", "worklist.step.completed", "audit.exported",
]


class AuditFilters(forms.Form):
    action = forms.CharField(required=False, label="Action",
                             widget=forms.TextInput(attrs={"list": "audit-actions",
                                                           "placeholder": "e.g. routing.rule"}))
    actor = forms.CharField(required=False, label="Actor",
                            widget=forms.TextInput(attrs={"placeholder": "user:ada, hl7:RIS"}))
    q = forms.CharField(required=False, label="Search",
                        widget=forms.TextInput(attrs={"type": "search"}))
    since = forms.CharField(required=False, label="Since",
                            widget=forms.TextInput(attrs={"placeholder": "YYYY-MM-DD"}))
    until = forms.CharField(required=False, label="Until",
                            widget=forms.TextInput(attrs={"placeholder": "YYYY-MM-DD"}))
    object_type = forms.CharField(required=False, widget=forms.HiddenInput)
    object_id = forms.CharField(required=False, widget=forms.HiddenInput)

    def clean_since(self):
        return parse_when(self.cleaned_data["since"])

    def clean_until(self):
        return parse_when(self.cleaned_data["until"], end=True)


def filtered_events(filters: AuditFilters):
    """The events the filters select, newest first. An action ending in "." or without a
    dot-separated tail matches as a prefix (``routing.rule`` finds every rule change)."""
    events = AuditEvent.objects.all()
    if not filters.is_valid():
        return events.none()
    data = filters.cleaned_data
    if action := data["action"].strip():
        events = events.filter(Q(action=action) | Q(action__startswith=action.rstrip(".") + "."))
    if actor := data["actor"].strip():
        events = events.filter(Q(actor=actor) | Q(actor__startswith=actor + ":"))
    if data["since"]:
        events = events.filter(at__gte=data["since"])
    if data["until"]:
        events = events.filter(at__lte=data["until"])
    if data["object_type"]:
        events = events.filter(object_type=data["object_type"])
    if data["object_id"]:
        events = events.filter(object_id=data["object_id"])
    if q := data["q"].strip():
        events = events.filter(Q(object_repr__icontains=q) | Q(object_id=q) | Q(actor__icontains=q)
                               | Q(action__icontains=q))
    return events.order_by("-id")


@role_required(VIEW)
def audit_list(request):
    filters = AuditFilters(request.GET)
    pager = Pager(request, filtered_events(filters))
    export_query = request.GET.copy()
    export_query.pop("page", None)
    return render(request, "gateway/audit_list.html", {
        "title": "Audit trail", "filters": filters,
        "pager": pager, "known_actions": KNOWN_ACTIONS,
        "export_query": export_query.urlencode(),
    })


def _spreadsheet_safe(value):
    """Text a spreadsheet would run as a formula (HL7 senders, AE titles and user names reach
    the trail) is exported with a leading apostrophe."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


class _Echo:
    def write(self, value):
        return value


@role_required(VIEW)
def audit_export(request):
    """The filtered trail as CSV, streamed (it can be large). The export is itself audited."""
    filters = AuditFilters(request.GET)
    events = filtered_events(filters)
    audit.record("audit.exported", None, {"filters": {k: v for k, v in request.GET.items()
                                                       if v and k != "page"}})
    columns = ["id", "at", "actor", "action", "object_type", "object_id", "object_repr",
               "detail", "hash"]
    writer = csv.writer(_Echo())

    def rows():
        yield writer.writerow(columns)
        for event in events.values_list(*columns).iterator(chunk_size=2000):
            values = list(event)
            values[1] = values[1].isoformat()
            values[7] = json.dumps(values[7], sort_keys=True, ensure_ascii=False)
            yield writer.writerow([_spreadsheet_safe(v) for v in values])

    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    response = StreamingHttpResponse(rows(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="audit-{stamp}.csv"'
    return response


@role_required(VIEW)
def audit_detail(request, pk: int):
    event = get_object_or_404(AuditEvent, pk=pk)
    previous = AuditEvent.objects.filter(id__lt=pk).order_by("-id").values("id", "hash").first()
    expected = audit.chain_hash(previous["hash"] if previous else audit.GENESIS, {
        "at": event.at, "actor": event.actor, "action": event.action,
        "object_type": event.object_type, "object_id": event.object_id,
        "object_repr": event.object_repr, "detail": event.detail})
    detail = dict(event.detail)
    before, after = detail.pop("before", None), detail.pop("after", None)
    changes = []
    if isinstance(before, dict) or isinstance(after, dict):
        keys = sorted(set(before or {}) | set(after or {}))
        changes = [(k, (before or {}).get(k, ""), (after or {}).get(k, "")) for k in keys]
    return render(request, "gateway/audit_detail.html", {
        "title": f"Audit event {event.pk}", "event": event, "previous": previous,
        "link_ok": expected == event.hash, "changes": changes,
        "created": before is None and after is not None,
        "deleted": after is None and before is not None,
        "detail_json": json.dumps(detail, indent=2, sort_keys=True, ensure_ascii=False),
    })
