r"""Turn the bytes of one HL7 v2 message into segments and plain values.

What this handles, as HL7 v2 chapter 2 describes it: the delimiters a message declares
in MSH-1 / MSH-2 (any characters, not only ``|^~\&``), segments ended by CR, LF or CRLF,
the character set named in MSH-18, and escape sequences (\F\ \S\ \T\ \R\ \E\,
\Xhh..\ bytes in the message's character set, formatting such as \.br\). Values are
read through :class:`Message` so that every caller gets unescaped text.

Splitting is plain ``str.split``, a field only when it is read: on the listener's hot path
this took 0.05 ms per order message where the ``hl7`` package's parser took 0.35 ms (a
third of the listener's CPU per message). The ``hl7`` package stays the tests' and the
benchmark's MLLP client.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

# HL7 table 0357, message error condition codes.
SEGMENT_SEQUENCE_ERROR = "100"
REQUIRED_FIELD_MISSING = "101"
DATA_TYPE_ERROR = "102"
TABLE_VALUE_NOT_FOUND = "103"
UNSUPPORTED_MESSAGE_TYPE = "200"
UNSUPPORTED_EVENT_CODE = "201"
UNSUPPORTED_PROCESSING_ID = "202"
UNSUPPORTED_VERSION_ID = "203"
UNKNOWN_KEY_IDENTIFIER = "204"
DUPLICATE_KEY_IDENTIFIER = "205"
APPLICATION_RECORD_LOCKED = "206"
APPLICATION_INTERNAL_ERROR = "207"

ERROR_NAMES = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}

# MSH-18 values (HL7 table 0211) and the spellings senders actually use, to Python codecs.
_CHARSETS = {
    "ASCII": "ascii",
    "US-ASCII": "ascii",
    "UNICODE": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "ISO_IR 192": "utf-8",
    "ISO_IR 100": "latin-1",
    "WINDOWS-1252": "cp1252",
    "CP1252": "cp1252",
}
for _n in range(1, 16):
    _CHARSETS[f"8859/{_n}"] = f"iso8859-{_n}"
    _CHARSETS[f"ISO-8859-{_n}"] = f"iso8859-{_n}"
    _CHARSETS[f"ISO8859-{_n}"] = f"iso8859-{_n}"
_CHARSETS["8859/1"] = "latin-1"

# What MSH-18 should say in an ACK when the message named no character set.
DEFAULT_CODEC = "utf-8"


class HL7Error(Exception):
    """A message the gateway will not (or cannot) apply.

    ``code`` is from HL7 table 0357, ``location`` is ``(segment, sequence, field)`` (and
    optionally component), ``reject`` chooses AR (the message itself is unacceptable, e.g.
    its type or version) over AE (its content could not be applied)."""

    def __init__(
        self,
        code: str,
        text: str,
        location: tuple = (),
        reject: bool = False,
    ):
        super().__init__(text)
        self.code = code
        self.text = text
        self.location = location
        self.reject = reject


@dataclass(frozen=True)
class Delimiters:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @property
    def encoding_characters(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent


@dataclass
class Header:
    """MSH as received. ``raw`` holds the escaped text of each field (index = MSH-n) so that
    an ACK can mirror it byte for byte."""

    delimiters: Delimiters = field(default_factory=Delimiters)
    raw: list[str] = field(default_factory=list)
    codec: str = DEFAULT_CODEC

    def raw_field(self, n: int) -> str:
        return self.raw[n] if n < len(self.raw) else ""

    def component(self, n: int, comp: int = 1) -> str:
        value = self.raw_field(n).split(self.delimiters.repetition, 1)[0]
        parts = value.split(self.delimiters.component)
        text = parts[comp - 1] if comp <= len(parts) else ""
        return unescape(text.split(self.delimiters.subcomponent, 1)[0], self.delimiters, self.codec)

    @property
    def sending_application(self) -> str:
        return self.component(3)

    @property
    def sending_facility(self) -> str:
        return self.component(4)

    @property
    def receiving_application(self) -> str:
        return self.component(5)

    @property
    def receiving_facility(self) -> str:
        return self.component(6)

    @property
    def message_type(self) -> str:
        return self.component(9, 1).upper()

    @property
    def trigger_event(self) -> str:
        return self.component(9, 2).upper()

    @property
    def control_id(self) -> str:
        return self.component(10)

    @property
    def processing_id(self) -> str:
        return self.component(11).upper()

    @property
    def version(self) -> str:
        return self.component(12)

    @property
    def charset(self) -> str:
        return self.component(18)


def codec_for(charset: str) -> str | None:
    """The Python codec for an MSH-18 value, or None when the gateway does not know it."""
    name = charset.strip().upper()
    if name in _CHARSETS:
        return _CHARSETS[name]
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def read_header(raw: bytes) -> Header:
    """Read MSH from the raw bytes without trusting the rest of the message.

    Raises HL7Error (code 100) when the bytes do not start with an MSH segment."""
    start = message_start(raw)
    if raw[start : start + 3] != b"MSH" or len(raw) < start + 8:
        raise HL7Error(
            SEGMENT_SEQUENCE_ERROR,
            "The message does not start with an MSH segment",
            ("MSH", 1),
            reject=True,
        )
    end = len(raw)
    for stop in (b"\r", b"\n"):
        pos = raw.find(stop, start)
        if pos != -1:
            end = min(end, pos)
    # Latin-1 maps every byte, and the delimiters and MSH values are ASCII in every
    # charset HL7 allows over MLLP, so this is safe before MSH-18 is known.
    line = raw[start:end].decode("latin-1")
    delimiters = _delimiters(line)
    fields = _msh_fields(line, delimiters)
    header = Header(delimiters=delimiters, raw=fields)
    header.codec = codec_for(header.charset) if header.charset else DEFAULT_CODEC
    header.codec = header.codec or DEFAULT_CODEC
    return header


def message_start(raw: bytes) -> int:
    """Where MSH should begin: after leading whitespace and a UTF-8 byte order mark (which
    some editors add)."""
    start = len(raw) - len(raw.lstrip())
    if raw.startswith(b"\xef\xbb\xbf", start):
        start += 3
    return start


def _delimiters(line: str) -> Delimiters:
    field_sep = line[3]
    if field_sep.isalnum() or field_sep in " \r\n":
        raise HL7Error(
            DATA_TYPE_ERROR, f"MSH-1 (field separator) {field_sep!r} is not usable", ("MSH", 1, 1),
            reject=True,
        )
    end = line.find(field_sep, 4)
    encoding = line[4:] if end == -1 else line[4:end]
    defaults = "^~\\&"
    chars = [encoding[i] if i < len(encoding) else defaults[i] for i in range(4)]
    if len(set(chars + [field_sep])) != 5:
        raise HL7Error(
            DATA_TYPE_ERROR,
            f"MSH-2 (encoding characters) {encoding!r} repeats a delimiter",
            ("MSH", 1, 2),
            reject=True,
        )
    return Delimiters(field_sep, chars[0], chars[1], chars[2], chars[3])


def _msh_fields(line: str, d: Delimiters) -> list[str]:
    # MSH-1 is the field separator itself, so MSH-n is at index n.
    parts = line.split(d.field)
    return ["MSH", d.field] + parts[1:]


# Segments mapped into the worklist (see mapping.py); all others are kept only in the raw
# message.
READ_SEGMENTS = {"MSH", "EVN", "PID", "PV1", "AL1", "ORC", "TQ1", "OBR", "IPC", "ZDS", "NTE",
                 "OBX", "MRG"}


def decode_text(raw: bytes, header: Header | None, strict: bool = False) -> tuple[str, str]:
    """The message as text with CR between segments (CRLF and LF read as CR, padding
    stripped), and the codec it was decoded with: MSH-18's; without MSH-18 (or when a
    ``header``-less or ASCII-declared message has 8-bit bytes) UTF-8 when it decodes, else
    Latin-1, which decodes anything and is what 8-bit senders without MSH-18 usually mean.
    ``strict`` (the listener): an unsupported MSH-18, or bytes that are not valid in the
    declared character set, raise HL7Error instead of falling back."""
    text = codec = None
    if header is not None and header.charset:
        codec = codec_for(header.charset)
        if codec is None and strict:
            raise HL7Error(
                TABLE_VALUE_NOT_FOUND,
                f"MSH-18 (character set) {header.charset!r} is not supported",
                ("MSH", 1, 18),
                reject=True,
            )
        if codec is not None:
            try:
                text = raw.decode(codec)
            except UnicodeDecodeError as exc:
                if strict and codec != "ascii":
                    raise HL7Error(
                        DATA_TYPE_ERROR,
                        f"The message is not valid {header.charset} text "
                        f"(byte {exc.start}): check MSH-18",
                        ("MSH", 1, 18),
                    ) from exc
    if text is None:
        try:
            text, codec = raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, codec = raw.decode("latin-1"), "latin-1"
    return segment_text(text), codec


def segment_text(text: str) -> str:
    """Segments separated by CR (CRLF and LF read as CR), padding around the message
    stripped."""
    return text.replace("\r\n", "\r").replace("\n", "\r").strip("\r\n\t \x00\ufeff")


class Message:
    """One decoded, split message. Values are read with :meth:`get` and friends, which
    return unescaped text ("" when absent); HL7's explicit null ``""`` comes back as
    :data:`NULL` so that callers can tell "clear this" from "not sent"."""

    def __init__(self, raw: bytes, header: Header | None = None):
        self.header = header or read_header(raw)
        d = self.header.delimiters
        text, self.header.codec = decode_text(raw[message_start(raw):], self.header,
                                              strict=True)
        self.codec = self.header.codec
        # Only the segments the gateway reads are split (insurance, guarantor, next of kin…
        # can be most of a real order message); blank lines between segments are dropped.
        # A segment is split into its fields here; a field into repetitions, components and
        # subcomponents only when it is read (see raw()).
        self.segments = [
            _msh_fields(line, d) if line.startswith("MSH") else line.split(d.field)
            for line in text.split("\r") if line[:3].upper() in READ_SEGMENTS
        ]
        self.names = [seg[0].strip().upper() for seg in self.segments]
        if not self.names or self.names[0] != "MSH":
            raise HL7Error(SEGMENT_SEQUENCE_ERROR, "The message does not start with an MSH "
                           "segment", ("MSH", 1), reject=True)
        # MSH again, from the decoded text, so that non-ASCII sender names come back right.
        self.header.raw = self.segments[0]
        self.delimiters = d
        self._levels = (d.repetition, d.component, d.subcomponent)

    def all(self, name: str) -> list:
        return [seg for seg, n in zip(self.segments, self.names, strict=True) if n == name]

    def first(self, name: str):
        for seg, n in zip(self.segments, self.names, strict=True):
            if n == name:
                return seg
        return None

    # --- values -------------------------------------------------------------------------

    def raw(self, seg, n: int, rep: int = 1, comp: int = 1, sub: int = 1) -> str:
        """The escaped text at seg-n.rep.comp.sub ("" when absent)."""
        if seg is None or n >= len(seg):
            return ""
        value = seg[n]
        if n <= 2 and seg is self.segments[0]:  # MSH-1 and MSH-2 are the delimiters
            return value if rep == comp == sub == 1 else ""
        for index, separator in zip((rep, comp, sub), self._levels, strict=True):
            if separator in value:
                parts = value.split(separator)
                if index > len(parts):
                    return ""
                value = parts[index - 1]
            elif index != 1:
                return ""
        return value

    def get(self, seg, n: int, comp: int = 1, sub: int = 1, rep: int = 1) -> str:
        value = self.raw(seg, n, rep, comp, sub)
        if value == '""':
            return NULL
        return unescape(value, self.delimiters, self.codec).strip()

    def repetitions(self, seg, n: int) -> int:
        if seg is None or n >= len(seg) or not seg[n]:
            return 0
        return seg[n].count(self.delimiters.repetition) + 1


class _Null(str):
    """HL7's explicit null (``""``): the receiver must clear the value."""


