"""DICOM event handlers of the storage SCP. The gateway's AE binds them with their
configuration in the bind tuple (see :func:`storage_handlers`).

The C-STORE handler is a thin adapter: :func:`routing.storage.store_instance` stores and
records the instance before the response goes out, and routes a new one with the
association's rules in the same transaction. An instance it could not route there (a
replaced one, or deciding failed) is routed once committed
(:func:`routing.routing.route_instance`) — if that fails, it stays PENDING for the sweep.

SOP classes: every storage SOP class pynetdicom knows is offered with
:data:`STORAGE_TRANSFER_SYNTAXES`. A storage SOP class it does not know (a private one, or a
public one newer than pynetdicom: ``1.2.840.10008.5.1.4.1.1.*``) is accepted too: on
A-ASSOCIATE-RQ, :func:`accept_unknown_storage` adds a supported context for it to that
association and registers the UID with pynetdicom's storage service so its C-STOREs reach
the handler. Other unknown public UIDs (query, print, ...) are rejected as before.

Associations recorded: storage associations only, i.e. those whose request proposed at least
one storage SOP class (MWL queries are recorded per query by the worklist; echoes are not
recorded). Each becomes a :class:`~routing.models.DicomAssociation` with the number of
instances stored and refused and how it ended.
"""

from __future__ import annotations

import functools
import logging
import re
import struct
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from django.db import close_old_connections, connection, transaction
from django.db.models import Q
from django.utils import timezone
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.presentation import build_context
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import register_uid, uid_to_service_class

from gateway import audit
from gateway.audit import acting_as

from .models import AssociationResult, DicomAssociation
from .routing import enabled_rules, route_instance
from .storage import Origin, StorageConfig, StoreResult, StoreStatus, store_instance

logger = logging.getLogger(__name__)

# Accepted as received, never decoded. pynetdicom accepts, per proposed context, the first of
# these the peer also proposed: uncompressed first (Explicit VR before Implicit), so a peer
# that could send either never has to compress for us, and lossy last, so a peer offering
# both never degrades an image on our account.
STORAGE_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,  # 1.2.840.10008.1.2.1
    ImplicitVRLittleEndian,  # 1.2.840.10008.1.2
    DeflatedExplicitVRLittleEndian,  # 1.2.840.10008.1.2.1.99
    ExplicitVRBigEndian,  # 1.2.840.10008.1.2.2 (retired, still sent by old modalities)
    JPEGLosslessSV1,  # 1.2.840.10008.1.2.4.70
    JPEGLossless,  # .57
    JPEGLSLossless,  # .80
    JPEG2000Lossless,  # .90
    RLELossless,  # 1.2.840.10008.1.2.5
    JPEGBaseline8Bit,  # .50
    JPEGExtended12Bit,  # .51
    JPEGLSNearLossless,  # .81
    JPEG2000,  # .91
]

STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."
DICOM_ROOT = "1.2.840.10008."
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# Unknown SOP classes are registered process-wide; a peer proposing thousands of made-up
# UIDs must not grow that registry without end.
MAX_REGISTERED_UNKNOWN = 2000
_registered_lock = threading.Lock()
_registered: set[str] = set()


def storage_sop_classes() -> list[str]:
    """Every storage SOP class pynetdicom knows."""
    return [cx.abstract_syntax for cx in AllStoragePresentationContexts]


_KNOWN_STORAGE = frozenset(str(uid) for uid in storage_sop_classes())


def looks_like_storage(uid: str) -> bool:
    """A SOP class UID the storage SCP accepts although pynetdicom does not know it: one in
    the public storage branch, or a private (non-DICOM-root) one."""
    uid = str(uid)
    if not _UID.match(uid) or len(uid) > 64:
        return False
    return uid.startswith(STORAGE_ROOT) or not uid.startswith(DICOM_ROOT)


def _register_storage(uid: str) -> bool:
    if uid_to_service_class(uid) is StorageServiceClass:
        return True
    with _registered_lock:
        if uid in _registered:
            return True
        if len(_registered) >= MAX_REGISTERED_UNKNOWN:
            return False
        register_uid(uid, "GatewayStorage_" + uid.replace(".", "_"), StorageServiceClass)
        _registered.add(uid)
        return True


class AssociationLog:
    """Which association has which DicomAssociation row, and its counts so far. Shared by
    the handlers of one AE through their bind tuples; keyed by the pynetdicom Association."""

    @dataclass
    class Entry:
        storage: bool = False
        row_id: int | None = None
        instances: int = 0
        failures: int = 0
        # The enabled rules, loaded at the association's first C-STORE: an association
        # routes with the rules as they were when it started sending.
        rules: list | None = None

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def entry(self, assoc) -> AssociationLog.Entry:
        with self._lock:
            found = self._entries.get(assoc)
            if found is None:
                found = self._entries[assoc] = self.Entry()
            return found


