"""What the gateway writes and reads on a DICOM connection itself; how pynetdicom waits.

pynetdicom runs each association as two polling threads: the DUL thread reads the socket and
sends what is queued for it, sleeping 1 ms whenever a turn found nothing to do; the association
thread looks for a complete message every 1 ms. Every hand-over between them, and from the
network, waited up to a millisecond, several times per instance, and each message went through
pydicom to be encoded and through the DUL's queue and state machine to be sent, one primitive
per PDU. For C-STORE, the gateway's busiest message, that cost more than storing the instance.

So, on the same associations and with pynetdicom doing everything else (negotiation, decoding
messages, timeouts, release, abort):

- :func:`install_prompt_waits`: the two threads' polling sleeps end as soon as there is
  something to do (the DUL thread waits for the socket to become readable, the association
  thread for a message in its queue). Where nothing else can need them, they last longer than
  pynetdicom's 1 ms, each of which cost ~3% of a core per thread of an idle association: an
  idle DUL thread waits until another thread queues something for it (only its timers wait
  up to DUL_IDLE_WAIT), the reactor of an association that only sends requests polls every
  SENDER_REACTOR_WAIT.
- :func:`send_stores_directly`: every C-STORE request of a sending association goes to the
  socket in P-DATA-TF PDUs built here, a block of them per system call: a file's tail straight
  from disk (:func:`write_file_message`), a data set pynetdicom encoded from memory
  (:func:`write_bytes_message`) (:mod:`routing.scu`).
- :func:`answer_stores_directly`: the C-STORE response of the storage SCP is encoded here and
  written by the thread that handled the request.
- :func:`read_in_large_blocks`: the DUL thread reads each PDU with a few ``recv_into`` calls
  into one buffer (pynetdicom reads 4 KB per system call and grows the buffer each time, 32
  calls per 128 KB PDU), and hands a P-DATA-TF PDU's values to DIMSE as views of that buffer,
  as its state machine's DT-2 action would, without pynetdicom's PDU objects and copies.
  Together they take about a third of pynetdicom's CPU per received CT instance away.
- The two C-STORE messages are also decoded here, into the primitives pynetdicom's decoder
  would queue (tests compare them): a request whose command set comes whole in one PDV, its
  data set fragments joined once at the end (:func:`_receive_store_request`), and a response
  in one PDV (:func:`_queue_store_response`). pynetdicom decodes each command set through
  pydicom (~120 us) and copies each fragment into a growing buffer. Anything unusual is left
  to pynetdicom's decoder.

Either write happens only while the DUL has nothing queued, so messages keep their order, and
fails like pynetdicom's own send does: the DUL is told the transport closed (PS3.8 9.2, Evt17).
The encoders produce the bytes pynetdicom's would (tests compare them). pynetdicom is pinned in
pyproject.toml; the tests run every DICOM exchange through these paths.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pynetdicom.association
import pynetdicom.dul
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ as C_STORE_RQ_MESSAGE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA

logger = logging.getLogger(__name__)

# PS3.7 E.1-1, 9.3.1: command fields, and Command Data Set Type (0x0101: no data set).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
DATA_SET_PRESENT = 0x0001
NO_DATA_SET = 0x0101
# PS3.8 9.3.5: a PDV item is its length (4 bytes), the context ID and the message control
# header (1 byte each) and the fragment; a PDU's maximum length counts those 6 bytes.
PDV_OVERHEAD = 6
COMMAND_FRAGMENT, LAST_FRAGMENT = 0x01, 0x02
# Fragment size when the peer sets no maximum; file data read and written this much at a time.
UNLIMITED_FRAGMENT = 1 << 20
WRITE_BLOCK = 1 << 20
# pynetdicom's association reactor sleeps this long between looks at its message queue.
REACTOR_DELAY = 0.001


class ConnectionBroken(OSError):
    """Writing to the peer failed part-way: the association cannot carry anything more."""


# --- Encoding -----------------------------------------------------------------------------


def _element(element: int, value: bytes, pad: bytes = b"\x00") -> bytes:
    # Group 0000, Implicit VR Little Endian (PS3.7 6.3.1), values padded to even length.
    value += pad * (len(value) % 2)
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _command(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def c_store_rq(message_id: int, sop_class: str, sop_instance: str, priority: int) -> bytes:
    """The encoded command set of a C-STORE request with a data set."""
    return _command(
        _element(0x0002, sop_class.encode("ascii")),
        _element(0x0100, _us(C_STORE_RQ)),
        _element(0x0110, _us(message_id)),
        _element(0x0700, _us(priority)),
        _element(0x0800, _us(DATA_SET_PRESENT)),
        _element(0x1000, sop_instance.encode("ascii")),
    )


def c_store_rsp(message_id: int, sop_class: str, sop_instance: str, status: int,
                error_comment: str = "") -> bytes:
    """The encoded command set of a C-STORE response (Error Comment only when given)."""
    return _command(
        _element(0x0002, sop_class.encode("ascii")),
        _element(0x0100, _us(C_STORE_RSP)),
        _element(0x0120, _us(message_id)),
        _element(0x0800, _us(NO_DATA_SET)),
        _element(0x0900, _us(status)),
        *([_element(0x0902, error_comment.encode("ascii"), b" ")] if error_comment else []),
        _element(0x1000, sop_instance.encode("ascii")),
    )


def p_data_tf(context_id: int, data: memoryview, fragment: int, control: int,
              ends: bool) -> list:
    """The P-DATA-TF PDUs carrying ``data`` in fragments of at most ``fragment`` bytes, one
    PDV each, as a list of byte strings to write in order. ``control``: COMMAND_FRAGMENT or 0;
    ``ends``: the last fragment of ``data`` is the last of the command or data set."""
    parts: list = []
    for start in range(0, len(data), fragment):
        chunk = data[start:start + fragment]
        last = ends and start + fragment >= len(data)
        header = control | (LAST_FRAGMENT if last else 0)
        parts.append(struct.pack(">BBIIBB", 0x04, 0x00, len(chunk) + PDV_OVERHEAD,
                                 len(chunk) + 2, context_id, header))
        parts.append(chunk)
    return parts


def _fragment(max_pdu: int) -> int:
    return (max_pdu - PDV_OVERHEAD) if max_pdu else UNLIMITED_FRAGMENT


def _sendall(sock: socket.socket, parts: list) -> None:
    try:
        sock.sendall(b"".join(parts))
    except OSError as exc:
        raise ConnectionBroken(exc.strerror or str(exc)) from exc


# --- Writing ------------------------------------------------------------------------------


def _write(sock: socket.socket, context_id: int, max_pdu: int, command: bytes,
           blocks: Iterator[tuple[bytes, bool]]) -> None:
    """Write ``command`` then the data set given as (block, is last) pairs, each block a
    whole number of fragments but the last. Once anything has been written, any failure is a
    :class:`ConnectionBroken`: the peer holds part of a message the association cannot finish."""
    fragment = _fragment(max_pdu)
    parts = p_data_tf(context_id, memoryview(command), fragment, COMMAND_FRAGMENT, True)
    written = False
    try:
        for block, last in blocks:
            parts += p_data_tf(context_id, memoryview(block), fragment, 0, last)
            _sendall(sock, parts)
            written, parts = True, []
    except ConnectionBroken:
        raise
    except Exception as exc:
        if written:
            raise ConnectionBroken(f"stopped part-way through a message: {exc}") from exc
        raise


def _block_size(max_pdu: int) -> int:
    fragment = _fragment(max_pdu)
    return max(1, WRITE_BLOCK // fragment) * fragment


def write_file_message(sock: socket.socket, context_id: int, max_pdu: int, command: bytes,
                       path: Path, offset: int) -> None:
    """Write a DIMSE message: ``command``, then the data set that starts at ``offset`` in the
    file ``path``, in P-DATA-TF PDUs of at most ``max_pdu`` bytes (0: no limit)."""
    block = _block_size(max_pdu)

    def blocks() -> Iterator[tuple[bytes, bool]]:
        with open(path, "rb") as f:
            remaining = os.fstat(f.fileno()).st_size - offset
            f.seek(offset)
            while remaining > 0:
                data = f.read(min(block, remaining))
                if len(data) < min(block, remaining):
                    raise OSError(f"{path.name} became shorter while it was being sent")
                remaining -= len(data)
                yield data, remaining == 0

    _write(sock, context_id, max_pdu, command, blocks())


def write_bytes_message(sock: socket.socket, context_id: int, max_pdu: int, command: bytes,
                        data_set: bytes) -> None:
    """Write a DIMSE message: ``command``, then the encoded ``data_set``."""
    block = _block_size(max_pdu)
    view = memoryview(data_set)
    _write(sock, context_id, max_pdu, command, (
        (view[start:start + block], start + block >= len(view))
        for start in range(0, len(view), block)))


def _writable(assoc) -> socket.socket | None:
    """The association's socket when the thread at hand may write to it: nothing is waiting
    in the DUL's queue (it would go first) and the connection is there."""
    if not assoc.dul.to_provider_queue.empty():
        return None
    return getattr(assoc.dul.socket, "socket", None)


