"""HL7 v2 segments to worklist values, following IHE Radiology Scheduled Workflow
(RAD TF-2: RAD-4 Procedure Scheduled, RAD-12 Patient Update, RAD-13 Procedure Update).

Everything here is pure: it reads a :class:`~worklist.hl7.parse.Message` and returns plain
values keyed by model field name. A key is present only when the message sent the field,
so that an update leaves what was not sent alone; HL7's explicit null ``""`` gives "".
Identifiers that do not fit their DICOM VR are refused (truncating an identifier could put
one patient's images on another's order); free text is shortened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .parse import (
    DATA_TYPE_ERROR,
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    HL7Error,
    Message,
    is_null,
    parse_ts,
)

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_DATE = re.compile(r"\d{8}")

# HL7 table 0001 (administrative sex) to DICOM Patient's Sex (0010,0040): M, F or O.
# "Unknown" and "not applicable" are not "other": DICOM says that with an empty value.
_SEX = {"M": "M", "F": "F", "O": "O", "A": "O", "U": "", "N": ""}

# HL7 table 0027 (priority) to DICOM Requested Procedure Priority (0040,1003).
_PRIORITY = {"S": "STAT", "A": "HIGH", "R": "ROUTINE"}
_DICOM_PRIORITIES = {"STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW"}


@dataclass
class PatientInfo:
    patient_id: str
    issuer: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepInfo:
    sps_id: str
    values: dict[str, Any] = field(default_factory=dict)
    # True when the message named the step (OBR-20 / IPC-4) rather than the id defaulting.
    explicit_id: bool = False
    # Where the Station table should look when the message names no station AE.
    routing_location: str = ""


@dataclass
class ProcedureInfo:
    """One Requested Procedure (an ImagingOrder) with its steps, from one ORC/OBR group."""

    order_control: str
    order_status: str
    placer: str
    filler: str
    accession: str
    requested_procedure_id: str
    study_instance_uid: str
    values: dict[str, Any] = field(default_factory=dict)
    steps: list[StepInfo] = field(default_factory=list)
    # True when the message itself carried the requested procedure id (OBR-19 / IPC-2).
    explicit_procedure_id: bool = False
    orc_index: int = 1


# --- small value helpers ----------------------------------------------------------------


def text(value: str, max_length: int) -> str:
    """Free text for a single-line DICOM VR: no control characters, no backslash (DICOM's
    value separator), shortened to the VR's length."""
    if not value:
        return value
    value = " ".join(value.replace("\\", "/").split())
    return value[:max_length]


def identifier(value: str, max_length: int, what: str, location: tuple) -> str:
    if len(value) > max_length:
        raise HL7Error(
            DATA_TYPE_ERROR,
            f"{what} {value!r} is longer than the {max_length} characters DICOM allows",
            location,
        )
    if "\\" in value or any(ord(c) < 32 for c in value):
        raise HL7Error(DATA_TYPE_ERROR, f"{what} {value!r} contains a control character or "
                       "backslash, which DICOM cannot carry", location)
    return value


def _put(values: dict, key: str, value: Any) -> None:
    if is_null(value):
        values[key] = "" if not isinstance(values.get(key), list) else []
    elif value:
        values[key] = value


def _pn(parts: list[str]) -> str:
    """DICOM PN (PS3.5 6.2): family^given^middle^prefix^suffix, trailing empties dropped."""
    cleaned = [" ".join(p.replace("^", " ").replace("=", " ").replace("\\", "/").split())
               for p in parts]
    return "^".join(cleaned).rstrip("^")[:64]


def xpn(msg: Message, seg, n: int, rep: int = 1) -> str:
    """XPN (family&…^given^middle^suffix^prefix^degree) to DICOM PN."""
    if msg.raw(seg, n, rep) == '""':
        return msg.get(seg, n)
    g = msg.get
    return _pn([g(seg, n, 1, 1, rep), g(seg, n, 2, 1, rep), g(seg, n, 3, 1, rep),
                g(seg, n, 5, 1, rep), g(seg, n, 4, 1, rep)])


