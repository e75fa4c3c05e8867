"""Modality Worklist matching (PS3.4 Annex K): a C-FIND identifier in, SQL and response
identifiers out.

:func:`compile_query` turns the identifier into a :class:`WorklistPlan`: a Django ``Q`` over
indexed columns of :class:`~worklist.models.ScheduledStep` and its order and patient, the
columns to fetch, and a per-row builder that fills exactly the requested keys. Nothing here
touches the network; the C-FIND handler is a thin loop around :func:`find_worklist`.

Matching types (PS3.4 C.2.2.2) are implemented one function each, below. One worklist item
is one Scheduled Procedure Step, so its Scheduled Procedure Step Sequence has one item.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from typing import Any

from django.db import connection
from django.db.models import F, Q, Value
from django.db.models.functions import TruncTime, Upper
from django.db.models.lookups import Exact, GreaterThanOrEqual, LessThanOrEqual, Lookup
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

from .models import ScheduledStep, StepStatus

UTF8_CHARSET = "ISO_IR 192"
SPS_SEQUENCE = 0x00400100
SPECIFIC_CHARACTER_SET = 0x00080005

# States a modality may ask for explicitly in ScheduledProcedureStepStatus. Without that key
# only StepStatus.on_worklist() is returned; STARTED is added so that a console can find an
# exam it began and must resume. Ended steps are never worklist items.
QUERYABLE_STATUSES = [*StepStatus.on_worklist(), StepStatus.STARTED]


class InvalidIdentifier(ValueError):
    """The identifier cannot be answered: undecodable, a value its VR does not allow, or a
    structure the Modality Worklist model does not have. Answered with 0xA900."""

    def __init__(self, message: str, tag: int | None = None):
        super().__init__(message)
        self.tag = tag


class UnreadableIdentifier(ValueError):
    """The identifier's bytes do not parse as a dataset (truncated, unknown VR, runaway
    sequence). Answered with 0xC001 Unable to process."""


@dataclass(frozen=True)
class WorklistOptions:
    """Site policy applied to every query."""

    # When set, a query whose ScheduledStationAETitle is universal gets only this station's steps.
    restrict_to_station: str | None = None


# --- Attributes the gateway knows (PS3.4 Table K.6-1) --------------------------------------


@dataclass(frozen=True)
class Attr:
    """One key of the Modality Worklist information model and where its value lives."""

    keyword: str
    vr: str
    column: str | None  # path from ScheduledStep, for .values(); None: the gateway has no value
    match_column: str | None = None  # when matching uses another column (PatientName -> name_key)
    item_keys: tuple[CodeKey, ...] = ()  # for sequences rendered from a JSON list of dicts


@dataclass(frozen=True)
class CodeKey:
    """One attribute of an item of a JSON-backed sequence."""

    tag: int
    vr: str
    json_key: str


CODE_ITEM = (
    CodeKey(0x00080100, "SH", "value"),
    CodeKey(0x00080102, "SH", "scheme"),
    CodeKey(0x00080103, "SH", "version"),
    CodeKey(0x00080104, "LO", "meaning"),
)
OTHER_PATIENT_ID_ITEM = (
    CodeKey(0x00100020, "LO", "id"),
    CodeKey(0x00100021, "LO", "issuer"),
    CodeKey(0x00100022, "CS", "type"),
)

_O = "order__"
_P = "order__patient__"

TOP_LEVEL: dict[int, Attr] = {
    0x00080050: Attr("AccessionNumber", "SH", _O + "accession_number"),
    0x00080090: Attr("ReferringPhysicianName", "PN", _O + "referring_physician"),
    0x00081110: Attr("ReferencedStudySequence", "SQ", None),
    0x00100010: Attr("PatientName", "PN", _P + "name", match_column=_P + "name_key"),
    0x00100020: Attr("PatientID", "LO", _P + "patient_id"),
    0x00100021: Attr("IssuerOfPatientID", "LO", _P + "issuer"),
    0x00100030: Attr("PatientBirthDate", "DA", _P + "birth_date"),
    0x00100040: Attr("PatientSex", "CS", _P + "sex"),
    0x00101002: Attr(
        "OtherPatientIDsSequence", "SQ", _P + "other_ids", item_keys=OTHER_PATIENT_ID_ITEM
    ),
    0x00101030: Attr("PatientWeight", "DS", _P + "weight_kg"),
    0x00102000: Attr("MedicalAlerts", "LO", _P + "medical_alerts"),
    0x00102110: Attr("Allergies", "LO", _P + "allergies"),
    0x001021C0: Attr("PregnancyStatus", "US", _P + "pregnancy_status"),
    0x0020000D: Attr("StudyInstanceUID", "UI", _O + "study_instance_uid"),
    0x00321032: Attr("RequestingPhysician", "PN", _O + "requesting_physician"),
    0x00321060: Attr("RequestedProcedureDescription", "LO", _O + "requested_procedure_description"),
    0x00321064: Attr(
        "RequestedProcedureCodeSequence",
        "SQ",
        _O + "requested_procedure_codes",
        item_keys=CODE_ITEM,
    ),
    0x00380010: Attr("AdmissionID", "LO", _O + "admission_id"),
    0x00380300: Attr("CurrentPatientLocation", "LO", _O + "patient_location"),
    0x00401001: Attr("RequestedProcedureID", "SH", _O + "requested_procedure_id"),
    0x00401002: Attr("ReasonForTheRequestedProcedure", "LO", _O + "reason"),
    0x00401003: Attr("RequestedProcedurePriority", "SH", _O + "priority"),
    0x00402016: Attr("PlacerOrderNumberImagingServiceRequest", "LO", _O + "placer_order_number"),
    0x00402017: Attr("FillerOrderNumberImagingServiceRequest", "LO", _O + "filler_order_number"),
}

SPS_DATE = 0x00400002
SPS_TIME = 0x00400003
SPS_STATUS = 0x00400020
SPS_STATION_AE = 0x00400001

SPS_ITEM: dict[int, Attr] = {
    SPS_STATION_AE: Attr("ScheduledStationAETitle", "AE", "station_ae_title"),
    SPS_DATE: Attr("ScheduledProcedureStepStartDate", "DA", "start"),
    SPS_TIME: Attr("ScheduledProcedureStepStartTime", "TM", "start"),
    0x00080060: Attr("Modality", "CS", "modality"),
    0x00400006: Attr("ScheduledPerformingPhysicianName", "PN", "performing_physician"),
    0x00400007: Attr("ScheduledProcedureStepDescription", "LO", "description"),
    0x00400010: Attr("ScheduledStationName", "SH", "station_name"),
    0x00400011: Attr("ScheduledProcedureStepLocation", "SH", "location"),
    0x00400008: Attr("ScheduledProtocolCodeSequence", "SQ", "protocol_codes", item_keys=CODE_ITEM),
    0x00400012: Attr("PreMedication", "LO", "pre_medication"),
    0x00400009: Attr("ScheduledProcedureStepID", "SH", "sps_id"),
    0x00321070: Attr("RequestedContrastAgent", "LO", "contrast_agent"),
    SPS_STATUS: Attr("ScheduledProcedureStepStatus", "CS", "status"),
    0x00400400: Attr("CommentsOnTheScheduledProcedureStep", "LT", "comments"),
}

# VRs whose values may carry wildcards (PS3.4 C.2.2.2.4).
_WILDCARD_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
_NO_MATCH = Q(pk__in=[])


# --- Reading the identifier -----------------------------------------------------------------


def _values(elem: DataElement) -> list[str]:
    """The element's values as stripped strings; [] for a zero-length (universal) key."""
    value = elem.value
    if value is None or value == "" or value == b"":
        return []
    if isinstance(value, bytes):
        raise InvalidIdentifier(
            f"{elem.keyword or elem.tag} has a value its VR does not allow", elem.tag
        )
    items = list(value) if isinstance(value, MultiValue | list) else [value]
    out = []
    for item in items:
        text = str(item) if not isinstance(item, PersonName) else _pn_alphabetic(item)
        if "\ufffd" in text:
            raise InvalidIdentifier(
                f"{elem.keyword or elem.tag} cannot be decoded with the query's "
                "SpecificCharacterSet",
                elem.tag,
            )
        out.append(text.strip())
    # A key whose every value is only "*" matches everything (PS3.4 C.2.2.2.3 / C.2.2.2.4).
    if all(v == "" or set(v) == {"*"} for v in out):
        return []
    return out