def _write_or_close(assoc, write) -> None:
    try:
        write()
    except ConnectionBroken:
        # As pynetdicom does when its own send fails: close, which tells the DUL once (Evt17).
        if assoc.dul.socket is not None:
            assoc.dul.socket.close()
        raise


def send_stores_directly(assoc) -> None:
    """Have ``assoc`` write its C-STORE requests itself: the data set from a file's tail
    (pynetdicom's chunked sending from a path) with :func:`write_file_message`, or as encoded
    by pynetdicom with :func:`write_bytes_message`. Every C-STORE of the association goes this
    way, so none of its PDUs can still be on their way through the DUL thread when the next
    one is written; anything else goes through pynetdicom. A failed write raises
    :class:`ConnectionBroken` to the sender, the connection closed."""
    dimse = assoc.dimse
    send_msg = dimse.send_msg

    def send(primitive, context_id: int) -> None:
        located = getattr(primitive, "_dataset_path", None)
        encoded = primitive.DataSet.getvalue() if type(primitive) is C_STORE and isinstance(
            primitive.DataSet, BytesIO) else None
        sock = _writable(assoc)
        if (type(primitive) is not C_STORE or sock is None
                or primitive.MessageIDBeingRespondedTo is not None
                or primitive.MoveOriginatorApplicationEntityTitle
                or not (encoded or (located and os.path.getsize(located[0]) > located[1]))):
            send_msg(primitive, context_id)
            return
        command = c_store_rq(primitive.MessageID, str(primitive.AffectedSOPClassUID),
                             str(primitive.AffectedSOPInstanceUID), primitive.Priority)
        max_pdu = dimse.maximum_pdu_size
        if encoded:
            _write_or_close(assoc, lambda: write_bytes_message(
                sock, context_id, max_pdu, command, encoded))
        else:
            _write_or_close(assoc, lambda: write_file_message(
                sock, context_id, max_pdu, command, Path(located[0]), located[1]))

    dimse.send_msg = send