def xcn(msg: Message, seg, n: int, rep: int = 1) -> str:
    """XCN (id^family&…^given^middle^suffix^prefix^degree) to DICOM PN."""
    if msg.raw(seg, n, rep) == '""':
        return msg.get(seg, n)
    g = msg.get
    return _pn([g(seg, n, 2, 1, rep), g(seg, n, 3, 1, rep), g(seg, n, 4, 1, rep),
                g(seg, n, 6, 1, rep), g(seg, n, 5, 1, rep)])


def coded(msg: Message, seg, n: int, first: int = 1) -> dict | None:
    """CE/CWE code^text^coding system (starting at component ``first``) as a code item."""
    value = msg.get(seg, n, first)
    meaning = msg.get(seg, n, first + 1)
    if not value and not meaning:
        return None
    return {"value": value, "meaning": text(meaning, 64), "scheme": msg.get(seg, n, first + 2)}


def priority(value: str) -> str:
    value = value.strip().upper()
    if value in _DICOM_PRIORITIES:
        return value
    return _PRIORITY.get(value, "")


# --- patient ----------------------------------------------------------------------------


def patient_info(msg: Message, pid, required: bool = True) -> PatientInfo | None:
    """PID (and the message's PV1/AL1 where they describe the patient) to Patient values."""
    if pid is None:
        if required:
            raise HL7Error(REQUIRED_FIELD_MISSING,
                           "PID-3 (patient identifier) is required: the message has no PID "
                           "segment", ("PID", 1, 3))
        return None
    ids = []
    for rep in range(1, max(1, msg.repetitions(pid, 3)) + 1):
        value = msg.get(pid, 3, 1, 1, rep)
        if not value:
            continue
        issuer = msg.get(pid, 3, 4, 1, rep) or msg.get(pid, 3, 4, 2, rep)
        ids.append({"id": value, "issuer": issuer, "type": msg.get(pid, 3, 5, 1, rep)})
    if not ids:
        raise HL7Error(REQUIRED_FIELD_MISSING, "PID-3 (patient identifier) is required",
                       ("PID", 1, 3))
    first = ids[0]
    info = PatientInfo(
        patient_id=identifier(first["id"], 64, "PID-3.1 (patient identifier)", ("PID", 1, 3)),
        issuer=identifier(first["issuer"], 64, "PID-3.4 (assigning authority)", ("PID", 1, 3)),
    )
    values = info.values
    if len(ids) > 1:
        values["other_ids"] = ids[1:]
    name = xpn(msg, pid, 5)
    _put(values, "name", name)
    birth = msg.get(pid, 7, 1, 1)
    if birth and not is_null(birth):
        birth = birth[:8]
        if not _DATE.fullmatch(birth):
            raise HL7Error(DATA_TYPE_ERROR,
                           f"PID-7 (date of birth) {msg.get(pid, 7)!r} is not a date (YYYYMMDD)",
                           ("PID", 1, 7))
    _put(values, "birth_date", birth)
    sex = msg.get(pid, 8)
    if is_null(sex):
        _put(values, "sex", sex)
    elif sex:
        values["sex"] = _SEX.get(sex.upper()[:1], "")
    weight = _weight_kg(msg)
    if weight:
        values["weight_kg"] = weight
    allergies = [msg.get(al1, 3, 2) or msg.get(al1, 3, 1) for al1 in msg.all("AL1")]
    if any(allergies):
        values["allergies"] = text("; ".join(a for a in allergies if a), 64)
    return info


# OBX-3 codes for body weight (LOINC) and the units OBX-6 may give it in.
_WEIGHT_CODES = {"3141-9", "29463-7", "8335-2"}
_POUNDS = {"LB", "LBS", "[LB_AV]"}


def _weight_kg(msg: Message) -> str:
    """Patient's Weight (0010,1030) in kg from a body-weight OBX, "" when there is none."""
    for obx in msg.all("OBX"):
        code, label = msg.get(obx, 3, 1), msg.get(obx, 3, 2).upper()
        if code not in _WEIGHT_CODES and "WEIGHT" not in label:
            continue
        try:
            value = float(msg.get(obx, 5).replace(",", "."))
        except ValueError:
            return ""
        if msg.get(obx, 6, 1).upper() in _POUNDS:
            value *= 0.45359237
        return f"{value:.1f}".rstrip("0").rstrip(".")
    return ""


