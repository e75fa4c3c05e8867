"""Delivery: the sending stage. Rows say what has to go where; these functions claim them, send
them with the C-STORE SCU, record each outcome, and find work whose task was lost.

- A worker claims due rows of one node with a conditional UPDATE (``FOR UPDATE SKIP LOCKED`` on
  PostgreSQL; SQLite's IMMEDIATE transactions serialise writers), so a second run of the same
  task finds nothing to do.
- A node's open associations are the distinct holders (``claimed_by``) of its SENDING rows; a
  holder only gets a claim while there are fewer than ``max_associations`` others. The node row
  is locked while counting, so the limit holds across processes and machines.
- One association carries many instances: the holder claims the next batch before it records
  the last outcomes of the current one, so it never lets go of its slot while work is queued.
- Failures retry with exponential backoff and become DEAD after DELIVERY_GIVE_UP_HOURS; only a
  person brings them back (``retry_deliveries``).
"""

from __future__ import annotations

import functools
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Exists, F, OuterRef, Q, QuerySet
from django.utils import timezone

from gateway import audit, sql

from . import scu
from .models import Delivery, DeliveryStatus, Node, ReceivedInstance
from .routing import enqueue_nodes, queued_mark

logger = logging.getLogger(__name__)

# Rows claimed at a time. Small enough that a claim is a short transaction and a dead worker
# strands few rows; large enough that claiming costs little next to sending.
BATCH_SIZE = 32
RETRYABLE = [DeliveryStatus.DEAD, DeliveryStatus.FAILED]
ABANDONABLE = [DeliveryStatus.PENDING, DeliveryStatus.FAILED, DeliveryStatus.DEAD]
DONE = [DeliveryStatus.DELIVERED, DeliveryStatus.ABANDONED]

# Successes are written in groups of this many, or after this long, whichever comes first.
OUTCOME_GROUP = 16
OUTCOME_SECONDS = 1.0

# After a batch smaller than GATHER_BELOW (instances arrive more slowly than they go), the
# association waits GATHER_SECONDS for a few more before claiming again: a claim and an
# outcome commit cost more than sending one instance, and paying them per instance
# halved what a modality could send through the gateway while it was being forwarded.
GATHER_BELOW = 8
GATHER_SECONDS = 0.05

Enqueue = Callable[[int], None]


# --- Backoff -------------------------------------------------------------------------------


def retry_delay(attempts: int) -> timedelta:
    """How long to wait after the ``attempts``-th failed attempt: DELIVERY_RETRY_BASE_SECONDS,
    doubling each attempt, never more than DELIVERY_RETRY_MAX_SECONDS."""
    base = settings.DELIVERY_RETRY_BASE_SECONDS
    cap = settings.DELIVERY_RETRY_MAX_SECONDS
    exponent = min(max(attempts - 1, 0), 32)
    return timedelta(seconds=min(base * 2**exponent, cap))


def gives_up_at(delivery: Delivery) -> datetime:
    """When a delivery that keeps failing becomes DEAD: DELIVERY_GIVE_UP_HOURS after it was
    decided, or after it was last retried by hand."""
    start = max(delivery.created_at, delivery.retried_at or delivery.created_at)
    return start + timedelta(hours=settings.DELIVERY_GIVE_UP_HOURS)


# --- Claiming ------------------------------------------------------------------------------


def due(now: datetime | None = None) -> QuerySet[Delivery]:
    """Deliveries that should be attempted now (their node may still be disabled)."""
    return Delivery.objects.filter(
        status__in=[DeliveryStatus.PENDING, DeliveryStatus.FAILED],
        next_attempt_at__lte=now or timezone.now(),
    )


@dataclass
class Claimed:
    """A delivery this holder claimed, and the status to put back if it is not attempted."""

    delivery: Delivery
    previous_status: str


# What sending a claimed delivery reads (the rest, above all the instance's header, is left
# in the database: loading it cost more than a claim's five statements).
_CLAIMED_FIELDS = ("instance", "node", "coerce", "instance_version", "status",
                   "instance__path", "instance__sop_class_uid",
                   "instance__transfer_syntax_uid", "instance__version")


