"""Synthetic but realistic data: patients with varied (some non-ASCII) names, ORM^O01 orders,
and the scheduled steps of a busy department. Deterministic for a given seed, so that a cache
keyed by the generation parameters stays valid and query values can be drawn from the data.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from datetime import date, datetime, timedelta

FAMILY = [
    "SMITH",
    "JOHNSON",
    "WILLIAMS",
    "BROWN",
    "JONES",
    "GARCIA",
    "MILLER",
    "DAVIS",
    "RODRIGUEZ",
    "MARTINEZ",
    "HERNANDEZ",
    "LOPEZ",
    "GONZALEZ",
    "WILSON",
    "ANDERSON",
    "THOMAS",
    "TAYLOR",
    "MOORE",
    "JACKSON",
    "MARTIN",
    "LEE",
    "PEREZ",
    "THOMPSON",
    "WHITE",
    "HARRIS",
    "SANCHEZ",
    "CLARK",
    "RAMIREZ",
    "LEWIS",
    "ROBINSON",
    "WALKER",
    "YOUNG",
    "ALLEN",
    "KING",
    "WRIGHT",
    "SCOTT",
    "TORRES",
    "NGUYEN",
    "HILL",
    "FLORES",
    "GREEN",
    "ADAMS",
    "NELSON",
    "BAKER",
    "HALL",
    "RIVERA",
    "CAMPBELL",
    "MITCHELL",
    "CARTER",
    "ROBERTS",
    "SMITS",
    "SMIRNOV",
    "SMILEY",
    "MÜLLER",
    "SCHMIDT",
    "SCHNEIDER",
    "FISCHER",
    "WEBER",
    "MEYER",
    "WAGNER",
    "BECKER",
    "SCHULZ",
    "HOFFMANN",
    "KOCH",
    "RICHTER",
    "KLEIN",
    "WOLF",
    "SCHRÖDER",
    "NEUMANN",
    "SCHWARZ",
    "ZIMMERMANN",
    "DUBOIS",
    "LEFÈVRE",
    "MOREAU",
    "LAURENT",
    "SIMON",
    "MICHEL",
    "GARCÍA",
    "FERNÁNDEZ",
    "GONZÁLEZ",
    "MUÑOZ",
    "PÉREZ",
    "JIMÉNEZ",
    "ØSTERGÅRD",
    "JØRGENSEN",
    "NIELSEN",
    "HANSEN",
    "ŠIMEK",
    "NOVÁK",
    "DVOŘÁK",
    "KOWALSKI",
    "NOWAK",
    "WIŚNIEWSKI",
    "O'BRIEN",
    "MURPHY",
    "KELLY",
    "ROSSI",
    "RUSSO",
    "FERRARI",
    "ESPOSITO",
    "BIANCHI",
    "ROMANO",
    "COLOMBO",
    "DE JONG",
    "JANSEN",
    "DE VRIES",
    "VAN DEN BERG",
    "BAKKER",
    "VISSER",
    "PETERS",
    "ÅKESSON",
    "LINDSTRÖM",
    "BJÖRK",
]
# Syllables that make the long tail of rarer family names, so a prefix query like "SMI*"
# answers tens of items rather than a tenth of the database.
_SYL = [
    "BA",
    "KO",
    "RI",
    "TAN",
    "MEL",
    "DOR",
    "VIS",
    "LUN",
    "HAR",
    "PEN",
    "SO",
    "GRA",
    "WEN",
    "TIL",
    "MAR",
    "NOR",
    "QUI",
    "ZA",
    "FEL",
    "BRO",
    "CHI",
    "DAL",
    "EK",
    "OST",
    "YAM",
]
GIVEN = [
    "James",
    "Mary",
    "John",
    "Patricia",
    "Robert",
    "Jennifer",
    "Michael",
    "Linda",
    "William",
    "Elizabeth",
    "David",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Jürgen",
    "Zoë",
    "Renée",
    "José",
    "Łukasz",
    "Søren",
    "Anaïs",
    "François",
    "Małgorzata",
    "Björn",
    "Inés",
    "Ahmet",
    "Mehmet",
    "Fatma",
    "Wei",
    "Yuki",
    "Priya",
    "Olumide",
    "Chloé",
]

# Modality mix of a general hospital department and its stations (AE titles).
MODALITY_WEIGHTS = {"CT": 30, "MR": 20, "US": 20, "CR": 15, "DX": 15}
STATIONS = {
    "CT": ["CT01", "CT02", "CT03", "CT04", "CT05"],
    "MR": ["MR01", "MR02", "MR03", "MR04"],
    "US": ["US01", "US02", "US03", "US04"],
    "CR": ["CR01", "CR02", "CR03"],
    "DX": ["DX01", "DX02", "DX03", "DX04"],
}
PROCEDURES = {
    "CT": [
        ("CTHEAD", "CT Head without contrast"),
        ("CTCHEST", "CT Chest with contrast"),
        ("CTABD", "CT Abdomen and Pelvis"),
        ("CTSPINE", "CT Lumbar Spine"),
    ],
    "MR": [
        ("MRBRAIN", "MR Brain with and without contrast"),
        ("MRKNEE", "MR Knee left"),
        ("MRSPINE", "MR Cervical Spine"),
    ],
    "US": [("USABD", "US Abdomen complete"), ("USTHY", "US Thyroid"), ("USOB", "US Obstetric")],
    "CR": [("CRCHEST", "CR Chest PA and lateral"), ("CRHAND", "CR Hand right 3 views")],
    "DX": [("DXKNEE", "DX Knee bilateral standing"), ("DXPELV", "DX Pelvis AP")],
}
PHYSICIANS = ["HOUSE^Gregory", "GREY^Meredith", "WATSON^John", "QUINN^Michaela", "STRANGE^Stephen"]


def _birth_date(rng: random.Random) -> str:
    return f"{rng.randint(1930, 2024)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"


def family_name(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice(FAMILY)
    return "".join(rng.choice(_SYL) for _ in range(rng.randint(2, 3)))


@dataclass(frozen=True)
class Patient:
    index: int
    patient_id: str
    name: str  # DICOM PN: FAMILY^Given
    birth_date: str
    sex: str


def patients(n: int, seed: int = 1) -> list[Patient]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        out.append(
            Patient(
                index=i,
                patient_id=f"P{i:07d}",
                name=f"{family_name(rng)}^{rng.choice(GIVEN)}",
                birth_date=_birth_date(rng),
                sex=rng.choice("MF"),
            )
        )
    return out


@dataclass(frozen=True)
class Step:
    index: int
    patient: Patient
    accession: str
    requested_procedure_id: str
    study_uid: str
    procedure_code: str
    procedure_description: str
    sps_id: str
    modality: str
    station_ae: str
    start: datetime
    physician: str
    referring: str


def steps(n: int, pats: list[Patient], today: date, days: int = 30, seed: int = 2) -> list[Step]:
    """``n`` scheduled steps, one per order, over today ± ``days``, 07:00 to 19:55."""
    rng = random.Random(seed)
    mods = list(MODALITY_WEIGHTS)
    weights = list(MODALITY_WEIGHTS.values())
    out = []
    for i in range(n):
        modality = rng.choices(mods, weights)[0]
        code, desc = rng.choice(PROCEDURES[modality])
        day = today + timedelta(days=rng.randint(-days, days))
        start = datetime(day.year, day.month, day.day, rng.randint(7, 19), rng.randrange(0, 60, 5))
        out.append(
            Step(
                index=i,
                patient=rng.choice(pats),
                accession=f"A{i:09d}",
                requested_procedure_id=f"RP{i:08d}",
                study_uid=f"1.2.826.0.1.3680043.10.543.1.{i + 1}",
                procedure_code=code,
                procedure_description=desc,
                sps_id=f"S{i:09d}",
                modality=modality,
                station_ae=rng.choice(STATIONS[modality]),
                start=start,
                physician=rng.choice(PHYSICIANS),
                referring=rng.choice(PHYSICIANS),
            )
        )
    return out


def orm_o01(i: int, tag: str, rng: random.Random, now: datetime) -> bytes:
    """One new-order ORM^O01 (ORC-1 NW) of about 600 bytes, HL7 v2.3.1 as IHE SWF sends it:
    accession in OBR-18, requested procedure id OBR-19, SPS id OBR-20, modality OBR-24,
    start in OBR-27.4 and ORC-7.4, Study Instance UID in ZDS-1. ``tag`` keeps control ids,
    patient ids and accessions of one run apart from another's."""
    family = family_name(rng)
    given = rng.choice(GIVEN)
    modality = rng.choices(list(MODALITY_WEIGHTS), list(MODALITY_WEIGHTS.values()))[0]
    code, desc = rng.choice(PROCEDURES[modality])
    start = now + timedelta(days=rng.randint(0, 14), minutes=rng.randrange(0, 600, 5))
    ts = now.strftime("%Y%m%d%H%M%S")
    st = start.strftime("%Y%m%d%H%M%S")
    pid = f"{tag}P{rng.randint(0, 49999):06d}"
    acc = f"{tag}{i:08d}"[-16:]
    phys = rng.choice(PHYSICIANS)
    sex = rng.choice("MF")
    dob = _birth_date(rng)
    segs = [
        f"MSH|^~\\&|RIS|GENERAL HOSPITAL|GATEWAY|RADIOLOGY|{ts}||ORM^O01|{tag}{i:010d}|P|2.3.1"
        "||||||UNICODE UTF-8",
        f"PID|1||{pid}^^^HOSP^MR||{family}^{given}^^^^^L||{dob}|{sex}|||"
        f"{rng.randint(1, 999)} Main St^^Springfield^IL^{rng.randint(10000, 99999)}"
        f"||||||{tag}V{i:08d}",
        f"PV1|1|O|RAD^{rng.randint(1, 20)}^1||||{phys}^^^^^^MD||||||||||||||{tag}V{i:08d}",
        f"ORC|NW|{tag}PL{i:08d}|{tag}FI{i:08d}||SC||^^^{st}^^R||{ts}|||{phys}^^^^^^MD",
        f"OBR|1|{tag}PL{i:08d}|{tag}FI{i:08d}|{code}^{desc}^LOCAL|||{ts}|||||||||{phys}^^^^^^MD|"
        f"|{acc}|RP{i:08d}|S{i:08d}||||{modality}|||^^^{st}^^R||||"
        f"^Routine follow-up|||||{st}",
        f"ZDS|1.2.826.0.1.3680043.10.543.{zlib.crc32(tag.encode()) % 100000}.{i + 1}"
        "^GATEWAY^Application^DICOM",
    ]
    return ("\r".join(segs) + "\r").encode("utf-8")


def orm_messages(n: int, tag: str, seed: int = 3) -> list[bytes]:
    rng = random.Random(f"{seed}-{tag}")
    now = datetime.now().replace(microsecond=0)
    return [orm_o01(i, tag, rng, now) for i in range(n)]
