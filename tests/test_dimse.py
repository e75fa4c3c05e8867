"""What the gateway writes on a DICOM connection itself is what pynetdicom would have written,
what it reads is what pynetdicom would have read, and its prompter waits never keep a message
from the thread that waits for it."""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
import tracemalloc
from io import BytesIO
from types import SimpleNamespace

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.transport import AssociationSocket

from gateway import dimse

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"  # odd length: padded


def pynetdicom_command(message_class, **fields) -> bytes:
    primitive = C_STORE()
    for name, value in fields.items():
        setattr(primitive, name, value)
    message = message_class()
    message.primitive_to_message(primitive)
    return encode(message.command_set, True, True)


@pytest.mark.parametrize("sop_class", [CT, ENHANCED_MR])
@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.3.45"])
def test_a_c_store_request_is_encoded_as_pynetdicom_does(sop_class, sop_instance):
    expected = pynetdicom_command(
        C_STORE_RQ, MessageID=7, Priority=2, AffectedSOPClassUID=sop_class,
        AffectedSOPInstanceUID=sop_instance, DataSet=BytesIO(b"\x00\x00"))

    assert dimse.c_store_rq(7, sop_class, sop_instance, 2) == expected


@pytest.mark.parametrize("status, comment", [
    (0x0000, ""), (0xA700, "less than 500 MB free"), (0xC220, "odd"), (0xB007, ""),
])
def test_a_c_store_response_is_encoded_as_pynetdicom_does(status, comment):
    fields = dict(MessageIDBeingRespondedTo=65535, AffectedSOPClassUID=ENHANCED_MR,
                  AffectedSOPInstanceUID="1.2.3.45", Status=status)
    if comment:
        fields["ErrorComment"] = comment

    assert (dimse.c_store_rsp(65535, ENHANCED_MR, "1.2.3.45", status, comment)
            == pynetdicom_command(C_STORE_RSP, **fields))


def pynetdicom_decoded(command: bytes) -> C_STORE | None:
    """The primitive pynetdicom's DIMSE provider puts on its queue for this command set, as
    it arrived alone in a PDV; None where pynetdicom refuses it."""
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.pdu_primitives import P_DATA

    message = DIMSEMessage()
    data = P_DATA()
    data.presentation_data_value_list = [[1, b"\x03" + command]]
    try:
        message.decode_msg(data)
        return message.message_to_primitive()
    except Exception:
        return None


def primitive_fields(primitive: C_STORE) -> dict:
    names = ("MessageID", "MessageIDBeingRespondedTo", "AffectedSOPClassUID",
             "AffectedSOPInstanceUID", "Priority", "MoveOriginatorApplicationEntityTitle",
             "MoveOriginatorMessageID", "DataSet", "Status", "OffendingElement", "ErrorComment",
             "_dataset_path", "_dataset_file")
    return {name: (type(getattr(primitive, name)), getattr(primitive, name)) for name in names}


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, element, len(value)) + value


