"""Fixtures for the HL7 / MLLP tests: a message builder that puts values at field numbers
(so that nobody counts pipes), the real listener as a subprocess, and an MLLP client."""

from __future__ import annotations

import importlib
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.conf import settings

DATA = Path(__file__).parent / "data" / "hl7"
MANAGE = Path(__file__).resolve().parent.parent / "manage.py"

START, END = b"\x0b", b"\x1c\r"


def seg(name: str, fields: dict[int, str], f: str = "|") -> str:
    """One segment with ``fields`` at their HL7 sequence numbers, the rest empty."""
    last = max(fields) if fields else 0
    return f.join([name] + [fields.get(i, "") for i in range(1, last + 1)])


def msh(
    message_type: str = "ORM^O01",
    control_id: str = "MSG0001",
    version: str = "2.3.1",
    *,
    app: str = "RIS",
    facility: str = "RADIOLOGY",
    processing_id: str = "P",
    charset: str = "",
    encoding: str = "^~\\&",
    f: str = "|",
) -> str:
    fields = {3: app, 4: facility, 5: "GATEWAY", 6: "HOSPITAL", 7: "20260115083000",
              9: message_type, 10: control_id, 11: processing_id, 12: version}
    if charset:
        fields[18] = charset
    return f"MSH{f}{encoding}{f}" + f.join(fields.get(i, "") for i in range(3, max(fields) + 1))


def pid(patient_id: str = "PAT001", issuer: str = "HOSP", name: str = "Doe^John",
        birth_date: str = "19700101", sex: str = "M", **extra) -> str:
    fields = {1: "1", 3: f"{patient_id}^^^{issuer}^MR" if patient_id else "", 5: name,
              7: birth_date, 8: sex}
    fields.update({int(k[1:]): v for k, v in extra.items()})
    return seg("PID", fields)


def pv1(**extra) -> str:
    fields = {1: "1", 2: "O", 3: "RAD^101^1", 8: "1234^Welby^Marcus^A^III^Dr", 19: "V0001"}
    fields.update({int(k[1:]): v for k, v in extra.items()})
    return seg("PV1", fields)


def orc(control: str = "NW", placer: str = "PL0001", filler: str = "FL0001",
        status: str = "SC", start: str = "20260120093000", priority: str = "R", **extra) -> str:
    fields = {1: control, 2: placer, 3: filler, 5: status,
              7: f"^^^{start}^^{priority}" if (start or priority) else ""}
    fields.update({int(k[1:]): v for k, v in extra.items()})
    return seg("ORC", fields)


def obr(placer: str = "PL0001", filler: str = "FL0001", accession: str = "ACC0001",
        rp_id: str = "RP0001", sps_id: str = "SPS0001", modality: str = "CT", **extra) -> str:
    fields = {1: "1", 2: placer, 3: filler,
              4: "CTHEAD^CT Head^L^CTH01^CT Head without contrast^LOCAL",
              16: "5678^House^Gregory^^^Dr", 18: accession, 19: rp_id, 20: sps_id,
              24: modality, 31: "^Headache", 44: "CTHEAD^CT Head^LOCAL"}
    fields.update({int(k[1:]): v for k, v in extra.items()})
    return seg("OBR", {k: v for k, v in fields.items() if v is not None})


def message(*segments: str, terminator: str = "\r") -> bytes:
    return (terminator.join(segments) + terminator).encode("utf-8")


def orm(control_id: str = "MSG0001", version: str = "2.3.1", control: str = "NW",
        status: str = "SC", **keys) -> bytes:
    """A one-procedure ORM^O01; ``keys`` go to both ORC and OBR (placer, filler) or OBR."""
    order_keys = {k: keys.pop(k) for k in ("placer", "filler") if k in keys}
    return message(
        msh("ORM^O01", control_id, version),
        pid(),
        pv1(),
        orc(control, status=status, **order_keys),
        obr(**order_keys, **keys),
    )


@dataclass
class Ack:
    """An ACK as a RIS reads it."""

    raw: bytes

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", "replace")

    def segment(self, name: str) -> list[str]:
        for line in self.text.strip("\r").split("\r"):
            if line.startswith(name):
                return line.split(self.text[3])
        return []

    def field(self, name: str, n: int) -> str:
        fields = self.segment(name)
        if name == "MSH":
            n -= 1
        return fields[n] if n < len(fields) else ""

    @property
    def code(self) -> str:
        return self.field("MSA", 1)

    @property
    def control_id(self) -> str:
        return self.field("MSA", 2)

    @property
    def error_code(self) -> str:
        err = self.segment("ERR")
        if not err:
            return ""
        if len(err) > 3 and err[3]:
            return err[3].split("^")[0]
        return err[1].split("^")[3].split("&")[0]

    @property
    def error_text(self) -> str:
        err = self.segment("ERR")
        return err[8] if len(err) > 8 else self.field("MSA", 3)


def ack_of(raw: bytes) -> Ack:
    return Ack(raw)


@pytest.fixture
def hl7():
    """Apply a message with the plain function, the way the listener does; returns the ACK."""
    from worklist.hl7.service import clear_caches, handle_message

    clear_caches()

    def send(raw: bytes, peer: str = "127.0.0.1:5000") -> Ack:
        return Ack(handle_message(raw, peer))

    yield send
    clear_caches()


@pytest.fixture
def status_mappings():
    """The default ORC-1/ORC-5 mappings from migration 0002 (a transactional test before
    this one may have flushed them)."""
    from worklist.models import OrderStatusMapping

    defaults = importlib.import_module("worklist.migrations.0002_default_status_mappings")
    for control, status, step_status in defaults.DEFAULTS:
        OrderStatusMapping.objects.get_or_create(
            order_control=control, order_status=status, defaults={"step_status": step_status}
        )


class Listener:
    """``manage.py hl7listener --port 0`` as a subprocess on 127.0.0.1."""

    def __init__(self, database_url: str, *args: str, **env: str):
        environment = {**os.environ, "DATABASE_URL": database_url, "LOG_LEVEL": "WARNING",
                       **env}
        self.process = subprocess.Popen(
            [sys.executable, str(MANAGE), "hl7listener", "--host", "127.0.0.1", "--port", "0",
             *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment, text=True,
        )
        line = self.process.stdout.readline()
        match = re.search(r":(\d+) ", line)
        if not match:
            self.stop()
            raise RuntimeError(f"listener did not start: {line!r} {self.process.stderr.read()}")
        self.port = int(match.group(1))

    def connect(self) -> MLLPConnection:
        return MLLPConnection(self.port)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self.process.stderr.close()
        return self.process.returncode


class MLLPConnection:
    """A raw-socket MLLP client: framing under the test's control."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def send(self, raw: bytes) -> Ack:
        self.sock.sendall(START + raw + END)
        return self.receive()

    def receive(self) -> Ack:
        while END not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the listener")
            self.buffer += chunk
        frame, self.buffer = self.buffer.split(END, 1)
        assert frame.startswith(START)
        return Ack(frame[1:])

    def is_closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def database_url_for_subprocess() -> str:
    db = settings.DATABASES["default"]
    return f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


@pytest.fixture(scope="module")
def shared_listener(django_db_setup):
    server = Listener(database_url_for_subprocess(), HL7_MAX_MESSAGE_BYTES="65536")
    yield server
    server.stop()


@pytest.fixture
def listener(shared_listener, transactional_db, status_mappings):
    """The real listener on the test database (rows it commits are visible to the test);
    one process per test module, the tables emptied after each test."""
    return shared_listener
