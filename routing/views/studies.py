"""What was received and where it went: received studies, their instances, the deliveries, and
the operator's hand actions on deliveries (retry, abandon, retry all failed for a node).

Every list pages with :class:`gateway.web.Pager` over an indexed order, and its counts are
aggregate queries over the shown page only, so a page costs the same with 100,000 rows behind
it. The hand actions call :mod:`routing.delivery`, which audits them with the signed-in user.
"""

from __future__ import annotations

from collections import defaultdict

from django import forms
from django.contrib import messages
from django.db.models import Count, Max, Prefetch, Q
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from gateway.web import (
    OPERATE,
    VIEW,
    Pager,
    parse_when,
    query_string,
    redirect_back,
    role_required,
)

from .. import config, delivery
from ..models import (
    Delivery,
    DeliveryStatus,
    Node,
    ReceivedInstance,
    ReceivedStudy,
)
from ..routing import enqueue_nodes
from ..scu import sop_class_name

OPEN = "open"  # the pseudo status of the deliveries filter: PENDING, SENDING or FAILED

# The order a delivery summary names the states in, and the word it uses for each.
SUMMARY_ORDER = [
    (DeliveryStatus.DELIVERED, "delivered"),
    (DeliveryStatus.PENDING, "pending"),
    (DeliveryStatus.SENDING, "sending"),
    (DeliveryStatus.FAILED, "failed"),
    (DeliveryStatus.DEAD, "dead"),
    (DeliveryStatus.ABANDONED, "abandoned"),
]


# --- Filters -------------------------------------------------------------------------------


def _when_input() -> forms.TextInput:
    return forms.TextInput(attrs={
        "placeholder": "YYYY-MM-DD", "size": 16,
        "title": "A date (2026-11-27) or a date and time (2026-11-27T14:30)",
    })


class NodeChoice(forms.ModelChoiceField):
    def label_from_instance(self, obj: Node) -> str:
        return obj.name


class StudyFilters(forms.Form):
    patient = forms.CharField(
        required=False,
        label="Patient",
        widget=forms.TextInput(attrs={"placeholder": "ID or name prefix", "type": "search"}),
    )
    accession = forms.CharField(required=False, label="Accession")
    since = forms.CharField(required=False, label="Received since", widget=_when_input())
    until = forms.CharField(required=False, label="Received until", widget=_when_input())

    def clean_since(self):
        return parse_when(self.cleaned_data["since"])

    def clean_until(self):
        return parse_when(self.cleaned_data["until"], end=True)


def filtered_studies(filters: StudyFilters):
    """The studies the filters select, last received first. A filter with an error selects
    nothing rather than everything."""
    studies = ReceivedStudy.objects.order_by("-last_received_at", "-id")
    if not filters.is_valid():
        return studies.none()
    data = filters.cleaned_data
    if patient := data["patient"].strip():
        # The ID exactly, or the start of the DICOM name (FAMILY^GIVEN), in any case.
        studies = studies.filter(
            Q(patient_id=patient) | Q(patient_name__istartswith=patient)
        )
    if accession := data["accession"].strip():
        studies = studies.filter(accession_number=accession)
    if data["since"]:
        studies = studies.filter(last_received_at__gte=data["since"])
    if data["until"]:
        studies = studies.filter(last_received_at__lte=data["until"])
    return studies


class DeliveryFilters(forms.Form):
    node = NodeChoice(
        queryset=Node.objects.order_by("name"), required=False, label="Node", empty_label="Any"
    )
    status = forms.ChoiceField(
        required=False,
        label="Status",
        choices=[("", "Any"), (OPEN, "Open (pending, sending, failed)"),
                 *DeliveryStatus.choices],
    )
    since = forms.CharField(required=False, label="Created since", widget=_when_input())
    delivered_since = forms.CharField(required=False, label="Delivered since",
                                      widget=_when_input())
    study = forms.IntegerField(
        required=False, min_value=1, label="Study",
        widget=forms.NumberInput(attrs={"placeholder": "study id", "style": "width:7em"}),
    )

    def clean_since(self):
        return parse_when(self.cleaned_data["since"])

    def clean_delivered_since(self):
        return parse_when(self.cleaned_data["delivered_since"])