NULL = _Null("")


def is_null(value: str) -> bool:
    return isinstance(value, _Null)


_FORMATTING = {".br": "\n", ".sp": "\n", ".ce": "\n", ".fi": "", ".nf": "", ".sk": " ",
               ".in": "", ".ti": "", "H": "", "N": ""}


def unescape(value: str, d: Delimiters, codec: str = "utf-8") -> str:
    """Resolve HL7 escape sequences (v2 chapter 2.7). Unknown sequences are dropped, an
    unterminated one is kept as text."""
    esc = d.escape
    if not value or esc not in value:
        return value
    hex_codec = "latin-1" if codec == "ascii" else codec
    out: list[str] = []
    pending = bytearray()
    i = 0
    while True:
        j = value.find(esc, i)
        k = value.find(esc, j + 1) if j != -1 else -1
        if j == -1 or k == -1:
            break
        if j > i and pending:
            out.append(pending.decode(hex_codec, "replace"))
            pending.clear()
        out.append(value[i:j])
        seq = value[j + 1 : k]
        i = k + 1
        if seq.startswith("X") and len(seq) > 1:
            try:
                pending += bytes.fromhex(seq[1:])
                continue
            except ValueError:
                pass
        if pending:
            out.append(pending.decode(hex_codec, "replace"))
            pending.clear()
        if seq == "F":
            out.append(d.field)
        elif seq == "S":
            out.append(d.component)
        elif seq == "T":
            out.append(d.subcomponent)
        elif seq == "R":
            out.append(d.repetition)
        elif seq == "E":
            out.append(esc)
        elif seq in _FORMATTING:
            out.append(_FORMATTING[seq])
        elif seq[:3] in _FORMATTING:
            out.append(_FORMATTING[seq[:3]])
    if pending:
        out.append(pending.decode(hex_codec, "replace"))
    out.append(value[i:])
    return "".join(out)


def escape(value: str, d: Delimiters) -> str:
    """Escape delimiters in text the gateway writes (ACK error texts)."""
    esc = d.escape
    out = value.replace(esc, f"{esc}E{esc}")
    for char, code in ((d.field, "F"), (d.component, "S"), (d.subcomponent, "T"),
                       (d.repetition, "R")):
        out = out.replace(char, f"{esc}{code}{esc}")
    return out.replace("\r", " ").replace("\n", " ")


_TS = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?\d*([+-]\d{4})?")


def parse_ts(value: str, what: str, location: tuple) -> datetime | None:
    """An HL7 TS/DTM as the wall-clock time it names, stored as if UTC (see the models'
    docstring). A zone offset in the value is ignored: the worklist shows local times."""
    if not value:
        return None
    match = _TS.fullmatch(value.strip())
    if match:
        y, mo, d, h, mi, s, frac, _zone = match.groups()
        try:
            return datetime(
                int(y), int(mo or 1), int(d or 1), int(h or 0), int(mi or 0), int(s or 0),
                int((frac or "0").ljust(6, "0")), tzinfo=UTC,
            )
        except ValueError:
            pass
    raise HL7Error(DATA_TYPE_ERROR, f"{what} {value!r} is not a valid HL7 date/time", location)
