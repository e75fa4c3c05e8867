"""Routing decisions: turn a received instance into Delivery rows, one transaction per
instance, and hand the nodes concerned to the delivery tasks once it commits.

Rules are evaluated in ``order`` (then name) with :func:`routing.rules.matching_rules`. For
each matching rule:

* ``mode = instance``: a delivery to each destination is decided now;
* ``mode = study``: decided once the study has been quiet (no instance received) for the
  rule's ``study_quiet_seconds``; until then the instance stays PENDING and
  :func:`route_quiet_studies` (periodic) routes it.

One delivery per (instance, node, instance version): when several rules send to the same
node, the first matching rule (in order) gives the delivery its rule and coercions. A
disabled node still gets its delivery: disabling a node delays delivery (the sender holds
rows for disabled nodes), it never drops studies. An instance no rule matches is UNMATCHED;
one whose deliveries are all decided is ROUTED.

Everything here is idempotent: running it twice for the same instance creates nothing new,
so the sweeps can run while the storage SCP routes.

Two ways in: the storage SCP decides for an instance it has just inserted inside the
storing transaction (:func:`decide`, then :func:`record_decision`: the facts are in memory,
nothing is read back), and :func:`route_instance` decides for a committed PENDING row (a
replaced instance, the sweeps, per-study rules once the study is quiet).
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import connection, transaction
from django.utils import timezone
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from gateway import sql

from .header import ReceivedDataSet
from .models import (
    Delivery,
    DeliveryStatus,
    Node,
    ReceivedInstance,
    ReceivedStudy,
    RoutingMode,
    RoutingStatus,
    Rule,
)
from .rules import Attribute, Facts, matching_rules

logger = logging.getLogger(__name__)


def facts_for(instance: ReceivedInstance) -> Facts:
    """What rules see of an instance: its stored header and its association; attributes the
    header left out (long values) are read from the stored file when a rule asks."""

    def from_file(attribute: Attribute):
        if attribute.tag is None or not instance.path:
            return None
        try:
            ds = dcmread(instance.path, stop_before_pixels=True, specific_tags=[attribute.tag])
        except Exception:
            return None
        return _element_value(ds, attribute)

    return Facts(
        instance.header or {},
        {
            "calling_ae": instance.calling_ae,
            "called_ae": instance.called_ae,
            "source_ip": instance.source_ip,
        },
        fallback=from_file,
    )


def facts_from_dataset(association: dict[str, str], parsed: ReceivedDataSet) -> Facts:
    """The same facts as :func:`facts_for`, for an instance being stored: its header, the
    association attributes as they are recorded, and attributes the header left out taken
    from the received data set (the bytes the stored file will hold)."""

    def from_data_set(attribute: Attribute):
        if attribute.tag is None or not parsed.has(attribute.tag):
            return None
        try:
            ds = parsed.dataset
        except Exception:
            return None
        return _element_value(ds, attribute)

    return Facts(parsed.header, association, fallback=from_data_set)


def _element_value(ds: Dataset, attribute: Attribute):
    if attribute.tag is None:
        return None
    try:
        element = ds.get(attribute.tag)
    except Exception:
        return None
    if element is None or isinstance(element.value, bytes | bytearray):
        return None
    value = element.value
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    return str(value)


@dataclass
class Decision:
    """Where an instance goes: ``status`` is its routing status afterwards (UNMATCHED,
    ROUTED, or PENDING while a per-study rule waits); ``deliveries`` maps each node decided
    now to the first matching rule sending there."""

    status: str
    deliveries: dict[int, Rule] = field(default_factory=dict)


def decide(rules: list[Rule], facts: Facts, quiet_for: float) -> Decision:
    """Evaluate ``rules`` (enabled, in order, destinations prefetched) against ``facts``;
    ``quiet_for``: seconds since the study last received an instance. No database access."""
    matched = matching_rules(rules, facts)
    if not matched:
        return Decision(RoutingStatus.UNMATCHED)
    decided: dict[int, Rule] = {}
    waiting = False
    for rule in matched:
        if rule.mode == RoutingMode.STUDY and quiet_for < rule.study_quiet_seconds:
            waiting = True
            continue
        for node_id in _destination_ids(rule):
            decided.setdefault(node_id, rule)
    return Decision(RoutingStatus.PENDING if waiting else RoutingStatus.ROUTED, decided)


def _destination_ids(rule: Rule) -> list[int]:
    """The rule's destination node ids, read from its prefetched destinations once: building
    the related manager per instance cost the storage SCP ~0.1 ms of CPU per C-STORE."""
    ids = rule.__dict__.get("_destination_ids")
    if ids is None:
        ids = rule.__dict__["_destination_ids"] = [node.pk for node in rule.destinations.all()]
    return ids


def _delivery_row(instance_id: int, version: int, node_id: int, rule: Rule,
                  now: datetime) -> dict:
    return {
        "instance_id": instance_id,
        "node_id": node_id,
        "rule_id": rule.pk,
        "rule_name": rule.name,
        "coerce": list(rule.coerce or []),
        "instance_version": version,
        "status": DeliveryStatus.PENDING,
        "next_attempt_at": now,
    }


def decision_locks(decision: Decision) -> tuple[str, list]:
    """A statement (and its parameters) that locks the nodes and rules ``decision`` names
    against deletion until commit and counts those still there: ``n`` and ``r`` common
    table expressions, then whether all are, as ``recorded``."""
    node_ids = sorted(decision.deliveries)
    rule_ids = sorted({rule.pk for rule in decision.deliveries.values()})
    return _locks_sql(len(node_ids), len(rule_ids)), [
        *node_ids, *rule_ids, len(node_ids), len(rule_ids)]


@functools.cache
def _locks_sql(nodes: int, rules: int) -> str:
    qn = connection.ops.quote_name
    lock = " FOR KEY SHARE" if connection.vendor == "postgresql" else ""

    def locked(model, count):
        return (f"SELECT {qn('id')} FROM {qn(model._meta.db_table)} "
                f"WHERE {qn('id')} IN ({', '.join(['%s'] * count)}){lock}")

    return (f"n AS ({locked(Node, nodes)}), r AS ({locked(Rule, rules)}), "
            "ok AS (SELECT (SELECT COUNT(*) FROM n) = %s AND (SELECT COUNT(*) FROM r) = %s "
            "AS recorded)")


def can_record(decision: Decision) -> bool:
    """Inside the storing transaction, before the instance row is written: whether the
    nodes and rules ``decision`` names still exist (the association's rules may be older
    than a deletion). They are locked against deletion until commit, so the deliveries
    :func:`record_decision` inserts cannot fail their foreign keys at commit."""
    if not decision.deliveries:
        return True
    locks, params = decision_locks(decision)
    with sql.cursor() as cursor:
        cursor.execute(f"WITH {locks} SELECT recorded FROM ok", params)
        return bool(cursor.fetchone()[0])


def delivery_rows(instance_id: int, version: int, decision: Decision,
                  now: datetime) -> list[dict]:
    """The Delivery rows (PENDING, due ``now``) of ``decision`` for one instance version."""
    return [_delivery_row(instance_id, version, node_id, rule, now)
            for node_id, rule in decision.deliveries.items()]


def enqueue_on_commit(decision: Decision) -> None:
    """Once the transaction that recorded ``decision``'s deliveries commits, enqueue their
    nodes (at once outside a transaction)."""
    node_ids = sorted(decision.deliveries)
    if node_ids:
        transaction.on_commit(lambda: enqueue_nodes(node_ids))


def record_decision(instance_id: int, version: int, decision: Decision,
                    now: datetime) -> None:
    """Inside the storing transaction, for an instance just inserted with
    ``decision.status``: insert its deliveries (PENDING, due ``now``); the caller enqueues
    their nodes on commit (:func:`enqueue_on_commit`)."""
    if decision.deliveries:
        sql.insert(Delivery, delivery_rows(instance_id, version, decision, now))


def enabled_rules() -> list[Rule]:
    return list(
        Rule.objects.filter(enabled=True).prefetch_related("destinations").order_by("order", "name")
    )


def route_instance(instance_id: int, now: datetime | None = None,
                   rules: list[Rule] | None = None) -> str:
    """Decide where one instance goes; return its routing status afterwards.

    Creates the missing Delivery rows (PENDING, due now) in one transaction with the
    instance's new status, and enqueues delivery of each node concerned after commit. An
    instance that is no longer PENDING is left alone.
    """
    now = now or timezone.now()
    rules = enabled_rules() if rules is None else rules
    node_ids: set[int] = set()
    with transaction.atomic():
        instance = (
            ReceivedInstance.objects.select_for_update().select_related("study")
            .filter(pk=instance_id).first()
        )
        if instance is None or instance.routing_status != RoutingStatus.PENDING:
            return instance.routing_status if instance else ""
        quiet_for = (now - instance.study.last_received_at).total_seconds()
        decision = decide(rules, facts_for(instance), quiet_for)
        if decision.status == RoutingStatus.UNMATCHED:
            instance.routing_status = RoutingStatus.UNMATCHED
            instance.routed_at = now
            instance.save(update_fields=["routing_status", "routed_at"])
            return instance.routing_status

        decided = decision.deliveries
        waiting = decision.status == RoutingStatus.PENDING
        existing = set(
            Delivery.objects.filter(
                instance=instance, instance_version=instance.version
            ).values_list("node_id", flat=True)
        ) if decided else set()
        new = [
            Delivery(
                instance=instance,
                node_id=node_id,
                rule=rule,
                rule_name=rule.name,
                coerce=list(rule.coerce or []),
                instance_version=instance.version,
                status=DeliveryStatus.PENDING,
                next_attempt_at=now,
            )
            for node_id, rule in decided.items()
            if node_id not in existing
        ]
        Delivery.objects.bulk_create(new)
        node_ids = {d.node_id for d in new}
        if not waiting:
            instance.routing_status = RoutingStatus.ROUTED
            instance.routed_at = now
            instance.save(update_fields=["routing_status", "routed_at"])
        if node_ids:
            transaction.on_commit(lambda: enqueue_nodes(sorted(node_ids)))
        return instance.routing_status


def enqueue_nodes(node_ids: list[int]) -> None:
    """Ask the delivery tasks to work on these nodes. Without the task (module not there,
    broker down) nothing is lost: the delivery sweep finds due rows by itself.

    A node that a run will claim for again gets no new task (see :func:`queued_mark`):
    without that, a study streaming in queued a task per instance, each claiming nothing
    because the node's associations were busy, at about the cost of sending the instance."""
    try:
        from routing import tasks

        deliver_node = tasks.deliver_node
    except (ImportError, AttributeError):
        return
    for node_id in node_ids:
        if not queued_mark(node_id, set_it=True):
            continue
        try:
            deliver_node.delay(node_id)
        except Exception:
            queued_mark(node_id, set_it=False)  # no task: the next commit should enqueue
            logger.warning("could not enqueue delivery to node %s; the sweep will", node_id)


