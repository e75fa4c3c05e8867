"""The dashboard: what happened in the last 24 hours, each node's health, and an hourly chart.

Every number links into the list that shows exactly the rows it counts (the lists' query-string
filters), so ``since`` is cut to whole seconds and the same instant goes into the counts and the
links. The page redraws itself from :func:`dashboard_data` (the same numbers as JSON) every few
seconds. A handful of queries in all, each on an indexed column, none per node or per hour.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from django.db.models import Count, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce, TruncHour
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.utils.dateformat import format as date_format

from routing.models import Delivery, DeliveryStatus, Node, ReceivedInstance, ReceivedStudy
from worklist.models import HL7Message, MessageStatus, ScheduledStep, StepStatus

from ..web import VIEW, query_string, role_required

WINDOW = timedelta(hours=24)
REFUSED = [MessageStatus.ERROR, MessageStatus.REJECTED]

# The charts: which hourly series each draws, with the words for a bar's tooltip.
CHARTS = [
    {"id": "images", "title": "Images per hour",
     "series": [("instances", "instances received"), ("delivered", "deliveries delivered")]},
    {"id": "hl7", "title": "HL7 messages per hour",
     "series": [("hl7", "HL7 messages received"), ("hl7_refused", "HL7 messages refused")]},
]
# Chart geometry (pixels; the chart's width is 100 %, so x positions are percentages).
CHART_HEIGHT, CHART_TOP, CHART_BOTTOM = 160, 6, 142


def _when(value: datetime | None) -> str:
    """How the page shows a time (server's time zone), also sent in the JSON as is."""
    return date_format(timezone.localtime(value), "Y-m-d H:i") if value else ""


def _iso(value: datetime) -> str:
    return timezone.localtime(value).isoformat(timespec="seconds")


def summary(now: datetime | None = None) -> dict:
    """Everything the dashboard shows, as plain JSON-able values: ``counts`` and ``links``
    (by the same keys), ``nodes``, ``hours`` (one dict per hour, oldest first) and when."""
    now = now or timezone.now()
    since = (now - WINDOW).replace(microsecond=0)
    hours = _hours(since, now)
    by_hour = {h["start"]: h for h in hours}

    # Per hour, and in all: HL7 messages received and refused, instances received. The totals
    # are the sums of the hours (one query each).
    hl7 = (
        HL7Message.objects.filter(received_at__gte=since)
        .annotate(hour=TruncHour("received_at"))
        .values("hour")
        .annotate(n=Count("id"), refused=Count("id", filter=Q(status__in=REFUSED)))
        .order_by()
    )
    totals = {"hl7": 0, "hl7_refused": 0, "instances": 0}
    for row in hl7:
        _add(by_hour, row["hour"], hl7=row["n"], hl7_refused=row["refused"])
        totals["hl7"] += row["n"]
        totals["hl7_refused"] += row["refused"]
    instances = (
        ReceivedInstance.objects.filter(received_at__gte=since)
        .annotate(hour=TruncHour("received_at"))
        .values("hour")
        .annotate(n=Count("id"))
        .order_by()
    )
    for row in instances:
        _add(by_hour, row["hour"], instances=row["n"])
        totals["instances"] += row["n"]
    # Throughput is what was delivered in an hour, whenever it was decided.
    delivered = (
        Delivery.objects.filter(delivered_at__gte=since)
        .annotate(hour=TruncHour("delivered_at"))
        .values("hour")
        .annotate(n=Count("id"))
        .order_by()
    )
    for row in delivered:
        _add(by_hour, row["hour"], delivered=row["n"])
    # The cards count deliveries decided in the window, by status: what the list shows with
    # ?since= (on created_at).
    by_status = dict(
        Delivery.objects.filter(created_at__gte=since)
        .values("status")
        .annotate(n=Count("id"))
        .order_by()
        .values_list("status", "n")
    )
    studies = ReceivedStudy.objects.filter(last_received_at__gte=since).count()
    worklist_open = ScheduledStep.objects.filter(status__in=StepStatus.on_worklist()).count()

    counts = {
        "hl7_received": totals["hl7"],
        "hl7_refused": totals["hl7_refused"],
        "worklist_open": worklist_open,
        "instances_received": totals["instances"],
        "studies_received": studies,
        "deliveries_delivered": by_status.get(DeliveryStatus.DELIVERED, 0),
        "deliveries_open": sum(by_status.get(s, 0) for s in DeliveryStatus.open()),
        "deliveries_failed": by_status.get(DeliveryStatus.FAILED, 0),
        "deliveries_dead": by_status.get(DeliveryStatus.DEAD, 0),
    }
    iso = _iso(since)
    deliveries = reverse("delivery-list")
    links = {
        "hl7_received": reverse("hl7-list") + query_string(since=iso),
        "hl7_refused": reverse("hl7-list") + query_string(status="refused", since=iso),
        "worklist_open": reverse("worklist-list") + query_string(status="open"),
        "instances_received": reverse("study-list") + query_string(since=iso),
        "studies_received": reverse("study-list") + query_string(since=iso),
        "deliveries_delivered": deliveries + query_string(status=DeliveryStatus.DELIVERED,
                                                          since=iso),
        "deliveries_open": deliveries + query_string(status="open", since=iso),
        "deliveries_failed": deliveries + query_string(status=DeliveryStatus.FAILED, since=iso),
        "deliveries_dead": deliveries + query_string(status=DeliveryStatus.DEAD, since=iso),
    }
    return {
        "generated_at": _iso(now),
        "generated": _when(now),
        "since": iso,
        "since_display": _when(since),
        "counts": counts,
        "links": links,
        "nodes": node_health(),
        "hours": [{**h, "start": _iso(h["start"])} for h in hours],
        "charts": [{"id": c["id"], "title": c["title"], "series": [list(s) for s in c["series"]]}
                   for c in CHARTS],
    }


def _hours(since: datetime, now: datetime) -> list[dict]:
    """The hours from the one ``since`` falls in to the current one, in the server's time zone
    (stepped in UTC, so a daylight-saving change gives no gap or duplicate)."""
    start = timezone.localtime(since).replace(minute=0, second=0, microsecond=0)
    hours = []
    while start <= now:
        local = timezone.localtime(start)
        hours.append({"start": start, "label": local.strftime("%H:%M"),
                      "hl7": 0, "hl7_refused": 0, "instances": 0, "delivered": 0})
        start = start.astimezone(UTC) + timedelta(hours=1)
    return hours


def _add(hours: dict[datetime, dict], start: datetime | None, **values: int) -> None:
    if start in hours:  # aware datetimes compare (and hash) as instants
        hours[start].update(values)


def node_health() -> list[dict]:
    """Each node: enabled, the last C-ECHO answer, the last delivery, the backlog (open
    deliveries) and the dead ones, each with a link. One query, subqueries on the node's
    indexes."""
    deliveries = Delivery.objects.filter(node=OuterRef("pk")).order_by()

    def count(statuses: list[str]) -> Coalesce:
        return Coalesce(
            Subquery(
                deliveries.filter(status__in=statuses)
                .values("node")
                .annotate(n=Count("id"))
                .values("n")
            ),
            0,
        )

    nodes = Node.objects.order_by("name").annotate(
        backlog=count(DeliveryStatus.open()),
        dead=count([DeliveryStatus.DEAD]),
        last_delivered_at=Subquery(
            deliveries.filter(delivered_at__isnull=False)
            .order_by("-delivered_at")
            .values("delivered_at")[:1]
        ),
    )
    base = reverse("delivery-list")
    rows = []
    for node in nodes:
        echo_failed = bool(node.last_echo_error) and (
            node.last_echo_ok_at is None
            or (node.last_echo_at is not None and node.last_echo_at > node.last_echo_ok_at)
        )
        rows.append({
            "id": node.pk,
            "name": node.name,
            "address": f"{node.ae_title}@{node.host}:{node.port}",
            "enabled": node.enabled,
            "echo_ok": not echo_failed and node.last_echo_ok_at is not None,
            "echo_failed": echo_failed,
            "last_echo_ok": _when(node.last_echo_ok_at),
            "last_echo_error": node.last_echo_error if echo_failed else "",
            "last_delivered": _when(node.last_delivered_at),
            "backlog": node.backlog,
            "dead": node.dead,
            "url": base + query_string(node=node.pk),
            "backlog_url": base + query_string(node=node.pk, status="open"),
            "dead_url": base + query_string(node=node.pk, status=DeliveryStatus.DEAD),
            "delivered_url": base + query_string(node=node.pk, status=DeliveryStatus.DELIVERED),
        })
    return rows


def charts(data: dict) -> list[dict]:
    """The bars of each chart for the first render (the page's script draws the same from the
    JSON): x and width in percent, y and height in pixels."""
    hours = data["hours"]
    drawn = []
    for chart in data["charts"]:
        keys = [key for key, _ in chart["series"]]
        peak = max([h[key] for h in hours for key in keys] + [0])
        slot = 100 / max(len(hours), 1)
        width = slot * 0.8 / len(keys)
        bars, ticks = [], []
        for i, hour in enumerate(hours):
            for j, (key, words) in enumerate(chart["series"]):
                value = hour[key]
                height = round((CHART_BOTTOM - CHART_TOP) * value / peak, 1) if peak else 0
                bars.append({
                    "x": round(i * slot + slot * 0.1 + j * width, 3),
                    "y": round(CHART_BOTTOM - height, 1),
                    "width": round(width, 3),
                    "height": height,
                    "series": j,
                    "title": f"{hour['label']}: {value} {words}",
                })
            if (len(hours) - 1 - i) % 3 == 0:  # every third hour, back from the current one
                ticks.append({**_tick(i, len(hours), slot), "label": hour["label"]})
        drawn.append({**chart, "bars": bars, "ticks": ticks, "peak": peak})
    return drawn


def _tick(i: int, count: int, slot: float) -> dict:
    """Where an hour's label goes: under its bars, kept inside the chart at either end."""
    if i == 0:
        return {"x": 0, "anchor": "start"}
    if i == count - 1:
        return {"x": 100, "anchor": "end"}
    return {"x": round(i * slot + slot / 2, 3), "anchor": "middle"}


@role_required(VIEW)
def dashboard(request: HttpRequest) -> HttpResponse:
    data = summary()
    return render(request, "gateway/dashboard.html", {
        "title": "Dashboard", "data": data, "charts": charts(data),
        "height": CHART_HEIGHT, "bottom": CHART_BOTTOM, "top": CHART_TOP,
    })


@role_required(VIEW)
def dashboard_data(request: HttpRequest) -> JsonResponse:
    response = JsonResponse(summary())
    response["Cache-Control"] = "no-store"
    return response
