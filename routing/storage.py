"""Store one received SOP instance: the plain function behind the storage SCP.

:func:`store_instance` takes the instance exactly as it came over the network (file meta +
data set bytes, never decoded and re-encoded), writes it durably under
``<GATEWAY_DATA_DIR>/store/<study>/<series>/<sop instance>.dcm`` and records it, and only
then says Success. Given the association's rules, it also decides where a new instance goes
in the same transaction (:func:`routing.routing.decide`: the header, the association and
the parsed data set are in memory, so nothing is read back); otherwise, and for a replaced
instance, routing happens after, on the committed row (:func:`routing.routing.route_instance`).

Durability: the bytes go to a temporary file in ``store/.incoming`` (same filesystem),
written and fsynced by a helper thread from the moment they have arrived, while this one
parses the data set, decides where it goes and writes its rows in a transaction (on
PostgreSQL one statement: study, instance and deliveries). Only then does it wait for the
file, give it its final name and fsync the directory, all before the commit: a committed
row always names a durable file, and a failed commit removes the new file. Nothing is
half-kept: on any failure the temporary file is removed and no row is written. On Linux the
temporary file has no name at all until then (O_TMPFILE, linked into place), so a process
killed mid-store leaves nothing; the writers open the next ones ahead (:class:`_Spares`).
Elsewhere it is a named ``.part`` file, renamed into place; :func:`remove_abandoned_incoming`
deletes those a killed process left.

Duplicates (the same SOP Instance UID received again), by ``GATEWAY_DUPLICATE_POLICY``:

``replace`` (default)
    The new bytes are stored beside the old ones (``<sop instance>.v<version>.dcm``), the
    row's ``version`` goes up and names them, and the old file is removed once that has
    committed: a failure or a crash before leaves the previous version whole, row and file.
    The instance is routed again (deliveries are per version). Deliveries of the older
    version still waiting (PENDING/FAILED) are marked ABANDONED ("superseded"); one being
    sent finishes (its file stays readable while open); one claimed but not yet sent finds
    its file gone and is abandoned as superseded too.
``keep``
    The first copy stays, the peer gets Success, nothing is written or routed.
``reject``
    The peer gets 0xC230 (a "Cannot understand" failure, PS3.4 B.2.3: there is no specific
    duplicate status for C-STORE) with an Error Comment; nothing changes.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from django.db import connection, transaction
from django.utils import timezone
from pydicom.datadict import tag_for_keyword

from gateway import sql

from .header import ReceivedDataSet
from .models import Delivery, DeliveryStatus, ReceivedInstance, ReceivedStudy, RoutingStatus
from .routing import (
    Decision,
    can_record,
    decide,
    decision_locks,
    delivery_rows,
    enqueue_on_commit,
    facts_from_dataset,
    record_decision,
)

logger = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class StoreStatus(IntEnum):
    """C-STORE response statuses the storage SCP sends (PS3.4 B.2.3, PS3.7 C)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # Cxxx "Cannot understand" family; the low byte says which problem.
    CANNOT_PARSE = 0xC210
    CANNOT_WRITE = 0xC220
    DUPLICATE_REJECTED = 0xC230


class DuplicatePolicy:
    REPLACE = "replace"
    KEEP = "keep"
    REJECT = "reject"


@dataclass(frozen=True)
class StorageConfig:
    """What storing needs from settings, fixed when the AE is built."""

    data_dir: Path
    min_free_mb: int = 1024
    duplicate_policy: str = DuplicatePolicy.REPLACE

    @classmethod
    def from_settings(cls) -> StorageConfig:
        from django.conf import settings

        return cls(
            data_dir=Path(settings.DATA_DIR),
            min_free_mb=settings.GATEWAY_MIN_FREE_MB,
            duplicate_policy=settings.GATEWAY_DUPLICATE_POLICY,
        )

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def incoming_dir(self) -> Path:
        """Where instances are written before their UIDs are known (same filesystem)."""
        return self.store_dir / ".incoming"


