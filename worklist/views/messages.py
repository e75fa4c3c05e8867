"""The HL7 message pages: every message received, filtered; one message with a segment and
field viewer, its ACK, its effects; and reprocessing a refused message."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from django import forms
from django.contrib import messages
from django.db.models import Q
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST
from hl7apy import load_library

from gateway.models import AuditEvent
from gateway.web import OPERATE, VIEW, Pager, parse_when, query_string, role_required

from ..hl7 import service
from ..hl7.parse import (
    Delimiters,
    HL7Error,
    decode_text,
    read_header,
    segment_text,
    unescape,
)
from ..models import HL7Message, ImagingOrder, MessageStatus

REFUSED = "refused"
_LIST_COLUMNS = ("id", "received_at", "message_type", "control_id", "sending_application",
                 "sending_facility", "peer", "patient_id", "status", "error_code", "error_text")


# --- the list -----------------------------------------------------------------------------


class MessageFilters(forms.Form):
    """The messages page's filters; the dashboard links here with the same parameters."""

    status = forms.ChoiceField(
        required=False, label="Status",
        choices=[("", "Any status"), (REFUSED, "Refused (error or rejected)"),
                 *MessageStatus.choices])
    type = forms.CharField(required=False, label="Type", max_length=40,
                           widget=forms.TextInput(attrs={"size": 10,
                                                         "placeholder": "ORM or ORM^O01"}))
    sender = forms.CharField(required=False, label="Sender", max_length=361,
                             widget=forms.TextInput(attrs={"size": 14,
                                                           "placeholder": "RIS or RIS^FACILITY"}))
    control_id = forms.CharField(required=False, label="Control ID", max_length=199)
    patient = forms.CharField(required=False, label="Patient ID", max_length=64,
                              widget=forms.TextInput(attrs={"size": 12}))
    since = forms.CharField(required=False, label="Since",
                            widget=forms.TextInput(attrs={"size": 16,
                                                          "placeholder": "YYYY-MM-DD"}))
    until = forms.CharField(required=False, label="Until",
                            widget=forms.TextInput(attrs={"size": 16,
                                                          "placeholder": "YYYY-MM-DD"}))

    def clean_since(self):
        return parse_when(self.cleaned_data["since"])

    def clean_until(self):
        return parse_when(self.cleaned_data["until"], end=True)


def message_type_filter(text: str) -> Q:
    """MSH-9 as stored ("ORM^O01"): a whole type with its event, or a type alone, which
    finds every event of that type (a prefix on the varchar_pattern_ops index)."""
    text = text.strip().upper().replace(" ", "^").replace("_", "^")
    parts = [p for p in text.split("^") if p][:2]
    if len(parts) == 2:
        return Q(message_type="^".join(parts))
    kind = parts[0] if parts else ""
    return Q(message_type=kind) | Q(message_type__startswith=kind + "^")


def filtered_messages(filters: MessageFilters):
    """The messages the filters select, newest first, without their raw bytes."""
    found = HL7Message.objects.only(*_LIST_COLUMNS)
    if not filters.is_valid():
        return found.none()
    data = filters.cleaned_data
    if data["status"] == REFUSED:
        found = found.filter(status__in=service.REPROCESSABLE)
    elif data["status"]:
        found = found.filter(status=data["status"])
    if data["type"].strip():
        found = found.filter(message_type_filter(data["type"]))
    if sender := data["sender"].strip():
        application, _, facility = sender.partition("^")
        found = found.filter(sending_application=application)
        if facility:
            found = found.filter(sending_facility=facility)
    if control_id := data["control_id"].strip():
        found = found.filter(control_id=control_id)
    if patient := data["patient"].strip():
        found = found.filter(patient_id=patient)
    if data["since"]:
        found = found.filter(received_at__gte=data["since"])
    if data["until"]:
        found = found.filter(received_at__lte=data["until"])
    return found.order_by("-id")


@role_required(VIEW)
def message_list(request):
    filters = MessageFilters(request.GET)
    pager = Pager(request, filtered_messages(filters))
    return render(request, "worklist/message_list.html",
                  {"title": "HL7 messages", "filters": filters, "pager": pager})


# --- one message --------------------------------------------------------------------------