def visit_values(msg: Message) -> dict[str, Any]:
    """PV1 values that ImagingOrder keeps per order."""
    pv1 = msg.first("PV1")
    values: dict[str, Any] = {}
    if pv1 is None:
        return values
    _put(values, "referring_physician", xcn(msg, pv1, 8))
    admission = msg.get(pv1, 19)
    _put(values, "admission_id", admission if is_null(admission) else text(admission, 64))
    if msg.raw(pv1, 3) == '""':
        values["patient_location"] = ""
    else:
        parts = [msg.get(pv1, 3, c) for c in (1, 2, 3)]
        _put(values, "patient_location", text("^".join(parts).rstrip("^"), 64))
    return values


# --- orders -----------------------------------------------------------------------------


@dataclass
class _Group:
    orc: Any
    index: int
    tq1: Any = None
    obrs: list = field(default_factory=list)  # [{"obr", "tq1", "ipcs", "zds", "ntes"}]


def _groups(msg: Message) -> list[_Group]:
    groups: list[_Group] = []
    for seg, name in zip(msg.segments, msg.names, strict=True):
        if name == "ORC":
            groups.append(_Group(orc=seg, index=len(groups) + 1))
            continue
        if name not in ("TQ1", "OBR", "IPC", "ZDS", "NTE"):
            continue
        if not groups:
            if name == "NTE":
                continue
            raise HL7Error(SEGMENT_SEQUENCE_ERROR,
                           f"{name} segment without a preceding ORC segment", (name, 1))
        group = groups[-1]
        current = group.obrs[-1] if group.obrs else None
        if name == "OBR":
            group.obrs.append({"obr": seg, "tq1": None, "ipcs": [], "zds": None, "ntes": []})
        elif name == "TQ1":
            if current is None:
                group.tq1 = group.tq1 or seg
            else:
                current["tq1"] = current["tq1"] or seg
        elif current is None:
            if name == "IPC":
                raise HL7Error(SEGMENT_SEQUENCE_ERROR,
                               "IPC segment without a preceding OBR segment", ("IPC", 1))
        elif name == "IPC":
            current["ipcs"].append(seg)
        elif name == "ZDS":
            current["zds"] = seg
        else:
            current["ntes"].append(seg)
    return groups


def procedures(msg: Message) -> list[ProcedureInfo]:
    """Every Requested Procedure the ORM/OMI describes, in message order."""
    groups = _groups(msg)
    if not groups:
        raise HL7Error(REQUIRED_FIELD_MISSING, "ORC segment is required", ("ORC", 1, 1))
    visit = visit_values(msg)
    result: list[ProcedureInfo] = []
    for group in groups:
        orc = group.orc
        control = msg.get(orc, 1).upper()
        if not control:
            raise HL7Error(REQUIRED_FIELD_MISSING, "ORC-1 (order control) is required",
                           ("ORC", group.index, 1))
        if not group.obrs:
            if control in ("NW", "XO"):
                raise HL7Error(REQUIRED_FIELD_MISSING,
                               f"OBR segment is required for ORC-1 {control}",
                               ("OBR", group.index))
            result.append(_procedure(msg, group, None, [], visit, control))
            continue
        for part in group.obrs:
            for ipcs in _split_by_procedure(msg, part["ipcs"]):
                result.append(_procedure(msg, group, part, ipcs, visit, control))
    _check_distinct(result)
    return result


def _split_by_procedure(msg: Message, ipcs: list) -> list[list]:
    """IPC segments grouped by their requested procedure (IPC-1/2/3); [[]] without IPC."""
    if not ipcs:
        return [[]]
    seen: dict[tuple, list] = {}
    for ipc in ipcs:
        key = (msg.get(ipc, 1), msg.get(ipc, 2), msg.get(ipc, 3))
        seen.setdefault(key, []).append(ipc)
    return list(seen.values())


