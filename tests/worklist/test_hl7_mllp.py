"""The MLLP listener as a RIS meets it: `manage.py hl7listener --port 0` on real sockets."""

import socket

import hl7.client
import pytest

from tests.fixtures_hl7 import (
    Ack,
    Listener,
    database_url_for_subprocess,
    message,
    msh,
    obr,
    orc,
    orm,
    pid,
    seg,
)
from worklist.models import HL7Message, ImagingOrder


def numbered_orm(n: int) -> bytes:
    key = f"N{n}"
    return message(msh(control_id=f"C{n}"), pid(patient_id=f"P{n}"),
                   orc(placer=key, filler=key), obr(placer=key, filler=key, accession=key))


class TestListener:
    def test_it_answers_many_messages_on_one_connection(self, listener):
        with hl7.client.MLLPClient("127.0.0.1", listener.port) as client:
            answers = [client.send_message(numbered_orm(n)) for n in range(5)]
        assert all(b"MSA|AA|C%d" % n in a for n, a in enumerate(answers))
        assert all(a.startswith(b"\x0b") and a.endswith(b"\x1c\r") for a in answers)
        assert ImagingOrder.objects.count() == 5
        assert HL7Message.objects.filter(status="ACCEPTED").count() == 5

    def test_it_serves_connections_concurrently(self, listener):
        connections = [listener.connect() for _ in range(4)]
        for n, conn in enumerate(connections):
            conn.sock.sendall(b"\x0b" + numbered_orm(n) + b"\x1c\r")
        acks = [conn.receive() for conn in connections]
        assert [(a.code, a.control_id) for a in acks] == [("AA", f"C{n}") for n in range(4)]
        for conn in connections:
            conn.close()

    def test_it_reassembles_a_frame_sent_in_pieces(self, listener):
        conn = listener.connect()
        frame = b"\x0b" + orm() + b"\x1c\r"
        for i in range(0, len(frame), 7):
            conn.sock.sendall(frame[i : i + 7])
        assert conn.receive().code == "AA"
        conn.close()

    def test_it_answers_back_to_back_frames_in_order(self, listener):
        conn = listener.connect()
        conn.sock.sendall(b"".join(b"\x0b" + numbered_orm(n) + b"\x1c\r" for n in range(3)))
        assert [conn.receive().control_id for _ in range(3)] == ["C0", "C1", "C2"]
        conn.close()

    def test_it_closes_a_connection_that_does_not_speak_mllp_and_serves_the_others(
        self, listener
    ):
        good = listener.connect()
        bad = listener.connect()
        bad.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert bad.is_closed_by_peer()
        assert good.send(numbered_orm(1)).code == "AA"
        good.close()
        bad.close()

    def test_it_rejects_an_oversize_frame_closes_that_connection_and_serves_the_others(
        self, listener
    ):
        good = listener.connect()
        big = listener.connect()
        huge_note = seg("NTE", {1: "1", 3: "x" * 70000})
        ack = big.send(message(msh(control_id="BIG1"), pid(), orc(), obr(), huge_note))
        assert (ack.code, ack.control_id) == ("AR", "BIG1")
        assert "65536" in ack.error_text
        assert big.is_closed_by_peer()
        assert good.send(numbered_orm(2)).code == "AA"
        record = HL7Message.objects.get(control_id="BIG1")
        assert record.status == "REJECTED"
        good.close()
        big.close()

    @pytest.mark.usefixtures("transactional_db", "status_mappings")
    def test_it_stops_cleanly_on_sigterm(self):
        server = Listener(database_url_for_subprocess())
        conn = server.connect()
        assert conn.send(orm()).code == "AA"
        assert server.stop() == 0
        assert conn.is_closed_by_peer()
        conn.close()


@pytest.mark.usefixtures("transactional_db", "status_mappings")
class TestWorkers:
    def test_it_shares_the_port_between_worker_processes(self):
        server = Listener(database_url_for_subprocess(), "--workers", "2")
        try:
            connections = [server.connect() for _ in range(4)]
            acks = [conn.send(numbered_orm(n)) for n, conn in enumerate(connections)]
            assert [a.code for a in acks] == ["AA"] * 4
            assert ImagingOrder.objects.count() == 4
            for conn in connections:
                conn.close()
        finally:
            assert server.stop() == 0


class TestDatabaseDown:
    def test_it_never_answers_aa_without_a_database(self):
        # Port 1 on 127.0.0.1: nothing listens, connections are refused at once.
        server = Listener("postgres://postgres@127.0.0.1:1/nowhere")
        try:
            conn = server.connect()
            ack = conn.send(orm())
            assert (ack.code, ack.error_code) == ("AE", "207")
            assert ack.control_id == "MSG0001"
            conn.close()
        finally:
            server.stop()

    def test_it_can_be_reached_on_ipv4_loopback_only(self):
        server = Listener("postgres://postgres@127.0.0.1:1/nowhere")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5):
                pass
        finally:
            server.stop()


@pytest.mark.usefixtures("transactional_db", "status_mappings")
class TestConnectionRecovery:
    def test_it_handles_a_message_again_on_a_fresh_database_connection(self):
        from django.db import connection

        from worklist.hl7.service import handle_message
        from worklist.mllp import _in_thread

        connection.ensure_connection()
        connection.connection.close()  # as if the database had restarted
        ack = Ack(_in_thread(handle_message, orm(), "127.0.0.1:5000"))
        assert ack.code == "AA"
        assert ImagingOrder.objects.count() == 1


class TestIdleTimeout:
    def test_it_closes_a_connection_that_stays_idle(self):
        server = Listener("postgres://postgres@127.0.0.1:1/nowhere", HL7_IDLE_TIMEOUT="1")
        try:
            conn = server.connect()
            assert conn.is_closed_by_peer()
            conn.close()
        finally:
            server.stop()