# A mark per node, in the broker's Redis beside the queue, meaning "a delivery run for this
# node will look at what is due after now": set (if absent) just before a task is enqueued;
# deleted by a run that had a slot as it ends, which then enqueues a task for whatever is
# due by then (``delivery._leave``). A commit that finds the mark set enqueues nothing and
# relies on that; one that finds it absent enqueues. A broker that loses its queue loses the
# marks with it; a mark also expires after QUEUED_MARK_SECONDS (a worker killed mid-run);
# the sweep finds due rows in any case. Without Redis (the embedded broker), or while Redis
# does not answer, every commit enqueues.
QUEUED_MARK_SECONDS = 60
# Redis must not slow down a C-STORE response: one quick try, and after a failure no marks
# for a while.
_MARK_TIMEOUT = 0.2
_MARK_PAUSE_SECONDS = 10.0
_marks_paused_until = 0.0


class _Marks:
    """The broker's Redis, for marks only: connections made with redis-py's settings for the
    URL (database, password, TLS, the timeouts above) and used directly, one per caller at a
    time, with each node's two commands packed once. A C-STORE pays ~30 us of CPU for its
    mark instead of ~100 us through redis-py's client (pool, retries, argument encoding)."""

    def __init__(self, url: str):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        pool = redis.Redis.from_url(
            url, socket_timeout=_MARK_TIMEOUT, socket_connect_timeout=_MARK_TIMEOUT,
            retry=Retry(NoBackoff(), 0)).connection_pool
        self._connect = lambda: pool.connection_class(**pool.connection_kwargs)
        self._broken = (redis.ConnectionError, redis.TimeoutError, OSError)
        self._idle: collections.deque = collections.deque()
        self._packed: dict[tuple[int, bool], list] = {}

    def command(self, node_id: int, set_it: bool):
        """SET the node's mark if absent (replies whether it was), or DEL it."""
        try:
            connection = self._idle.pop()
        except IndexError:
            connection = self._connect()
        else:
            # As redis-py's pool does: an idle connection with something to read has been
            # closed by the server (a restart); it reconnects on its next command.
            try:
                closed = connection.can_read()
            except self._broken:
                closed = True
            if closed:
                connection.disconnect()
        try:
            packed = self._packed.get((node_id, set_it))
            if packed is None:
                key = f"gateway:delivery-queued:{node_id}"
                args = (("SET", key, "1", "NX", "EX", QUEUED_MARK_SECONDS) if set_it
                        else ("DEL", key))
                packed = self._packed[(node_id, set_it)] = connection.pack_command(*args)
            connection.send_packed_command(packed, check_health=False)
            reply = connection.read_response()
        except BaseException:
            # Redis restarted or went away: the idle connections are as stale as this one.
            for stale in [connection, *self._idle]:
                stale.disconnect()
            self._idle.clear()
            raise
        self._idle.append(connection)
        return reply