def _peer(event) -> tuple[str, str, str]:
    """(calling AE, called AE, peer address) of the association of ``event``."""
    requestor = event.assoc.requestor
    primitive = getattr(requestor, "primitive", None)
    calling = (getattr(primitive, "calling_ae_title", None) or requestor.ae_title or "").strip()
    called = (getattr(primitive, "called_ae_title", "") or "").strip()
    return calling[:16], called[:16], str(requestor.address or "")


def _with_db(func: Callable) -> Callable:
    """Association threads open and close their own Django connection."""

    @functools.wraps(func)
    def wrapper(event, *args):
        close_old_connections()
        try:
            return func(event, *args)
        finally:
            connection.close()

    return wrapper


def accept_unknown_storage(event, log: AssociationLog) -> None:
    """EVT_REQUESTED: offer storage for proposed SOP classes that look like storage but that
    the AE has no context for, and note whether this is a storage association."""
    acceptor = event.assoc.acceptor
    supported = {str(cx.abstract_syntax) for cx in acceptor.supported_contexts}
    proposed = event.assoc.requestor.primitive.presentation_context_definition_list or []
    added = []
    storage = False
    for cx in proposed:
        uid = str(cx.abstract_syntax)
        if uid in _KNOWN_STORAGE:
            storage = True
        if uid in supported or not looks_like_storage(uid):
            continue
        storage = True
        if _register_storage(uid):
            added.append(build_context(uid, STORAGE_TRANSFER_SYNTAXES))
            supported.add(uid)
    if added:
        acceptor.supported_contexts = [*acceptor.supported_contexts, *added]
    log.entry(event.assoc).storage = storage


@_with_db
def record_accepted(event, log: AssociationLog) -> None:
    """EVT_ACCEPTED: a DicomAssociation row (OPEN) for a storage association."""
    entry = log.entry(event.assoc)
    if not entry.storage:
        return
    calling, called, address = _peer(event)
    try:
        entry.row_id = DicomAssociation.objects.create(
            calling_ae=calling, called_ae=called, peer=f"{address}:{event.assoc.requestor.port}"
        ).pk
    except Exception:
        logger.exception("could not record the association from %s", calling)


@_with_db
def record_rejected(event, log: AssociationLog) -> None:
    """EVT_REJECTED: the AE turned the storage association down (e.g. too many open)."""
    entry = log.entry(event.assoc)
    if not entry.storage:
        return
    calling, called, address = _peer(event)
    try:
        with transaction.atomic():
            row = DicomAssociation.objects.create(
                calling_ae=calling, called_ae=called,
                peer=f"{address}:{event.assoc.requestor.port}",
                result=AssociationResult.REJECTED, ended_at=timezone.now(),
            )
            _audit_association(row)
    except Exception:
        logger.exception("could not record the rejected association from %s", calling)


# EVT_CONN_CLOSE comes from the transport thread and may beat the association thread's
# EVT_RELEASED; its guess is recorded with this text so that the real outcome replaces it.
CLOSED_WITHOUT_RELEASE = "connection closed without release"


def _finish(event, log: AssociationLog, result: str, error_text: str = "",
            fallback: bool = False) -> None:
    entry = log.entry(event.assoc)
    if entry.row_id is None:
        return
    unfinished = Q(result=AssociationResult.OPEN)
    if not fallback:
        unfinished |= Q(error_text=CLOSED_WITHOUT_RELEASE)
    try:
        with transaction.atomic():
            changed = DicomAssociation.objects.filter(unfinished, pk=entry.row_id).update(
                result=result, ended_at=timezone.now(), instances=entry.instances,
                failures=entry.failures, error_text=error_text,
            )
            if changed:
                _audit_association(DicomAssociation.objects.get(pk=entry.row_id))
    except Exception:
        logger.exception("could not record the end of association %s", entry.row_id)


def _audit_association(row: DicomAssociation) -> None:
    # If the connection's close beat the release, a second event corrects the first.
    audit.record("dicom.association", row, {
        "calling_ae": row.calling_ae, "called_ae": row.called_ae, "peer": row.peer,
        "result": row.result, "instances": row.instances, "failures": row.failures,
        "error": row.error_text,
    }, actor=f"dicom:{row.calling_ae}")


@_with_db
def record_released(event, log: AssociationLog) -> None:
    """EVT_RELEASED: the peer released the association normally."""
    _finish(event, log, AssociationResult.RELEASED)


@_with_db
def record_aborted(event, log: AssociationLog) -> None:
    """EVT_ABORTED: A-ABORT from either side, or the connection dropped."""
    _finish(event, log, AssociationResult.ABORTED, "aborted")


@_with_db
def record_closed(event, log: AssociationLog) -> None:
    """EVT_CONN_CLOSE: whatever is still OPEN ended without release (unless EVT_RELEASED or
    EVT_ABORTED says otherwise, even afterwards)."""
    if event.assoc.is_released or event.assoc.is_aborted:
        return
    _finish(event, log, AssociationResult.ABORTED, CLOSED_WITHOUT_RELEASE, fallback=True)