# The priority Association.send_c_store gives by default (PS3.7 9.1.1.1.7: 0x0002 LOW).
LOW = 0x0002


def store_file(assoc, context_id: int, message_id: int, sop_class: str, sop_instance: str,
               path: Path, offset: int) -> tuple[bool, C_STORE | None]:
    """Send a C-STORE request for the data set at ``offset`` in the file ``path`` and wait
    for its response, as ``Association.send_c_store`` does with a file on an association of
    :func:`send_stores_directly` and :func:`leave_responses_to_the_sender`, without what it
    spends ~0.3 ms of CPU on per instance: reading the file meta through pydicom, building
    the request primitive, turning the response into a Dataset. The caller has read the
    UIDs, the offset and the context.

    Returns (sent, response): sent False, having done nothing, while the DUL has something
    queued (pynetdicom's send then goes after it); response None when none came within the
    DIMSE timeout or it was not a valid C-STORE response: the association is then aborted,
    as pynetdicom does. A failed write raises :class:`ConnectionBroken`, the connection
    closed."""
    sock = _writable(assoc)
    if sock is None:
        return False, None
    command = c_store_rq(message_id, sop_class, sop_instance, LOW)
    dimse = assoc.dimse
    sender = _SENDERS_ONLY[assoc]
    # pynetdicom pauses the reactor meanwhile; this one runs on, but its network idle timer,
    # which only a PDU received restarts, must not expire while a long data set is written
    # or a slow PACS stores it: the DIMSE timeout bounds that wait.
    sender.outstanding += 1
    try:
        _write_or_close(assoc, lambda: write_file_message(
            sock, context_id, dimse.maximum_pdu_size, command, path, offset))
        _context_id, response = dimse.get_msg(block=True)
    finally:
        sender.outstanding -= 1
    if response is None:
        assoc._handle_no_response()  # as send_c_store: abort unless already ended
        return True, None
    if type(response) is not C_STORE or not response.is_valid_response:
        logger.error("invalid response to a C-STORE request; aborting the association")
        assoc.abort()
        return True, None
    return True, response