@role_required(VIEW)
def message_detail(request, pk: int):
    message = get_object_or_404(
        HL7Message.objects.select_related("reprocessed_from").defer(
            "reprocessed_from__raw", "reprocessed_from__ack"), pk=pk)
    text, delimiters, codec = decode_message(bytes(message.raw))
    ack_text, ack_delimiters, _ = decode_message(bytes(message.ack), codec)
    events = _events_of(message)
    order_ids = {int(e.object_id) for e in events
                 if e.object_type == ImagingOrder._meta.label and e.object_id.isdigit()}
    orders = (ImagingOrder.objects.filter(Q(pk__in=order_ids) | Q(last_message=message))
              .select_related("patient").prefetch_related("steps").order_by("id"))
    return render(request, "worklist/message_detail.html", {
        "title": f"HL7 message {message.pk}",
        "message": message,
        "codec": codec,
        "raw_lines": text.splitlines(),
        "segments": segments_of(text, delimiters, message.version, codec),
        "ack_lines": ack_text.splitlines(),
        "ack_segments": segments_of(ack_text, ack_delimiters, message.version, codec),
        "ack_code": ack_code(ack_text, ack_delimiters),
        "reprocessed_as": list(message.reprocessed_as.only("id", "status", "received_at")
                               .order_by("id")),
        "not_reprocessable": service.why_not_reprocessable(message),
        "orders": orders,
        "events": events,
        "events_url": reverse("audit-list") + query_string(
            object_type=HL7Message._meta.label, object_id=message.pk),
    })


@role_required(OPERATE)
@require_POST
def message_reprocess(request, pk: int):
    original = get_object_or_404(HL7Message.objects.only("id", "status"), pk=pk)
    try:
        attempt = service.reprocess(original.pk)
    except service.NotReprocessable as exc:
        messages.error(request, str(exc))
        return redirect("hl7-detail", pk=original.pk)
    except HL7Message.DoesNotExist:
        messages.error(request, f"Message {original.pk} no longer exists; nothing was "
                                "reprocessed.")
        return redirect("hl7-list")
    except RuntimeError:
        # The new attempt could not be stored (the service logged why); its transaction
        # rolled back, so nothing changed.
        messages.error(request, f"Message {original.pk} could not be reprocessed: the new "
                                "attempt could not be stored (see the gateway's log). Nothing "
                                "was changed; try again later.")
        return redirect("hl7-detail", pk=original.pk)
    text, delimiters, _ = decode_message(bytes(attempt.ack))
    code = ack_code(text, delimiters) or "?"
    result = f"Message {original.pk} reprocessed as message {attempt.pk}: {code}"
    if attempt.status == MessageStatus.ACCEPTED:
        messages.success(request, f"{result}, accepted.")
    elif attempt.status == MessageStatus.DUPLICATE:
        messages.warning(request, f"{result} (duplicate): a message with this control ID "
                                  "from this sender was accepted meanwhile, so this one "
                                  "changed nothing.")
    else:
        messages.error(request, f"{result}, error {attempt.error_code}: {attempt.error_text}")
    return redirect("hl7-detail", pk=attempt.pk)


def _events_of(message: HL7Message) -> list[AuditEvent]:
    """The message's own events (received, reprocessed) and those of its effects, which
    were appended with its received event in one statement (same ``at``) and name it."""
    own = list(AuditEvent.objects.filter(object_type=HL7Message._meta.label,
                                         object_id=str(message.pk)).order_by("id"))
    received = next((e for e in own if e.action == "hl7.message.received"), None)
    effects = []
    if received is not None:
        effects = list(AuditEvent.objects.filter(at=received.at, detail__message=message.pk)
                       .exclude(pk=received.pk).order_by("id"))
    return sorted(own + effects, key=lambda e: e.pk)


# --- the segment and field viewer ---------------------------------------------------------


def decode_message(raw: bytes, codec: str | None = None) -> tuple[str, Delimiters | None, str]:
    """The text of a stored message or ACK with segments on lines, its delimiters (None when
    it has no readable MSH) and the codec used: ``codec`` when given and it decodes (an ACK
    goes out in its message's), else as the listener decides (parse.decode_text)."""
    try:
        header = read_header(raw)
    except HL7Error:
        header = None
    text = None
    if codec:
        try:
            text = segment_text(raw.decode(codec))
        except (UnicodeDecodeError, LookupError):
            text = None
    if text is None:
        text, codec = decode_text(raw, header)
    lines = "\n".join(line for line in text.split("\r") if line.strip())
    return lines, header.delimiters if header else None, codec


@dataclass
class Part:
    """A component (or subcomponent) of a field, decoded."""

    label: str
    name: str
    value: str
    subcomponents: list[Part] = field(default_factory=list)


@dataclass
class FieldView:
    """One non-empty field: ``value`` when it is a single plain value, else its
    repetitions, each a list of its non-empty components."""

    label: str
    name: str
    value: str = ""
    repetitions: list[list[Part]] = field(default_factory=list)


@dataclass
class SegmentView:
    name: str
    title: str
    fields: list[FieldView]


# Segments the gateway reads or answers with, and the common ones around them.
SEGMENT_TITLES = {
    "MSH": "Message header", "EVN": "Event type", "PID": "Patient identification",
    "PD1": "Patient additional demographics", "PV1": "Patient visit",
    "PV2": "Patient visit, additional information", "AL1": "Patient allergy information",
    "ORC": "Common order", "OBR": "Observation request", "TQ1": "Timing/quantity",
    "IPC": "Imaging procedure control", "NTE": "Notes and comments",
    "OBX": "Observation/result", "MRG": "Merge patient information",
    "DG1": "Diagnosis", "NK1": "Next of kin", "IN1": "Insurance", "GT1": "Guarantor",
    "MSA": "Message acknowledgment", "ERR": "Error", "ZDS": "Study instance UID (Z segment)",
}


