"""DICOM event handlers of the worklist app. The gateway's AE binds them with their
configuration in the bind tuple: ``(evt.EVT_C_FIND, handle_find, [config])``.

Each association runs in its own thread, so a handler opens and closes its own Django
database connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from enum import IntEnum

from django.db import close_old_connections, connection, transaction
from pydicom.dataset import Dataset
from pynetdicom.events import Event

from gateway import audit

from .models import WorklistQuery
from .mwl import InvalidIdentifier, UnreadableIdentifier, WorklistOptions, find_worklist

logger = logging.getLogger(__name__)


class FindStatus(IntEnum):
    """C-FIND response statuses the worklist SCP sends (PS3.4 C.4.1.1.4, PS3.7 C)."""

    SUCCESS = 0x0000
    PENDING = 0xFF00
    CANCEL = 0xFE00
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    UNABLE_TO_PROCESS = 0xC001


@dataclass(frozen=True)
class WorklistConfig:
    """What the MWL C-FIND handler needs from settings, fixed when the AE is built."""

    restrict_to_calling_station: bool = False
    max_results: int = 5000
    chunk_size: int = 500


def handle_find(
    event: Event, config: WorklistConfig
) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """EVT_C_FIND for the Modality Worklist Information Model - FIND.

    Yields ``(0xFF00, identifier)`` per worklist item, at most ``config.max_results`` of them
    (the cap ends with Success and a warning in the log), stops with Cancel on C-CANCEL, and
    answers an identifier it cannot use with 0xA900 and an Error Comment. Every query is
    recorded as a :class:`WorklistQuery`.
    """
    close_old_connections()
    started = time.monotonic()
    requestor = event.assoc.requestor
    record = WorklistQuery(
        calling_ae=(requestor.ae_title or "").strip()[:16],
        called_ae=_called_ae(event)[:16],
        peer=f"{requestor.address}:{requestor.port}"[:100],
    )
    status: FindStatus | None = None  # None until a final response is sent
    answers: Generator[Dataset, None, None] | None = None
    try:
        try:
            identifier = event.identifier
            options = WorklistOptions(
                restrict_to_station=record.calling_ae
                if config.restrict_to_calling_station
                else None
            )
            try:
                answers = find_worklist(
                    identifier,
                    options,
                    limit=config.max_results + 1,
                    chunk_size=config.chunk_size,
                    implicit_vr=event.context.transfer_syntax.is_implicit_VR,
                )
            finally:
                # After matching: converting to JSON decodes every element, which would hide
                # a value cut short from the check find_worklist makes.
                record.keys = _keys_as_json(identifier)
        except InvalidIdentifier as exc:
            status = FindStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
            record.error_text = str(exc)
            yield _failure(status, str(exc), exc.tag), None
            return
        except Exception as exc:  # UnreadableIdentifier, or pydicom failing to decode at all
            status = FindStatus.UNABLE_TO_PROCESS
            detail = str(exc) if isinstance(exc, UnreadableIdentifier) else type(exc).__name__
            record.error_text = f"unparsable identifier: {detail}"
            yield _failure(status, "the identifier cannot be parsed"), None
            return

        for answer in answers:
            if event.is_cancelled:
                status = FindStatus.CANCEL
                yield status, None
                return
            if record.answers >= config.max_results:
                record.error_text = f"answer capped at MWL_MAX_RESULTS={config.max_results}"
                logger.warning(
                    "MWL query by %s capped at %d answers", record.calling_ae, config.max_results
                )
                break
            record.answers += 1
            yield FindStatus.PENDING, answer
        status = FindStatus.SUCCESS
        yield status, None
    except Exception as exc:
        logger.exception("MWL query by %s failed", record.calling_ae)
        record.error_text = f"{type(exc).__name__}: {exc}"[:2000]
        status = FindStatus.UNABLE_TO_PROCESS
        yield _failure(status, "the worklist could not be read"), None
    finally:
        if status is None:
            record.error_text = record.error_text or "association ended before the final response"
        record.status = f"{status:04X}" if status is not None else ""
        record.duration_ms = (time.monotonic() - started) * 1000
        try:
            if answers is not None:
                answers.close()  # its server-side cursor, before the connection goes
            with transaction.atomic():
                record.save()
                audit.record("dicom.worklist.query", record, {
                    "calling_ae": record.calling_ae, "peer": record.peer,
                    "answers": record.answers, "status": record.status,
                    "error": record.error_text,
                }, actor=f"dicom:{record.calling_ae}")
        except Exception:
            logger.exception("could not record the MWL query by %s", record.calling_ae)
        finally:
            connection.close()


def _failure(status: int, comment: str, tag: int | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = int(status)
    ds.ErrorComment = comment[:64]
    if tag is not None:
        ds.OffendingElement = [tag]
    return ds


def _called_ae(event: Event) -> str:
    primitive = getattr(event.assoc.requestor, "primitive", None)
    return (getattr(primitive, "called_ae_title", "") or "").strip()


def _keys_as_json(identifier: Dataset) -> dict:
    """The query as DICOM JSON, for the audit trail; elements that cannot be converted are
    kept as their repr so a malformed query is still recorded."""
    try:
        return identifier.to_json_dict()
    except Exception:
        keys = {}
        for tag in list(identifier.keys()):
            try:
                keys[f"{int(tag):08X}"] = repr(identifier[tag].value)[:200]
            except Exception:
                keys[f"{int(tag):08X}"] = "<undecodable>"
        return keys
