"""The worklist pages: scheduled steps with filters, one step with exactly what a modality
receives for it, and the hand actions (cancel, complete) on a step."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from io import BytesIO

from django import forms
from django.contrib import messages
from django.db.models import F, Q
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom.dsutils import decode, encode

from gateway.models import AuditEvent
from gateway.web import OPERATE, VIEW, Pager, query_string, role_required

from ..models import HL7Message, ImagingOrder, ScheduledStep, StepAlreadyEnded, StepStatus
from ..mwl import item_for_step

OPEN = "open"
ANY = "all"
# What the action buttons post, and the status each one sets.
ACTIONS = {"cancel": StepStatus.CANCELLED, "complete": StepStatus.COMPLETED}
EVENTS_SHOWN = 50


class StepFilters(forms.Form):
    """The worklist's filters; the dashboard links here with the same query parameters."""

    status = forms.ChoiceField(
        required=False, label="Status",
        choices=[(OPEN, "Open (scheduled, arrived, ready)"), *StepStatus.choices,
                 (ANY, "Any status")])
    date_from = forms.DateField(required=False, label="From",
                                widget=forms.DateInput(attrs={"type": "date"}))
    date_to = forms.DateField(required=False, label="To",
                              widget=forms.DateInput(attrs={"type": "date"}))
    modality = forms.CharField(required=False, label="Modality", max_length=16,
                               widget=forms.TextInput(attrs={"size": 6, "placeholder": "CT"}))
    station = forms.CharField(required=False, label="Station AE", max_length=16,
                              widget=forms.TextInput(attrs={"size": 10}))
    patient = forms.CharField(required=False, label="Patient", max_length=64,
                              widget=forms.TextInput(attrs={"placeholder": "ID or name"}))
    accession = forms.CharField(required=False, label="Accession", max_length=16,
                                widget=forms.TextInput(attrs={"size": 12}))

    def clean(self):
        data = super().clean()
        low, high = data.get("date_from"), data.get("date_to")
        if low and high and low > high:
            self.add_error("date_to", "The end date is before the start date.")
        # The scheduled start bounds (the end date is inclusive, so up to the next midnight).
        # Starts are local wall-clock times stored as if UTC (see worklist.models).
        if low:
            data["start_from"] = datetime.combine(low, time.min, UTC)
        if high:
            try:
                data["start_before"] = datetime.combine(high + timedelta(days=1), time.min, UTC)
            except OverflowError:
                last = date.max - timedelta(days=1)
                self.add_error("date_to", f"Enter a date up to {last.isoformat()}.")
        return data


def filtered_steps(filters: StepFilters):
    """The steps the filters select, by scheduled start (then id, so pages are stable),
    with their order and patient. Every filter is on an indexed column; the default (open
    steps) reads the partial index step_open_start_id_idx in order."""
    steps = ScheduledStep.objects.select_related("order__patient")
    if not filters.is_valid():
        return steps.none()
    data = filters.cleaned_data
    status = data["status"] or OPEN
    if status == OPEN:
        steps = steps.filter(status__in=StepStatus.on_worklist())
    elif status != ANY:
        steps = steps.filter(status=status)
    if data.get("start_from"):
        steps = steps.filter(start__gte=data["start_from"])
    if data.get("start_before"):
        steps = steps.filter(start__lt=data["start_before"])
    if modality := data["modality"].strip().upper():
        steps = steps.filter(modality=modality)
    if station := data["station"].strip():
        steps = steps.filter(station_ae_title=station)
    if patient := data["patient"].strip():
        steps = steps.filter(Q(order__patient__patient_id=patient)
                             | Q(order__patient__name_key__startswith=patient.upper()))
    if accession := data["accession"].strip():
        steps = steps.filter(order__accession_number=accession)
    return steps.order_by(F("start").asc(nulls_last=True), "id")


@role_required(VIEW)
def step_list(request):
    data = request.GET.copy()
    if not data.get("status"):
        data["status"] = OPEN  # the default, shown as chosen
    filters = StepFilters(data)
    pager = Pager(request, filtered_steps(filters))
    return render(request, "worklist/step_list.html",
                  {"title": "Worklist", "filters": filters, "pager": pager})


