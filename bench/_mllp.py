"""MLLP framing (HL7 v2 over TCP: <VT> message <FS><CR>) shared by the bench's client and peer."""

from __future__ import annotations

import socket

START = b"\x0b"
END = b"\x1c\x0d"


def frame(message: bytes) -> bytes:
    return START + message + END


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection((host, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def ack_code(ack: bytes) -> str:
    """MSA-1 of an ACK (AA, AE, AR, CA, ...), or '?' when there is no MSA segment."""
    at = ack.find(b"\rMSA|")  # segment start: a control id may itself end in "MSA"
    return ack[at + 5 : at + 7].decode("ascii", "replace") if at >= 0 else "?"
