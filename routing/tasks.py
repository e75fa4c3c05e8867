"""Celery tasks of the sending stage. They take ids, only execute what the rows say is due, and
are safe to run twice (the claim makes a second run find nothing). The work is in
:mod:`routing.delivery`; these wrappers set the actor and enqueue follow-up tasks."""

from __future__ import annotations

from celery import shared_task

from gateway.audit import acting_as

from . import delivery, storage
from .models import Node
from .routing import route_pending_instances, route_quiet_studies


@shared_task
def deliver_node(node_id: int) -> dict:
    """Send what is due for one node, reusing one association while work is queued, and asking
    for another run (up to ``max_associations``) while there is a backlog. Returns at once when
    the node already has ``max_associations`` holders: they keep draining."""
    with acting_as("system"):
        return delivery.deliver_to_node(node_id, deliver_node.delay).summary()


@shared_task
def sweep_deliveries() -> dict:
    """Periodic (every DELIVERY_SWEEP_SECONDS): take back expired claims, enqueue every node with
    due deliveries, and let the rules stage route what is still waiting for it."""
    with acting_as("system"):
        result = delivery.sweep(deliver_node.delay)
        delivery.run_routing_stage()
    return {"taken_back": result.taken_back, "enqueued": result.enqueued}


@shared_task
def echo_node(node_id: int) -> str:
    """C-ECHO one node and record the answer on it."""
    with acting_as("system"):
        return delivery.echo_node(node_id)


@shared_task
def echo_nodes() -> int:
    """Periodic: one echo task per enabled node."""
    node_ids = list(Node.objects.filter(enabled=True).values_list("pk", flat=True))
    for node_id in node_ids:
        echo_node.delay(node_id)
    return len(node_ids)


@shared_task
def purge_delivered_files() -> int:
    """Periodic (hourly): delete received files that every node has (GATEWAY_RETENTION_HOURS),
    and temporary files a killed process left behind."""
    storage.remove_abandoned_incoming()
    with acting_as("system"):
        return delivery.purge_delivered_files()


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