def handle_store(event, config: StorageConfig, log: AssociationLog) -> int | Dataset:
    """EVT_C_STORE: store the instance as received, answer, then route it.

    Success (0x0000) only once the file is fsynced and its row committed; 0xA700 when disk
    space is short; 0xA900 / 0xC2xx failures with an Error Comment otherwise (see
    :class:`routing.storage.StoreStatus`). A failure never ends the association.
    """
    close_old_connections()
    entry = log.entry(event.assoc)
    calling, called, address = _peer(event)
    try:
        with acting_as(f"dicom:{calling}"):
            try:
                encoded = _as_part10(event, calling)
                origin = Origin(calling, called, address, entry.row_id)
                result = store_instance(encoded, origin, config, _rules(entry))
            except Exception:
                logger.exception("C-STORE from %s could not be handled", calling)
                result = StoreResult(StoreStatus.CANNOT_WRITE, "the instance could not be stored")
            if result.ok:
                entry.instances += 1
            else:
                entry.failures += 1
            if result.route and result.instance_id is not None:
                _route(result.instance_id, entry)
        if result.ok:
            return int(StoreStatus.SUCCESS)
        return _failure(result.status, result.comment)
    finally:
        connection.close()


def _as_part10(event, calling_ae: str) -> bytes:
    """The received data set exactly as it came, behind file meta information that names the
    transfer syntax it came in and the AE that sent it (PS3.10 7.1)."""
    request = event.request
    meta = _file_meta(str(request.AffectedSOPClassUID or ""),
                      str(request.AffectedSOPInstanceUID or ""),
                      str(event.context.transfer_syntax or ""), calling_ae)
    if meta is None:
        meta = event.file_meta
        if calling_ae:
            meta.SourceApplicationEntityTitle = calling_ae
        meta = encode_file_meta(meta)
    return b"".join((b"\x00" * 128, b"DICM", meta, request.DataSet.getvalue()))


_IMPLEMENTATION = (str(PYNETDICOM_IMPLEMENTATION_UID), PYNETDICOM_IMPLEMENTATION_VERSION)


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str,
               calling_ae: str) -> bytes | None:
    """The File Meta Information group (Explicit VR Little Endian) with the elements and
    bytes pynetdicom's ``event.file_meta`` plus ``encode_file_meta`` give, encoded directly:
    building and writing a pydicom data set costs more per instance than storing it. None
    for values that are not short plain ASCII; the caller then lets pydicom decide."""
    values = (sop_class, sop_instance, transfer_syntax, *_IMPLEMENTATION, calling_ae)
    if not all(v.isascii() and len(v) <= 64 for v in values) or not all(values[:5]):
        return None
    elements = [struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"]
    for element, vr, value, pad in (
        (0x0002, b"UI", sop_class, b"\x00"),
        (0x0003, b"UI", sop_instance, b"\x00"),
        (0x0010, b"UI", transfer_syntax, b"\x00"),
        (0x0012, b"UI", _IMPLEMENTATION[0], b"\x00"),
        (0x0013, b"SH", _IMPLEMENTATION[1], b" "),
        (0x0016, b"AE", calling_ae, b" "),
    ):
        if not value:
            continue
        data = value.encode("ascii")
        data += pad * (len(data) % 2)
        elements.append(struct.pack("<HH2sH", 0x0002, element, vr, len(data)) + data)
    body = b"".join(elements)
    return struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def _rules(entry: AssociationLog.Entry) -> list | None:
    """The association's rules; None (route after storing) when they cannot be loaded."""
    if entry.rules is None:
        try:
            entry.rules = enabled_rules()
        except Exception:
            logger.exception("could not load the routing rules; routing after storing")
    return entry.rules


def _route(instance_id: int, entry: AssociationLog.Entry) -> None:
    try:
        if entry.rules is None:
            entry.rules = enabled_rules()
        route_instance(instance_id, rules=entry.rules)
    except Exception:
        logger.exception("routing instance %s failed; it stays PENDING for the sweep",
                         instance_id)


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = int(status)
    ds.ErrorComment = comment[:64]
    return ds


def storage_handlers(config: StorageConfig | None = None) -> list[tuple]:
    """The bind tuples of the storage SCP, sharing one :class:`AssociationLog`."""
    config = config or StorageConfig.from_settings()
    log = AssociationLog()
    return [
        (evt.EVT_REQUESTED, accept_unknown_storage, [log]),
        (evt.EVT_ACCEPTED, record_accepted, [log]),
        (evt.EVT_REJECTED, record_rejected, [log]),
        (evt.EVT_RELEASED, record_released, [log]),
        (evt.EVT_ABORTED, record_aborted, [log]),
        (evt.EVT_CONN_CLOSE, record_closed, [log]),
        (evt.EVT_C_STORE, handle_store, [config, log]),
    ]