class _Sender:
    """A sending association's state here: requests waiting for their response, and what
    wakes its reactor's wait when pynetdicom pauses it (``_Checkpoint``)."""

    def __init__(self) -> None:
        self.outstanding = 0
        self.wake = threading.Event()


class _Checkpoint(threading.Event):
    """``Association._reactor_checkpoint`` of a sending association: clearing it (pausing
    the reactor, which send_c_store and release() then wait for) also wakes the reactor."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self.set()
        self._wake = wake

    def clear(self) -> None:
        super().clear()
        self._wake.set()


# Requestor associations whose reactor thread leaves every message to the sender.
_SENDERS_ONLY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def leave_responses_to_the_sender(assoc) -> None:
    """On an association used only to send requests, the responses are for the thread that
    sent them, never for the association's reactor thread.

    pynetdicom pauses that thread around each request, but the pause can be stale: a request
    sent right after the previous response finds the reactor still flagged as paused, and the
    reactor, waking late, took the new response off the queue as if it were a request. The
    sender then waited in vain until the peer dropped the association (Orthanc: 30 s). It
    was rare while sending took long; once writing a request took a fraction of a
    millisecond, it happened every few hundred instances."""
    dimse = assoc.dimse
    get_msg = dimse.get_msg

    def get(block: bool = False):
        if not block and threading.current_thread() is assoc:
            return None, None
        return get_msg(block=block)

    dimse.get_msg = get
    sender = _SENDERS_ONLY[assoc] = _Sender()
    assoc._reactor_checkpoint = _Checkpoint(sender.wake)
    idle_timer_expired = assoc.dul.idle_timer_expired
    assoc.dul.idle_timer_expired = lambda: not sender.outstanding and idle_timer_expired()


def answer_stores_directly(assoc) -> None:
    """Have ``assoc`` (an SCP's) write its C-STORE responses itself, encoded with
    :func:`c_store_rsp`; responses with other status elements, and every other message, go
    through pynetdicom. A failed write only closes the connection, as pynetdicom's would."""
    dimse = assoc.dimse
    send_msg = dimse.send_msg

    def send(primitive, context_id: int) -> None:
        sock = _writable(assoc)
        comment = primitive.ErrorComment if type(primitive) is C_STORE else None
        if (type(primitive) is not C_STORE or sock is None
                or primitive.MessageIDBeingRespondedTo is None
                or primitive.OffendingElement is not None
                or not (comment or "").isascii()):
            send_msg(primitive, context_id)
            return
        command = c_store_rsp(primitive.MessageIDBeingRespondedTo,
                              str(primitive.AffectedSOPClassUID or ""),
                              str(primitive.AffectedSOPInstanceUID or ""),
                              primitive.Status, comment or "")
        if dimse.maximum_pdu_size and len(command) > _fragment(dimse.maximum_pdu_size):
            send_msg(primitive, context_id)
            return
        parts = p_data_tf(context_id, memoryview(command), len(command), COMMAND_FRAGMENT, True)
        try:
            _write_or_close(assoc, lambda: _sendall(sock, parts))
        except ConnectionBroken:
            pass

    dimse.send_msg = send


# --- Reading ------------------------------------------------------------------------------

# A PDU announces its length before it arrives: a buffer is allocated for at most this much
# of it ahead of the data, so that a garbled length does not allocate gigabytes.
READ_BLOCK = 1 << 20


def read_exactly(sock: socket.socket, size: int) -> bytearray:
    """``size`` bytes from ``sock``, fewer if the peer closes first, as pynetdicom's
    ``AssociationSocket.recv`` returns them (socket errors and timeouts propagate alike)."""
    blocks = []
    left = size
    while left:
        block = bytearray(min(left, READ_BLOCK))
        view = memoryview(block)
        filled = 0
        while filled < len(block):
            count = sock.recv_into(view[filled:])
            if not count:
                break
            filled += count
        left -= filled
        if filled < len(block):  # closed: what arrived, as pynetdicom returns it
            blocks.append(block[:filled])
            break
        blocks.append(block)
    if len(blocks) == 1:
        return blocks[0]
    return bytearray().join(blocks)


def read_in_large_blocks(assoc) -> None:
    """Have ``assoc``'s DUL thread read PDUs with :func:`read_exactly`, and hand the data of a
    P-DATA-TF PDU straight to DIMSE (:func:`_read_data_directly`)."""
    dul = assoc.dul
    transport = dul.socket
    if transport is None:
        return

    def recv(size: int) -> bytearray:
        return read_exactly(transport.socket, size)

    transport.recv = recv
    read_pdu = dul._read_pdu_data

    def read() -> None:
        if not _read_data_directly(assoc):
            _hand_over_incoming_store(assoc)
            read_pdu()

    dul._read_pdu_data = read


P_DATA_TF_TYPE = 0x04
_PDU_HEADER = struct.Struct(">BxL")
_PDV_LENGTH = struct.Struct(">L")
# Events whose handlers expect the PDU to go through pynetdicom's decoders and state machine.
_PDU_EVENTS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_FSM_TRANSITION, evt.EVT_DIMSE_RECV)


