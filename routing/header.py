"""The header of a received instance as JSON: the top-level attributes rules match and the
pages show, recorded with the instance before its C-STORE is answered.

A received instance is read by :class:`ReceivedDataSet`. Where its encoding is plain (explicit
VR little endian, the data set of every uncompressed and compressed transfer syntax but three)
the elements before Pixel Data are found by walking their tags and lengths
(:func:`scan_part10`) and pydicom reads nothing: on a CT instance that walk costs a tenth of
``dcmread`` and of the lookups that follow it. Anything else (implicit VR, big endian,
deflate, undefined lengths outside sequences, an unknown VR, a length past the end, deep or
odd sequences...) is read by pydicom as before, so the two ways keep and refuse the same
instances and read the same values; the tests compare them over pydicom's own sample files
and over broken encodings.

pydicom decodes a value through hooks, validation and value classes; for the ~100 short
elements of a CT or MR header that cost more CPU than the rest of storing the instance. The
common ones, ASCII text and binary numbers in little-endian explicit VR, are decoded here
directly into the text pydicom's value would give (the tests compare both over pydicom's own
sample files); every other element, and every element while pydicom is configured away from
its defaults, goes through pydicom.
"""

from __future__ import annotations

import re
import struct
from functools import cached_property
from io import BytesIO
from typing import NamedTuple

from pydicom import config, dcmread
from pydicom.datadict import DicomDictionary
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import PrivateTransferSyntaxes

MAX_HEADER_VALUE = 1024
# Values rules cannot compare as text; the stored file still has them.
SKIPPED_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"}
# An element read with one of these explicit VRs keeps it when decoded (UN may become the
# dictionary VR), so it is left out without decoding it: sequences would be parsed in full.
_SKIPPED_RAW_VRS = SKIPPED_VRS - {"UN"}

# Text VRs whose values are split at backslashes (PS3.5 6.2), and those that are not.
_MULTI_TEXT = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "SH", "LO", "PN", "UC",
                         "IS", "DS"})
_SINGLE_TEXT = frozenset({"ST", "LT", "UT", "UR"})
_NUMBERS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "UV": "Q", "SV": "q",
            "FL": "f", "FD": "d"}
# Values pydicom's IS and DS accept as they are; anything else is left to pydicom.
_IS = re.compile(r"\s*[+-]?\d+\s*\Z")
_DS = re.compile(r"\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*\Z")
# LUT Descriptors: pydicom reads the first value as unsigned whatever the VR says
# (PS3.3 C.11.1.1.1).
_LUT_DESCRIPTORS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})
# Character sets in which ASCII bytes are the ASCII characters (no ISO 2022 code extensions).
_ASCII_CHARSETS = frozenset({
    "", "ISO_IR 6", "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 126",
    "ISO_IR 127", "ISO_IR 138", "ISO_IR 144", "ISO_IR 148", "ISO_IR 166", "ISO_IR 192",
    "ISO_IR 203", "GB18030", "GBK",
})


def header_as_json(ds: Dataset, decode_directly: bool = True) -> dict:
    """The top-level attributes rules can match, as JSON: keyword (or ``GGGGEEEE`` for tags
    without one) → string, or list of strings for multi-valued attributes. Binary, sequence
    and unknown-VR elements, values over 1 KB and values that do not decode are left out
    (they stay in the stored file): one broken element costs only itself.

    ``decode_directly=False`` decodes every value with pydicom: the reference the direct
    decoding is tested against."""
    direct = decode_directly and _pydicom_defaults() and _ascii_charset(ds)
    header: dict = {}
    for tag in sorted(ds.keys()):
        try:
            raw = ds.get_item(tag)
            if isinstance(raw, RawDataElement):
                if raw.VR in _SKIPPED_RAW_VRS:
                    continue
                out = (_decoded(raw.tag, raw.VR, raw.value)
                       if direct and not raw.is_implicit_VR and raw.is_little_endian else None)
                if out is not None:
                    _add(header, _key(tag), out)
                    continue
            # Reading the element decodes it (pydicom reads values lazily), which raises for
            # a garbled VR or length: iterating the dataset would fail the whole header.
            element = ds[tag]
            if element.VR in SKIPPED_VRS:
                continue
            value = element.value
            if isinstance(value, bytes | bytearray):
                continue
            if isinstance(value, MultiValue | list | tuple):
                out = [_clean(v) for v in value]
            else:
                out = _clean(value)
        except Exception:
            continue
        _add(header, element.keyword or f"{int(element.tag):08X}", out)
    return header