def _raw_response(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


@pytest.mark.parametrize("status, comment", [
    (0x0000, ""), (0xA700, "less than 500 MB free"), (0xC220, "odd"), (0xB007, ""),
])
def test_a_c_store_response_is_read_as_pynetdicom_reads_it(status, comment):
    command = dimse.c_store_rsp(65535, ENHANCED_MR, "1.2.3.45", status, comment)

    ours = dimse.store_response(memoryview(command))

    assert ours is not None
    assert primitive_fields(ours) == primitive_fields(pynetdicom_decoded(command))


@pytest.mark.parametrize("command", [
    # Written by other implementations: no Affected SOP Class UID, values padded with blanks
    # or nulls, the elements in another order.
    _raw_response(_element(0x0100, b"\x01\x80"), _element(0x0120, b"\x05\x00"),
                  _element(0x0800, b"\x01\x01"), _element(0x0900, b"\x00\x00")),
    _raw_response(_element(0x0002, CT.encode() + b"\x00"), _element(0x0100, b"\x01\x80"),
                  _element(0x0120, b"\x05\x00"), _element(0x0800, b"\x01\x01"),
                  _element(0x0900, b"\x07\xa7"), _element(0x0902, b" no room  "),
                  _element(0x1000, b"1.2.3 ")),
    _raw_response(_element(0x0900, b"\x00\x00"), _element(0x0800, b"\x01\x01"),
                  _element(0x0120, b"\x05\x00"), _element(0x0100, b"\x01\x80")),
], ids=["minimal", "padded", "reordered"])
def test_a_c_store_response_from_another_implementation_is_read_as_pynetdicom_reads_it(command):
    ours = dimse.store_response(command)

    assert ours is not None
    assert primitive_fields(ours) == primitive_fields(pynetdicom_decoded(command))


@pytest.mark.parametrize("command", [
    # An element this reader leaves to pynetdicom (Offending Element), a request, a response
    # announcing a data set, a value with two UIDs, one not ASCII, an empty one, a Status of
    # the wrong length, a length past the end, an element twice.
    _raw_response(_element(0x0100, b"\x01\x80"), _element(0x0120, b"\x05\x00"),
                  _element(0x0800, b"\x01\x01"), _element(0x0900, b"\x01\xc0"),
                  _element(0x0901, b"\x08\x00\x18\x00")),
    dimse.c_store_rq(5, CT, "1.2.3", 0),
    _raw_response(_element(0x0100, b"\x01\x80"), _element(0x0120, b"\x05\x00"),
                  _element(0x0800, b"\x00\x00"), _element(0x0900, b"\x00\x00")),
    _raw_response(_element(0x0100, b"\x01\x80"), _element(0x0120, b"\x05\x00"),
                  _element(0x0800, b"\x01\x01"), _element(0x0900, b"\x00\x00"),
                  _element(0x1000, b"1.2\\1.3\x00")),
    _raw_response(_element(0x0100, b"\x01\x80"), _element(0x0120, b"\x05\x00"),
                  _element(0x0800, b"\x01\x01"), _element(0x0900, b"\x00\x00"),
                  _element(0x0902, "Zürich".encode("latin-1"))),
    _raw_response(_element(0x0100, b"\x01\x80"), _element(0x0120, b"\x05\x00"),
                  _element(0x0800, b"\x01\x01"), _element(0x0900, b"\x00\x00"),
                  _element(0x1000, b"")),
    _raw_response(_element(0x0100, b"\x01\x80"), _element(0x0120, b"\x05\x00"),
                  _element(0x0800, b"\x01\x01"), _element(0x0900, b"\x00\x00\x00\x00")),
    _raw_response(_element(0x0100, b"\x01\x80"), _element(0x0120, b"\x05\x00"),
                  _element(0x0800, b"\x01\x01"), _element(0x0900, b"\x00\x00"))[:-1],
    _raw_response(_element(0x0100, b"\x01\x80"), _element(0x0120, b"\x05\x00"),
                  _element(0x0120, b"\x06\x00"), _element(0x0800, b"\x01\x01"),
                  _element(0x0900, b"\x00\x00")),
], ids=["offending-element", "request", "with-data-set", "two-values", "not-ascii", "empty",
        "long-status", "cut-short", "twice"])
def test_anything_else_is_left_to_pynetdicom(command):
    assert dimse.store_response(command) is None


@pytest.mark.parametrize("command", [
    dimse.c_store_rq(7, CT, "1.2.3.4", 2),
    dimse.c_store_rq(65535, ENHANCED_MR, "1.2.3.45", 1),
    pynetdicom_command(C_STORE_RQ, MessageID=3, Priority=0, AffectedSOPClassUID=CT,
                       AffectedSOPInstanceUID="1.2.3", DataSet=BytesIO(b"\x00\x00")),
    # Without the group length, the UIDs padded with a blank, in another order.
    _raw_response(_element(0x1000, b"1.2.3 "), _element(0x0800, b"\xfe\xfe"),
                  _element(0x0700, b"\x00\x00"), _element(0x0110, b"\x09\x00"),
                  _element(0x0100, b"\x01\x00"), _element(0x0002, CT.encode() + b"\x00")
                  )[12:],
], ids=["ours", "ours-odd", "pynetdicom", "reordered"])
def test_a_c_store_request_is_read_as_pynetdicom_reads_it(command):
    ours = dimse.store_request(memoryview(command))
    theirs = pynetdicom_decoded(command)

    assert ours is not None
    theirs.DataSet = None  # the data set follows the command set
    assert primitive_fields(ours) == primitive_fields(theirs)


@pytest.mark.parametrize("command", [
    # On behalf of a C-MOVE, without a data set, a response, Priority of the wrong length,
    # a Message ID missing.
    pynetdicom_command(C_STORE_RQ, MessageID=3, Priority=0, AffectedSOPClassUID=CT,
                       AffectedSOPInstanceUID="1.2.3", DataSet=BytesIO(b"\x00\x00"),
                       MoveOriginatorApplicationEntityTitle="QR",
                       MoveOriginatorMessageID=1),
    _raw_response(_element(0x0002, CT.encode()), _element(0x0100, b"\x01\x00"),
                  _element(0x0110, b"\x09\x00"), _element(0x0700, b"\x00\x00"),
                  _element(0x0800, b"\x01\x01"), _element(0x1000, b"1.2.3\x00")),
    dimse.c_store_rsp(7, CT, "1.2.3", 0),
    _raw_response(_element(0x0002, CT.encode()), _element(0x0100, b"\x01\x00"),
                  _element(0x0110, b"\x09\x00"), _element(0x0700, b"\x00"),
                  _element(0x0800, b"\x00\x00"), _element(0x1000, b"1.2.3\x00")),
    _raw_response(_element(0x0002, CT.encode()), _element(0x0100, b"\x01\x00"),
                  _element(0x0700, b"\x00\x00"),
                  _element(0x0800, b"\x00\x00"), _element(0x1000, b"1.2.3\x00")),
], ids=["move-originator", "no-data-set", "response", "short-priority", "no-message-id"])
def test_any_other_request_is_left_to_pynetdicom(command):
    assert dimse.store_request(command) is None


def test_a_sending_association_reads_its_c_store_responses_itself(tmp_path, monkeypatch):
    from tests.fixtures_storage import sample_file

    read = []
    queue_response = dimse._queue_store_response
    monkeypatch.setattr(dimse, "_queue_store_response",
                        lambda assoc, values: read.append(queue_response(assoc, values))
                        or read[-1])
    server = _store_scp(lambda event: 0xB007)  # a warning status: Coercion of data elements
    try:
        ae = AE(ae_title="CT1")
        ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="GATEWAY")
        dimse.read_in_large_blocks(assoc)
        rsp = assoc.send_c_store(sample_file("explicit", tmp_path))
        assoc.release()
    finally:
        server.shutdown()

    assert rsp.Status == 0xB007
    # The SCP's PDUs (the request) go through it too, and are left to pynetdicom.
    assert read.count(True) == 1