def _procedure(msg: Message, group: _Group, part: dict | None, ipcs: list, visit: dict,
               control: str) -> ProcedureInfo:
    orc = group.orc
    obr = part["obr"] if part else None
    ipc = ipcs[0] if ipcs else None
    tq1 = (part["tq1"] if part else None) or group.tq1
    g = msg.get
    loc = group.index

    placer = g(orc, 2) or g(obr, 2)
    filler = g(orc, 3) or g(obr, 3)
    accession = (g(ipc, 1) if ipc is not None else "") or g(obr, 18)
    rp_id = (g(ipc, 2) if ipc is not None else "") or g(obr, 19)
    explicit_rp = bool(rp_id)
    if part and part["zds"] is not None:
        study_uid = g(part["zds"], 1)
    else:
        study_uid = g(ipc, 3) if ipc is not None else ""
    if not (placer or filler or accession):
        raise HL7Error(
            REQUIRED_FIELD_MISSING,
            "ORC-2 (placer order number) or ORC-3 (filler order number) is required",
            ("ORC", loc, 2),
        )
    placer = identifier(placer, 64, "ORC-2 (placer order number)", ("ORC", loc, 2))
    filler = identifier(filler, 64, "ORC-3 (filler order number)", ("ORC", loc, 3))
    acc_field = "IPC-1" if ipc is not None and g(ipc, 1) else "OBR-18"
    accession = identifier(accession, 16, f"{acc_field} (accession number)", ("OBR", loc, 18))
    if not rp_id:
        rp_id = accession or filler or placer
        if len(rp_id) > 16:
            raise HL7Error(
                REQUIRED_FIELD_MISSING,
                "OBR-19 (requested procedure ID) is required: the order number it would "
                "default to is longer than 16 characters",
                ("OBR", loc, 19),
            )
    rp_field = "IPC-2" if ipc is not None and g(ipc, 2) else "OBR-19"
    rp_id = identifier(rp_id, 16, f"{rp_field} (requested procedure ID)", ("OBR", loc, 19))
    if study_uid and not (len(study_uid) <= 64 and _UID.fullmatch(study_uid)):
        raise HL7Error(DATA_TYPE_ERROR,
                       f"Study Instance UID {study_uid!r} (ZDS-1 / IPC-3) is not a valid UID",
                       ("ZDS", loc, 1))

    info = ProcedureInfo(
        order_control=control,
        order_status=g(orc, 5).upper(),
        placer=placer,
        filler=filler,
        accession=accession,
        requested_procedure_id=rp_id,
        study_instance_uid=study_uid,
        explicit_procedure_id=explicit_rp,
        orc_index=loc,
    )
    values = info.values
    values.update(visit)
    if obr is None:
        return info

    procedure_code = coded(msg, obr, 44) or coded(msg, obr, 4)
    if msg.raw(obr, 44) == '""':
        values["requested_procedure_description"] = ""
        values["requested_procedure_codes"] = []
    elif procedure_code:
        values["requested_procedure_description"] = text(procedure_code["meaning"], 64)
        if procedure_code["value"]:
            values["requested_procedure_codes"] = [procedure_code]
    _put(values, "requesting_physician", xcn(msg, obr, 16) or xcn(msg, orc, 12))
    reason = g(obr, 31, 2) or g(obr, 31, 1)
    _put(values, "reason", reason if is_null(reason) else text(reason, 64))
    prio = (g(tq1, 9) if tq1 is not None else "") or g(orc, 7, 6) or g(obr, 27, 6)
    if prio:
        values["priority"] = priority(prio)

    start = _start(msg, tq1, orc, obr, loc)
    protocol = coded(msg, obr, 4, 4) or coded(msg, obr, 4, 1)
    comments = "\n".join(g(nte, 3) for nte in part["ntes"] if g(nte, 3))
    base_step: dict[str, Any] = {}
    if start is not None:
        base_step["start"] = start
    if protocol:
        base_step["description"] = text(protocol["meaning"], 64)
        base_step["protocol_codes"] = [protocol] if protocol["value"] else []
    if comments:
        base_step["comments"] = comments
    routing_location = g(msg.first("PV1"), 3)

    if not ipcs:
        sps_id = g(obr, 20) or rp_id
        step = StepInfo(
            sps_id=identifier(sps_id, 16, "OBR-20 (scheduled procedure step ID)",
                              ("OBR", loc, 20)),
            values=dict(base_step),
            explicit_id=bool(g(obr, 20)),
            routing_location=routing_location,
        )
        modality = g(obr, 24).upper()
        modality = identifier(modality, 16, "OBR-24 (modality)", ("OBR", loc, 24))
        _put(step.values, "modality", modality)
        info.steps.append(step)
        return info

    for index, ipc_seg in enumerate(ipcs, start=1):
        sps_id = g(ipc_seg, 4)
        if not sps_id:
            if len(ipcs) > 1:
                raise HL7Error(REQUIRED_FIELD_MISSING,
                               "IPC-4 (scheduled procedure step ID) is required when a "
                               "procedure has several IPC segments", ("IPC", index, 4))
            sps_id = g(obr, 20) or rp_id
        step = StepInfo(
            sps_id=identifier(sps_id, 16, "IPC-4 (scheduled procedure step ID)",
                              ("IPC", index, 4)),
            values=dict(base_step),
            explicit_id=bool(g(ipc_seg, 4) or g(obr, 20)),
        )
        sv = step.values
        modality = (g(ipc_seg, 5) or g(obr, 24)).upper()
        _put(sv, "modality", identifier(modality, 16, "IPC-5 (modality)", ("IPC", index, 5)))
        step_protocol = coded(msg, ipc_seg, 6)
        if step_protocol:
            sv["description"] = text(step_protocol["meaning"], 64)
            sv["protocol_codes"] = [step_protocol] if step_protocol["value"] else []
        _put(sv, "station_name", text(g(ipc_seg, 7), 16))
        location = text(g(ipc_seg, 8), 16)
        _put(sv, "location", location)
        station_ae = g(ipc_seg, 9)
        if station_ae:
            sv["station_ae_title"] = identifier(station_ae, 16, "IPC-9 (scheduled station AE "
                                                "title)", ("IPC", index, 9))
        step.routing_location = location or routing_location
        info.steps.append(step)
    ids = [s.sps_id for s in info.steps]
    if len(set(ids)) != len(ids):
        raise HL7Error(REQUIRED_FIELD_MISSING, "IPC-4 (scheduled procedure step ID) repeats "
                       "within one procedure; each step needs its own", ("IPC", 1, 4))
    return info