def _read_data_directly(assoc) -> bool:
    """Read the next PDU and hand its presentation data values to DIMSE as the state machine
    would (Sta6 + Evt10, action DT-2: a P-DATA indication), when it is a P-DATA-TF PDU in
    data transfer with nothing queued before it; False, having read nothing, otherwise.

    pynetdicom would copy each PDU three times on its way (into the buffer, to bytes, each
    value out of it) and build its PDU objects; here DIMSE gets views of the PDU as read. A
    PDU that ends early is Evt17 and an unreadable one Evt19, as in pynetdicom."""
    dul = assoc.dul
    sock = getattr(dul.socket, "socket", None)
    if (sock is None or isinstance(sock, ssl.SSLSocket)
            or dul.state_machine.current_state != "Sta6"
            or dul.event_queue.queue or dul._recv_pdu.queue
            or any(assoc.get_handlers(event) for event in _PDU_EVENTS)):
        return False
    try:
        header = sock.recv(_PDU_HEADER.size, socket.MSG_PEEK)
    except OSError:
        return False
    if len(header) < _PDU_HEADER.size or header[0] != P_DATA_TF_TYPE:
        return False
    length = _PDU_HEADER.unpack(header)[1]
    try:
        read_exactly(sock, _PDU_HEADER.size)
        body = read_exactly(sock, length)
    except OSError:
        body = None
    if body is None or len(body) < length:
        logger.error("Connection closed before the entire PDU was received")
        dul.event_queue.put("Evt17")  # transport closed
        return True
    values = _presentation_data_values(body)
    if values is None:
        logger.error("A P-DATA-TF PDU whose items do not fill it: aborting the association")
        dul.event_queue.put("Evt19")  # invalid PDU
        return True
    if not values:  # an empty P-DATA-TF PDU: nothing for DIMSE
        return True
    incoming = _receive_store_request(assoc, values)
    if incoming is not False:
        if incoming is None:
            logger.error("A C-STORE request's fragments out of order: aborting the association")
            dul.event_queue.put("Evt19")  # invalid PDU
        return True
    if _queue_store_response(assoc, values):
        return True
    primitive = P_DATA()
    primitive._presentation_data_value_list = values  # views: the setter wants bytes
    assoc.dimse.receive_primitive(primitive)
    return True


def _presentation_data_values(body: bytearray) -> list | None:
    """(context ID, message control header + fragment) of each PDV item of a P-DATA-TF PDU's
    body (PS3.8 9.3.5), as views of it; None if the items do not fill it exactly."""
    view = memoryview(body)
    values = []
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < PDV_OVERHEAD:
            return None
        length = _PDV_LENGTH.unpack_from(view, offset)[0]
        if length < 2 or offset + 4 + length > end:
            return None
        values.append((view[offset + 4], view[offset + 5:offset + 4 + length]))
        offset += 4 + length
    return values


class _IncomingStore:
    """A C-STORE request whose command set has been read, while its data set arrives."""

    def __init__(self, context_id: int, command: bytes, primitive: C_STORE) -> None:
        self.context_id, self.command, self.primitive = context_id, command, primitive
        self.fragments: list = []


def _hand_over_incoming_store(assoc) -> None:
    """Before pynetdicom reads a PDU itself (one this module leaves to it: a header that came
    in pieces, a handler bound meanwhile...), give it the C-STORE request being read here, as
    its decoder would hold it by now, so that it goes on with the rest of the data set."""
    incoming = getattr(assoc, "_incoming_store", None)
    if incoming is None:
        return
    assoc._incoming_store = None
    message = C_STORE_RQ_MESSAGE()
    message.context_id = incoming.context_id
    message.encoded_command_set = BytesIO(incoming.command)
    message.command_set = decode(message.encoded_command_set, True, True)
    message.data_set = BytesIO(b"".join(incoming.fragments))
    message.data_set.seek(0, os.SEEK_END)
    assoc.dimse.message = message


