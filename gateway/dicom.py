"""The gateway's one DICOM Application Entity: which services it offers and which app handler
answers each. To add a service (storage SCP, MPPS), append a :class:`Service` to
:func:`services`; the AE, its presentation contexts and its event bindings follow from that list.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from pydicom import config as pydicom_config
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification
from pynetdicom.transport import ThreadedAssociationServer

from gateway.dimse import answer_stores_directly, install_prompt_waits, read_in_large_blocks
from routing.dicom_handlers import (
    STORAGE_TRANSFER_SYNTAXES,
    storage_handlers,
    storage_sop_classes,
)
from routing.storage import StorageConfig
from worklist.dicom_handlers import WorklistConfig, handle_find

logger = logging.getLogger(__name__)

# pydicom warns about (and logs) each received value that breaks its VR, value included:
# that is PHI in the log. The worklist validates its keys itself and answers 0xA900.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
# Identifiers are PHI and logging them costs 10-20% per answer.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
# The standard handlers format a log line per message even when the logger drops it.
_config.LOG_HANDLER_LEVEL = "none"
# Association threads wake when there is work instead of polling every millisecond.
install_prompt_waits()

# Explicit VR first: it carries the VR, so keys the gateway does not know come back typed.
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

Handler = tuple[evt.EventType, Callable[..., Any]] | tuple[evt.EventType, Callable[..., Any], list]


@dataclass(frozen=True)
class Service:
    """One DICOM service the AE offers as SCP: its SOP classes and the handlers that answer,
    and the transfer syntaxes it accepts (None: :data:`TRANSFER_SYNTAXES`)."""

    name: str
    sop_classes: list[str]
    handlers: list[Handler] = field(default_factory=list)
    transfer_syntaxes: list[str] | None = None


def set_tcp_nodelay(event) -> None:
    """EVT_CONN_OPEN: pynetdicom leaves Nagle's algorithm on, which delays every small
    C-FIND response by the peer's delayed ACK (~40-90 ms per answer)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # the peer may already have gone
            pass


def answer_stores_promptly(event) -> None:
    """EVT_CONN_OPEN: PDUs are read in large blocks, and C-STORE responses are written by the
    thread that stored the instance (see :mod:`gateway.dimse`)."""
    read_in_large_blocks(event.assoc)
    answer_stores_directly(event.assoc)


def services(
    worklist: WorklistConfig | None = None, storage: StorageConfig | None = None
) -> list[Service]:
    """The services of the gateway AE, with their handlers bound to their configuration."""
    worklist = worklist or WorklistConfig(
        restrict_to_calling_station=settings.MWL_RESTRICT_TO_CALLING_STATION,
        max_results=settings.MWL_MAX_RESULTS,
    )
    return [
        # C-ECHO is answered by pynetdicom's default handler (Success).
        Service("verification", [Verification]),
        Service(
            "modality worklist",
            [ModalityWorklistInformationFind],
            [(evt.EVT_C_FIND, handle_find, [worklist])],
        ),
        # Every storage SOP class, and unknown ones accepted on request (see the handlers).
        Service(
            "storage",
            storage_sop_classes(),
            storage_handlers(storage or StorageConfig.from_settings()),
            STORAGE_TRANSFER_SYNTAXES,
        ),
    ]


def build_ae(ae_title: str | None = None, offered: list[Service] | None = None) -> AE:
    """The AE with a presentation context for every SOP class of the offered services, with
    the service's transfer syntaxes (default: Explicit then Implicit VR Little Endian)."""
    ae = AE(ae_title=ae_title or settings.DICOM_AE_TITLE)
    ae.maximum_pdu_size = 0  # no limit on what the peer may send us
    ae.maximum_associations = settings.DICOM_MAX_ASSOCIATIONS
    for service in offered if offered is not None else services():
        for sop_class in service.sop_classes:
            ae.add_supported_context(sop_class, service.transfer_syntaxes or TRANSFER_SYNTAXES)
    return ae


def event_handlers(offered: list[Service] | None = None) -> list[Handler]:
    """Every handler to bind when the server starts, transport handlers first."""
    handlers: list[Handler] = [
        (evt.EVT_CONN_OPEN, set_tcp_nodelay),
        (evt.EVT_CONN_OPEN, answer_stores_promptly),
    ]
    for service in offered if offered is not None else services():
        handlers.extend(service.handlers)
    return handlers


def start_server(
    host: str | None = None,
    port: int | None = None,
    ae_title: str | None = None,
    offered: list[Service] | None = None,
) -> ThreadedAssociationServer:
    """Start the AE listening in background threads and return its server; its
    ``server_address`` holds the bound port (useful with port 0). Stop it with
    ``server.shutdown()``."""
    offered = offered if offered is not None else services()
    ae = build_ae(ae_title, offered)
    address = (
        host if host is not None else settings.DICOM_HOST,
        port if port is not None else settings.DICOM_PORT,
    )
    server = ae.start_server(address, block=False, evt_handlers=event_handlers(offered))
    logger.info("DICOM AE %s listening on %s:%s", ae.ae_title, *server.server_address[:2])
    return server


def stop_server(server: ThreadedAssociationServer, grace: float = 10.0) -> None:
    """Stop accepting associations, give the ones in progress ``grace`` seconds to finish
    their current answer and release, then abort what is left."""
    server.shutdown()
    deadline = time.monotonic() + grace
    for assoc in server.active_associations:
        assoc.join(timeout=max(0.0, deadline - time.monotonic()))
        if assoc.is_alive():
            assoc.abort()
