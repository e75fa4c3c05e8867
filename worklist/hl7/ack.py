"""Original-mode acknowledgements (HL7 v2 chapter 2, "original acknowledgment rules").

The ACK mirrors the message: sending and receiving application/facility swapped, the same
version (MSH-12), character set (MSH-18) and delimiters, MSH-9 = ACK^<trigger>^ACK and
MSA-2 = the message's MSH-10. AE/AR carry an ERR segment in the form the version expects.
"""

from __future__ import annotations

import itertools
import os
import time
from datetime import datetime

from .parse import ERROR_NAMES, Header, HL7Error, escape

ACCEPT = "AA"
ERROR = "AE"
REJECT = "AR"

_counter = itertools.count(1)


def _control_id() -> str:
    # Unique per ACK across processes of one host: time, process id and a counter, 20 chars
    # (MSH-10 is ST 20 before v2.5).
    return f"G{int(time.time()):x}{os.getpid() % 0xFFFF:04x}{next(_counter) % 0xFFFFF:05x}"[:20]


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return (2, 5)


def build_ack(header: Header | None, code: str, error: HL7Error | None = None) -> bytes:
    """The ACK for a message with ``header`` (None when not even MSH could be read)."""
    header = header or Header()
    d = header.delimiters
    f, c, s = d.field, d.component, d.subcomponent
    raw = header.raw_field
    version_raw = raw(12) or "2.5"
    trigger = raw(9).split(c)[1] if c in raw(9) else ""
    msh = [
        "MSH",
        d.encoding_characters,
        raw(5),
        raw(6),
        raw(3),
        raw(4),
        datetime.now().strftime("%Y%m%d%H%M%S"),
        "",
        f"ACK{c}{trigger}{c}ACK",
        _control_id(),
        raw(11) or "P",
        version_raw,
    ]
    if raw(18):
        msh += ["", "", "", "", "", raw(18)]
    segments = [f.join(msh)]
    msa = ["MSA", code, raw(10)]
    if error is not None:
        msa.append(escape(error.text, d))
    segments.append(f.join(msa))
    if error is not None:
        version = _version_tuple(header.version.split(c)[0] if header.version else "2.5")
        location = list(error.location) + [""] * (3 - len(error.location))
        seg_id, seq, fld = (str(x) if x != "" else "" for x in location[:3])
        name = ERROR_NAMES.get(error.code, "")
        if version >= (2, 5):
            erl = c.join([seg_id, seq, fld]).rstrip(c) if seg_id else ""
            severity = "E"
            segments.append(f.join([
                "ERR", "", erl, c.join([error.code, name, "HL70357"]), severity,
                "", "", "", escape(error.text, d),
            ]))
        else:
            eld = c.join([seg_id, seq, fld, s.join([error.code, name, "HL70357"])])
            segments.append(f.join(["ERR", eld]))
    text = "\r".join(segments) + "\r"
    try:
        return text.encode(header.codec or "utf-8", errors="replace")
    except (LookupError, UnicodeError):
        return text.encode("utf-8", errors="replace")