@dataclass(frozen=True)
class Origin:
    """Where an instance came from."""

    calling_ae: str
    called_ae: str = ""
    source_ip: str = ""
    association_id: int | None = None


@dataclass(frozen=True)
class StoreResult:
    """The answer for the peer, and what to route next (``instance_id`` when the instance
    was stored or replaced and should be routed)."""

    status: StoreStatus
    comment: str = ""
    instance_id: int | None = None
    route: bool = False

    @property
    def ok(self) -> bool:
        return self.status == StoreStatus.SUCCESS


class StoreRefused(Exception):
    def __init__(self, status: StoreStatus, comment: str):
        super().__init__(comment)
        self.status = status
        self.comment = comment


def store_instance(encoded: bytes, origin: Origin, config: StorageConfig,
                   rules: list | None = None) -> StoreResult:
    """Store ``encoded`` (Part 10 bytes: preamble, file meta with the transfer syntax, data
    set as received) and record it; return the status to answer the C-STORE with.

    ``rules``: the enabled rules (destinations prefetched) to route a new instance with in
    the storing transaction; its deliveries are enqueued once that commits. Without them,
    or when deciding fails, the result asks for routing after commit (``route``).

    0xA700 when free space under the data directory would drop below ``min_free_mb``;
    0xC210 when the data set cannot be parsed or lacks the UIDs it is filed by; 0xA900 when
    the data set's SOP Instance/Class UID contradicts the request; 0xC220 when it cannot be
    written; duplicates per ``config.duplicate_policy`` (see the module docstring).
    """
    try:
        _check_free_space(config, len(encoded))
        # Written and fsynced meanwhile: parsing, deciding and recording wait for it last.
        written = _write_temp(config.incoming_dir, encoded)
        try:
            parsed = _parse(encoded)
            uids = _uids(parsed)
        except StoreRefused:
            _discard_written(written)
            raise
        return _store(encoded, parsed, uids, origin, config, rules, written)
    except StoreRefused as refused:
        logger.warning("C-STORE from %s refused (0x%04X): %s",
                       origin.calling_ae, refused.status, refused.comment)
        return StoreResult(refused.status, refused.comment)


def _parse(encoded: bytes) -> ReceivedDataSet:
    try:
        # A truncated or garbled encoding fails here, whether scanned or read by pydicom;
        # the header's values are decoded one by one, a broken one left out.
        parsed = ReceivedDataSet(encoded)
        parsed.header  # noqa: B018
        return parsed
    except Exception as exc:
        raise StoreRefused(StoreStatus.CANNOT_PARSE,
                           f"data set cannot be parsed: {type(exc).__name__}") from None


@dataclass(frozen=True)
class _Uids:
    sop_class: str
    sop_instance: str
    study: str
    series: str
    transfer_syntax: str


# Where each UID is read from: the file meta, and the data set's own SOP UIDs that must agree.
_UID_TAGS = {"sop_class": 0x00020002, "sop_instance": 0x00020003, "transfer_syntax": 0x00020010,
             "study": 0x0020000D, "series": 0x0020000E}
_DATA_SET_SOP_TAGS = (0x00080018, 0x00080016)


def _uids(parsed: ReceivedDataSet) -> _Uids:
    values = {name: parsed.plain_uid(tag) for name, tag in _UID_TAGS.items()}
    in_data_set = tuple(parsed.plain_uid(tag) for tag in _DATA_SET_SOP_TAGS)
    if None in values.values() or None in in_data_set:
        values, in_data_set = _uids_from_dataset(parsed)
    for name, value in values.items():
        # UIDs become path components: anything but digits and dots is refused.
        if not _UID.match(value) or len(value) > 64:
            raise StoreRefused(StoreStatus.CANNOT_PARSE, f"missing or invalid {name} UID")
    if in_data_set != (values["sop_instance"], values["sop_class"]):
        raise StoreRefused(StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                           "SOP Instance/Class UID in the data set differ from the request")
    return _Uids(**values)


