"""Messages that arrive together on different connections share one commit (group commit),
and yet each is answered, stored and refused as if it had come alone."""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from gateway import audit
from tests.fixtures_hl7 import Ack, MLLPConnection, message, msh, obr, orc, pid, pv1
from worklist.hl7.ack import ACCEPT, build_ack
from worklist.hl7.parse import read_header
from worklist.hl7.service import clear_caches, handle_messages, handle_oversize
from worklist.mllp import MLLPServer, bind_socket
from worklist.models import HL7Message, ImagingOrder, ScheduledStep


def order(n: int, control: str = "NW", control_id: str = "", status: str = "SC",
          **obr_values) -> bytes:
    key = f"B{n}"
    return message(msh(control_id=control_id or f"C{n}"), pid(patient_id=f"P{n}"), pv1(),
                   orc(control, placer=key, filler=key, status=status),
                   obr(placer=key, filler=key, accession=key, **obr_values))


def apply_together(*raws: bytes) -> list[Ack]:
    clear_caches()
    return [Ack(a) for a in handle_messages([(raw, f"127.0.0.1:{5000 + i}")
                                             for i, raw in enumerate(raws)])]


@pytest.mark.usefixtures("transactional_db", "status_mappings")
class TestMessagesAppliedTogether:
    def test_each_message_gets_its_own_ack_and_effect_under_one_commit(self):
        with CaptureQueriesContext(connection) as queries:
            acks = apply_together(order(1), order(2), order(3), order(4))
        assert [(a.code, a.control_id) for a in acks] == [("AA", f"C{n}") for n in range(1, 5)]
        assert sorted(ImagingOrder.objects.values_list("accession_number", flat=True)) == [
            "B1", "B2", "B3", "B4"]
        statements = [q["sql"].split(None, 1)[0].upper() for q in queries.captured_queries]
        assert statements.count("COMMIT") == 1
        assert sum("pg_advisory_xact_lock" in q["sql"] for q in queries.captured_queries) == 1
        assert set(HL7Message.objects.values_list("status", flat=True)) == {"ACCEPTED"}
        checked, broken = audit.verify()
        assert broken is None
        assert checked == 8  # received + order created, per message

    def test_a_message_that_fails_is_refused_alone_and_the_others_are_applied(self):
        with CaptureQueriesContext(connection) as queries:
            acks = apply_together(order(1), order(9, control="CA", control_id="CANCEL9",
                                                  status="CA"), order(2))
        assert [(a.code, a.control_id) for a in acks] == [
            ("AA", "C1"), ("AE", "CANCEL9"), ("AA", "C2")]
        assert acks[1].error_code == "204"
        assert "no order matches" in acks[1].error_text
        assert ImagingOrder.objects.count() == 2
        # The two others still share a commit; the refusal is stored on its own.
        statements = [q["sql"].split(None, 1)[0].upper() for q in queries.captured_queries]
        assert statements.count("COMMIT") == 2
        refused = HL7Message.objects.get(control_id="CANCEL9")
        assert (refused.status, refused.error_code) == ("ERROR", "204")
        assert audit.verify()[1] is None

    def test_an_unreadable_message_is_rejected_alone(self):
        acks = apply_together(b"PID|1||X\rOBR|1\r", order(1))
        assert [a.code for a in acks] == ["AR", "AA"]
        assert acks[0].error_code == "100"
        assert ImagingOrder.objects.count() == 1

    def test_the_same_control_id_twice_has_one_effect(self):
        acks = apply_together(order(1), order(1))
        assert [(a.code, a.control_id) for a in acks] == [("AA", "C1"), ("AA", "C1")]
        assert ImagingOrder.objects.count() == 1
        assert sorted(HL7Message.objects.values_list("status", flat=True)) == [
            "ACCEPTED", "DUPLICATE"]

    def test_messages_about_one_order_apply_in_arrival_order(self):
        new = order(1)
        changed = order(1, control="XO", control_id="C1-XO", modality="MR")
        acks = apply_together(new, changed)
        assert [a.code for a in acks] == ["AA", "AA"]
        assert ImagingOrder.objects.count() == 1
        assert list(ScheduledStep.objects.values_list("modality", flat=True)) == ["MR"]


