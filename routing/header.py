"""The header of a received instance as JSON: the top-level attributes rules match and the
pages show, recorded with the instance before its C-STORE is answered.

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

from pydicom import config
from pydicom.datadict import dictionary_has_tag, dictionary_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

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
                out = _decoded(raw) if direct else None
                if out is not None:
                    key = dictionary_keyword(tag) if dictionary_has_tag(tag) else ""
                    _add(header, key or f"{int(tag):08X}", out)
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


def _decoded(raw: RawDataElement) -> str | list[str] | None:
    """The cleaned text of a common element's value, or None to let pydicom decode it."""
    vr, value = raw.VR, raw.value
    if raw.is_implicit_VR or not raw.is_little_endian or value is None:
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
    code = _NUMBERS.get(vr)
    if code is None or raw.tag in _LUT_DESCRIPTORS:
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