def _uids_from_dataset(parsed: ReceivedDataSet) -> tuple[dict[str, str], tuple[str, str]]:
    try:
        ds = parsed.dataset
        meta = ds.file_meta
        values = {
            "sop_class": str(meta.MediaStorageSOPClassUID),
            "sop_instance": str(meta.MediaStorageSOPInstanceUID),
            "transfer_syntax": str(meta.TransferSyntaxUID),
            "study": str(ds.get("StudyInstanceUID", "") or ""),
            "series": str(ds.get("SeriesInstanceUID", "") or ""),
        }
        in_data_set = str(ds.get("SOPInstanceUID", "") or ""), str(ds.get("SOPClassUID", "") or "")
    except Exception as exc:
        raise StoreRefused(StoreStatus.CANNOT_PARSE,
                           f"data set cannot be parsed: {type(exc).__name__}") from None
    return values, in_data_set


def _check_free_space(config: StorageConfig, size: int) -> None:
    try:
        _make_dirs(config.store_dir)
    except OSError as exc:
        raise _write_refused(exc) from None
    free = shutil.disk_usage(config.store_dir).free
    if free - size < config.min_free_mb * 1024 * 1024:
        raise StoreRefused(StoreStatus.OUT_OF_RESOURCES,
                           f"less than {config.min_free_mb} MB free for received instances")


def _decide(rules: list | None, origin: Origin, parsed: ReceivedDataSet,
            uids: _Uids) -> Decision | None:
    """The routing decision for a new instance, or None to route it after commit."""
    if rules is None:
        return None
    association = {"calling_ae": origin.calling_ae[:16], "called_ae": origin.called_ae[:16],
                   "source_ip": origin.source_ip[:64]}
    try:
        # The study has just received this instance: it has been quiet for 0 seconds.
        return decide(rules, facts_from_dataset(association, parsed), 0.0)
    except Exception:
        logger.exception("routing %s failed; it is routed after storing", uids.sop_instance)
        return None


