"""The HL7 core: one message in, its effect and its record committed together, the ACK out.

:func:`handle_message` is what the MLLP adapter calls per frame and what tests call without
sockets. The HL7Message row (status ACCEPTED, with the ACK) is written first in the effect's
transaction: the partial unique constraint on (sender, MSH-10) then makes a concurrent
duplicate wait for, and fail on, the first one's commit, and is answered as a duplicate.
A message whose effect fails is rolled back and stored on its own as ERROR/REJECTED, so it
is kept for reprocessing. Nothing here answers AA unless the commit succeeded.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings
from django.db import (
    DatabaseError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    connection,
    transaction,
)
from django.utils import timezone
from pydicom.uid import generate_uid

from gateway import audit as audit_trail
from gateway import sql
from gateway.audit import acting_as, current_actor

from ..models import (
    HL7Message,
    ImagingOrder,
    MessageStatus,
    OrderStatus,
    OrderStatusMapping,
    Patient,
    ScheduledStep,
    Station,
    StepStatus,
)
from . import mapping
from .ack import ACCEPT, ERROR, REJECT, build_ack
from .parse import (
    APPLICATION_INTERNAL_ERROR,
    APPLICATION_RECORD_LOCKED,
    DUPLICATE_KEY_IDENTIFIER,
    REQUIRED_FIELD_MISSING,
    TABLE_VALUE_NOT_FOUND,
    UNKNOWN_KEY_IDENTIFIER,
    UNSUPPORTED_EVENT_CODE,
    UNSUPPORTED_MESSAGE_TYPE,
    UNSUPPORTED_PROCESSING_ID,
    UNSUPPORTED_VERSION_ID,
    Header,
    HL7Error,
    Message,
    read_header,
)

log = logging.getLogger("worklist.hl7")

SUPPORTED_VERSIONS = {"2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8",
                      "2.8.1", "2.8.2"}
# HL7 table 0103: production, training, debugging.
PROCESSING_IDS = {"P", "T", "D"}
# ORC-1 values that end steps; a completed step stays completed whatever the RIS says.
_ENDING_CONTROLS = {"CA", "OC", "DC", "OD"}
_ON_WORKLIST = set(StepStatus.on_worklist())
_UNDER_WAY = {StepStatus.STARTED, StepStatus.COMPLETED}


def handle_message(raw: bytes, peer: str = "") -> bytes:
    """Apply one HL7 v2 message (without MLLP framing) and return the ACK bytes.

    ``peer`` is stored with the message (e.g. "10.0.0.5:40122"). Never raises: every
    failure becomes AE or AR, and AA is returned only after the effect has committed."""
    try:
        return _handle(raw, peer)
    except Exception as exc:  # the last line of defence: a bug answers AE, never AA
        log.exception("failed to handle a message from %s", peer)
        return build_ack(None, ERROR, _internal(exc))


@dataclass
class _Prepared:
    """A message whose header was checked and whose segments were split: ready to apply."""

    raw: bytes
    peer: str
    header: Header
    handler: Callable
    msg: Message
    patient_id: str
    ack: bytes


def _prepare(raw: bytes, peer: str) -> _Prepared | bytes:
    """The message ready to apply, or the AE/AR (already stored) when it cannot be."""
    try:
        header = read_header(raw)
    except HL7Error as exc:
        return _refuse(raw, peer, None, exc)
    try:
        handler = _check_header(header)
        msg = Message(raw, header)
    except HL7Error as exc:
        return _refuse(raw, peer, header, exc)
    patient_id = msg.get(msg.first("PID"), 3)[:64]
    return _Prepared(raw, peer, header, handler, msg, patient_id, build_ack(header, ACCEPT))


def _apply(item: _Prepared, events: list[dict]) -> None:
    """Store the message as ACCEPTED and apply its effect, inside the caller's transaction;
    its audit events are added to ``events`` for the caller to append."""
    fields = _record_fields(item.header, item.raw, item.peer, item.patient_id)
    with acting_as(_actor_for(item.header, item.peer)):
        (pk,) = sql.insert(HL7Message, [{"status": MessageStatus.ACCEPTED, "ack": item.ack,
                                         **fields}])
        record = HL7Message(pk=pk, control_id=fields["control_id"])
        audit = _Audit(record)
        audit.received(item.header, MessageStatus.ACCEPTED)
        item.handler(item.msg, record, audit)
    events.extend(audit.events)


def _handle(raw: bytes, peer: str) -> bytes:
    item = _prepare(raw, peer)
    if isinstance(item, bytes):
        return item
    return _commit_one(item)


def _commit_one(item: _Prepared) -> bytes:
    """Apply one prepared message in its own transaction; its ACK, or the AE/AR for why not."""
    raw, peer, header, patient_id = item.raw, item.peer, item.header, item.patient_id
    try:
        with transaction.atomic():
            events: list[dict] = []
            _apply(item, events)
            audit_trail.append(events)
        return item.ack
    except HL7Error as exc:
        return _refuse(raw, peer, header, exc, patient_id)
    except IntegrityError as exc:
        if _accepted_before(header):
            return _store_duplicate(raw, peer, header, patient_id, item.ack)
        log.exception("integrity error on %s from %s", header.control_id, peer)
        return _refuse(raw, peer, header, _internal(exc), patient_id)
    except DatabaseError as exc:
        log.error("database error on %s from %s: %s", header.control_id, peer, exc)
        if type(exc.__cause__).__name__ in ("DeadlockDetected", "LockNotAvailable",
                                            "SerializationFailure"):
            locked = HL7Error(APPLICATION_RECORD_LOCKED, "A record this message changes is "
                              "locked by another message; please resend it")
            return _refuse(raw, peer, header, locked, patient_id)
        return _refuse(raw, peer, header, _internal(exc, "the database is unavailable"),
                       patient_id)
    except Exception as exc:  # a bug must not kill the connection or answer AA
        log.exception("failed to apply %s from %s", header.control_id, peer)
        return _refuse(raw, peer, header, _internal(exc), patient_id)


def handle_messages(messages: list[tuple[bytes, str]]) -> list[bytes]:
    """Apply messages that arrived together on different connections (``(raw, peer)``
    pairs) and return their ACKs in the same order: :func:`handle_message` for each, with
    one commit for all of them.

    Each message is still stored with its effect in the transaction that commits before its
    ACK; the messages of a batch simply share that transaction, applied in the given order
    exactly as one after the other. When one fails (its content, a duplicate control ID, a
    lock), the batch is rolled back and applied again without it, and that message is then
    applied on its own, so that one message's error is never another's. When the database
    cannot be reached, every message is answered AE at once. Never raises."""
    acks: list[bytes | None] = [None] * len(messages)
    pending: list[tuple[int, _Prepared]] = []
    for index, (raw, peer) in enumerate(messages):
        try:
            item = _prepare(raw, peer)
        except Exception as exc:  # the last line of defence, as in handle_message
            log.exception("failed to handle a message from %s", peer)
            item = build_ack(None, ERROR, _internal(exc))
        if isinstance(item, bytes):
            acks[index] = item
        else:
            pending.append((index, item))
    alone: list[tuple[int, _Prepared]] = []
    while len(pending) > 1:
        failed_at = None
        try:
            with transaction.atomic():
                events: list[dict] = []
                for position, (_index, item) in enumerate(pending):
                    failed_at = position
                    _apply(item, events)
                failed_at = None
                audit_trail.append(events)
        except Exception as exc:
            if _unreachable(exc):
                log.error("database unavailable; %d messages answered AE: %s", len(pending),
                          exc)
                unavailable = _internal(exc, "the database is unavailable")
                for index, item in pending:
                    acks[index] = build_ack(item.header, ERROR, unavailable)
                pending = []
                break
            if failed_at is None:  # the audit trail or the commit: each on its own
                log.info("a batch of %d messages could not commit (%s); applying each on "
                         "its own", len(pending), type(exc).__name__)
                break
            log.info("message %s failed in a batch of %d (%s); the others go again without it",
                     pending[failed_at][1].header.control_id, len(pending),
                     type(exc).__name__)
            alone.append(pending.pop(failed_at))
        else:
            for index, item in pending:
                acks[index] = item.ack
            pending = []
    for index, item in [*alone, *pending]:
        try:
            acks[index] = _commit_one(item)
        except Exception as exc:
            log.exception("failed to handle a message from %s", item.peer)
            acks[index] = build_ack(item.header, ERROR, _internal(exc))
    return acks  # type: ignore[return-value]


def _unreachable(exc: Exception) -> bool:
    """Whether a failure means the database cannot be reached at all (so that trying each
    message on its own would only make every sender wait longer for the same AE)."""
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return False
    try:
        return connection.connection is None or not connection.is_usable()
    except Exception:
        return True


def handle_oversize(prefix: bytes, peer: str, limit: int) -> bytes:
    """AR for a frame larger than ``limit`` bytes; stores its beginning for the record."""
    try:
        header = read_header(prefix)
    except HL7Error:
        header = None
    error = HL7Error(APPLICATION_INTERNAL_ERROR,
                     f"The message is larger than the {limit} bytes this gateway accepts",
                     reject=True)
    return _refuse(prefix[:65536], peer, header, error)


# --- header checks ----------------------------------------------------------------------


def _check_header(header: Header) -> Callable:
    if not header.control_id:
        raise HL7Error(REQUIRED_FIELD_MISSING, "MSH-10 (message control ID) is required",
                       ("MSH", 1, 10), reject=True)
    processing_id = header.processing_id
    if not processing_id:
        raise HL7Error(REQUIRED_FIELD_MISSING, "MSH-11 (processing ID) is required",
                       ("MSH", 1, 11), reject=True)
    if processing_id not in PROCESSING_IDS:
        raise HL7Error(UNSUPPORTED_PROCESSING_ID,
                       f"MSH-11 (processing ID) {processing_id!r} is not supported; "
                       "expected P, T or D", ("MSH", 1, 11), reject=True)
    version = header.version
    if not version:
        raise HL7Error(REQUIRED_FIELD_MISSING, "MSH-12 (version ID) is required",
                       ("MSH", 1, 12), reject=True)
    if version not in SUPPORTED_VERSIONS:
        raise HL7Error(UNSUPPORTED_VERSION_ID,
                       f"MSH-12 (version ID) {version!r} is not supported; this gateway "
                       "accepts 2.3 to 2.8.2", ("MSH", 1, 12), reject=True)
    kind, trigger = header.message_type, header.trigger_event
    if not kind:
        raise HL7Error(REQUIRED_FIELD_MISSING, "MSH-9 (message type) is required",
                       ("MSH", 1, 9), reject=True)
    handler = HANDLERS.get((kind, trigger))
    if handler is None and not trigger and kind in {k for k, _ in HANDLERS}:
        raise HL7Error(REQUIRED_FIELD_MISSING, "MSH-9.2 (trigger event) is required",
                       ("MSH", 1, 9), reject=True)
    if handler is None:
        if kind in {k for k, _ in HANDLERS}:
            supported = ", ".join(f"{k} {t}" for k, t in HANDLERS if k == kind)
            raise HL7Error(UNSUPPORTED_EVENT_CODE,
                           f"Event {kind} {trigger} is not supported (supported: {supported})",
                           ("MSH", 1, 9), reject=True)
        raise HL7Error(UNSUPPORTED_MESSAGE_TYPE,
                       f"Message type {kind} {trigger} is not supported (supported: ORM O01, "
                       "OMI O23, ADT A08, ADT A31, ADT A40)", ("MSH", 1, 9), reject=True)
    return handler


# --- storing refused and duplicate messages ---------------------------------------------


def _record_fields(header: Header | None, raw: bytes, peer: str, patient_id: str) -> dict:
    fields = {"raw": raw, "peer": peer[:100], "patient_id": patient_id[:64]}
    if header is not None:
        fields.update(
            sending_application=header.sending_application[:180],
            sending_facility=header.sending_facility[:180],
            receiving_application=header.receiving_application[:180],
            receiving_facility=header.receiving_facility[:180],
            control_id=header.control_id[:199],
            message_type="^".join(p for p in (header.message_type, header.trigger_event)
                                  if p)[:20],
            version=header.version[:10],
        )
    reprocessing = _reprocessing.get()
    if reprocessing is not None:
        fields["reprocessed_from_id"] = reprocessing.original_id
    return fields


def _refuse(raw: bytes, peer: str, header: Header | None, error: HL7Error,
            patient_id: str = "") -> bytes:
    code = REJECT if error.reject else ERROR
    ack = build_ack(header, code, error)
    try:
        status = MessageStatus.REJECTED if error.reject else MessageStatus.ERROR
        with acting_as(_actor_for(header, peer)), transaction.atomic():
            record = HL7Message.objects.create(
                status=status, error_code=error.code, error_text=error.text, ack=ack,
                **_record_fields(header, raw, peer, patient_id),
            )
            audit = _Audit(record)
            audit.received(header, status, error.code)
            audit.save()
    except Exception as exc:  # the answer stays AE/AR even when it cannot be stored
        log.error("could not store refused message from %s: %s", peer, exc)
    # The text stays out of the log: it can quote identifiers and names (it is in the ACK and
    # the stored message).
    log.info("%s to %s from %s: error %s", code, header.control_id if header else "-", peer,
             error.code)
    return ack


def _internal(exc: Exception, text: str = "") -> HL7Error:
    return HL7Error(APPLICATION_INTERNAL_ERROR,
                    f"The gateway could not apply the message ({text or type(exc).__name__}); "
                    "please resend it later")


def _accepted_before(header: Header) -> bool:
    try:
        return HL7Message.objects.filter(
            sending_application=header.sending_application[:180],
            sending_facility=header.sending_facility[:180],
            control_id=header.control_id[:199],
            status=MessageStatus.ACCEPTED,
        ).exists()
    except DatabaseError:
        return False


def _store_duplicate(raw: bytes, peer: str, header: Header, patient_id: str,
                     ack: bytes) -> bytes:
    try:
        with acting_as(_actor_for(header, peer)), transaction.atomic():
            record = HL7Message.objects.create(status=MessageStatus.DUPLICATE, ack=ack,
                                               **_record_fields(header, raw, peer, patient_id))
            audit = _Audit(record)
            audit.received(header, MessageStatus.DUPLICATE)
            audit.save()
    except DatabaseError as exc:
        # The first copy is committed, so AA is still the truth for the sender.
        log.error("could not store duplicate %s from %s: %s", header.control_id, peer, exc)
    return ack


# --- look-up tables (small, read on every message, cached briefly) ----------------------

_CACHE_SECONDS = 5.0
_cache: dict[str, tuple[float, object]] = {}


def clear_caches() -> None:
    """Forget cached mappings and stations (tests; admin changes show within seconds)."""
    _cache.clear()


def _cached(key: str, load: Callable):
    now = time.monotonic()
    hit = _cache.get(key)
    if hit is not None and now - hit[0] < _CACHE_SECONDS:
        return hit[1]
    value = load()
    _cache[key] = (now, value)
    return value


def _status_mappings() -> dict[tuple[str, str], str]:
    return _cached("mappings", lambda: {
        (m.order_control, m.order_status): m.step_status for m in OrderStatusMapping.objects.all()
    })


def _stations() -> list[Station]:
    return _cached("stations", lambda: list(Station.objects.filter(enabled=True)))


def step_status_for(control: str, status: str, orc_index: int = 1) -> str:
    """The step status an ORC-1/ORC-5 pair maps to; AE 103 when the table has no row."""
    step_status = _status_mappings().get((control, status))
    if step_status is None:
        raise HL7Error(
            TABLE_VALUE_NOT_FOUND,
            f"ORC-1 (order control) {control!r} with ORC-5 (order status) "
            f"{status or '(empty)'!r} has no step status in the order status mapping table",
            ("ORC", orc_index, 5 if status else 1),
        )
    return step_status


def station_for(modality: str, location: str) -> Station | None:
    """The most specific enabled Station for a modality and location: both given, then
    modality only, then location only, then a catch-all row."""
    best, best_score = None, -1
    for station in _stations():
        if station.modality and station.modality != modality:
            continue
        if station.location and station.location != location:
            continue
        score = 2 * bool(station.modality) + bool(station.location)
        if score > best_score:
            best, best_score = station, score
    return best


def new_study_uid() -> str:
    root = settings.GATEWAY_UID_ROOT
    return str(generate_uid(prefix=None if root == "2.25" else f"{root}."))


# --- patients ---------------------------------------------------------------------------

_PATIENT_COLUMNS = ["name", "name_key", "birth_date", "sex", "other_ids", "weight_kg",
                    "medical_alerts", "allergies"]


def save_patient(info: mapping.PatientInfo) -> int:
    """Insert or update the patient in one statement and return its pk. Only the values the
    message sent are changed; the row stays locked until the transaction ends, which
    serialises concurrent messages about one patient."""
    values = dict(info.values)
    if "name" in values:
        values["name_key"] = values["name"].upper()
    table = Patient._meta.db_table
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    json_cast = "::jsonb" if connection.vendor == "postgresql" else ""
    params = [info.patient_id, info.issuer]
    placeholders = ["%s", "%s"]
    for column in _PATIENT_COLUMNS:
        if column == "other_ids":
            params.append(json.dumps(values.get(column, [])))
            placeholders.append(f"%s{json_cast}")
        else:
            params.append(values.get(column, ""))
            placeholders.append("%s")
    params += [now, now]
    placeholders += ["%s", "%s"]
    updates = [f"{c} = EXCLUDED.{c}" for c in _PATIENT_COLUMNS if c in values]
    updates.append("updated_at = EXCLUDED.updated_at")
    statement = (
        f"INSERT INTO {table} (patient_id, issuer, {', '.join(_PATIENT_COLUMNS)}, created_at, "
        f"updated_at) VALUES ({', '.join(placeholders)}) "
        f"ON CONFLICT (patient_id, issuer) DO UPDATE SET {', '.join(updates)} RETURNING id"
    )
    with sql.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchone()[0]


# --- effects ----------------------------------------------------------------------------


class _Audit:
    """Audit events of one message, appended to the trail in one statement at the end."""

    def __init__(self, record: HL7Message):
        self.record = record
        self.events: list[dict] = []

    def received(self, header: Header | None, status: str, error_code: str = "") -> None:
        """The message itself: who sent what, and what the gateway answered."""
        kind = f"{header.message_type}^{header.trigger_event}".strip("^") if header else ""
        self.events.append({
            "actor": current_actor(), "action": "hl7.message.received",
            "object_type": HL7Message._meta.label, "object_id": str(self.record.pk),
            "object_repr": f"{kind or '?'} {header.control_id if header else ''}"[:200],
            "detail": {"status": status, "type": kind, "error_code": error_code,
                       "control_id": header.control_id if header else "",
                       "sending_application": header.sending_application if header else "",
                       "sending_facility": header.sending_facility if header else ""},
        })

    def add(self, action: str, obj, **detail) -> None:
        self.events.append({
            "actor": current_actor(), "action": action, "object_type": obj._meta.label,
            "object_id": str(obj.pk), "object_repr": str(obj)[:200],
            "detail": {"message": self.record.pk, "control_id": self.record.control_id,
                       **detail},
        })

    def save(self) -> None:
        audit_trail.append(self.events)


def apply_order(msg: Message, record: HL7Message, audit: _Audit) -> None:
    """ORM^O01 / OMI^O23 (RAD-4, RAD-13): create, update, cancel, discontinue or change the
    status of each requested procedure in the message."""
    patient = mapping.patient_info(msg, msg.first("PID"))
    procedures = mapping.procedures(msg)
    statuses = [step_status_for(p.order_control, p.order_status, p.orc_index)
                for p in procedures]
    patient_pk = save_patient(patient)
    header = msg.header
    sender = {"sending_application": header.sending_application[:180],
              "sending_facility": header.sending_facility[:180]}
    candidates = _candidate_orders(sender, procedures)
    order_numbers = [(p.placer, p.filler) for p in procedures]
    for proc, step_status in zip(procedures, statuses, strict=True):
        several = order_numbers.count((proc.placer, proc.filler)) > 1
        matches = _matching(proc, candidates, several)
        if proc.order_control in ("NW", "XO") and len(matches) > 1:
            raise HL7Error(
                DUPLICATE_KEY_IDENTIFIER,
                f"{len(matches)} orders match {_describe(proc)}; send OBR-19 (requested "
                "procedure ID) to say which one", ("OBR", proc.orc_index, 19))
        if proc.order_control == "NW" and not matches:
            order = _create_order(proc, step_status, patient_pk, sender, record)
            candidates.append(order)
            audit.add("hl7.order.created", order, order_control="NW")
        elif not matches:
            raise HL7Error(
                UNKNOWN_KEY_IDENTIFIER,
                f"ORC-1 {proc.order_control}: no order matches {_describe(proc)}",
                ("ORC", proc.orc_index, 2))
        elif proc.order_control in ("NW", "XO"):
            _update_order(matches[0], proc, step_status, patient_pk, record)
            audit.add("hl7.order.updated", matches[0], order_control=proc.order_control)
        else:
            for order in matches:
                _change_status(order, proc, step_status, record)
                audit.add("hl7.order.status", order, order_control=proc.order_control,
                          order_status=proc.order_status, step_status=step_status)


def _describe(proc: mapping.ProcedureInfo) -> str:
    keys = [("placer order number", proc.placer), ("filler order number", proc.filler),
            ("accession number", proc.accession)]
    text = ", ".join(f"{name} {value!r}" for name, value in keys if value)
    if proc.explicit_procedure_id:
        text += f", requested procedure ID {proc.requested_procedure_id!r}"
    return text


def _candidate_orders(sender: dict, procedures: list[mapping.ProcedureInfo]) -> list:
    """Every order of this sender that any procedure of the message could mean, locked
    until the transaction ends so that concurrent messages about one order queue up."""
    keys: dict[str, set[str]] = {}
    for field, attr in (("placer_order_number", "placer"), ("filler_order_number", "filler")):
        keys[field] = {getattr(p, attr) for p in procedures if getattr(p, attr)}
    keys["accession_number"] = {p.accession for p in procedures
                                if p.accession and not (p.placer or p.filler)}
    ids = sql.locked_ids(ImagingOrder, sender, keys)
    orders = list(ImagingOrder.objects.filter(pk__in=ids).order_by("id")) if ids else []
    if orders:
        steps: dict[int, list] = {}
        for step in ScheduledStep.objects.filter(order__in=orders).order_by("id"):
            steps.setdefault(step.order_id, []).append(step)
        for order in orders:
            order._hl7_steps = steps.get(order.pk, [])
    return orders


def _agrees(order: ImagingOrder, proc: mapping.ProcedureInfo) -> bool:
    """Whether a stored order is the one a procedure means: its placer and filler order
    numbers agree wherever both sides have one (a different number is a different order);
    the accession number decides only when neither does."""
    decided = False
    for field, value in (("placer_order_number", proc.placer),
                         ("filler_order_number", proc.filler)):
        stored = getattr(order, field)
        if value and stored:
            if stored != value:
                return False
            decided = True
    if not decided:
        return bool(proc.accession) and order.accession_number == proc.accession
    return True


def _matching(proc: mapping.ProcedureInfo, candidates: list, several: bool) -> list:
    """Orders meant by a procedure, narrowed by requested procedure ID when the message
    sent one, and by accession number (else the defaulted procedure ID) when the message
    has ``several`` procedures with the same order numbers."""
    matches = [o for o in candidates if _agrees(o, proc)]
    if several and not proc.explicit_procedure_id:
        if proc.accession:
            return [o for o in matches if o.accession_number == proc.accession]
        return [o for o in matches if o.requested_procedure_id == proc.requested_procedure_id]
    if proc.explicit_procedure_id:
        matches = [o for o in matches
                   if o.requested_procedure_id == proc.requested_procedure_id]
    elif len(matches) > 1:
        for field, value in (("accession_number", proc.accession),
                             ("requested_procedure_id", proc.requested_procedure_id)):
            narrowed = [o for o in matches if value and getattr(o, field) == value]
            if narrowed:
                return narrowed
    return matches


def _create_order(proc: mapping.ProcedureInfo, step_status: str, patient_pk: int,
                  sender: dict, record: HL7Message) -> ImagingOrder:
    values = {
        "patient_id": patient_pk,
        "placer_order_number": proc.placer,
        "filler_order_number": proc.filler,
        "accession_number": proc.accession,
        "requested_procedure_id": proc.requested_procedure_id,
        "study_instance_uid": proc.study_instance_uid or new_study_uid(),
        "status": OrderStatus.for_steps([step_status] * len(proc.steps)),
        "last_message_id": record.pk,
        **sender,
        **proc.values,
    }
    (pk,) = sql.insert(ImagingOrder, [values])
    now = timezone.now()
    order = ImagingOrder(pk=pk, created_at=now, updated_at=now, **values)
    step_rows = [{"order_id": pk, "sps_id": info.sps_id, "status": step_status,
                  **_step_values(info, {})} for info in proc.steps]
    step_ids = sql.insert(ScheduledStep, step_rows)
    order._hl7_steps = [ScheduledStep(pk=step_pk, created_at=now, updated_at=now, **row)
                        for step_pk, row in zip(step_ids, step_rows, strict=True)]
    return order


def _step_values(info: mapping.StepInfo, current: dict) -> dict:
    """A step's values from the message, with the station from the Station table when the
    message names none (IPC-9)."""
    values = dict(info.values)
    if "station_ae_title" not in values:
        modality = values.get("modality", current.get("modality", ""))
        station = station_for(modality, info.routing_location)
        if station is not None:
            values["station_ae_title"] = station.ae_title
            values.setdefault("station_name", station.station_name)
        elif current and modality != current.get("modality"):
            # The old station was chosen for another modality.
            values["station_ae_title"] = ""
            values.setdefault("station_name", "")
    return values


def _update_order(order: ImagingOrder, proc: mapping.ProcedureInfo, step_status: str,
                  patient_pk: int, record: HL7Message) -> None:
    """NW for a known order (a RIS resend) or XO: the message's values replace the stored
    ones, its steps replace the steps still on the worklist."""
    order.patient_id = patient_pk
    for field, value in (("placer_order_number", proc.placer),
                         ("filler_order_number", proc.filler),
                         ("accession_number", proc.accession),
                         ("study_instance_uid", proc.study_instance_uid)):
        if value:
            setattr(order, field, value)
    if proc.explicit_procedure_id:
        order.requested_procedure_id = proc.requested_procedure_id
    for field, value in proc.values.items():
        setattr(order, field, value)
    existing = {step.sps_id: step for step in order._hl7_steps}
    seen = set()
    new_steps = []
    now = timezone.now()
    for info in proc.steps:
        seen.add(info.sps_id)
        step = existing.get(info.sps_id)
        if step is None:
            step = ScheduledStep(order=order, sps_id=info.sps_id, status=step_status,
                                 **_step_values(info, {}))
            new_steps.append(step)
            continue
        for field, value in _step_values(info, {"modality": step.modality}).items():
            setattr(step, field, value)
        # A resend must not put an exam that is under way back on the worklist.
        if not (step.status in _UNDER_WAY and step_status in _ON_WORKLIST):
            step.status = step_status
        step.updated_at = now
        step.save()
    for step in order._hl7_steps:
        if step.sps_id not in seen and step.status in _ON_WORKLIST:
            step.status = StepStatus.CANCELLED
            step.updated_at = now
            step.save(update_fields=["status", "updated_at"])
    if new_steps:
        ScheduledStep.objects.bulk_create(new_steps)
    order._hl7_steps = list(order._hl7_steps) + new_steps
    order.status = OrderStatus.for_steps(s.status for s in order._hl7_steps)
    order.last_message = record
    order.save()


def _change_status(order: ImagingOrder, proc: mapping.ProcedureInfo, step_status: str,
                   record: HL7Message) -> None:
    """CA/OC, DC/OD, SC and any other mapped ORC-1: set the steps' status (only the steps
    the message names, when it names any it has)."""
    steps = order._hl7_steps
    named = {s.sps_id for s in proc.steps if s.explicit_id}
    targets = [s for s in steps if s.sps_id in named] or steps
    now = timezone.now()
    changed = []
    for step in targets:
        if proc.order_control in _ENDING_CONTROLS and step.status == StepStatus.COMPLETED:
            continue
        if step.status != step_status:
            step.status = step_status
            step.updated_at = now
            changed.append(step)
    if changed:
        ScheduledStep.objects.bulk_update(changed, ["status", "updated_at"])
    order.status = OrderStatus.for_steps(s.status for s in steps)
    if not steps:
        order.status = {"CA": OrderStatus.CANCELLED, "OC": OrderStatus.CANCELLED,
                        "DC": OrderStatus.DISCONTINUED, "OD": OrderStatus.DISCONTINUED
                        }.get(proc.order_control, order.status)
    order.last_message = record
    order.save(update_fields=["status", "last_message", "updated_at"])


def apply_patient_update(msg: Message, record: HL7Message, audit: _Audit) -> None:
    """ADT^A08 / A31 (RAD-12): update a known patient's demographics, and the visit values
    (PV1) of their open orders for the same visit. An unknown patient is not created: the
    gateway keeps only patients that have orders."""
    info = mapping.patient_info(msg, msg.first("PID"))
    try:
        patient = Patient.objects.select_for_update().get(patient_id=info.patient_id,
                                                          issuer=info.issuer)
    except Patient.DoesNotExist:
        return
    save_patient(info)
    audit.add("hl7.patient.updated", patient, fields=sorted(info.values))
    visit = mapping.visit_values(msg)
    admission = visit.get("admission_id")
    if admission:
        ImagingOrder.objects.filter(patient=patient, status=OrderStatus.OPEN,
                                    admission_id=admission).update(
            last_message=record, updated_at=timezone.now(), **visit)


def apply_merge(msg: Message, record: HL7Message, audit: _Audit) -> None:
    """ADT^A40 (RAD-12 merge): the prior patient's (MRG-1) open orders move to the surviving
    patient (PID-3); the prior patient is marked merged into the survivor."""
    for info, prior_id, prior_issuer in mapping.merge_pairs(msg):
        surviving_pk = save_patient(info)
        prior = (Patient.objects.select_for_update()
                 .filter(patient_id=prior_id, issuer=prior_issuer or info.issuer).first())
        if prior is None and not prior_issuer:
            prior = (Patient.objects.select_for_update()
                     .filter(patient_id=prior_id, issuer="").first())
        if prior is None or prior.pk == surviving_pk:
            continue
        moved = ImagingOrder.objects.filter(patient=prior, status=OrderStatus.OPEN).update(
            patient_id=surviving_pk, last_message=record, updated_at=timezone.now())
        Patient.objects.filter(merged_into=prior).update(merged_into_id=surviving_pk)
        prior.merged_into_id = surviving_pk
        prior.save(update_fields=["merged_into", "updated_at"])
        audit.add("hl7.patient.merged", prior, into=surviving_pk, orders_moved=moved)


HANDLERS: dict[tuple[str, str], Callable[[Message, HL7Message, _Audit], None]] = {
    ("ORM", "O01"): apply_order,
    ("OMI", "O23"): apply_order,
    ("ADT", "A08"): apply_patient_update,
    ("ADT", "A31"): apply_patient_update,
    ("ADT", "A40"): apply_merge,
}


# --- reprocessing a refused message (the messages page) ---------------------------------

REPROCESSABLE = (MessageStatus.ERROR, MessageStatus.REJECTED)
# The start of the error text handle_oversize stores: only the message's beginning is kept.
_OVERSIZE_TEXT = "The message is larger than the "


@dataclass(frozen=True)
class _Reprocessing:
    original_id: int
    actor: str


# Set only while reprocess() runs; the listener's path reads it once per stored row.
_reprocessing: contextvars.ContextVar[_Reprocessing | None] = contextvars.ContextVar(
    "hl7_reprocessing", default=None)


def _actor_for(header: Header | None, peer: str) -> str:
    """Who the audit trail names for a message: its sending application, or the user who
    reprocesses it."""
    reprocessing = _reprocessing.get()
    if reprocessing is not None:
        return reprocessing.actor
    return f"hl7:{header.sending_application}" if header else f"hl7:{peer}"


class NotReprocessable(Exception):
    """A message that is not run again; the text says why."""


def why_not_reprocessable(message: HL7Message) -> str:
    """"" when ``message`` may be reprocessed, else the reason it may not."""
    if message.status not in REPROCESSABLE:
        return (f"Only a refused message (error or rejected) can be reprocessed; message "
                f"{message.pk} was {message.get_status_display()}.")
    if message.error_text.startswith(_OVERSIZE_TEXT):
        return (f"Message {message.pk} was over the size limit and only its beginning is "
                "stored; ask the sender to send it again.")
    return ""


def reprocess(message_id: int, actor: str | None = None) -> HL7Message:
    """Run a refused (ERROR or REJECTED) message's stored bytes through the listener's
    handling again, e.g. after an administrator added the order status mapping it lacked.

    The attempt is stored as a new HL7Message whose ``reprocessed_from`` is the original;
    its ACK goes nowhere. Its audit events, and ``hl7.message.reprocessed`` on the original
    (original id, new id, new status), name ``actor`` (default: the current actor, the
    signed-in user in the UI), all in one transaction. The mapping and station tables are
    read afresh. When the sender's control id was accepted meanwhile, the attempt is a
    DUPLICATE (AA, no effect), exactly as a resend from the sender would be.

    Raises :class:`NotReprocessable` for any other status or a message stored cut short,
    and ``HL7Message.DoesNotExist`` for an unknown id. Returns the new message."""
    actor = actor or current_actor()
    with transaction.atomic():
        original = HL7Message.objects.select_for_update().get(pk=message_id)
        reason = why_not_reprocessable(original)
        if reason:
            raise NotReprocessable(reason)
        clear_caches()
        token = _reprocessing.set(_Reprocessing(original.pk, actor))
        try:
            _handle(bytes(original.raw), original.peer)
        finally:
            _reprocessing.reset(token)
        attempt = (HL7Message.objects.filter(reprocessed_from=original).order_by("-id")
                   .first())
        if attempt is None:  # _refuse could not store it (logged there)
            raise RuntimeError(f"the new attempt of message {original.pk} was not stored")
        audit_trail.record("hl7.message.reprocessed", original,
                           {"original": original.pk, "new": attempt.pk,
                            "status": attempt.status, "error_code": attempt.error_code},
                           actor=actor)
    log.info("message %s reprocessed as %s: %s", original.pk, attempt.pk, attempt.status)
    return attempt