def _key(tag: int) -> str:
    """The header's key for a tag: its keyword, ``GGGGEEEE`` without one (as
    ``dictionary_keyword`` after ``dictionary_has_tag``, minus their tag conversions)."""
    entry = DicomDictionary.get(tag)
    return (entry[4] if entry is not None else "") or f"{int(tag):08X}"


def _add(header: dict, key: str, value: str | list[str]) -> None:
    size = len(value) if isinstance(value, str) else sum(len(v) for v in value)
    if size <= MAX_HEADER_VALUE:
        header[key] = value


def _clean(value) -> str:
    if value is None:
        return ""
    text = str(value)
    # PostgreSQL's jsonb cannot hold NUL; DICOM pads with it.
    return text.replace("\x00", "").strip()


def _pydicom_defaults() -> bool:
    """Whether pydicom decodes values the way :func:`_decoded` assumes."""
    return not (config.use_DS_decimal or config.use_DS_numpy or config.use_IS_numpy
                or config.datetime_conversion or config.use_none_as_empty_text_VR_value
                or config.data_element_callback
                # Raising on an invalid value would leave out elements decoded here.
                or config.settings.reading_validation_mode == config.RAISE)


def _ascii_charset(ds: Dataset) -> bool:
    try:
        charset = ds.get("SpecificCharacterSet", "") or ""
    except Exception:
        return False
    values = [charset] if isinstance(charset, str) else list(charset)
    return all(str(v).strip() in _ASCII_CHARSETS for v in values)


def _decoded(tag: int, vr: str, value: bytes | None) -> str | list[str] | None:
    """The cleaned text of a common element's value (little endian), or None to let pydicom
    decode it."""
    if value is None:
        return None
    if vr in _MULTI_TEXT or vr in _SINGLE_TEXT:
        # ESC starts an ISO 2022 escape sequence: pydicom switches character sets there.
        if not value.isascii() or b"\x1b" in value:
            return None
        text = value.decode("ascii")
        if vr in _SINGLE_TEXT:
            return _clean(text)
        items = text.split("\\")
        if vr == "PN" and "=" in text:
            return None  # component groups: pydicom rebuilds them
        if vr == "IS" and not all(_IS.match(v) or not v.strip(" \x00") for v in items):
            return None
        if vr == "DS" and not all(_DS.match(v) or not v.strip() for v in items):
            return None
        if len(items) == 1:
            return _clean(items[0])
        return [_clean(v) for v in items]
    if vr == "AT":
        if not value or len(value) % 4:
            return None
        tags = struct.unpack(f"<{len(value) // 2}H", value)
        out = [f"({tags[i]:04X},{tags[i + 1]:04X})" for i in range(0, len(tags), 2)]
        return out[0] if len(out) == 1 else out
    code = _NUMBERS.get(vr)
    if code is None or tag in _LUT_DESCRIPTORS:
        return None
    size = struct.calcsize(code)
    if len(value) % size:
        return None  # pydicom refuses it: the element is left out
    numbers = struct.unpack(f"<{len(value) // size}{code}", value)
    if not numbers:
        return ""
    if len(numbers) == 1:
        return str(numbers[0])
    return [str(n) for n in numbers]


# --- Reading a received instance --------------------------------------------------------------

# Explicit VR encodings (PS3.5 Table 7.1-1, 7.1-2): VRs with a 2-byte length, and with two
# reserved bytes and a 4-byte length.
_SHORT_VRS = {vr.encode(): vr for vr in ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL",
                                         "IS", "LO", "LT", "PN", "SH", "SL", "SS", "ST", "TM",
                                         "UI", "UL", "US")}
_LONG_VRS = {vr.encode(): vr for vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC",
                                        "UN", "UR", "UT", "UV")}
_ELEMENT = struct.Struct("<HH2sH")
_ITEM = struct.Struct("<HHI")
_LENGTH = struct.Struct("<I")
_UNDEFINED = 0xFFFFFFFF
_ITEM_TAG, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# Where ``dcmread(stop_before_pixels=True)`` stops: Pixel Data and its float variants.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
# Transfer syntaxes whose data set pydicom does not read as explicit VR little endian.
# (and those registered in pydicom's PrivateTransferSyntaxes).
_NOT_EXPLICIT_LITTLE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.2",
                                  "1.2.840.10008.1.2.1.99"})