def segments_of(text: str, d: Delimiters | None, version: str,
                codec: str = "utf-8") -> list[SegmentView]:
    """Every segment of ``text`` with its non-empty fields numbered (MSH-9, PID-5…),
    repetitions and components split, escape sequences decoded (``\\Xhh\\`` bytes in
    ``codec``), and names from hl7apy for ``version`` where it knows them. [] when the text
    has no readable MSH."""
    if d is None:
        return []
    segments = []
    for line in text.split("\n"):
        name = line[:3].upper()
        parts = line.split(d.field)
        if name == "MSH":
            # MSH-1 is the field separator itself, MSH-2 the encoding characters.
            numbered = [(1, d.field, False), (2, parts[1] if len(parts) > 1 else "", False)]
            numbered += [(n, parts[n - 1], True) for n in range(3, len(parts) + 1)]
        else:
            numbered = [(n, parts[n], True) for n in range(1, len(parts))]
        fields = [_field_view(name, n, value, d, version, codec, split)
                  for n, value, split in numbered if value]
        segments.append(SegmentView(name, SEGMENT_TITLES.get(name, ""), fields))
    return segments


def _field_view(segment: str, n: int, value: str, d: Delimiters, version: str, codec: str,
                split: bool) -> FieldView:
    label = f"{segment}-{n}"
    name, component_names = field_names(version, segment, n)
    if not split:
        return FieldView(label, name, value=value)
    repetitions = value.split(d.repetition)
    if len(repetitions) == 1 and d.component not in value and d.subcomponent not in value:
        return FieldView(label, name, value=unescape(value, d, codec))
    views = []
    for repetition in repetitions:
        parts = []
        for c, component in enumerate(repetition.split(d.component), 1):
            if not component:
                continue
            cname = component_names[c - 1] if c <= len(component_names) else ""
            subs = component.split(d.subcomponent)
            part = Part(f"{label}.{c}", cname,
                        unescape(component, d, codec) if len(subs) == 1 else "")
            if len(subs) > 1:
                part.subcomponents = [Part(f"{label}.{c}.{s}", "", unescape(sub, d, codec))
                                      for s, sub in enumerate(subs, 1) if sub]
            parts.append(part)
        views.append(parts)
    return FieldView(label, name, repetitions=views)


def ack_code(text: str, d: Delimiters | None) -> str:
    """MSA-1 of an ACK's text ("AA", "AE", "AR"), "" when it has none."""
    if d is None:
        return ""
    for line in text.split("\n"):
        if line[:3] == "MSA":
            parts = line.split(d.field)
            return parts[1] if len(parts) > 1 else ""
    return ""


@functools.cache
def _library(version: str):
    """hl7apy's reference for a version (2.7.1 falls back to 2.7), or None."""
    for candidate in (version, ".".join(version.split(".")[:2])):
        try:
            return load_library(candidate)
        except Exception:  # hl7apy raises its own UnsupportedVersion (and others on junk)
            continue
    return None


@functools.lru_cache(maxsize=4096)
def field_names(version: str, segment: str, n: int) -> tuple[str, tuple[str, ...]]:
    """The name of SEG-n and of its components in ``version``, as hl7apy knows them
    ("Patient Name", ("Family Name", "Given Name", …)); ("", ()) when it does not."""
    library = _library(version or "2.5")
    reference = library.FIELDS.get(f"{segment}_{n}") if library else None
    if not reference or len(reference) < 4:
        return "", ()
    components = ()
    if reference[0] == "sequence":
        components = tuple(_readable(child[1][3]) if len(child[1]) > 3 else ""
                           for child in reference[1])
    return _readable(reference[3]), components


_UPPER = {"ID", "PID", "UID", "HL7", "MSH", "MSA", "OBR", "ORC", "PV1", "DICOM", "II", "III",
          "IV", "MD", "ISO", "CE", "EI", "XCN", "OID", "URI", "ACK", "NPI", "SSN"}
_SMALL = {"OF", "OR", "AND", "THE", "TO", "FOR", "BY", "IN", "ON", "AT", "A", "AN"}


def _readable(constant: str) -> str:
    """hl7apy's constant names as text: PATIENT_NAME → "Patient Name"."""
    if not constant:
        return ""
    words = constant.replace("E_G_", "EG_").split("_")
    out = []
    for i, word in enumerate(words):
        if word == "EG":
            out.append("e.g.")
        elif word in _UPPER:
            out.append(word)
        elif i and word in _SMALL:
            out.append(word.lower())
        else:
            out.append(word.capitalize())
    return " ".join(out)