def _store(encoded: bytes, parsed: ReceivedDataSet, uids: _Uids, origin: Origin,
           config: StorageConfig, rules: list | None, written: Future) -> StoreResult:
    """Keep the instance whose bytes ``written`` is writing, or remove them."""
    final = config.store_dir / uids.study / uids.series / f"{uids.sop_instance}.dcm"
    placed: _TempFile | None = None
    previous_path: str | None = None
    try:
        if config.duplicate_policy != DuplicatePolicy.REPLACE:
            existing = (ReceivedInstance.objects.filter(sop_instance_uid=uids.sop_instance)
                        .first())
            if existing is not None and config.duplicate_policy == DuplicatePolicy.KEEP:
                _discard_written(written)
                return StoreResult(StoreStatus.SUCCESS, "duplicate kept", existing.pk,
                                   route=False)
            if existing is not None and config.duplicate_policy == DuplicatePolicy.REJECT:
                raise StoreRefused(StoreStatus.DUPLICATE_REJECTED,
                                   "SOP Instance UID already received")
        header = parsed.header
        decision = _decide(rules, origin, parsed, uids)
        if connection.vendor == "sqlite":
            # Its transaction locks the whole database: other writers must not wait for the disk.
            _written(written)
        with transaction.atomic():
            now = timezone.now()
            fields = _instance_fields(uids, header, origin, len(encoded), final, now)
            # Most instances are new: insert straight away, routed when the rules allow; a
            # duplicate (already there, or stored meanwhile by another association) hits
            # the unique SOP Instance UID, is not inserted, and takes the locked path below.
            if connection.vendor == "postgresql":
                instance_id, fields["study_id"], recorded = _insert_new(
                    parsed, uids, fields, decision, now)
                if instance_id is not None and not recorded:
                    decision = None
            else:
                fields["study_id"] = _upsert_study(parsed, uids.study, now)
                if decision is not None and not can_record(decision):
                    decision = None
                status = decision.status if decision is not None else RoutingStatus.PENDING
                instance_id = sql.insert_new(ReceivedInstance, {
                    **fields, "sop_instance_uid": uids.sop_instance, "version": 1,
                    "routing_status": status,
                    "routed_at": None if status == RoutingStatus.PENDING else now,
                }, unique="sop_instance_uid")
                if instance_id is not None and decision is not None:
                    record_decision(instance_id, 1, decision, now)
            if instance_id is not None:
                if decision is not None:
                    enqueue_on_commit(decision)
            else:
                decision = None
                instance = (
                    ReceivedInstance.objects.select_for_update()
                    .filter(sop_instance_uid=uids.sop_instance).first()
                )
                if instance is None:
                    raise RuntimeError(f"{uids.sop_instance} neither inserted nor found")
                if config.duplicate_policy != DuplicatePolicy.REPLACE:
                    # Another association stored it between our check and our insert.
                    raise StoreRefused(StoreStatus.DUPLICATE_REJECTED
                                       if config.duplicate_policy == DuplicatePolicy.REJECT
                                       else StoreStatus.SUCCESS, "duplicate") from None
                previous_path = instance.path
                instance.version += 1
                # A name of its own: until this commits, the row and the file it names are
                # still the previous version's, whatever fails from here on.
                final = final.with_name(f"{uids.sop_instance}.v{instance.version}.dcm")
                fields["path"] = str(final)
                Delivery.objects.filter(
                    instance=instance,
                    status__in=[DeliveryStatus.PENDING, DeliveryStatus.FAILED],
                    instance_version__lt=instance.version,
                ).update(
                    status=DeliveryStatus.ABANDONED,
                    last_error=f"superseded by version {instance.version}",
                    updated_at=now,
                )
                for name, value in fields.items():
                    setattr(instance, name, value)
                instance.save()
                instance_id = instance.pk
            # Last step before commit: from here on, the file is the one the row describes.
            temp = _written(written)
            _make_dirs(final.parent)
            temp.move_to(final)
            placed = temp
            _fsync_dir(final.parent)
    except StoreRefused as refused:
        _discard_written(written)
        if refused.status == StoreStatus.SUCCESS:
            return StoreResult(StoreStatus.SUCCESS, "duplicate kept")
        raise
    except Exception as exc:
        if placed is not None:
            placed.unplace()
        else:
            _discard_written(written)
        logger.exception("could not store %s", uids.sop_instance)
        raise StoreRefused(StoreStatus.CANNOT_WRITE,
                           f"instance could not be stored: {type(exc).__name__}") from None
    if previous_path and previous_path != str(final):
        _discard(previous_path)
    return StoreResult(StoreStatus.SUCCESS, instance_id=instance_id, route=decision is None)


def _instance_fields(uids: _Uids, header: dict, origin: Origin, size: int, final: Path,
                     now) -> dict:
    """The instance row's values as received, but its study, SOP Instance UID and version."""
    return {
        "sop_class_uid": uids.sop_class,
        "series_instance_uid": uids.series,
        "transfer_syntax_uid": uids.transfer_syntax,
        "header": header,
        "calling_ae": origin.calling_ae[:16],
        "called_ae": origin.called_ae[:16],
        "source_ip": origin.source_ip[:64],
        "association_id": origin.association_id,
        "size": size,
        "path": str(final),
        "received_at": now,
        "routing_status": RoutingStatus.PENDING,
        "routed_at": None,
        "file_deleted_at": None,
    }