def _store_scp(on_store):
    """A storage SCP set up as the gateway's (large reads, answers written directly)."""
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
    from pynetdicom import evt

    from gateway.dicom import answer_stores_promptly

    ae = AE(ae_title="GATEWAY")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
        (evt.EVT_CONN_OPEN, answer_stores_promptly), (evt.EVT_C_STORE, on_store)])


def test_pdus_never_exceed_the_fragment_and_only_the_last_is_marked_last():
    data = memoryview(bytes(range(256)) * 40)  # 10,240 bytes

    parts = dimse.p_data_tf(5, data, 4090, 0, True)

    headers, chunks = parts[0::2], parts[1::2]
    assert b"".join(chunks) == data.tobytes()
    assert [len(c) for c in chunks] == [4090, 4090, 2060]
    assert [h[-1] for h in headers] == [0x00, 0x00, dimse.LAST_FRAGMENT]
    assert all(h[:2] == b"\x04\x00" and h[-2] == 5 for h in headers)
    assert [int.from_bytes(h[2:6], "big") for h in headers] == [4096, 4096, 2066]


class ReactorLike(Association):
    """An association thread that only runs the reactor's polling sleep once, as pynetdicom's
    reactor does while a sender waits for its response."""

    def __init__(self):
        super().__init__(AE(), "requestor")

    def run(self):
        dimse._PromptClock.sleep(dimse.REACTOR_DELAY)