# --- the listener's side: gathering messages into batches --------------------------------


class RecordingHandler:
    """A batch handler that answers AA without a database and holds its first batch until
    released, as a slow commit would."""

    def __init__(self):
        self.batches: list[list[str]] = []
        self.first_started = threading.Event()
        self.release = threading.Event()

    def __call__(self, messages: list[tuple[bytes, str]]) -> list[bytes]:
        self.batches.append([read_header(raw).control_id for raw, _peer in messages])
        if len(self.batches) == 1:
            self.first_started.set()
            self.release.wait(20)
        return [build_ack(read_header(raw), ACCEPT) for raw, _peer in messages]


@contextmanager
def server_in_a_thread(handler, grace: float = 5.0, **options):
    loop = asyncio.new_event_loop()
    server = MLLPServer(handler, handle_oversize, max_message_bytes=1 << 20,
                        idle_timeout=60, **options)
    port = loop.run_until_complete(server.start(bind_socket("127.0.0.1", 0)))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server.loop = loop  # for a test that stops the server itself
    try:
        yield server, port
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=grace), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def wait_until(condition, seconds: float = 10.0) -> None:
    done = threading.Event()
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError("condition not reached")


class TestGathering:
    def test_messages_that_arrive_while_the_database_is_busy_go_as_one_batch(self):
        handler = RecordingHandler()
        with server_in_a_thread(handler, threads=1) as (server, port):
            first = MLLPConnection(port)
            first.sock.sendall(b"\x0b" + order(0) + b"\x1c\r")
            assert handler.first_started.wait(10)
            others = [MLLPConnection(port) for _ in range(3)]
            for n, conn in enumerate(others, start=1):
                conn.sock.sendall(b"\x0b" + order(n) + b"\x1c\r")
            wait_until(lambda: server.waiting == 3)
            handler.release.set()
            acks = [conn.receive() for conn in [first, *others]]
            for conn in [first, *others]:
                conn.close()
        assert [(a.code, a.control_id) for a in acks] == [("AA", f"C{n}") for n in range(4)]
        assert handler.batches == [["C0"], ["C1", "C2", "C3"]]

    def test_a_lone_connection_is_answered_without_waiting_for_others(self):
        handler = RecordingHandler()
        handler.release.set()
        with server_in_a_thread(handler, threads=2, gather_seconds=30) as (_server, port):
            conn = MLLPConnection(port)
            acks = [conn.send(order(n)) for n in range(3)]
            conn.close()
        # With a 30 s gathering limit, any wait for other connections would time the
        # client out (20 s); one connection's messages go one by one at once.
        assert [a.control_id for a in acks] == ["C0", "C1", "C2"]
        assert handler.batches == [["C0"], ["C1"], ["C2"]]

    def test_stopping_answers_what_it_applied_and_closes_what_it_did_not(self):
        handler = RecordingHandler()
        with server_in_a_thread(handler, threads=1) as (server, port):
            first = MLLPConnection(port)
            first.sock.sendall(b"\x0b" + order(0) + b"\x1c\r")
            assert handler.first_started.wait(10)
            second = MLLPConnection(port)
            second.sock.sendall(b"\x0b" + order(1) + b"\x1c\r")
            wait_until(lambda: server.waiting == 1)

            stopping = asyncio.run_coroutine_threadsafe(server.stop(grace=0.2), server.loop)
            # After the grace period the waiting message is given up: never applied, never
            # answered, so its sender sends it again.
            assert second.is_closed_by_peer()
            # The batch being applied outlasts the grace period: stopping waits for it.
            handler.release.set()
            assert first.receive().control_id == "C0"
            stopping.result(30)
        assert handler.batches == [["C0"]]
        first.close()
        second.close()