def claim(
    node_id: int, holder: str, limit: int = BATCH_SIZE, now: datetime | None = None
) -> list[Claimed]:
    """Claim up to ``limit`` due deliveries of an enabled node for ``holder`` (SENDING, with
    claimed_at/claimed_by set) and return them in id order. Returns nothing when the node is
    disabled, nothing is due, or ``holder`` holds nothing and the node already has
    ``max_associations`` other holders with a live lease."""
    now = now or timezone.now()
    if connection.vendor == "postgresql":
        return _claim_in_sql(node_id, holder, limit, now)
    with transaction.atomic():
        # FOR NO KEY UPDATE: serialises claimants of this node without blocking the inserts of
        # new Delivery rows, which only take a key-share lock on it.
        max_associations = (
            Node.objects.select_for_update(no_key=True).filter(pk=node_id, enabled=True)
            .values_list("max_associations", flat=True).first()
        )
        if max_associations is None:
            return []
        sending = Delivery.objects.filter(node_id=node_id, status=DeliveryStatus.SENDING)
        if not sending.filter(claimed_by=holder).exists():
            holders = (
                _others_claims(node_id, holder, now).values("claimed_by").distinct().count()
            )
            if holders >= max_associations:
                return []
        rows = list(
            due(now)
            .filter(node_id=node_id)
            .select_for_update(skip_locked=True, of=("self",))
            .order_by("id")
            .values_list("id", "status")[:limit]
        )
        if not rows:
            return []
        ids = [pk for pk, _ in rows]
        Delivery.objects.filter(
            pk__in=ids, status__in=[DeliveryStatus.PENDING, DeliveryStatus.FAILED]
        ).update(status=DeliveryStatus.SENDING, claimed_at=now, claimed_by=holder, updated_at=now)
        previous = dict(rows)
        claimed = (
            Delivery.objects.filter(pk__in=ids, status=DeliveryStatus.SENDING, claimed_by=holder)
            .select_related("instance")
            .only(*_CLAIMED_FIELDS)
            .order_by("id")
        )
        return [Claimed(d, previous[d.pk]) for d in claimed]


def _claim_in_sql(node_id: int, holder: str, limit: int, now: datetime) -> list[Claimed]:
    """:func:`claim` on PostgreSQL in two statements instead of six: its ORM statements cost
    the worker ~3 ms of CPU per claim, about a third of what sending a batch costs. The node's
    row is locked first, on its own: the second statement's snapshot, taken once it has the
    lock, then sees every claim committed before."""
    lease_start = now - timedelta(seconds=settings.DELIVERY_LEASE_SECONDS)
    with transaction.atomic(), sql.cursor() as cursor:
        cursor.execute(_lock_node_sql(), [node_id])
        locked = cursor.fetchone()
        if locked is None:
            return []
        cursor.execute(_claim_sql(), {
            "node": node_id, "holder": holder, "max": locked[0], "lease_start": lease_start,
            "now": now, "limit": limit, "sending": DeliveryStatus.SENDING.value,
            "pending": DeliveryStatus.PENDING.value, "failed": DeliveryStatus.FAILED.value})
        rows = cursor.fetchall()
    coerce = Delivery._meta.get_field("coerce")
    claimed = []
    for (pk, previous, instance_id, node, coercions, version, path, sop_class, syntax,
         instance_version) in rows:
        delivery = _loaded(Delivery, {
            "id": pk, "instance_id": instance_id, "node_id": node,
            "coerce": coerce.from_db_value(coercions, None, connection),
            "instance_version": version, "status": DeliveryStatus.SENDING})
        delivery.instance = _loaded(ReceivedInstance, {
            "id": instance_id, "path": path, "sop_class_uid": sop_class,
            "transfer_syntax_uid": syntax, "version": instance_version})
        claimed.append(Claimed(delivery, previous))
    return claimed


def _loaded(model: type, values: dict):
    """A model instance as the ORM loads it with ``.only(*values)``: other fields deferred."""
    names = [f.attname for f in model._meta.concrete_fields if f.attname in values]
    return model.from_db(connection.alias, names, [values[name] for name in names])