def _start(msg: Message, tq1, orc, obr, loc: int) -> datetime | None:
    g = msg.get
    if tq1 is not None and g(tq1, 7, 1):
        return parse_ts(g(tq1, 7, 1), "TQ1-7 (start date/time)", ("TQ1", loc, 7))
    if g(orc, 7, 4, 1):
        return parse_ts(g(orc, 7, 4, 1), "ORC-7.4 (start date/time)", ("ORC", loc, 7))
    if g(obr, 27, 4, 1):
        return parse_ts(g(obr, 27, 4, 1), "OBR-27.4 (start date/time)", ("OBR", loc, 27))
    if g(obr, 36, 1):
        return parse_ts(g(obr, 36, 1), "OBR-36 (scheduled date/time)", ("OBR", loc, 36))
    return None


def _check_distinct(result: list[ProcedureInfo]) -> None:
    seen = set()
    for proc in result:
        key = (proc.placer, proc.filler, proc.requested_procedure_id)
        if key in seen:
            raise HL7Error(
                DATA_TYPE_ERROR if proc.explicit_procedure_id else REQUIRED_FIELD_MISSING,
                "Two procedures in the message have the same order numbers and requested "
                f"procedure ID {proc.requested_procedure_id!r}: OBR-19 (requested procedure "
                "ID) must tell them apart",
                ("OBR", proc.orc_index, 19),
            )
        seen.add(key)


# --- merge (ADT^A40) --------------------------------------------------------------------


def merge_pairs(msg: Message) -> list[tuple[PatientInfo, str, str]]:
    """(surviving patient, prior id, prior issuer) for each PID/MRG pair of an A40."""
    pairs = []
    current = None
    for seg, name in zip(msg.segments, msg.names, strict=True):
        if name == "PID":
            current = patient_info(msg, seg)
        elif name == "MRG":
            if current is None:
                raise HL7Error(SEGMENT_SEQUENCE_ERROR, "MRG segment without a preceding PID",
                               ("MRG", 1))
            prior = msg.get(seg, 1)
            if not prior:
                raise HL7Error(REQUIRED_FIELD_MISSING,
                               "MRG-1 (prior patient identifier) is required", ("MRG", 1, 1))
            issuer = msg.get(seg, 1, 4) or msg.get(seg, 1, 4, 2)
            pairs.append((current, prior, issuer))
    if not pairs:
        if current is None:
            patient_info(msg, None)
        raise HL7Error(REQUIRED_FIELD_MISSING, "MRG-1 (prior patient identifier) is required: "
                       "the message has no MRG segment", ("MRG", 1, 1))
    return pairs