_marks: dict[str, _Marks] = {}


def queued_mark(node_id: int, set_it: bool) -> bool:
    """Set the node's mark (returns whether it was absent, i.e. whether to enqueue) or
    delete it (returns True). Redis errors answer "enqueue"."""
    global _marks_paused_until
    from gateway.celery import app

    url = str(app.conf.broker_url or "")
    if not url.startswith(("redis://", "rediss://")) or time.monotonic() < _marks_paused_until:
        return True
    try:
        marks = _marks.get(url)
        if marks is None:
            marks = _marks[url] = _Marks(url)
        reply = marks.command(node_id, set_it)
        if set_it:
            return reply is not None
    except Exception as exc:  # noqa: BLE001 - the mark only saves work; enqueue without it
        _marks_paused_until = time.monotonic() + _MARK_PAUSE_SECONDS
        logger.info("delivery marks paused for %.0f s: %s", _MARK_PAUSE_SECONDS, exc)
    return True


def route_pending_instances(older_than_seconds: int = 30, limit: int = 1000,
                            now: datetime | None = None) -> int:
    """Sweep: route instances still PENDING that were received at least
    ``older_than_seconds`` ago (routing right after storing failed, or a per-study rule was
    waiting). Returns how many were looked at."""
    now = now or timezone.now()
    ids = list(
        ReceivedInstance.objects.filter(
            routing_status=RoutingStatus.PENDING,
            received_at__lte=now - timedelta(seconds=older_than_seconds),
        ).order_by("id").values_list("id", flat=True)[:limit]
    )
    rules = enabled_rules()
    for instance_id in ids:
        try:
            route_instance(instance_id, now, rules)
        except Exception:
            logger.exception("routing instance %s failed; it stays PENDING", instance_id)
    return len(ids)