@functools.cache
def _lock_node_sql() -> str:
    qn = connection.ops.quote_name
    # FOR NO KEY UPDATE: serialises claimants of this node without blocking the inserts of
    # new Delivery rows, which only take a key-share lock on it.
    return (f"SELECT {qn('max_associations')} FROM {qn(Node._meta.db_table)} "
            f"WHERE {qn('id')} = %s AND {qn('enabled')} FOR NO KEY UPDATE")


@functools.cache
def _claim_sql() -> str:
    """The slot check, the due rows (skipping those another claimant has locked), their
    update and the fields sending reads (``_CLAIMED_FIELDS``), in id order."""
    qn = connection.ops.quote_name
    delivery, instance = qn(Delivery._meta.db_table), qn(ReceivedInstance._meta.db_table)
    return f"""
        WITH slot AS (
            SELECT 1 WHERE EXISTS (
                SELECT 1 FROM {delivery} WHERE node_id = %(node)s AND status = %(sending)s
                AND claimed_by = %(holder)s)
            OR (SELECT count(DISTINCT claimed_by) FROM {delivery}
                WHERE node_id = %(node)s AND status = %(sending)s
                AND claimed_at >= %(lease_start)s AND claimed_by <> %(holder)s) < %(max)s
        ), picked AS (
            SELECT id, status FROM {delivery}
            WHERE node_id = %(node)s AND status IN (%(pending)s, %(failed)s)
            AND next_attempt_at <= %(now)s AND EXISTS (SELECT 1 FROM slot)
            ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
        ), claimed AS (
            UPDATE {delivery} AS d SET status = %(sending)s, claimed_at = %(now)s,
                claimed_by = %(holder)s, updated_at = %(now)s
            FROM picked WHERE d.id = picked.id
            RETURNING d.id, picked.status AS previous, d.instance_id, d.node_id, d.coerce,
                d.instance_version
        )
        SELECT c.id, c.previous, c.instance_id, c.node_id, c.coerce, c.instance_version,
            i.path, i.sop_class_uid, i.transfer_syntax_uid, i.version
        FROM claimed AS c JOIN {instance} AS i ON i.id = c.instance_id ORDER BY c.id"""


def release(claims: Iterable[Claimed], holder: str) -> None:
    """Give back claimed rows that were not attempted, as they were (no attempt counted)."""
    by_status: dict[str, list[int]] = {}
    for c in claims:
        by_status.setdefault(c.previous_status, []).append(c.delivery.pk)
    for status, ids in by_status.items():
        Delivery.objects.filter(
            pk__in=ids, status=DeliveryStatus.SENDING, claimed_by=holder
        ).update(status=status, claimed_at=None, claimed_by="", updated_at=timezone.now())


def renew_lease(holder: str, now: datetime | None = None) -> None:
    """Keep a long batch from being taken back by the sweep while it is still being sent."""
    Delivery.objects.filter(status=DeliveryStatus.SENDING, claimed_by=holder).update(
        claimed_at=now or timezone.now()
    )


# --- Outcomes ------------------------------------------------------------------------------


def record_delivered(delivery_ids: list[int], holder: str, now: datetime | None = None,
                     node: Node | None = None) -> int:
    """The PACS has these instances. Also accepted for rows the sweep took back meanwhile (the
    instance did arrive); never touches a row another holder has claimed since. Returns how
    many rows changed. One audit event covers the group (``node`` names where it went)."""
    now = now or timezone.now()
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with sql.cursor() as cursor:
                cursor.execute(_delivered_sql(), {
                    "ids": list(delivery_ids), "holder": holder, "now": now,
                    "sending": DeliveryStatus.SENDING.value,
                    "pending": DeliveryStatus.PENDING.value,
                    "failed": DeliveryStatus.FAILED.value,
                    "delivered": DeliveryStatus.DELIVERED.value})
                ids = [pk for (pk,) in cursor.fetchall()]
        else:
            mine = Q(status=DeliveryStatus.SENDING, claimed_by=holder)
            taken_back = Q(status__in=[DeliveryStatus.PENDING, DeliveryStatus.FAILED])
            rows = Delivery.objects.filter(mine | taken_back, pk__in=delivery_ids)
            ids = sorted(rows.select_for_update().values_list("pk", flat=True))
            Delivery.objects.filter(pk__in=ids).update(
                status=DeliveryStatus.DELIVERED,
                delivered_at=now,
                last_error="",
                updated_at=now,
                claimed_at=None,
                claimed_by="",
                attempts=F("attempts") + 1,
            )
        if ids:
            audit.record("delivery.delivered", node, {"count": len(ids), "deliveries": ids})
    return len(ids)