def waiting_on(messages: queue.Queue, count: int) -> None:
    while len(messages.not_empty._waiters) < count:  # noqa: SLF001 - the test's only probe
        time.sleep(0.001)


def test_a_message_wakes_its_receiver_even_when_the_reactor_waited_first(monkeypatch):
    # The reactor waits long enough for the receiver to queue behind it, and the message
    # to come while both wait.
    monkeypatch.setattr(dimse, "REACTOR_DELAY", 30.0)
    reactor = ReactorLike()
    messages = reactor.dimse.msg_queue
    received: list = []
    receiver = threading.Thread(target=lambda: received.append(messages.get(timeout=30)),
                                daemon=True)

    reactor.start()
    waiting_on(messages, 1)
    receiver.start()
    waiting_on(messages, 2)
    messages.put((1, "C-STORE-RSP"))
    receiver.join(timeout=10)
    reactor.join(timeout=10)

    # A put wakes the first waiter only: the reactor, which does not take the message. Unless
    # it passes the wake-up on, the receiver sleeps on with the message queued.
    assert received == [(1, "C-STORE-RSP")]


def test_what_another_thread_queues_for_the_dul_wakes_it(monkeypatch):
    """With the DUL threads always idle and their waits as long as the test's timeouts, a
    C-ECHO (queued for the DUL by the requesting thread), the release and the end of both
    threads still happen: each of them wakes the DUL thread that must act on it."""
    from pynetdicom.sop_class import Verification

    dimse.install_prompt_waits()
    monkeypatch.setattr(dimse, "DUL_BUSY_WINDOW", 0.0)
    monkeypatch.setattr(dimse, "DUL_IDLE_WAIT", 30.0)
    scp = AE(ae_title="ECHOSCP")
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", 0), block=False)
    try:
        ae = AE(ae_title="ECHOSCU")
        ae.acse_timeout = ae.dimse_timeout = 5
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="ECHOSCP")
        status = assoc.send_c_echo().Status
        assoc.release()
        assoc.join(timeout=5)
        outcome = (status, assoc.is_released, assoc.is_alive(), assoc.dul.is_alive())
    finally:
        server.shutdown()

    assert outcome == (0x0000, True, False, False)


# --- Reading ---------------------------------------------------------------------------------


def _pynetdicom_recv(sock: socket.socket, size: int) -> bytearray:
    """What pynetdicom's own AssociationSocket.recv returns for the same socket."""
    return AssociationSocket.recv(SimpleNamespace(socket=sock), size)


def _sent_in_pieces(data: bytes, piece: int, close: bool) -> socket.socket:
    """The reading end of a connection whose peer writes ``data`` a piece at a time."""
    reader, writer = socket.socketpair()

    def write():
        for start in range(0, len(data), piece):
            writer.sendall(data[start:start + piece])
            time.sleep(0)
        if close:
            writer.close()

    threading.Thread(target=write, daemon=True).start()
    return reader


@pytest.mark.parametrize("read", [dimse.read_exactly, _pynetdicom_recv])
def test_a_pdu_arriving_in_pieces_is_read_whole(read):
    data = bytes(range(256)) * (3 * 4096 + 7)  # over three read blocks, and an odd tail
    reader = _sent_in_pieces(data, 7000, close=False)

    assert read(reader, len(data)) == data


@pytest.mark.parametrize("read", [dimse.read_exactly, _pynetdicom_recv])
def test_a_connection_closed_part_way_gives_what_arrived(read):
    reader = _sent_in_pieces(b"0123456789", 3, close=True)

    assert read(reader, 100) == bytearray(b"0123456789")


def test_a_huge_announced_length_allocates_no_more_than_arrives():
    reader = _sent_in_pieces(b"hello", 5, close=True)

    tracemalloc.start()
    try:
        got = dimse.read_exactly(reader, 0xFFFFFFFF)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert got == bytearray(b"hello")
    assert peak < 4 * dimse.READ_BLOCK


@pytest.mark.parametrize("read", [dimse.read_exactly, _pynetdicom_recv])
def test_a_silent_peer_times_out_the_read(read):
    reader, _writer = socket.socketpair()
    reader.settimeout(0.05)

    with pytest.raises(TimeoutError):
        read(reader, 10)