def _insert_new(parsed: ReceivedDataSet, uids: _Uids, fields: dict, decision: Decision | None,
                now) -> tuple[int | None, int, bool]:
    """PostgreSQL, in the storing transaction: the study upsert (the instance's modality
    merged in SQL), the instance row and its deliveries (guarded by the locks of
    :func:`routing.routing.can_record`) in one statement, sent while the file's fsync runs:
    end to end, each of the four it replaces waited for a core that Orthanc and the worker
    were using. Returns the new instance's id (None if the SOP Instance UID has a row), the
    study's id, and whether the decision's deliveries were recorded (False when a node or
    rule it names is gone: the instance is then PENDING)."""
    deliveries = decision.deliveries if decision is not None else {}
    status = decision.status if decision is not None else RoutingStatus.PENDING
    row = {**fields, "sop_instance_uid": uids.sop_instance, "version": 1,
           "routing_status": status,
           "routed_at": None if status == RoutingStatus.PENDING else now}
    params = _study_params(parsed, uids.study, now)
    locks = ""
    if deliveries:
        locks, lock_params = decision_locks(decision)
        params += lock_params
    params += sql.select_params(ReceivedInstance, row, _INSTANCE_EXPRESSIONS)
    for delivery in delivery_rows(0, 1, decision, now) if deliveries else []:
        params += sql.select_params(Delivery, delivery, _DELIVERY_EXPRESSIONS)
    with sql.cursor() as cursor:
        cursor.execute(_one_statement(locks, len(deliveries)), params)
        instance_id, study_id, recorded = cursor.fetchone()
    return instance_id, study_id, bool(recorded)


_INSTANCE_EXPRESSIONS = (
    ("study_id", "s.id"),
    # Routed only if the nodes and rules decided on are still there (see can_record).
    ("routing_status", f"CASE WHEN ok.recorded THEN %s::varchar "
                       f"ELSE '{RoutingStatus.PENDING.value}' END"),
    ("routed_at", "CASE WHEN ok.recorded THEN %s::timestamp with time zone END"),
)


_DELIVERY_EXPRESSIONS = (("instance_id", "i.id"),)


@functools.cache
def _one_statement(locks: str, deliveries: int) -> str:
    """The statement of :func:`_insert_new`: ``locks`` from
    :func:`routing.routing.decision_locks` ("" without deliveries), then ``deliveries`` rows."""
    qn = connection.ops.quote_name
    upsert, _merge = _study_sql(merge_in_sql=True)
    parts = [f"s AS ({upsert})", locks or "ok AS (SELECT TRUE AS recorded)"]
    columns, items = sql.select_items(ReceivedInstance, _INSTANCE_EXPRESSIONS)
    parts.append(
        f"i AS (INSERT INTO {qn(ReceivedInstance._meta.db_table)} ({columns}) "
        f"SELECT {items} FROM s, ok ON CONFLICT ({qn('sop_instance_uid')}) DO NOTHING "
        f"RETURNING {qn('id')})")
    if deliveries:
        columns, items = sql.select_items(Delivery, _DELIVERY_EXPRESSIONS)
        selects = " UNION ALL ".join(
            [f"SELECT {items} FROM i, ok WHERE ok.recorded"] * deliveries)
        parts.append(f"d AS (INSERT INTO {qn(Delivery._meta.db_table)} ({columns}) {selects})")
    return (f"WITH {', '.join(parts)} "
            "SELECT (SELECT id FROM i), (SELECT id FROM s), (SELECT recorded FROM ok)")


_STUDY_FIELDS = (
    ("patient_id", "PatientID", 64),
    ("patient_name", "PatientName", 324),
    ("accession_number", "AccessionNumber", 16),
    ("study_date", "StudyDate", 8),
    ("study_description", "StudyDescription", 64),
)


def _upsert_study(parsed: ReceivedDataSet, study_uid: str, now) -> int:
    """Create or update the study row (locking it until commit) in one statement; return
    its id. Fields the instance has a value for overwrite the study's; the instance's
    modality is added to the study's modalities."""
    params = _study_params(parsed, study_uid, now)
    modality = params[len(_STUDY_FIELDS) + 1]
    upsert, merge = _study_sql()
    with sql.cursor() as cursor:
        cursor.execute(upsert, params)
        study_id, modalities_text = cursor.fetchone()
        # The row is locked by this transaction now: merging the modality is race-free.
        modalities = [m for m in (modalities_text or "").split("\\") if m]
        if modality and modality not in modalities:
            candidate = "\\".join([*modalities, modality])
            if len(candidate) <= 64:
                cursor.execute(merge, [candidate, study_id])
    return study_id