def _pn_alphabetic(name: PersonName) -> str:
    # Only the alphabetic component group is stored; trailing empty components are not
    # significant ("SMITH^JOHN^^" is "SMITH^JOHN").
    return str(name).split("=")[0].rstrip("^ ")


# --- Matching, one function per PS3.4 C.2.2.2 matching type ---------------------------------


class _Like(Lookup):
    """SQL LIKE with backslash as escape character, for wildcard matching."""

    lookup_name = "mwl_like"

    def as_sql(self, compiler, connection):
        lhs, lhs_params = self.process_lhs(compiler, connection)
        rhs, rhs_params = self.process_rhs(compiler, connection)
        return f"{lhs} LIKE {rhs} ESCAPE '\\'", [*lhs_params, *rhs_params]


def _like_pattern(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def match_single_value(column: str, value: str, case_insensitive: bool = False) -> Q:
    """PS3.4 C.2.2.2.1 Single Value Matching: the stored value equals the key exactly
    (case-insensitively for PN, which C.2.2.2.1 allows)."""
    if case_insensitive:
        return Q(Exact(Upper(F(column)), Value(value.upper())))
    return Q(**{column: value})


def match_wildcard(column: str, value: str, case_insensitive: bool = False) -> Q:
    """PS3.4 C.2.2.2.4 Wild Card Matching: ``*`` any run of characters, ``?`` one character.
    SQL's own metacharacters in the key are escaped. A leading literal prefix lets PostgreSQL
    use a varchar_pattern_ops index."""
    lhs = Upper(F(column)) if case_insensitive else F(column)
    pattern = _like_pattern(value.upper() if case_insensitive else value)
    return Q(_Like(lhs, Value(pattern)))


def match_text(column: str, values: list[str], vr: str, case_insensitive: bool = False) -> Q:
    """Single value or wildcard matching of each value; several values (backslash-separated)
    match when any of them does."""
    q = Q()
    for value in values:
        if ("*" in value or "?" in value) and vr in _WILDCARD_VRS:
            q |= match_wildcard(column, value, case_insensitive)
        else:
            q |= match_single_value(column, value, case_insensitive)
    return q


def match_uid_list(column: str, values: list[str], tag: int) -> Q:
    """PS3.4 C.2.2.2.2 List of UID Matching: any of the backslash-separated UIDs."""
    for uid in values:
        if not re.fullmatch(r"[0-9.]{1,64}", uid):
            raise InvalidIdentifier("a UID key holds something that is not a UID", tag)
    return Q(**{f"{column}__in": values})


def _parse_date(text: str, tag: int) -> date:
    digits = text.replace(".", "") if len(text) == 10 else text  # ACR-NEMA YYYY.MM.DD
    if not re.fullmatch(r"\d{8}", digits):
        raise InvalidIdentifier("a DA key holds something that is not a date", tag)
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError as exc:
        raise InvalidIdentifier("a DA key holds an impossible date", tag) from exc


_TIME = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?")


def _parse_time(text: str, tag: int, upper: bool) -> time:
    """A TM value as a time. An upper bound covers the precision given: "10" runs to
    10:59:59.999999."""
    m = _TIME.fullmatch(text)
    if not m:
        raise InvalidIdentifier("a TM key holds something that is not a time", tag)
    hh, mm, ss, frac = m.groups()
    try:
        if frac is not None:
            micro = int(frac.ljust(6, "9" if upper else "0"))
            return time(int(hh), int(mm), int(ss), micro)
        if upper:
            return time(int(hh), int(mm or 59), int(ss or 59), 999999)
        return time(int(hh), int(mm or 0), int(ss or 0))
    except ValueError as exc:
        raise InvalidIdentifier("a TM key holds an impossible time", tag) from exc


def _range(values: list[str], tag: int) -> tuple[str | None, str | None] | None:
    """Split a DA/TM key into its (low, high) ends; a single value is both ends."""
    if not values:
        return None
    if len(values) > 1:
        raise InvalidIdentifier("a date or time key holds more than one value", tag)
    value = values[0]
    if "*" in value or "?" in value:
        raise InvalidIdentifier("a date or time key holds a wildcard", tag)
    if "-" not in value:
        return value, value
    low, _, high = value.partition("-")
    if "-" in high or (not low and not high):
        raise InvalidIdentifier("a date or time range is malformed", tag)
    return low or None, high or None


def match_date_range(column: str, values: list[str], tag: int) -> Q:
    """PS3.4 C.2.2.2.5 Range Matching on a DA column stored as YYYYMMDD text. An empty stored
    value never falls in a range; an inverted range matches nothing."""
    ends = _range(values, tag)
    if ends is None:
        return Q()
    low, high = (_parse_date(e, tag) if e else None for e in ends)
    if low and high and low > high:
        return _NO_MATCH
    q = ~Q(**{column: ""})
    if low:
        q &= Q(**{f"{column}__gte": low.strftime("%Y%m%d")})
    if high:
        q &= Q(**{f"{column}__lte": high.strftime("%Y%m%d")})
    return q


def match_scheduled_start(date_values: list[str], time_values: list[str]) -> Q:
    """ScheduledProcedureStepStartDate and -Time against ``ScheduledStep.start``.

    PS3.4 C.2.2.2.5 Range Matching: date alone matches whole days; time alone matches the
    time of day on any date. PS3.4 C.2.2.2.5.2 combined datetime matching: when both carry a
    value they form one datetime range, so 20260105-20260107 with 1000-1800 runs from
    Jan 5 10:00 to Jan 7 18:00. Ends are inclusive to the precision given. An inverted
    range matches nothing.
    """
    date_ends = _range(date_values, SPS_DATE)
    time_ends = _range(time_values, SPS_TIME)
    if date_ends is None and time_ends is None:
        return Q()
    t_low = _parse_time(time_ends[0], SPS_TIME, upper=False) if time_ends and time_ends[0] else None
    t_high = _parse_time(time_ends[1], SPS_TIME, upper=True) if time_ends and time_ends[1] else None
    if date_ends is None:
        if t_low and t_high and t_low > t_high:
            return _NO_MATCH
        of_day = TruncTime("start", tzinfo=UTC)
        q = Q(start__isnull=False)
        if t_low:
            q &= Q(GreaterThanOrEqual(of_day, t_low))
        if t_high:
            q &= Q(LessThanOrEqual(of_day, t_high))
        return q
    d_low, d_high = (_parse_date(e, SPS_DATE) if e else None for e in date_ends)
    low = datetime.combine(d_low, t_low or time.min, UTC) if d_low else None
    high = datetime.combine(d_high, t_high or time.max, UTC) if d_high else None
    if low and high and low > high:
        return _NO_MATCH
    q = Q()
    if low:
        q &= Q(start__gte=low)
    if high:
        q &= Q(start__lte=high)
    return q


def match_code_sequence(column: str, request_item: Dataset | None, item_keys) -> Q:
    """PS3.4 C.2.2.2.6 Sequence Matching on a JSON list of codes: single values inside the
    item must all hold in one code. Code matching is optional in Table K.6-1: wildcards, and
    databases without JSON containment (SQLite), treat it as universal matching."""
    if request_item is None:
        return Q()
    wanted = {}
    for key in item_keys:
        if key.tag in request_item:
            values = _values(request_item[key.tag])
            if len(values) == 1 and "*" not in values[0] and "?" not in values[0]:
                wanted[key.json_key] = values[0]
    if not wanted:
        return Q()
    if not connection.features.supports_json_field_contains:
        return Q()
    return Q(**{f"{column}__contains": [wanted]})


def match_status(values: list[str]) -> Q:
    """ScheduledProcedureStepStatus: without a value, the steps a modality should perform;
    with one, that status among the states it makes sense to ask for."""
    if not values:
        return Q(status__in=StepStatus.on_worklist())
    return Q(status__in=QUERYABLE_STATUSES) & match_text("status", values, "CS")


# --- Building answers -------------------------------------------------------------------------
#
# pydicom spends about 1 ms turning a fresh Dataset of ~25 elements into bytes, more than the
# rest of an answer costs. The plan therefore encodes each value straight to bytes (Little
# Endian, in the negotiated VR encoding, text as UTF-8) and hands pynetdicom a Dataset of raw
# elements whose original encoding matches, which pydicom writes out without re-encoding.

_LONG_LENGTH_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_ITEM_TAG = b"\xfe\xff\x00\xe0"

ValueEncoder = Callable[[dict], bytes]


def _text(value: Any) -> bytes:
    if value is None or value == "":
        return b""
    data = str(value).encode("utf-8")  # ASCII stays ASCII; the rest is ISO_IR 192
    return data + b" " if len(data) % 2 else data


def _uid(value: Any) -> bytes:
    if not value:
        return b""
    data = str(value).encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def _us(value: Any) -> bytes:
    return b"" if value is None or value == "" else struct.pack("<H", int(value))


def _value_encoder(vr: str) -> Callable[[Any], bytes]:
    if vr == "UI":
        return _uid
    if vr == "US":
        return _us
    return _text


@dataclass
class _Slot:
    """One requested key: its tag and VR and how to encode its value from a row."""

    tag: int
    vr: str
    encode: ValueEncoder

    def header(self, implicit_vr: bool, length: int) -> bytes:
        """The element's tag and length (and VR, when explicit) in Little Endian."""
        tag = struct.pack("<HH", self.tag >> 16, self.tag & 0xFFFF)
        if implicit_vr:
            return tag + struct.pack("<I", length)
        if self.vr in _LONG_LENGTH_VRS:
            return tag + self.vr.encode() + b"\0\0" + struct.pack("<I", length)
        return tag + self.vr.encode() + struct.pack("<H", length)


def _column(column: str, vr: str) -> ValueEncoder:
    to_bytes = _value_encoder(vr)
    if vr == "DS":
        # A weight the RIS sent that is not a decimal string goes back empty, not malformed.
        return lambda row: _text(row[column]) if _is_ds(row[column]) else b""
    return lambda row: to_bytes(row[column])


def _is_ds(text: str) -> bool:
    return (
        bool(text)
        and len(text) <= 16
        and re.fullmatch(r"[+-]?\d*\.?\d+([eE][+-]?\d+)?", text) is not None
    )


def _encode_items(items: list[list[tuple[_Slot, bytes]]], implicit_vr: bool) -> bytes:
    """Sequence items, each a sorted list of (slot, value bytes), with explicit lengths."""
    out = []
    for elements in items:
        body = b"".join(slot.header(implicit_vr, len(v)) + v for slot, v in elements)
        out.append(_ITEM_TAG + struct.pack("<I", len(body)) + body)
    return b"".join(out)


def _json_items(
    column: str, item_keys: tuple[CodeKey, ...], request_item: Dataset | None, implicit_vr: bool
) -> ValueEncoder:
    """Items of a JSON-backed sequence with the requested keys, or every key the gateway has
    when the request's sequence is empty or has an empty item."""
    full = request_item is None or len(request_item) == 0
    if full:
        wanted = [(_Slot(k.tag, k.vr, _text), k.json_key) for k in item_keys]
    else:
        known = {k.tag: k for k in item_keys}
        wanted = []
        for elem in request_item:
            key = known.get(int(elem.tag))
            vr = key.vr if key else _answer_vr(elem)
            wanted.append((_Slot(int(elem.tag), vr, _text), key.json_key if key else None))
        wanted.sort(key=lambda w: w[0].tag)

    def encode(row: dict) -> bytes:
        items = []
        for entry in row[column] or []:
            elements = []
            for slot, json_key in wanted:
                value = _text(entry.get(json_key)) if json_key and slot.vr != "SQ" else b""
                if full and not value:
                    continue
                elements.append((slot, value))
            items.append(elements)
        return _encode_items(items, implicit_vr)

    return encode


def _answer_vr(elem: DataElement) -> str:
    # An ambiguous dictionary VR ("US or SS") cannot be written for an empty value of a key
    # the gateway does not know; UN says "unknown" and is always valid.
    return elem.VR if elem.VR and " or " not in elem.VR else "UN"


def _nothing(row: dict) -> bytes:
    return b""


def _start_date(row: dict) -> bytes:
    start = row["start"]
    return start.strftime("%Y%m%d").encode() if start else b""


def _start_time(row: dict) -> bytes:
    start = row["start"]
    return start.strftime("%H%M%S").encode() if start else b""


def _is_ascii(value: Any) -> bool:
    if isinstance(value, str):
        return value.isascii()
    if isinstance(value, list):
        return all(_is_ascii(v) for v in value)
    if isinstance(value, dict):
        return all(_is_ascii(v) for v in value.values())
    return True


# --- The plan --------------------------------------------------------------------------------


@dataclass
class WorklistPlan:
    """What one C-FIND asks: a filter, the columns to read, and how to encode each answer."""

    q: Q
    implicit_vr: bool = False
    columns: set[str] = field(default_factory=set)
    slots: list[_Slot] = field(default_factory=list)

    def queryset(self):
        """The matching steps in scheduled order, as dicts of the columns the answers need."""
        return (
            ScheduledStep.objects.filter(self.q)
            .order_by(F("start").asc(nulls_last=True), "pk")
            .values("pk", "start", *sorted(self.columns))
        )

    def rows(
        self, limit: int | None = None, first_page: int = 50, chunk_size: int = 500
    ) -> Generator[dict, None, None]:
        """Stream the rows: the first page with one plain query (most worklist answers fit
        in it), the rest through a server-side cursor that continues after the last row
        seen, so memory stays flat however large the answer."""
        first = list(self.queryset()[: min(first_page, limit or first_page)])
        yield from first
        if len(first) < first_page or (limit is not None and len(first) >= limit):
            return
        last = first[-1]
        if last["start"] is None:
            after = Q(start__isnull=True, pk__gt=last["pk"])
        else:
            after = (
                Q(start__gt=last["start"])
                | Q(start=last["start"], pk__gt=last["pk"])
                | Q(start__isnull=True)
            )
        rest = self.queryset().filter(after)
        if limit is not None:
            rest = rest[: limit - len(first)]
        yield from rest.iterator(chunk_size=chunk_size)

    def answer(self, row: dict) -> Dataset:
        """The response identifier for one row of :meth:`queryset`."""
        implicit = self.implicit_vr
        elements = {
            BaseTag(slot.tag): RawDataElement(
                BaseTag(slot.tag), slot.vr, len(value), value, 0, implicit, True
            )
            for slot in self.slots
            for value in (slot.encode(row),)
        }
        charset: str | list[str] = default_encoding
        if not all(_is_ascii(v) for v in row.values()):
            charset = [UTF8_PYTHON]
            elements[_CHARSET_TAG] = RawDataElement(
                _CHARSET_TAG, "CS", len(_UTF8_VALUE), _UTF8_VALUE, 0, implicit, True
            )
        ds = Dataset(elements)
        # Matching what pydicom derives from the elements lets it write them as they are.
        ds.set_original_encoding(implicit, True, charset)
        return ds


_CHARSET_TAG = BaseTag(SPECIFIC_CHARACTER_SET)
_UTF8_VALUE = _text(UTF8_CHARSET)
UTF8_PYTHON = convert_encodings(UTF8_CHARSET)[0]


def compile_query(
    identifier: Dataset, options: WorklistOptions | None = None, implicit_vr: bool = False
) -> WorklistPlan:
    """Translate a Modality Worklist C-FIND identifier into a :class:`WorklistPlan` whose
    answers are encoded for the given VR encoding (Little Endian).

    Raises :class:`InvalidIdentifier` when the identifier cannot be answered and
    :class:`UnreadableIdentifier` when it cannot be parsed.
    """
    options = options or WorklistOptions()
    plan = WorklistPlan(q=Q(), implicit_vr=implicit_vr)
    sps_request: Dataset | None = None
    sps_requested = False
    elements = _parsed(identifier)
    for elem in elements:
        tag = int(elem.tag)
        if elem.tag.element == 0 or elem.tag.group in (0x0000, 0x0002):
            continue  # group lengths and command/meta groups are not keys
        if tag == SPECIFIC_CHARACTER_SET:
            # It says how the query is encoded, not what to return: answers carry
            # ISO_IR 192 when they hold non-ASCII text and no character set otherwise.
            continue
        if tag == SPS_SEQUENCE:
            sps_request = _single_item(elem)
            sps_requested = True
            continue
        _add_key(plan, tag, elem, TOP_LEVEL.get(tag))

    sps_values: dict[int, list[str]] = {}
    if sps_requested:
        _add_sps_sequence(plan, sps_request, sps_values)
    plan.q &= match_scheduled_start(sps_values.get(SPS_DATE, []), sps_values.get(SPS_TIME, []))
    plan.q &= match_status(sps_values.get(SPS_STATUS, []))
    if not sps_values.get(SPS_STATION_AE) and options.restrict_to_station is not None:
        plan.q &= Q(station_ae_title=options.restrict_to_station)
    plan.slots.sort(key=lambda slot: slot.tag)
    return plan


def _parsed(ds: Dataset) -> list[DataElement]:
    """Every element of ``ds``, decoded. pydicom reads lazily and forgives a value cut short,
    so both are checked here rather than met half-way through the answer."""
    try:
        for tag in list(ds.keys()):
            raw = ds.get_item(tag)
            if (
                isinstance(raw, RawDataElement)
                and raw.value is not None
                and raw.length != 0xFFFFFFFF
                and len(raw.value) != raw.length
            ):
                raise UnreadableIdentifier(f"element {tag} is cut short")
        return list(ds)
    except UnreadableIdentifier:
        raise
    except Exception as exc:
        raise UnreadableIdentifier(
            f"the identifier cannot be parsed: {type(exc).__name__}"
        ) from exc


def _single_item(elem: DataElement) -> Dataset | None:
    # PS3.4 C.2.2.2.6: a sequence key holds at most one item; an empty one is universal.
    if elem.VR != "SQ":
        raise InvalidIdentifier(f"{elem.keyword} must be a sequence", int(elem.tag))
    items = elem.value or []
    if len(items) > 1:
        raise InvalidIdentifier(f"{elem.keyword} holds more than one item", int(elem.tag))
    return items[0] if items else None


def _add_key(plan: WorklistPlan, tag: int, elem: DataElement, attr: Attr | None) -> list[str]:
    """Add one requested key to the plan: its matching condition and its answer slot.
    Returns the key's values ([] when universal)."""
    if attr is None or attr.column is None:
        plan.slots.append(_Slot(tag, attr.vr if attr else _answer_vr(elem), _nothing))
        return []
    if attr.vr == "SQ":
        item = _single_item(elem)
        plan.columns.add(attr.column)
        encode = _json_items(attr.column, attr.item_keys, item, plan.implicit_vr)
        plan.slots.append(_Slot(tag, "SQ", encode))
        if attr.item_keys is CODE_ITEM:
            plan.q &= match_code_sequence(attr.column, item, attr.item_keys)
        return []
    if elem.VR not in (attr.vr, "UN"):
        raise InvalidIdentifier(f"{attr.keyword} must have VR {attr.vr}", tag)
    values = _values(elem)
    plan.columns.add(attr.column)
    if tag == SPS_DATE:
        plan.slots.append(_Slot(tag, "DA", _start_date))
    elif tag == SPS_TIME:
        plan.slots.append(_Slot(tag, "TM", _start_time))
    else:
        plan.slots.append(_Slot(tag, attr.vr, _column(attr.column, attr.vr)))
    if not values or tag in (SPS_DATE, SPS_TIME, SPS_STATUS):
        return values  # universal, or matched together by compile_query
    plan.q &= _match(attr, values, tag)
    return values


def _match(attr: Attr, values: list[str], tag: int) -> Q:
    column = attr.match_column or attr.column
    if attr.vr == "UI":
        return match_uid_list(column, values, tag)
    if attr.vr == "DA":
        return match_date_range(column, values, tag)
    if attr.vr == "US":
        try:
            numbers = [int(v) for v in values]
        except ValueError as exc:
            raise InvalidIdentifier(f"{attr.keyword} must be a number", tag) from exc
        return Q(**{f"{column}__in": numbers})
    if attr.vr == "PN":
        if attr.match_column:  # a column already upper-cased on save, with its own index
            return match_text(column, [v.upper() for v in values], "PN")
        return match_text(column, values, "PN", case_insensitive=True)
    return match_text(column, values, attr.vr)


def _add_sps_sequence(
    plan: WorklistPlan, item: Dataset | None, values: dict[int, list[str]]
) -> None:
    """The Scheduled Procedure Step Sequence: one item per answer, its keys matched against
    the step (PS3.4 C.2.2.2.6). An empty sequence or item asks for every SPS key."""
    inner = WorklistPlan(q=Q(), implicit_vr=plan.implicit_vr)
    if item is None or len(item) == 0:
        for tag, attr in SPS_ITEM.items():
            empty = DataElement(tag, attr.vr, [] if attr.vr == "SQ" else None)
            _add_key(inner, tag, empty, attr)
    else:
        for elem in _parsed(item):
            tag = int(elem.tag)
            if elem.tag.element == 0:
                continue
            values[tag] = _add_key(inner, tag, elem, SPS_ITEM.get(tag))
    plan.q &= inner.q
    plan.columns |= inner.columns
    slots = sorted(inner.slots, key=lambda slot: slot.tag)
    implicit = plan.implicit_vr

    def encode(row: dict) -> bytes:
        return _encode_items([[(slot, slot.encode(row)) for slot in slots]], implicit)

    plan.slots.append(_Slot(SPS_SEQUENCE, "SQ", encode))


def find_worklist(
    identifier: Dataset,
    options: WorklistOptions | None = None,
    limit: int | None = None,
    chunk_size: int = 500,
    implicit_vr: bool = False,
) -> Generator[Dataset, None, None]:
    """The answers to a Modality Worklist query, streamed from the database in scheduled
    order, encoded for ``implicit_vr`` (or explicit) VR Little Endian.

    Raises :class:`InvalidIdentifier` or :class:`UnreadableIdentifier` at call time, before
    anything is read.
    """
    plan = compile_query(identifier, options, implicit_vr)
    return (plan.answer(row) for row in plan.rows(limit, chunk_size=chunk_size))


# --- One step as a modality receives it (the worklist page) ---------------------------------


def every_return_key() -> Dataset:
    """An identifier asking for every return key the gateway answers (PS3.4 Table K.6-1),
    each universal, with an empty Scheduled Procedure Step Sequence (which asks for its
    full item)."""
    identifier = Dataset()
    for tag, attr in TOP_LEVEL.items():
        identifier.add(DataElement(tag, attr.vr, [] if attr.vr == "SQ" else None))
    identifier.add(DataElement(SPS_SEQUENCE, "SQ", []))
    return identifier


def item_for_step(step_id: int, implicit_vr: bool = False) -> Dataset | None:
    """The response identifier a C-FIND asking :func:`every_return_key` gets for this step,
    built by the same plan and encoder as a worklist answer. Matching is replaced by the
    step's id, so a step no query returns any more (ended) shows what it was. None when
    there is no such step."""
    plan = compile_query(every_return_key(), implicit_vr=implicit_vr)
    plan.q = Q(pk=step_id)
    rows = list(plan.queryset()[:1])
    return plan.answer(rows[0]) if rows else None