def _receive_store_request(assoc, values: list) -> bool | None:
    """Read a P-DATA-TF PDU's values as part of a C-STORE request, the common case of what a
    storage SCP receives: its command set whole in one PDV, then its data set in fragments.
    The request goes on the DIMSE queue as pynetdicom's ``receive_primitive`` would put it,
    without decoding the command set through pydicom (~120 us per instance) or copying each
    fragment into a growing buffer: the data set is joined once, at its end.

    True once read; False, having done nothing, for anything else (pynetdicom reads it); None
    for fragments that cannot follow what came before (a command, or another context, in the
    middle of a data set): the caller aborts, as for any invalid PDU."""
    dimse = assoc.dimse
    incoming = getattr(assoc, "_incoming_store", None)
    if incoming is None:
        if dimse.message is not None or pynetdicom._config.STORE_RECV_CHUNKED_DATASET:
            return False
        context_id, item = values[0]
        if item[0] != COMMAND_FRAGMENT | LAST_FRAGMENT or len(values) > 1 and any(
                v[0] != context_id or v[1][0] & COMMAND_FRAGMENT for v in values[1:]):
            return False
        primitive = store_request(item[1:])
        if primitive is None:
            return False
        incoming = _IncomingStore(context_id, bytes(item[1:]), primitive)
        values = values[1:]
    for position, (context_id, item) in enumerate(values):
        last = item[0] & LAST_FRAGMENT
        if (context_id != incoming.context_id or item[0] & COMMAND_FRAGMENT
                or last and position != len(values) - 1):
            assoc._incoming_store = None
            return None
        incoming.fragments.append(item[1:])
        if last:
            assoc._incoming_store = None
            incoming.primitive.DataSet = BytesIO(b"".join(incoming.fragments))
            _queue(dimse, incoming.context_id, incoming.primitive)
            return True
    assoc._incoming_store = incoming
    return True


# What a C-STORE request may hold to be read here (PS3.7 9.3.1.1): group length, Affected SOP
# Class UID, Command Field, Message ID, Priority, Command Data Set Type, Affected SOP Instance
# UID. A store on behalf of a C-MOVE (Move Originator) goes through pynetdicom.
_STORE_RQ_ELEMENTS = frozenset({0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000})


def store_request(command: memoryview | bytes) -> C_STORE | None:
    """The C_STORE primitive of an encoded C-STORE request command set announcing a data set
    (DataSet not set yet), with the values pynetdicom's decoder gives; None for anything it
    might read differently."""
    elements = _command_elements(command)
    if elements is None or elements.keys() | {0x0000} != _STORE_RQ_ELEMENTS:
        return None
    numbers = {element: _us_value(elements[element])
               for element in (0x0100, 0x0110, 0x0700, 0x0800)}
    uids = {element: _text_value(elements[element]) for element in (0x0002, 0x1000)}
    if (None in numbers.values() or None in uids.values()
            or numbers[0x0100] != C_STORE_RQ or numbers[0x0800] == NO_DATA_SET):
        return None
    try:
        primitive = C_STORE()
        primitive.MessageID = numbers[0x0110]
        primitive.AffectedSOPClassUID = uids[0x0002]
        primitive.AffectedSOPInstanceUID = uids[0x1000]
        primitive.Priority = numbers[0x0700]
    except (TypeError, ValueError):  # as pynetdicom would refuse it, let it
        return None
    return primitive


# What a C-STORE response may hold to be read here (PS3.7 9.3.1.2): group length, Affected SOP
# Class UID, Command Field, Message ID Being Responded To, Command Data Set Type, Status, Error
# Comment, Affected SOP Instance UID. Anything else (Offending Element, Error ID...) goes
# through pynetdicom.
_STORE_RSP_ELEMENTS = frozenset({0x0000, 0x0002, 0x0100, 0x0120, 0x0800, 0x0900, 0x0902, 0x1000})
_ELEMENT_HEADER = struct.Struct("<HHI")
_US = struct.Struct("<H")