_PLAIN_UID = re.compile(r"[0-9.]+\Z")


class Scan(NamedTuple):
    """The top level of a plain Part 10 encoding: tag → (VR, value bytes) for the file meta
    elements and for the data set's elements before Pixel Data (value None for a sequence of
    undefined length, which is walked but not kept)."""

    meta: dict[int, tuple[str, bytes]]
    elements: dict[int, tuple[str, bytes | None]]


def scan_part10(encoded: bytes) -> Scan | None:
    """Walk a Part 10 encoding's file meta and data set elements up to Pixel Data; None when
    any of it is not plain (see the module docstring), for pydicom to read instead."""
    try:
        return _scan(encoded)
    except (struct.error, RecursionError, UnicodeDecodeError):
        return None


def _element_at(data: bytes, pos: int, end: int) -> tuple[int, str, int, int] | None:
    """(tag, VR, where the value starts, value length) of the explicit VR little endian
    element at ``pos``; None if its VR is unknown or its header is cut short."""
    if end - pos < 8:
        return None
    group, elem, vr, length = _ELEMENT.unpack_from(data, pos)
    name = _SHORT_VRS.get(vr)
    start = pos + 8
    if name is None:
        name = _LONG_VRS.get(vr)
        if name is None or end - pos < 12:
            return None
        length = _LENGTH.unpack_from(data, start)[0]
        start += 4
    return group << 16 | elem, name, start, length


def part10_meta(data: bytes) -> tuple[dict[int, tuple[str, bytes]], int] | None:
    """The file meta elements (tag → (VR, value bytes)) of a Part 10 encoding, or of its
    beginning, and where its data set starts; None when the meta is not plain explicit VR
    little endian or not all in ``data``."""
    end = len(data)
    if end < 132 or data[128:132] != b"DICM":
        return None
    meta: dict = {}
    pos = 132
    while pos < end:
        element = _element_at(data, pos, end)
        if element is None:
            return None
        tag, name, start, length = element
        if tag >> 16 != 2:
            break
        pos = start + length
        if length == _UNDEFINED or pos > end:
            return None
        meta[tag] = (name, data[start:pos])
    else:
        return None  # the data set's first element is not in data
    return meta, pos


def plain_uid(elements: dict[int, tuple[str, bytes | None]], tag: int) -> str | None:
    """The value of a UI element of :func:`part10_meta` or :class:`Scan` as pydicom reads it,
    when it is one plain UID; None when it is missing, not a UI, empty or anything else."""
    found = elements.get(tag)
    if found is None or found[0] != "UI" or found[1] is None:
        return None
    text = found[1].decode("latin-1").rstrip("\0 ")
    return text if _PLAIN_UID.match(text) else None


def _scan(data: bytes) -> Scan | None:
    found = part10_meta(data)
    if found is None:
        return None
    meta, pos = found
    end = len(data)
    syntax = meta.get(0x00020010)
    if syntax is None:
        return None
    syntax_uid = syntax[1].decode("ascii").rstrip("\0 ")
    if syntax_uid in _NOT_EXPLICIT_LITTLE or syntax_uid in PrivateTransferSyntaxes:
        return None
    elements: dict = {}
    while pos < end:
        # An unknown VR, implicit VR (pydicom switches to it) or a header cut short: None.
        element = _element_at(data, pos, end)
        if element is None:
            return None
        tag, name, start, length = element
        if tag in _PIXEL_TAGS:
            break  # having read its header, as pydicom does before it stops there
        # Command or file meta elements in the data set, or a delimiter at its top level:
        # pydicom has rules of its own for those.
        if tag >> 16 <= 2 or tag >> 16 == 0xFFFE:
            return None
        if length == _UNDEFINED:
            if name != "SQ":
                return None
            pos = _skip_sequence(data, start, end)
            if pos is None:
                return None
            elements[tag] = (name, None)
        else:
            pos = start + length
            if pos > end:
                return None
            elements[tag] = (name, data[start:pos])
    if not elements:
        return None  # no data set: pydicom says what it makes of that
    return Scan(meta, elements)


# Sequences nested deeper than this are left to pydicom (which gives up on a few hundred
# levels): the walk must not accept what pydicom refuses.
MAX_NESTING = 16