@functools.cache
def _delivered_sql() -> str:
    """:func:`record_delivered` on PostgreSQL in one statement instead of two ORM ones (their
    compilation cost the worker more CPU than the rest of recording a group): the rows
    locked in id order (as another holder or the sweep would lock them), then updated."""
    qn = connection.ops.quote_name
    delivery = qn(Delivery._meta.db_table)
    return f"""
        WITH locked AS (
            SELECT id FROM {delivery} WHERE id = ANY(%(ids)s)
            AND ((status = %(sending)s AND claimed_by = %(holder)s)
                 OR status IN (%(pending)s, %(failed)s))
            ORDER BY id FOR UPDATE
        ), changed AS (
            UPDATE {delivery} AS d SET status = %(delivered)s, delivered_at = %(now)s,
                last_error = '', updated_at = %(now)s, claimed_at = NULL, claimed_by = '',
                attempts = d.attempts + 1
            FROM locked WHERE d.id = locked.id RETURNING d.id
        )
        SELECT id FROM changed ORDER BY id"""


def record_failure(delivery_id: int, holder: str, error: str, now: datetime | None = None) -> str:
    """One failed attempt: FAILED with the next attempt after the backoff, or DEAD once the
    give-up time has passed. Returns the new status ("" if the row is no longer ours)."""
    now = now or timezone.now()
    with transaction.atomic():
        delivery = (
            Delivery.objects.select_for_update()
            .filter(pk=delivery_id, status=DeliveryStatus.SENDING, claimed_by=holder)
            .first()
        )
        if delivery is None:
            return ""
        attempts = delivery.attempts + 1
        if now >= gives_up_at(delivery):
            status, next_attempt_at = DeliveryStatus.DEAD, now
        else:
            status, next_attempt_at = DeliveryStatus.FAILED, now + retry_delay(attempts)
        Delivery.objects.filter(pk=delivery_id).update(
            status=status,
            attempts=attempts,
            last_error=error[:2000],
            next_attempt_at=next_attempt_at,
            claimed_at=None,
            claimed_by="",
            updated_at=now,
        )
        if status == DeliveryStatus.DEAD or attempts == 1:
            # The first failure and the giving up are audited; the retries in between are on
            # the row (attempts, last error, next attempt).
            delivery.status, delivery.attempts = status, attempts
            action = "delivery.dead" if status == DeliveryStatus.DEAD else "delivery.failed"
            audit.record(action, delivery, {"attempts": attempts, "last_error": error,
                                            "node": delivery.node_id})
        return status


def supersede(claims: list[Claimed], holder: str) -> list[Claimed]:
    """Abandon claimed deliveries of an older version of an instance that has been received
    again (its new version has deliveries of its own); return the others."""
    keep = []
    for c in claims:
        d = c.delivery
        if d.instance_version == d.instance.version:
            keep.append(c)
            continue
        Delivery.objects.filter(pk=d.pk, status=DeliveryStatus.SENDING, claimed_by=holder).update(
            status=DeliveryStatus.ABANDONED,
            claimed_at=None,
            claimed_by="",
            updated_at=timezone.now(),
            last_error=f"superseded: the instance was received again (version "
            f"{d.instance.version}, this delivery was for version {d.instance_version})",
        )
    return keep


def _superseded_meanwhile(c: Claimed, holder: str) -> bool:
    """Whether a delivery that could not be sent was of a version replaced since it was claimed
    (the replacement removes the previous file once committed): then it is abandoned as
    superseded, not counted as a failure."""
    current = (ReceivedInstance.objects.filter(pk=c.delivery.instance_id)
               .values_list("version", flat=True).first())
    if current is None or current <= c.delivery.instance_version:
        return False
    c.delivery.instance.version = current
    return not supersede([c], holder)