def _queue_store_response(assoc, values: list) -> bool:
    """A C-STORE response that came whole in one PDV goes on the DIMSE queue as pynetdicom's
    ``receive_primitive`` would put it, without decoding the command set through pydicom
    (~120 us of the worker's CPU per instance sent); False, having done nothing, otherwise."""
    dimse = assoc.dimse
    if len(values) != 1 or dimse.message is not None:
        return False
    context_id, item = values[0]
    if item[0] != COMMAND_FRAGMENT | LAST_FRAGMENT:
        return False
    primitive = store_response(item[1:])
    if primitive is None:
        return False
    _queue(dimse, context_id, primitive)
    return True


def _queue(dimse, context_id: int, primitive: C_STORE) -> None:
    """Put a complete message on the DIMSE queue as ``receive_primitive`` would, with the
    context ID ``message_to_primitive`` sets (a new C_STORE has no data set file already)."""
    primitive._context_id = context_id
    dimse.msg_queue.put((context_id, primitive))


def store_response(command: memoryview | bytes) -> C_STORE | None:
    """The C_STORE primitive of an encoded C-STORE response command set, with the values
    pynetdicom's decoder gives; None for anything it might read differently (other
    elements, empty, multi-valued or non-ASCII values)."""
    elements = _command_elements(command)
    if elements is None or not elements.keys() <= _STORE_RSP_ELEMENTS:
        return None
    if not {0x0100, 0x0120, 0x0800, 0x0900} <= elements.keys():
        return None
    if (_us_value(elements[0x0100]), _us_value(elements[0x0800])) != (C_STORE_RSP, NO_DATA_SET):
        return None
    message_id, status = _us_value(elements[0x0120]), _us_value(elements[0x0900])
    if message_id is None or status is None:
        return None
    texts = {element: _text_value(elements[element])
             for element in (0x0002, 0x0902, 0x1000) if element in elements}
    if None in texts.values():
        return None
    try:
        primitive = C_STORE()
        primitive.MessageIDBeingRespondedTo = message_id
        if 0x0002 in texts:
            primitive.AffectedSOPClassUID = texts[0x0002]
        if 0x1000 in texts:
            primitive.AffectedSOPInstanceUID = texts[0x1000]
        primitive.Status = status
        if 0x0902 in texts:
            primitive.ErrorComment = texts[0x0902]
    except (TypeError, ValueError):  # as pynetdicom would refuse it, let it
        return None
    return primitive


def _command_elements(command: memoryview | bytes) -> dict[int, bytes] | None:
    """A command set's values by element number (group 0000, Implicit VR Little Endian,
    PS3.7 6.3.1); None unless it is exactly a run of such elements, each once."""
    elements: dict[int, bytes] = {}
    offset, end = 0, len(command)
    while offset < end:
        if end - offset < _ELEMENT_HEADER.size:
            return None
        group, element, length = _ELEMENT_HEADER.unpack_from(command, offset)
        offset += _ELEMENT_HEADER.size
        if group != 0 or length > end - offset or element in elements:
            return None
        elements[element] = bytes(command[offset:offset + length])
        offset += length
    return elements


def _us_value(value: bytes) -> int | None:
    return _US.unpack(value)[0] if len(value) == _US.size else None


def _text_value(value: bytes) -> str | None:
    """A single plain ASCII value without its trailing padding, as pydicom decodes UI and LO
    values; None when it is empty, multi-valued or not plain ASCII."""
    if not value.isascii() or b"\\" in value:
        return None
    text = value.decode("ascii").rstrip("\0 ")
    return text if text and text.isprintable() else None


# --- Waiting ------------------------------------------------------------------------------


# The DUL thread polls every 1 ms, as pynetdicom asks, while another thread has queued
# something for it within DUL_BUSY_WINDOW (a C-FIND's responses: each 1 ms poll sends what
# has queued meanwhile, where a wake per response would cost more); once it has been idle
# that long, it waits until woken, or DUL_IDLE_WAIT for its timers (ARTIM, PS3.8 9.1.5).
# The reactor of an association that only sends requests polls every SENDER_REACTOR_WAIT.
DUL_BUSY_WINDOW = 0.05
DUL_IDLE_WAIT = 0.05
SENDER_REACTOR_WAIT = 0.02