def route_quiet_studies(now: datetime | None = None, limit: int = 200) -> int:
    """Periodic: route the PENDING instances of studies that have been quiet for at least
    the shortest ``study_quiet_seconds`` of the enabled per-study rules, and mark a study
    routed once none of its instances waits any more. Returns the number of studies
    looked at."""
    now = now or timezone.now()
    rules = enabled_rules()
    quiet = [r.study_quiet_seconds for r in rules if r.mode == RoutingMode.STUDY]
    if not quiet:
        return 0
    studies = list(
        ReceivedStudy.objects.filter(
            study_routed_at__isnull=True,
            last_received_at__lte=now - timedelta(seconds=min(quiet)),
            instances__routing_status=RoutingStatus.PENDING,
        ).distinct().order_by("last_received_at").values_list("id", flat=True)[:limit]
    )
    for study_id in studies:
        pending = ReceivedInstance.objects.filter(
            study_id=study_id, routing_status=RoutingStatus.PENDING
        ).order_by("id").values_list("id", flat=True)
        for instance_id in list(pending):
            try:
                route_instance(instance_id, now, rules)
            except Exception:
                logger.exception("routing instance %s failed; it stays PENDING", instance_id)
        if not ReceivedInstance.objects.filter(
            study_id=study_id, routing_status=RoutingStatus.PENDING
        ).exists():
            # Conditional: an instance that arrived meanwhile reset last_received_at.
            ReceivedStudy.objects.filter(
                pk=study_id, study_routed_at__isnull=True, last_received_at__lte=now
            ).update(study_routed_at=now)
    return len(studies)