def _study_params(parsed: ReceivedDataSet, study_uid: str, now) -> list:
    """The parameters of :func:`_study_sql`'s upsert for the instance ``parsed``, whose
    header has the values decoded already."""
    values = [_text(parsed, keyword)[:size] for _field, keyword, size in _STUDY_FIELDS]
    modality = _text(parsed, "Modality")
    stamp = connection.ops.adapt_datetimefield_value(now)
    return [study_uid, *values, modality if len(modality) <= 64 else "", stamp, stamp, None]


@functools.cache
def _study_sql(merge_in_sql: bool = False) -> tuple[str, str]:
    """The study upsert (INSERT ... ON CONFLICT ... RETURNING id, modalities) and the
    modalities update, built once. ``merge_in_sql`` (PostgreSQL): the upsert adds the
    instance's modality to the study's itself."""
    qn = connection.ops.quote_name
    table = qn(ReceivedStudy._meta.db_table)
    fields = [field for field, _keyword, _size in _STUDY_FIELDS]
    columns = ["study_instance_uid", *fields, "modalities", "first_received_at",
               "last_received_at", "study_routed_at"]
    updates = [f"{qn('last_received_at')} = EXCLUDED.{qn('last_received_at')}",
               # A study that grows after it was routed as a whole is routed again once quiet.
               f"{qn('study_routed_at')} = NULL"]
    updates += [
        f"{qn(field)} = CASE WHEN EXCLUDED.{qn(field)} = '' THEN {table}.{qn(field)} "
        f"ELSE EXCLUDED.{qn(field)} END"
        for field in fields
    ]
    if merge_in_sql:
        old, new = f"{table}.{qn('modalities')}", f"EXCLUDED.{qn('modalities')}"
        updates.append(
            f"{qn('modalities')} = CASE WHEN {new} = '' "
            f"OR strpos('\\' || {old} || '\\', '\\' || {new} || '\\') > 0 THEN {old} "
            f"WHEN {old} = '' THEN {new} "
            f"WHEN length({old}) + 1 + length({new}) <= 64 THEN {old} || '\\' || {new} "
            f"ELSE {old} END")
    upsert = (
        f"INSERT INTO {table} ({', '.join(qn(c) for c in columns)}) "
        f"VALUES ({', '.join(['%s'] * len(columns))}) "
        f"ON CONFLICT ({qn('study_instance_uid')}) DO UPDATE SET {', '.join(updates)} "
        f"RETURNING {qn('id')}, {qn('modalities')}"
    )
    merge = f"UPDATE {table} SET {qn('modalities')} = %s WHERE {qn('id')} = %s"
    return upsert, merge


def _text(parsed: ReceivedDataSet, keyword: str) -> str:
    value = parsed.header.get(keyword)
    if isinstance(value, str):
        return value
    # Not a single short value: absent, multi-valued, or over the header's size limit.
    try:
        if not parsed.has(tag_for_keyword(keyword)):
            return ""
        value = parsed.dataset.get(keyword)
    except Exception:
        return ""
    return "" if value is None else str(value).replace("\x00", "").strip()


# Creating, writing and fsyncing the file wait on the disk with the GIL released; a few threads
# serve every association.
_writers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="store-writer")


