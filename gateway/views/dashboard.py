"""The dashboard: what happened in the last 24 hours, the work still to do, each node's health,
and an hourly chart.

Every number links into the list that shows exactly the rows it counts (the lists' query-string
filters and their own names for pseudo statuses), so ``since`` is cut to whole seconds and the
same instant goes into the counts and the links. The page redraws itself from
:func:`dashboard_data` (the same numbers, and the charts' bars ready to place, as JSON) every few
seconds. A handful of queries in all, each on an indexed column, none per node or per hour.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from django.db.models import Count, Q
from django.db.models.functions import TruncHour
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.utils.dateformat import format as date_format

from routing.models import (
    Delivery,
    DeliveryStatus,
    EchoState,
    Node,
    ReceivedInstance,
    ReceivedStudy,
)
from routing.views.studies import OPEN as DELIVERIES_OPEN
from worklist.hl7.service import REPROCESSABLE
from worklist.models import HL7Message, ScheduledStep, StepStatus
from worklist.views.messages import REFUSED
from worklist.views.worklist import OPEN as STEPS_OPEN

from ..web import VIEW, query_string, role_required

WINDOW = timedelta(hours=24)
# The delivery states the cards count whatever their age: the work still to do.
WAITING = [*DeliveryStatus.open(), DeliveryStatus.DEAD]

# The charts: which hourly series each draws, with the words for a bar's tooltip.
CHARTS = [
    {"id": "images", "title": "Images per hour",
     "series": [("instances", "instances received"), ("delivered", "deliveries delivered")]},
    {"id": "hl7", "title": "HL7 messages per hour",
     "series": [("hl7", "HL7 messages received"), ("hl7_refused", "HL7 messages refused")]},
]
# Chart geometry (pixels, app.css's .chart height; the chart's width is 100 %, so x positions
# are percentages).
CHART_HEIGHT, CHART_TOP, CHART_BOTTOM = 160, 6, 142


def _when(value: datetime | None) -> str:
    """How the page shows a time (server's time zone), also sent in the JSON as is."""
    return date_format(timezone.localtime(value), "Y-m-d H:i") if value else ""


def _iso(value: datetime) -> str:
    return timezone.localtime(value).isoformat(timespec="seconds")


def _per_hour(rows, field: str, since: datetime, **counts):
    """Rows counted per hour of ``field`` since ``since`` (``n``, plus any extra ``counts``),
    in one grouped query on the indexed timestamp."""
    return (
        rows.filter(**{f"{field}__gte": since})
        .annotate(hour=TruncHour(field))
        .values("hour")
        .annotate(n=Count("id"), **counts)
        .order_by()
    )


def summary(now: datetime | None = None) -> dict:
    """Everything the dashboard shows, as plain JSON-able values: ``counts`` and ``links``
    (by the same keys), ``nodes``, ``hours`` (one dict per hour, oldest first), ``charts``
    (their bars placed) and when."""
    now = now or timezone.now()
    since = (now - WINDOW).replace(microsecond=0)
    hours = _hours(since, now)
    by_hour = {h["start"]: h for h in hours}

    # Per hour, and in all: HL7 messages received and refused, instances received. The totals
    # are the sums of the hours (one query each).
    hl7 = _per_hour(HL7Message.objects, "received_at", since,
                    refused=Count("id", filter=Q(status__in=REPROCESSABLE)))
    totals = {"hl7": 0, "hl7_refused": 0, "instances": 0}
    for row in hl7:
        _add(by_hour, row["hour"], hl7=row["n"], hl7_refused=row["refused"])
        totals["hl7"] += row["n"]
        totals["hl7_refused"] += row["refused"]
    for row in _per_hour(ReceivedInstance.objects, "received_at", since):
        _add(by_hour, row["hour"], instances=row["n"])
        totals["instances"] += row["n"]
    # Throughput is what was delivered in an hour, whenever it was decided.
    for row in _per_hour(Delivery.objects, "delivered_at", since):
        _add(by_hour, row["hour"], delivered=row["n"])
    # The work still to do counts every delivery in its state, however old: yesterday's
    # outage backlog and last week's dead ones too. COUNT(*), not of a column, so PostgreSQL
    # answers from the (status, next_attempt_at) index alone.
    waiting = dict(
        Delivery.objects.filter(status__in=WAITING)
        .values("status")
        .annotate(n=Count("*"))
        .order_by()
        .values_list("status", "n")
    )
    delivered_recent = Delivery.objects.filter(delivered_at__gte=since).count()
    studies = ReceivedStudy.objects.filter(last_received_at__gte=since).count()
    worklist_open = ScheduledStep.objects.filter(status__in=StepStatus.on_worklist()).count()

    counts = {
        "hl7_received": totals["hl7"],
        "hl7_refused": totals["hl7_refused"],
        "worklist_open": worklist_open,
        "instances_received": totals["instances"],
        "studies_received": studies,
        "deliveries_delivered": delivered_recent,
        "deliveries_open": sum(waiting.get(s, 0) for s in DeliveryStatus.open()),
        "deliveries_failed": waiting.get(DeliveryStatus.FAILED, 0),
        "deliveries_dead": waiting.get(DeliveryStatus.DEAD, 0),
    }
    iso = _iso(since)
    hl7_list, deliveries = reverse("hl7-list"), reverse("delivery-list")
    links = {
        "hl7_received": hl7_list + query_string(since=iso),
        "hl7_refused": hl7_list + query_string(status=REFUSED, since=iso),
        "worklist_open": reverse("worklist-list") + query_string(status=STEPS_OPEN),
        "instances_received": reverse("study-list") + query_string(since=iso),
        "studies_received": reverse("study-list") + query_string(since=iso),
        "deliveries_delivered": deliveries + query_string(delivered_since=iso),
        "deliveries_open": deliveries + query_string(status=DELIVERIES_OPEN),
        "deliveries_failed": deliveries + query_string(status=DeliveryStatus.FAILED),
        "deliveries_dead": deliveries + query_string(status=DeliveryStatus.DEAD),
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
        "charts": charts(hours),
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
    """Each node: enabled, its last C-ECHO (:attr:`routing.models.Node.echo_state`), the last
    delivery, the backlog (open deliveries) and the dead ones, each with a link. One query
    (:meth:`routing.models.NodeQuerySet.with_activity`)."""
    base = reverse("delivery-list")
    rows = []
    for node in Node.objects.with_activity():
        failed = node.echo_state == EchoState.FAILED
        rows.append({
            "id": node.pk,
            "name": node.name,
            "address": f"{node.ae_title}@{node.host}:{node.port}",
            "enabled": node.enabled,
            "echo_state": node.echo_state,
            "last_echo": _when(node.last_echo_at),
            "last_echo_ok": _when(node.last_echo_ok_at),
            "last_echo_error": node.last_echo_error if failed else "",
            "last_delivered": _when(node.last_delivered_at),
            "backlog": node.backlog,
            "dead": node.dead,
            "url": base + query_string(node=node.pk),
            "backlog_url": base + query_string(node=node.pk, status=DELIVERIES_OPEN),
            "dead_url": base + query_string(node=node.pk, status=DeliveryStatus.DEAD),
            "delivered_url": base + query_string(node=node.pk, status=DeliveryStatus.DELIVERED),
        })
    return rows


def charts(hours: list[dict]) -> list[dict]:
    """Each chart of :data:`CHARTS` ready to place, for the first render and for the page's
    script alike: its ``bars`` (x and width in percent of the chart's width, y and height in
    pixels, the series' index and a tooltip), the hour labels under them (``ticks``), the
    ``baseline`` and the ``peak`` the bars are scaled to."""
    drawn = []
    slot = 100 / max(len(hours), 1)
    for chart in CHARTS:
        keys = [key for key, _ in chart["series"]]
        peak = max([h[key] for h in hours for key in keys] + [0])
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
                ticks.append({**_tick(i, len(hours), slot), "y": CHART_HEIGHT - 4,
                              "label": hour["label"]})
        drawn.append({
            "id": chart["id"], "title": chart["title"],
            "series": [list(s) for s in chart["series"]],
            "baseline": CHART_BOTTOM, "peak": peak, "bars": bars, "ticks": ticks,
        })
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
    return render(request, "gateway/dashboard.html", {"title": "Dashboard", "data": summary()})


@role_required(VIEW)
def dashboard_data(request: HttpRequest) -> JsonResponse:
    response = JsonResponse(summary())
    response["Cache-Control"] = "no-store"
    return response