class _Waker:
    """What lets the DUL thread of an idle association wait without polling: an eventfd it
    watches beside the socket, written when another thread queues something for it while it
    waits so. Closed by the DUL thread as it ends, after which a wake is a no-op (never a
    write to a reused descriptor number)."""

    def __init__(self, queues: tuple[queue.Queue, ...]) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._queues = queues
        self.closed = False
        self.waiting = False
        self.last_put = 0.0

    def queued(self) -> None:
        """Another thread than the DUL's has queued something for it: wake it if it waits."""
        self.last_put = time.monotonic()
        if self.waiting:
            with self._lock:
                if not self.closed:
                    os.eventfd_write(self.fd, 1)

    def wait(self, sock) -> None:
        """The DUL thread's sleep once idle: until the socket is readable, something is
        queued, or DUL_IDLE_WAIT."""
        # Flag first, queues second; a put queues first, reads the flag second: either this
        # sees the item or the put sees the flag.
        self.waiting = True
        try:
            if any(q.qsize() for q in self._queues):
                return
            # poll, not select: a descriptor number above FD_SETSIZE is no error.
            waiting = select.poll()
            waiting.register(sock, select.POLLIN)
            waiting.register(self.fd, select.POLLIN)
            ready = waiting.poll(DUL_IDLE_WAIT * 1000)
        finally:
            self.waiting = False
        if any(fd == self.fd for fd, _ in ready):
            try:
                os.eventfd_read(self.fd)
            except BlockingIOError:
                pass

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                os.close(self.fd)

    def __del__(self) -> None:
        self.close()  # a DUL whose thread never ran: nothing can wake it any more


def _waking(put, waker: _Waker, dul: DULServiceProvider):
    """``put`` of one of the DUL's queues: the DUL thread's own puts (an event per PDU it
    reads) are seen before it waits again; another thread's go through the waker."""

    def waking_put(item, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        if threading.get_ident() != dul.ident:
            waker.queued()

    return waking_put


class _PromptClock:
    """Stands in for the ``time`` module inside pynetdicom's association and DUL modules:
    everything is :mod:`time`'s, but the reactor threads' polling sleeps end as soon as there
    is work, and last longer where nothing can be missed meanwhile."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        thread = threading.current_thread()
        if isinstance(thread, DULServiceProvider):
            sock = getattr(thread.socket, "socket", None)
            waker = thread.__dict__.get("_waker")
            if sock is not None:
                try:
                    if waker is None or time.monotonic() - waker.last_put < DUL_BUSY_WINDOW:
                        select.select([sock], [], [], seconds)
                    else:
                        waker.wait(sock)
                    return
                except (OSError, ValueError):  # closed meanwhile
                    pass
        elif isinstance(thread, Association) and seconds == REACTOR_DELAY:
            sender = _SENDERS_ONLY.get(thread)
            if sender is not None:
                # It never takes a message (its sender does, woken by the queue itself), and
                # an abort or a closed connection wakes the sender with (None, None): it only
                # has to notice a release or an idle timeout, and to pause when asked, at once.
                sender.wake.clear()
                if thread._reactor_checkpoint.is_set():
                    sender.wake.wait(SENDER_REACTOR_WAIT)
                return
            messages = thread.dimse.msg_queue
            with messages.not_empty:
                if not messages.queue:
                    messages.not_empty.wait(seconds)
                if messages.queue:
                    # A put wakes one waiter, and this one may not take the message: pass
                    # the wake-up on, or a thread blocked in get_msg() (a sender waiting for
                    # its response) sleeps on until its timeout with the message there.
                    messages.not_empty.notify()
            return
        time.sleep(seconds)


def _prompt_dul_init(init):
    def __init__(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        if not hasattr(os, "eventfd"):
            return
        queues = (self.to_provider_queue, self.event_queue)
        waker = self.__dict__["_waker"] = _Waker(queues)
        for queue_ in queues:
            queue_.put = _waking(queue_.put, waker, self)

    return __init__


def _prompt_dul_run(run_reactor):
    def run(self) -> None:
        try:
            run_reactor(self)
        finally:
            waker = self.__dict__.get("_waker")
            if waker is not None:
                waker.close()

    return run


def install_prompt_waits() -> None:
    """Make pynetdicom's reactor threads in this process wake as soon as there is work, and
    poll less often where there is none (each 1 ms poll cost ~3% of a core per thread)."""
    if getattr(DULServiceProvider, "_prompt_waits", False):
        return
    clock = _PromptClock()
    pynetdicom.association.time = clock
    pynetdicom.dul.time = clock
    DULServiceProvider.__init__ = _prompt_dul_init(DULServiceProvider.__init__)
    DULServiceProvider.run_reactor = _prompt_dul_run(DULServiceProvider.run_reactor)
    DULServiceProvider._prompt_waits = True