@role_required(VIEW)
def step_detail(request, pk: int):
    step = get_object_or_404(
        ScheduledStep.objects.select_related("order__patient__merged_into",
                                             "order__last_message"), pk=pk)
    order = step.order
    item = item_for_step(step.pk)
    events = list(
        AuditEvent.objects.filter(
            Q(object_type=ScheduledStep._meta.label, object_id=str(step.pk))
            | Q(object_type=ImagingOrder._meta.label, object_id=str(order.pk))
        ).order_by("-id")[:EVENTS_SHOWN]
    )
    return render(request, "worklist/step_detail.html", {
        "title": f"Step {step.sps_id}",
        "step": step,
        "order": order,
        "patient": order.patient,
        "siblings": order.steps.exclude(pk=step.pk).order_by(
            F("start").asc(nulls_last=True), "id"),
        "item_rows": dataset_rows(_as_received(item)) if item is not None else [],
        "on_worklist": step.status in StepStatus.on_worklist(),
        "ended": step.status in StepStatus.ended(),
        "hl7_messages": _messages_of(order, events),
        "events": events,
        "events_more": len(events) == EVENTS_SHOWN,
        "step_events_url": _audit_url(ScheduledStep, step.pk),
        "order_events_url": _audit_url(ImagingOrder, order.pk),
    })


@role_required(OPERATE)
@require_POST
def step_set_status(request, pk: int):
    step = get_object_or_404(ScheduledStep, pk=pk)
    status = ACTIONS.get(request.POST.get("action", ""))
    if status is None:
        messages.error(request, "Choose Cancel step or Mark completed.")
        return redirect("worklist-detail", pk=step.pk)
    try:
        step.end_by_hand(status)
    except StepAlreadyEnded as exc:
        messages.error(request, f"Step {step.sps_id} has already ended ({exc}); "
                                "nothing was changed.")
    else:
        if status == StepStatus.CANCELLED:
            text = f"Step {step.sps_id} cancelled: modalities no longer receive it."
        else:
            text = f"Step {step.sps_id} marked completed: modalities no longer receive it."
        messages.success(request, f"{text} Order status: {step.order.get_status_display()}.")
    return redirect("worklist-detail", pk=step.pk)


# --- helpers ------------------------------------------------------------------------------


def _audit_url(model, pk: int) -> str:
    return reverse("audit-list") + query_string(object_type=model._meta.label, object_id=pk)


def _messages_of(order: ImagingOrder, events: list[AuditEvent]) -> list[HL7Message]:
    """The HL7 messages that touched the order: its last message and those its audit
    events name (hl7.order.* events carry the message id)."""
    ids = {order.last_message_id} if order.last_message_id else set()
    for event in events:
        if event.object_type == ImagingOrder._meta.label and event.action.startswith("hl7."):
            message_id = event.detail.get("message")
            if isinstance(message_id, int):
                ids.add(message_id)
    if not ids:
        return []
    return list(HL7Message.objects.filter(pk__in=ids).defer("raw", "ack").order_by("-id"))


def _as_received(ds: Dataset) -> Dataset:
    """The dataset as a modality decodes it: encoded the way the C-FIND answer is sent
    (explicit VR little endian) and read back."""
    return decode(BytesIO(encode(ds, False, True)), False, True)


def dataset_rows(ds: Dataset, depth: int = 0) -> list[dict]:
    """A dataset as table rows (tag, keyword, VR, value, depth), sequence items nested
    below their sequence."""
    rows = []
    for elem in ds:
        row = {"tag": f"({elem.tag.group:04X},{elem.tag.element:04X})",
               "keyword": elem.keyword or "(private or unknown)", "vr": elem.VR,
               "depth": depth, "indent": _indent(depth), "value": "", "item": None}
        rows.append(row)
        if elem.VR == "SQ":
            row["value"] = f"{len(elem.value)} item{'s' if len(elem.value) != 1 else ''}"
            for number, item in enumerate(elem.value, 1):
                rows.append({"item": number, "depth": depth + 1,
                             "indent": _indent(depth + 1)})
                rows.extend(dataset_rows(item, depth + 2))
        else:
            row["value"] = _element_text(elem.value)
    return rows


def _indent(depth: int) -> str:
    return f"{0.6 + depth * 1.25:.2f}"  # rem, as text so that no locale formats it


def _element_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_element_text(v) for v in value)
    if isinstance(value, bytes):
        return value.hex(" ")
    return str(value)