# --- Sending -------------------------------------------------------------------------------


@dataclass
class DeliveryRun:
    """What one ``deliver_to_node`` call did."""

    holder: str = field(default_factory=lambda: uuid.uuid4().hex)
    associations: int = 0
    delivered: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    # Enqueues another run for a node (the task); None: this run never asks for help.
    enqueue: Enqueue | None = field(default=None, repr=False, compare=False)
    # How many other holders the node had when this run last asked for another run.
    asked_with: int | None = field(default=None, repr=False, compare=False)

    def summary(self) -> dict:
        return {
            "associations": self.associations,
            "delivered": self.delivered,
            "failed": self.failed,
            "errors": self.errors[:5],
        }


def instance_path(instance: ReceivedInstance) -> Path:
    path = Path(instance.path)
    return path if path.is_absolute() else Path(settings.DATA_DIR) / path


def _pairs(claims: Iterable[Claimed]) -> list[tuple[str, str]]:
    return [
        (c.delivery.instance.sop_class_uid, c.delivery.instance.transfer_syntax_uid) for c in claims
    ]


def _due_pairs(node_id: int) -> list[tuple[str, str]]:
    """The (SOP class, transfer syntax) pairs still due for the node, so that the association
    opened now can carry the batches after this one too."""
    return list(
        due()
        .filter(node_id=node_id)
        .values_list("instance__sop_class_uid", "instance__transfer_syntax_uid")
        .distinct()[: scu.MAX_CONTEXTS]
    )


def _coercer() -> scu.Coercer | None:
    # The rules engineer's function; looked up when needed so the two stages stay separate.
    try:
        from .rules import apply_coercions
    except ImportError:
        return None
    return apply_coercions


def deliver_to_node(node_id: int, enqueue: Enqueue | None = None) -> DeliveryRun:
    """Send everything due for one node on as few associations as possible, while this
    holder has a slot. Safe to run any number of times concurrently. With ``enqueue`` (the
    task's ``delay``), a backlog asks for more runs, up to the node's ``max_associations``
    (:func:`_claim`).

    A run that gets a slot ends by clearing the node's queued mark and giving what is due
    by then a task of its own (:func:`_leave`); one that finds every slot taken leaves both
    to the runs that hold them."""
    run = DeliveryRun(enqueue=enqueue)
    node = Node.objects.filter(pk=node_id).first()
    if node is None:
        queued_mark(node_id, set_it=False)
        return run
    batch = _claim(node, run)
    if not batch and _others_claims(node_id, run.holder).exists():
        return run
    try:
        _send_claimed(node, batch, run)
    except BaseException:
        # Commits from now on enqueue again; what is due now waits for the sweep, so that a
        # run failing on every attempt does not enqueue itself in a loop.
        queued_mark(node_id, set_it=False)
        raise
    _leave(node_id)
    return run


def _send_claimed(node: Node, batch: list[Claimed], run: DeliveryRun) -> None:
    dest = scu.Destination(node.name, node.ae_title, node.host, node.port)
    while batch:
        batch = supersede(batch, run.holder)
        if not batch:
            batch = _claim(node, run)
            continue
        plan = scu.plan_contexts([*_pairs(batch), *_due_pairs(node.pk)])
        sendable = [c for c in batch if _fits(plan, c)]
        release([c for c in batch if not _fits(plan, c)], run.holder)
        try:
            assoc = scu.StoreAssociation(dest, settings.DICOM_AE_TITLE, plan)
        except scu.AssociationFailed as exc:
            # The node is unreachable: every claimed row waits for its own retry time.
            for c in sendable:
                _failed(run, c, str(exc))
            return
        run.associations += 1
        with assoc:
            batch = []
            while sendable:
                following = _send_batch(assoc, sendable, node, run)
                if following is None:  # association lost; the rest were given back
                    return
                following = supersede(following, run.holder)
                if not assoc.is_open or not assoc.carries(_pairs(following)):
                    batch = following  # needs contexts this association lacks: open another
                    break
                sendable = following
        if not batch:
            # Released the slot: a task that found it taken meanwhile returned at once, so look
            # again before leaving.
            batch = _claim(node, run)