class _TempFile:
    """An instance's bytes, written and fsynced, before they have their final name: a file
    without a name (``fd``, Linux's O_TMPFILE), or a named temporary file (``path``) where
    the file system has no such files."""

    def __init__(self, fd: int | None = None, path: str | None = None) -> None:
        self.fd, self.path = fd, path
        self.placed: tuple[Path, int, int] | None = None  # final name, device, inode

    def __del__(self) -> None:
        # Dropped on a path that did not discard it (an interrupt): an unnamed file's space
        # is only freed once its descriptor is closed.
        if self.fd is not None and self.path is None:
            os.close(self.fd)

    def move_to(self, final: Path) -> None:
        """Give the file the name ``final`` (replacing a file there: no row names it), not
        yet durable: :func:`_fsync_dir` makes it so."""
        if self.path is not None:
            stat = os.stat(self.path)
            os.replace(self.path, final)
            self.path, self.placed = None, (final, stat.st_dev, stat.st_ino)
            return
        stat = os.fstat(self.fd)
        directory = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                _link(self.fd, directory, final.name)
            except FileExistsError:  # left by a process that died before its commit
                os.unlink(final.name, dir_fd=directory)
                _link(self.fd, directory, final.name)
        finally:
            os.close(directory)
        self.placed = (final, stat.st_dev, stat.st_ino)
        self.discard()

    def unplace(self) -> None:
        """Remove the file from its final name, unless another store has put its own there
        meanwhile (once this one's transaction rolled back, nothing held that name)."""
        if self.placed is None:
            return
        final, device, inode = self.placed
        try:
            stat = os.stat(final)
        except FileNotFoundError:
            return
        if (stat.st_dev, stat.st_ino) == (device, inode):
            _discard(str(final))

    def discard(self) -> None:
        """Remove the file if it has not been given its final name."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.path is not None:
            _discard(self.path)
            self.path = None


def _link(fd: int, directory: int, name: str) -> None:
    # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N, as open(2) describes for O_TMPFILE; a
    # directory fd makes Python call linkat, not link, which would not follow the link.
    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=directory, follow_symlinks=True)


# Errors that say nothing about whether the file system has unnamed files: asked again later.
_PASSING_ERRORS = frozenset({errno.ENOENT, errno.ENOSPC, errno.EDQUOT, errno.EMFILE,
                             errno.ENFILE, errno.ENOMEM, errno.EIO, errno.EINTR, errno.EAGAIN})
_unnamed_files: dict[Path, bool] = {}


def _unnamed_files_work(directory: Path) -> bool:
    """Whether files without a name can be created in ``directory`` and linked into it
    (Linux, a file system with O_TMPFILE, /proc mounted): probed once per directory, again
    after an error that does not settle it (a directory not there yet, a full disk)."""
    known = _unnamed_files.get(directory)
    if known is not None:
        return known
    works = _probe_unnamed_files(directory)
    if works is not None:
        _unnamed_files[directory] = works
        if not works:
            logger.info("%s has no files without a name (O_TMPFILE): received instances are "
                        "written to named temporary files there", directory)
    return bool(works)


def _probe_unnamed_files(directory: Path) -> bool | None:
    probe = directory / f".probe-{os.getpid()}-{time.monotonic_ns()}.part"
    try:
        fd = _open_unnamed(directory)
    except AttributeError:  # not Linux
        return False
    except OSError as exc:
        return None if exc.errno in _PASSING_ERRORS else False
    try:
        handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _link(fd, handle, probe.name)
        finally:
            os.close(handle)
        os.unlink(probe)
        return True
    except OSError as exc:
        # The directory is there (the file was created in it): ENOENT means no /proc.
        return None if exc.errno in _PASSING_ERRORS - {errno.ENOENT} else False
    finally:
        os.close(fd)


def _open_unnamed(directory: Path) -> int:
    return os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)


def _new_temp(directory: Path) -> _TempFile:
    if _unnamed_files_work(directory):
        return _TempFile(fd=_open_unnamed(directory))
    fd, path = tempfile.mkstemp(dir=directory, suffix=".part")
    return _TempFile(fd=fd, path=path)


class _Spares:
    """Files without a name opened ahead, for the next instances: creating a file waits for
    the file system's journal, which every fsync keeps busy (~0.8 ms each under load, on
    the association's way to its answer). Only for the latest directory asked for (the
    server has one), at most ``SPARES``; a process that dies leaves nothing behind."""

    SPARES = 2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._directory: Path | None = None
        self._fds: list[int] = []

    def take(self, directory: Path) -> _TempFile:
        with self._lock:
            if directory == self._directory and self._fds:
                return _TempFile(fd=self._fds.pop())
        return _new_temp(directory)

    def refill(self, directory: Path) -> None:
        if not _unnamed_files_work(directory):
            return
        with self._lock:
            if directory != self._directory:
                for fd in self._fds:
                    os.close(fd)
                self._directory, self._fds = directory, []
            if len(self._fds) >= self.SPARES:
                return
        spare = _new_temp(directory)
        with self._lock:
            if directory == self._directory and len(self._fds) < self.SPARES:
                self._fds.append(spare.fd)
                spare.fd = None  # the list owns it now
                return
        spare.discard()


_spares = _Spares()


def _write_temp(directory: Path, data: bytes) -> Future:
    """Start writing ``data`` to a new temporary file in ``directory``, fsynced; return the
    future of its :class:`_TempFile`. A failure leaves nothing behind."""
    written = _writers.submit(_write_synced, directory, data)
    # Once the association has its file: the writer opens one ahead for a later instance.
    written.add_done_callback(lambda _future: _refill(directory))
    return written


def _write_synced(directory: Path, data: bytes) -> _TempFile:
    _make_dirs(directory)
    temp = _spares.take(directory)
    try:
        with memoryview(data) as view:
            written = 0
            while written < len(view):
                written += os.write(temp.fd, view[written:])
        os.fsync(temp.fd)
        if temp.path is not None:
            os.close(temp.fd)
            temp.fd = None
    except BaseException:
        temp.discard()
        raise
    return temp


def _refill(directory: Path) -> None:
    try:
        _spares.refill(directory)
    except OSError:
        logger.exception("cannot open files ahead in %s", directory)


def _written(future: Future) -> _TempFile:
    """The temporary file once written and fsynced; a refusal when that failed."""
    try:
        return future.result()
    except Exception as exc:
        raise _write_refused(exc) from None


def _write_refused(exc: Exception) -> StoreRefused:
    full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    status = StoreStatus.OUT_OF_RESOURCES if full else StoreStatus.CANNOT_WRITE
    return StoreRefused(status, f"instance could not be written: {type(exc).__name__}")


def _discard_written(future: Future) -> None:
    """Remove the temporary file of an instance not kept (once it is written)."""
    try:
        temp = future.result()
    except Exception:
        return  # a failed write leaves nothing
    temp.discard()


# A temporary file is written within a C-STORE (seconds at most); one this old was left by a
# process that died storing it.
INCOMING_MAX_AGE_SECONDS = 3600


def remove_abandoned_incoming(config: StorageConfig | None = None,
                              older_than: float = INCOMING_MAX_AGE_SECONDS) -> int:
    """Periodic: delete the named temporary files under ``store/.incoming`` that no C-STORE
    is writing any more (their process was killed mid-store; their instance was never
    acknowledged), where the file system has no unnamed files. Returns how many."""
    config = config or StorageConfig.from_settings()
    cutoff = time.time() - older_than
    removed = 0
    try:
        entries = list(os.scandir(config.incoming_dir))
    except FileNotFoundError:
        return 0
    except OSError:
        logger.exception("cannot list %s", config.incoming_dir)
        return 0
    for entry in entries:
        try:
            if (entry.name.endswith(".part") and entry.is_file(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_mtime < cutoff):
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
        except OSError:  # one file we may not remove must not stop retention
            logger.exception("cannot remove %s", entry.path)
    if removed:
        logger.warning("removed %d temporary files abandoned in %s", removed,
                       config.incoming_dir)
    return removed


def _make_dirs(directory: Path) -> None:
    """Create missing directories, fsyncing each parent so a new directory survives a crash."""
    missing = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        logger.exception("could not remove %s", path)