def filtered_deliveries(filters: DeliveryFilters):
    """The deliveries the filters select, newest first, with what a row shows joined in."""
    deliveries = Delivery.objects.select_related("instance__study", "node").order_by("-id")
    if not filters.is_valid():
        return deliveries.none()
    data = filters.cleaned_data
    if data["node"]:
        deliveries = deliveries.filter(node=data["node"])
    if data["status"] == OPEN:
        deliveries = deliveries.filter(status__in=DeliveryStatus.open())
    elif data["status"]:
        deliveries = deliveries.filter(status=data["status"])
    if data["since"]:
        deliveries = deliveries.filter(created_at__gte=data["since"])
    if data["delivered_since"]:
        deliveries = deliveries.filter(delivered_at__gte=data["delivered_since"])
    if data["study"]:
        deliveries = deliveries.filter(instance__study_id=data["study"])
    return deliveries


# --- Summaries -----------------------------------------------------------------------------


def delivery_summaries(study_ids: list[int]) -> dict[int, list[dict]]:
    """Per study, per node: ``{"node": name, "node_id": id, "counts": [(word, n)...],
    "text": "PACS1: 120 delivered, 3 failed"}``, from one aggregate query over these studies."""
    counts: dict[int, dict[tuple[str, int], dict[str, int]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    rows = (
        Delivery.objects.filter(instance__study_id__in=study_ids)
        .values("instance__study_id", "node_id", "node__name", "status")
        .annotate(n=Count("id"))
        .order_by()
    )
    for row in rows:
        key = (row["node__name"], row["node_id"])
        counts[row["instance__study_id"]][key][row["status"]] = row["n"]
    return {study_id: [_summary(name, node_id, by_status)
                       for (name, node_id), by_status in sorted(nodes.items())]
            for study_id, nodes in counts.items()}


def _summary(node_name: str, node_id: int, by_status: dict[str, int]) -> dict:
    parts = [(word, by_status[status]) for status, word in SUMMARY_ORDER if status in by_status]
    text = f"{node_name}: " + ", ".join(f"{n} {word}" for word, n in parts)
    return {"node": node_name, "node_id": node_id, "counts": parts, "text": text,
            "by_status": by_status}


# --- Pages ---------------------------------------------------------------------------------


@role_required(VIEW)
def study_list(request: HttpRequest) -> HttpResponse:
    filters = StudyFilters(request.GET)
    pager = Pager(request, filtered_studies(filters))
    ids = [s.pk for s in pager.items]
    instances = dict(
        ReceivedInstance.objects.filter(study_id__in=ids)
        .values("study_id")
        .annotate(n=Count("id"))
        .order_by()
        .values_list("study_id", "n")
    ) if ids else {}
    summaries = delivery_summaries(ids) if ids else {}
    for study in pager.items:
        study.instance_count = instances.get(study.pk, 0)
        study.deliveries = summaries.get(study.pk, [])
    return render(request, "routing/study_list.html", {
        "title": "Received studies", "filters": filters, "pager": pager,
    })


@role_required(VIEW)
def study_detail(request: HttpRequest, pk: int) -> HttpResponse:
    study = get_object_or_404(ReceivedStudy, pk=pk)
    instances = (
        ReceivedInstance.objects.filter(study=study)
        .order_by("series_instance_uid", "id")
        .defer("header")  # ~1 KB of JSON per instance that the page doesn't show
        .prefetch_related(
            Prefetch("deliveries", Delivery.objects.select_related("node")
                     .only("id", "instance_id", "status", "last_error", "node__name")
                     .order_by("node__name", "-id"))
        )
    )
    pager = Pager(request, instances, per_page=50)
    for instance in pager.items:
        instance.sop_class = sop_class_name(instance.sop_class_uid)
    nodes = _study_nodes(study)
    totals = ReceivedInstance.objects.filter(study=study).aggregate(
        count=Count("id"), series=Count("series_instance_uid", distinct=True)
    )
    return render(request, "routing/study_detail.html", {
        "title": str(study), "study": study, "pager": pager, "nodes": nodes, "totals": totals,
        "deliveries_url": reverse("delivery-list") + query_string(study=study.pk),
    })


def _study_nodes(study: ReceivedStudy) -> list[dict]:
    """Per node the study goes to: counts by status (each a link into the deliveries list)
    and the last error any of its deliveries there recorded. Two queries."""
    rows = (
        Delivery.objects.filter(instance__study=study)
        .values("node_id", "node__name", "status")
        .annotate(n=Count("id"), errored=Max("id", filter=~Q(last_error="")))
        .order_by()
    )
    nodes: dict[int, dict] = {}
    for row in rows:
        node = nodes.setdefault(row["node_id"], {
            "id": row["node_id"], "name": row["node__name"], "by_status": {}, "errored": None,
        })
        node["by_status"][row["status"]] = row["n"]
        if row["errored"] and (node["errored"] or 0) < row["errored"]:
            node["errored"] = row["errored"]
    errors = dict(
        Delivery.objects.filter(pk__in=[n["errored"] for n in nodes.values() if n["errored"]])
        .values_list("pk", "last_error")
    )
    base = reverse("delivery-list")
    for node in nodes.values():
        node["last_error"] = errors.get(node["errored"], "")
        node["url"] = base + query_string(study=study.pk, node=node["id"])
        node["counts"] = [
            {"status": status, "word": word, "n": node["by_status"][status],
             "url": base + query_string(study=study.pk, node=node["id"], status=status)}
            for status, word in SUMMARY_ORDER if status in node["by_status"]
        ]
    return sorted(nodes.values(), key=lambda n: n["name"])


@role_required(VIEW)
def delivery_list(request: HttpRequest) -> HttpResponse:
    filters = DeliveryFilters(request.GET)
    pager = Pager(request, filtered_deliveries(filters))
    data = filters.cleaned_data if filters.is_valid() else {}
    node = data.get("node")
    retryable = {}
    if node is not None:
        retryable = dict(
            Delivery.objects.filter(node=node, status__in=delivery.RETRYABLE)
            .values("status").annotate(n=Count("id")).order_by()
            .values_list("status", "n")
        )
    study = None
    if data.get("study"):
        study = ReceivedStudy.objects.filter(pk=data["study"]).first()
    for d in pager.items:
        d.can_retry = d.status in delivery.RETRYABLE and d.instance.file_deleted_at is None
        d.can_abandon = d.status in delivery.ABANDONABLE
        d.is_waiting = d.status in (DeliveryStatus.PENDING, DeliveryStatus.FAILED)
    return render(request, "routing/delivery_list.html", {
        "title": "Deliveries", "filters": filters, "pager": pager, "node": node,
        "retryable": retryable, "retryable_total": sum(retryable.values()), "study": study,
        "here": request.get_full_path(),
    })


# --- Hand actions --------------------------------------------------------------------------


def _enqueue(node_id: int) -> None:
    # Called once the change has committed: the worker sends now, not at the next sweep.
    enqueue_nodes([node_id])


@role_required(OPERATE)
@require_POST
def delivery_retry(request: HttpRequest, pk: int) -> HttpResponse:
    row = get_object_or_404(Delivery.objects.select_related("node", "instance"), pk=pk)
    if delivery.retry_by_hand(Delivery.objects.filter(pk=pk), _enqueue):
        messages.success(request, f"Delivery {pk} to {row.node.name} queued again.")
    elif row.status in delivery.RETRYABLE:
        messages.warning(request, f"Delivery {pk} was not retried: its file has already been "
                                  "deleted by retention.")
    else:
        messages.warning(request, f"Delivery {pk} was not retried: it is "
                                  f"{row.get_status_display().lower()}.")
    return redirect_back(request, reverse("delivery-list"))


@role_required(OPERATE)
@require_POST
def delivery_abandon(request: HttpRequest, pk: int) -> HttpResponse:
    row = get_object_or_404(Delivery.objects.select_related("node"), pk=pk)
    if delivery.abandon(Delivery.objects.filter(pk=pk)):
        messages.success(request, f"Delivery {pk} to {row.node.name} abandoned: it will not "
                                  "be sent.")
    else:
        messages.warning(request, f"Delivery {pk} was not abandoned: it is "
                                  f"{row.get_status_display().lower()}.")
    return redirect_back(request, reverse("delivery-list"))


@role_required(OPERATE)
@require_POST
def node_retry_failed(request: HttpRequest, pk: int) -> HttpResponse:
    node = get_object_or_404(Node, pk=pk)
    retried = delivery.retry_node(node.pk, _enqueue)
    if retried:
        count = config.deliveries_text(len(retried))
        messages.success(request, f"{count} to {node.name} queued again.")
    left = Delivery.objects.filter(
        node=node, status__in=delivery.RETRYABLE, instance__file_deleted_at__isnull=True
    ).count()
    if left:
        # A long outage leaves more than one request should take: the rest on the next press.
        messages.warning(request, f"{config.deliveries_text(left)} to {node.name} are still "
                                  "failed or dead: press “Retry all failed” again for them.")
    elif not retried:
        messages.info(request, f"No failed or dead deliveries to {node.name} to retry.")
    return redirect_back(request, reverse("delivery-list") + query_string(node=node.pk))