def _claim(node: Node, run: DeliveryRun) -> list[Claimed]:
    """The run's next batch. One that comes back full means a backlog (a node that was down,
    a study arriving faster than one association forwards it): the run asks for another run
    (:func:`_ask_for_help`), so that the backlog goes out over parallel associations, as many
    as the node allows and workers are free."""
    batch = claim(node.pk, run.holder)
    if len(batch) == BATCH_SIZE:
        _ask_for_help(node, run)
    return batch


def _ask_for_help(node: Node, run: DeliveryRun) -> None:
    """Enqueue one more run while the node has fewer holders than ``max_associations``, and
    only once the number of other holders has changed since this run last asked (the run it
    asked for has started, or one has ended): a task waiting for a free worker is not asked
    for again and again. A task lost meanwhile is made up for by the sweep."""
    if run.enqueue is None or node.max_associations < 2:
        return
    others = _others_claims(node.pk, run.holder).values("claimed_by").distinct().count()
    if others + 1 >= node.max_associations or others == run.asked_with:
        return
    run.asked_with = others
    try:
        run.enqueue(node.pk)
    except Exception:  # this run goes on sending alone
        logger.warning("could not enqueue a second delivery run for node %s", node.pk)


def _others_claims(node_id: int, holder: str, now: datetime | None = None
                   ) -> QuerySet[Delivery]:
    """Rows of the node that other holders claimed under a lease still live at ``now``."""
    lease_start = (now or timezone.now()) - timedelta(seconds=settings.DELIVERY_LEASE_SECONDS)
    return (Delivery.objects.filter(node_id=node_id, status=DeliveryStatus.SENDING,
                                    claimed_at__gte=lease_start)
            .exclude(claimed_by=holder))


def _leave(node_id: int) -> None:
    """The end of a run that had a slot: clear the node's queued mark, so that commits from
    now on enqueue a task, and enqueue one for what is due already (committed while the mark
    was still set, or given back), which no run would otherwise claim before the sweep."""
    queued_mark(node_id, set_it=False)
    if due().filter(node_id=node_id, node__enabled=True).exists():
        enqueue_nodes([node_id])


def _fits(plan: dict[str, list[str]], c: Claimed) -> bool:
    i = c.delivery.instance
    return i.transfer_syntax_uid in plan.get(i.sop_class_uid, ())


def _failed(run: DeliveryRun, c: Claimed, error: str) -> None:
    if record_failure(c.delivery.pk, run.holder, error):
        run.failed += 1
        if error not in run.errors:
            run.errors.append(error)


def _send_batch(
    assoc: scu.StoreAssociation, batch: list[Claimed], node: Node, run: DeliveryRun
) -> list[Claimed] | None:
    """Send one claimed batch; return the next batch, claimed while this holder still holds
    rows of this one, so its slot is never free while work is queued; None if the association
    broke. Successes are recorded a few at a time: one commit per instance would cost about as
    much as sending it."""
    coercer = _coercer()
    stored: list[int] = []
    recorded_at = renewed_at = time.monotonic()

    def record_stored() -> None:
        nonlocal stored, recorded_at, renewed_at
        if stored:
            run.delivered += record_delivered(stored, run.holder, node=node)
            stored = []
        recorded_at = time.monotonic()
        if recorded_at - renewed_at > settings.DELIVERY_LEASE_SECONDS / 3:
            renew_lease(run.holder)
            renewed_at = recorded_at

    try:
        for index, c in enumerate(batch):
            d = c.delivery
            result = assoc.store(
                instance_path(d.instance),
                d.instance.sop_class_uid,
                d.instance.transfer_syntax_uid,
                d.coerce or [],
                coercer,
            )
            if result.connection_lost:
                _failed(run, c, result.error)
                release(batch[index + 1 :], run.holder)
                return None
            if result.stored:
                stored.append(d.pk)
            elif not _superseded_meanwhile(c, run.holder):
                _failed(run, c, result.error)
            last = index == len(batch) - 1
            if not last and (
                len(stored) >= OUTCOME_GROUP or time.monotonic() - recorded_at > OUTCOME_SECONDS
            ):
                record_stored()
        if len(batch) < GATHER_BELOW:
            time.sleep(GATHER_SECONDS)
        return _claim(node, run)
    finally:
        record_stored()