def _skip_sequence(data: bytes, pos: int, end: int, depth: int = 1) -> int | None:
    """The position after an undefined-length sequence's delimiter, its items walked element
    by element as pydicom parses them; None if anything in it is not plain."""
    if depth > MAX_NESTING:
        return None
    while True:
        if end - pos < 8:
            return None
        group, elem, length = _ITEM.unpack_from(data, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM_TAG:
            return None
        if length == _UNDEFINED:
            pos = _skip_item(data, pos, end, True, depth)
        else:
            item_end = pos + length
            if item_end > end or _skip_item(data, pos, item_end, False, depth) != item_end:
                return None
            pos = item_end
        if pos is None:
            return None


def _skip_item(data: bytes, pos: int, end: int, undefined: bool, depth: int) -> int | None:
    """The end of an item's data set (after its delimiter when ``undefined``)."""
    while True:
        if not undefined and pos == end:
            return pos
        if end - pos < 8:
            return None
        group, elem, length = _ITEM.unpack_from(data, pos)
        if group == 0xFFFE:
            # A delimiter's length is zero; pydicom reads other bytes there as a VR.
            if undefined and (group << 16 | elem) == _ITEM_END and length == 0:
                return pos + 8
            return None
        element = _element_at(data, pos, end)
        if element is None:
            return None
        tag, name, start, length = element
        if tag == 0x00080005:
            return None  # pydicom decodes an item's character set as it reads it
        if length == _UNDEFINED:
            if name != "SQ":
                return None
            pos = _skip_sequence(data, start, end, depth + 1)
            if pos is None:
                return None
        else:
            pos = start + length
            if pos > end:
                return None


class ReceivedDataSet:
    """A received instance (Part 10 bytes) as storing reads it: its UIDs and header straight
    from :func:`scan_part10` where the encoding is plain, and pydicom's Dataset
    (``dcmread(stop_before_pixels=True)``) only when something asks for more.

    Constructing one raises what ``dcmread`` raises for an encoding that is neither plain nor
    readable by pydicom."""

    def __init__(self, encoded: bytes):
        self.encoded = encoded
        # pydicom configured away from its defaults reads as it is told: let it.
        self._scan = scan_part10(encoded) if _pydicom_defaults() else None
        if self._scan is None:
            self.dataset  # noqa: B018 - read now: this is where an unreadable encoding fails

    @property
    def scanned(self) -> bool:
        """Whether the encoding was plain enough to be walked without pydicom."""
        return self._scan is not None

    @cached_property
    def dataset(self) -> Dataset:
        # Element lengths are read eagerly, values lazily (one by one, in header_as_json).
        return dcmread(BytesIO(self.encoded), stop_before_pixels=True)

    def has(self, tag: int) -> bool:
        """Whether the data set has this top-level element (before Pixel Data)."""
        if self._scan is not None:
            return tag in self._scan.elements
        return tag in self.dataset

    def plain_uid(self, tag: int) -> str | None:
        """A UI element's value (file meta for group 2) as pydicom reads it, when it is one
        plain UID; None when it is missing, not a UI, empty or anything else: ask
        :attr:`dataset`."""
        if self._scan is None:
            return None
        return plain_uid(self._scan.meta if tag >> 16 == 2 else self._scan.elements, tag)

    @cached_property
    def header(self) -> dict:
        """:func:`header_as_json` of the data set."""
        if self._scan is not None:
            header = _header_from_scan(self._scan.elements)
            if header is not None:
                return header
        return header_as_json(self.dataset)


def _header_from_scan(elements: dict[int, tuple[str, bytes | None]]) -> dict | None:
    """What :func:`header_as_json` makes of these elements, when every one decodes directly;
    None otherwise (the caller asks pydicom)."""
    charset = elements.get(0x00080005)
    if charset is not None:
        if charset[0] != "CS" or not charset[1].isascii():
            return None
        values = charset[1].decode("ascii").split("\\")
        if not all(v.strip() in _ASCII_CHARSETS for v in values):
            return None
    header: dict = {}
    for tag in sorted(elements):
        vr, value = elements[tag]
        if vr in _SKIPPED_RAW_VRS:
            continue
        out = _decoded(tag, vr, value)
        if out is None:
            return None
        _add(header, _key(tag), out)
    return header