# --- Sweep, echo, retention ----------------------------------------------------------------


@dataclass
class SweepResult:
    taken_back: int
    enqueued: dict[int, int]


def take_back_expired(now: datetime | None = None) -> int:
    """SENDING rows whose claim is older than DELIVERY_LEASE_SECONDS (the worker died or lost
    its database) go back to PENDING; no attempt is counted."""
    now = now or timezone.now()
    lease_start = now - timedelta(seconds=settings.DELIVERY_LEASE_SECONDS)
    return Delivery.objects.filter(
        status=DeliveryStatus.SENDING, claimed_at__lt=lease_start
    ).update(
        status=DeliveryStatus.PENDING,
        claimed_at=None,
        claimed_by="",
        next_attempt_at=now,
        updated_at=now,
        last_error="taken back: the claim expired before an outcome was recorded",
    )


def sweep(enqueue: Enqueue, now: datetime | None = None) -> SweepResult:
    """Take back expired claims, then ask for delivery to every enabled node with due rows:
    as many tasks as it could use associations (at most ``max_associations``). The database
    alone decides, so work survives a broker that lost its messages."""
    now = now or timezone.now()
    taken_back = take_back_expired(now)
    backlog = (
        due(now)
        .filter(node__enabled=True)
        .values("node_id", "node__max_associations")
        .annotate(n=Count("id"))
        .order_by("node_id")
    )
    enqueued: dict[int, int] = {}
    for row in backlog:
        tasks = max(1, min(row["node__max_associations"], math.ceil(row["n"] / BATCH_SIZE)))
        for _ in range(tasks):
            enqueue(row["node_id"])
        enqueued[row["node_id"]] = tasks
    return SweepResult(taken_back, enqueued)


def run_routing_stage() -> None:
    """Let the rules stage catch up: instances whose routing was lost, and per-study rules
    whose studies went quiet. Optional: skipped while that stage does not exist."""
    try:
        from . import routing as routing_stage
    except ImportError:
        return
    for name in ("route_pending_instances", "route_quiet_studies"):
        function = getattr(routing_stage, name, None)
        if function is None:
            continue
        try:
            function()
        except Exception:
            logger.exception("%s failed during the sweep", name)


def echo_node(node_id: int, timeout: float | None = None) -> str:
    """C-ECHO one node and record the answer on it; returns "" on success, else the error.
    ``timeout``: see :func:`scu.echo`."""
    node = Node.objects.filter(pk=node_id).first()
    if node is None:
        return f"no node {node_id}"
    dest = scu.Destination(node.name, node.ae_title, node.host, node.port)
    error = scu.echo(dest, settings.DICOM_AE_TITLE, timeout)
    now = timezone.now()
    fields = {"last_echo_at": now, "last_echo_error": error}
    if not error:
        fields["last_echo_ok_at"] = now
    Node.objects.filter(pk=node_id).update(**fields)
    return error


def purge_delivered_files(now: datetime | None = None) -> int:
    """Delete received files whose every delivery is DELIVERED or ABANDONED and that are older
    than GATEWAY_RETENTION_HOURS; set file_deleted_at. Instances with no delivery at all
    (not routed yet, or UNMATCHED) keep their file, so an administrator can still see and route
    them; so do instances with a DEAD delivery, which can be retried by hand."""
    now = now or timezone.now()
    cutoff = now - timedelta(hours=settings.GATEWAY_RETENTION_HOURS)
    deliveries = Delivery.objects.filter(instance=OuterRef("pk"))
    candidates = ReceivedInstance.objects.filter(
        Exists(deliveries),
        ~Exists(deliveries.exclude(status__in=DONE)),
        file_deleted_at__isnull=True,
        received_at__lt=cutoff,
    )
    deleted = freed = 0
    for pk in list(candidates.values_list("pk", flat=True)[:10000]):
        with transaction.atomic():
            instance = candidates.select_for_update(of=("self",)).filter(pk=pk).first()
            if instance is None:
                continue
            path = instance_path(instance)
            try:
                size = path.stat().st_size
                path.unlink()
                freed += size
            except FileNotFoundError:
                pass
            ReceivedInstance.objects.filter(pk=pk).update(file_deleted_at=now)
            deleted += 1
    if deleted:
        audit.record(
            "retention.purge",
            None,
            {
                "files": deleted,
                "bytes": freed,
                "older_than_hours": settings.GATEWAY_RETENTION_HOURS,
            },
        )
    return deleted


# --- By hand -------------------------------------------------------------------------------


def retry_by_hand(
    deliveries: QuerySet[Delivery], enqueue: Enqueue, actor: str | None = None
) -> list[int]:
    """Put DEAD or FAILED deliveries back to PENDING, due now, with attempts reset to 0 and the
    give-up clock restarted; enqueue their nodes once the change commits. Deliveries whose file
    retention already deleted are skipped. Returns the ids retried."""
    now = timezone.now()
    with transaction.atomic():
        rows = _change_by_hand(
            deliveries.filter(status__in=RETRYABLE, instance__file_deleted_at__isnull=True),
            "delivery.retry",
            actor,
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            retried_at=now,
        )
        for node_id in sorted({d.node_id for d in rows}):
            transaction.on_commit(lambda node_id=node_id: enqueue(node_id))
    return [d.pk for d in rows]


def abandon(deliveries: QuerySet[Delivery], actor: str | None = None) -> list[int]:
    """Give up on PENDING, FAILED or DEAD deliveries for good (ABANDONED): they are never sent
    and no longer keep their file from retention. Returns the ids abandoned."""
    with transaction.atomic():
        rows = _change_by_hand(
            deliveries.filter(status__in=ABANDONABLE),
            "delivery.abandon",
            actor,
            status=DeliveryStatus.ABANDONED,
        )
    return [d.pk for d in rows]


def _change_by_hand(
    deliveries: QuerySet[Delivery], action: str, actor: str | None, **changes
) -> list[Delivery]:
    """Lock the deliveries, audit each one's state before the change, then apply ``changes``
    (and drop any claim). Runs inside the caller's transaction."""
    rows = list(
        deliveries.select_for_update(of=("self",))
        .select_related("instance", "node")
        .order_by("id")
    )
    Delivery.objects.filter(pk__in=[d.pk for d in rows]).update(
        claimed_at=None, claimed_by="", updated_at=timezone.now(), **changes
    )
    who = actor or audit.current_actor()
    audit.append([
        {"actor": who, "action": action, "object_type": Delivery._meta.label,
         "object_id": str(d.pk), "object_repr": str(d)[:200],
         "detail": {"previous_status": d.status, "attempts": d.attempts,
                    "last_error": d.last_error}}
        for d in rows
    ])
    return rows


def retry_node(
    node_id: int,
    enqueue: Enqueue,
    actor: str | None = None,
    batch: int = 500,
    seconds: float = 15.0,
) -> list[int]:
    """Retry by hand the FAILED and DEAD deliveries to one node (see :func:`retry_by_hand`): the
    operator's answer to a PACS that is back after an outage. Works in batches of ``batch``,
    oldest first, each its own transaction: no batch holds many row locks for long, and the
    workers start sending the first while the next is retried. Starts no new batch after
    ``seconds`` (a request must end); what is left stays as it was, for another call. Returns
    the ids retried."""
    deadline = time.monotonic() + seconds
    retried: list[int] = []
    after = 0
    while True:
        ids = list(
            Delivery.objects.filter(
                node_id=node_id,
                status__in=RETRYABLE,
                instance__file_deleted_at__isnull=True,
                pk__gt=after,
            )
            .order_by("id")
            .values_list("pk", flat=True)[:batch]
        )
        if not ids:
            return retried
        retried += retry_by_hand(Delivery.objects.filter(pk__in=ids), enqueue, actor)
        after = ids[-1]
        if time.monotonic() >= deadline:
            return retried
