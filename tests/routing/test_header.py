"""The header recorded with each received instance: what rules match and the pages show."""

import struct
import warnings
from io import BytesIO
from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from routing.header import ReceivedDataSet, header_as_json

# Explicit VR elements with a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"}


def _element(tag: int, vr: str, value: bytes) -> bytes:
    group, element = tag >> 16, tag & 0xFFFF
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, element, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), len(value)) + value


def _read(elements: list[tuple[int, str, bytes]]) -> bytes:
    """A Part 10 file in Explicit VR Little Endian holding exactly these encoded values."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.7"
    fp = DicomBytesIO()
    write_file_meta_info(fp, meta)
    body = b"".join(_element(*e) for e in sorted(elements))
    return b"\0" * 128 + b"DICM" + fp.getvalue() + body


def _both(encoded: bytes) -> tuple[dict, dict]:
    """The header as storing reads it (scanned where the encoding is plain, values decoded
    directly) and by pydicom alone, each from a fresh read; and decoded directly from
    pydicom's read, which must agree with both."""
    scanned = ReceivedDataSet(encoded).header
    direct = header_as_json(dcmread(BytesIO(encoded), stop_before_pixels=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values on purpose
        reference = header_as_json(dcmread(BytesIO(encoded), stop_before_pixels=True),
                                   decode_directly=False)
    assert direct == reference
    return scanned, reference


@pytest.mark.filterwarnings("ignore:The value length")
def test_the_header_keeps_short_text_values_and_leaves_out_the_rest():
    ds = Dataset()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientName = "Smith^John"
    ds.SeriesNumber = 12
    ds.StudyDescription = "x" * 2000
    ds.InstitutionName = "General\x00"
    ds.add_new(0x00291010, "LO", "private value")
    ds.add_new(0x00091001, "OB", b"\x01\x02")
    ds.ReferencedStudySequence = Sequence([Dataset()])

    header = header_as_json(ds)

    assert header == {
        "ImageType": ["ORIGINAL", "PRIMARY"],
        "Modality": "CT",
        "InstitutionName": "General",
        "PatientName": "Smith^John",
        "SeriesNumber": "12",
        "00291010": "private value",
    }


def test_values_as_received_read_as_pydicom_reads_them():
    encoded = _read([
        (0x00080008, "CS", b"ORIGINAL\\PRIMARY \\"),
        (0x00080013, "TM", b"101010.5 "),
        (0x00080060, "CS", b"CT"),
        (0x00081030, "LO", b"caf\xe9 "),  # Latin-1: pydicom decodes it
        (0x00090010, "LO", b"ACME 1.0"),  # private creator: no keyword
        (0x00100010, "PN", b"Doe^John=Doe^J\x00"),
        (0x00100020, "LO", b" id 1 "),
        (0x00100030, "DA", b"19700101"),
        (0x00180015, "CS", b""),
        (0x00181050, "DS", b"abc "),  # not a number: pydicom keeps it as text
        (0x00181100, "DS", b"1e3 "),
        (0x00189306, "FD", struct.pack("<d", 0.1)),
        (0x00189307, "FL", struct.pack("<f", 0.1)),
        (0x0020000D, "UI", b"1.2.3\x00"),
        (0x00200011, "IS", b"12.0"),
        (0x00200012, "IS", b"1.5 "),
        (0x00200013, "IS", b" 7 "),
        (0x00200037, "DS", b"1\\0\\0\\0\\1\\0 "),
        (0x00204000, "LT", b"a\\b "),
        (0x00280010, "US", b"\x00\x02"),
        (0x00280011, "US", b"\x00\x02\x00\x04"),
        (0x00280030, "DS", b" 0.5\\0.50 "),
        (0x00280106, "SS", struct.pack("<h", -5)),
        (0x00281052, "DS", b""),
        (0x00281053, "DS", b"1\\\\2 "),
        (0x00283002, "SS", struct.pack("<3h", -32768, 0, 16)),  # LUT Descriptor
        (0x00280009, "AT", struct.pack("<2H", 0x0018, 0x1063)),
        (0x00209165, "AT", struct.pack("<4H", 0x0020, 0x9056, 0x0020, 0x9057)),
        (0x00280100, "US", b""),
        (0x00180050, "DS", b""),
        (0x00081050, "PN", b""),
        (0x00400254, "LO", b"x" * 1100),
    ])

    direct, reference = _both(encoded)

    assert direct == reference
    assert direct["ImageType"] == ["ORIGINAL", "PRIMARY", ""]
    assert direct["PatientName"] == "Doe^John=Doe^J"
    assert direct["PatientID"] == "id 1"
    assert direct["StudyDescription"] == "café"
    assert direct["00090010"] == "ACME 1.0"
    assert direct["StudyInstanceUID"] == "1.2.3"
    assert direct["InstanceNumber"] == "7"
    assert direct["PixelSpacing"] == ["0.5", "0.50"]
    assert direct["Columns"] == ["512", "1024"]
    assert direct["SmallestImagePixelValue"] == "-5"
    assert direct["LUTDescriptor"] == ["32768", "0", "16"]
    assert direct["TotalCollimationWidth"] == "0.10000000149011612"
    assert direct["RescaleIntercept"] == "" and direct["BodyPartExamined"] == ""
    assert direct["FrameIncrementPointer"] == "(0018,1063)"
    assert direct["DimensionIndexPointer"] == ["(0020,9056)", "(0020,9057)"]
    assert direct["BitsAllocated"] == direct["SliceThickness"] == ""
    assert direct["PerformingPhysicianName"] == ""
    assert "PerformedProcedureStepDescription" not in direct  # over 1 KB


def _undefined_sequence(tag: int, *items: bytes, defined_items: bool = False) -> bytes:
    """An explicit VR sequence of undefined length holding these encoded item data sets."""
    group, element = tag >> 16, tag & 0xFFFF
    out = struct.pack("<HH2sHI", group, element, b"SQ", 0, 0xFFFFFFFF)
    for item in items:
        if defined_items:
            out += struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item
        else:
            out += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + item
            out += struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    return out + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def _with_raw(elements: list[tuple[int, str, bytes]], raw: bytes, after: list) -> bytes:
    """:func:`_read` of ``elements``, then ``raw`` bytes, then ``after`` elements."""
    return _read(elements) + raw + b"".join(_element(*e) for e in after)


def test_sequences_of_undefined_length_are_walked_to_the_elements_after_them():
    inner = _element(0x00080100, "SH", b"T-1") + _element(0x00080102, "SH", b"SRT ")
    nested = _element(0x00081150, "UI", b"1.2.840.10008.5.1.4.1.1.2\x00")
    items = [inner + _undefined_sequence(0x00081199, nested, nested), inner]
    encoded = _with_raw(
        [(0x00080005, "CS", b"ISO_IR 192"), (0x00080060, "CS", b"CT")],
        _undefined_sequence(0x00082218, *items)
        + _undefined_sequence(0x00082220, inner, defined_items=True),
        [(0x00100010, "PN", b"Doe^Jane"), (0x00280009, "AT", struct.pack("<2H", 0x18, 0x1063)),
         (0x00209165, "AT", struct.pack("<4H", 0x20, 0x9056, 0x20, 0x9057)),
         (0x00280100, "US", b""), (0x00180050, "DS", b""), (0x7FE00010, "OW", b"\0\0")],
    )

    scanned, reference = _both(encoded)

    assert ReceivedDataSet(encoded).scanned
    assert scanned == reference == {
        "SpecificCharacterSet": "ISO_IR 192",
        "Modality": "CT",
        "PatientName": "Doe^Jane",
        "FrameIncrementPointer": "(0018,1063)",
        "DimensionIndexPointer": ["(0020,9056)", "(0020,9057)"],
        "SliceThickness": "",
        "BitsAllocated": "",
    }


def _nested(levels: int) -> bytes:
    """Sequences of undefined length nested ``levels`` deep, innermost empty."""
    inner = b""
    for _ in range(levels):
        inner = _undefined_sequence(0x00082218, inner)
    return inner


@pytest.mark.parametrize("raw", [
    pytest.param(_element(0x00100010, "ZZ", b"Doe"), id="unknown VR"),
    pytest.param(struct.pack("<HH2sHI", 0x0010, 0x0010, b"UN", 0, 0xFFFFFFFF)
                 + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), id="UN of undefined length"),
    pytest.param(_undefined_sequence(0x00082218, _element(0x00080100, "SH", b"T-1"),
                                     defined_items=True)[:-8], id="sequence without its end"),
    pytest.param(struct.pack("<HHI", 0x0010, 0x0010, 4) + b"Doe ", id="implicit VR"),
    pytest.param(struct.pack("<HHI", 0xFFFE, 0xE00D, 0), id="delimiter at the top level"),
    pytest.param(_element(0x00100010, "PN", b"Doe^John")[:-3], id="value past the end"),
    pytest.param(struct.pack("<HH2sH", 0x7FE0, 0x0010, b"OW", 0) + b"\0\0",
                 id="pixel data header cut short"),
    pytest.param(_nested(250), id="sequences nested 250 deep"),
    pytest.param(_undefined_sequence(0x00082218, _element(0x00080005, "US", b"\1\2\3")),
                 id="odd character set in an item"),
    pytest.param(_undefined_sequence(0x00082218, _element(0x00080100, "SH", b"T-1"))[:-16]
                 + struct.pack("<HH2s2s", 0xFFFE, 0xE00D, b"OB", b"\0\0")
                 + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), id="item delimiter with a length"),
])
def test_an_encoding_that_is_not_plain_is_read_as_pydicom_reads_it(raw):
    """Kept or refused as pydicom's path would (ReceivedDataSet failing is the refusal)."""
    encoded = _with_raw([(0x00080060, "CS", b"MR")], raw, [])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            reference = header_as_json(dcmread(BytesIO(encoded), stop_before_pixels=True),
                                       decode_directly=False)
        except Exception:  # noqa: BLE001 - refused
            reference = None
        try:
            read = ReceivedDataSet(encoded)
            header = read.header
        except Exception:  # noqa: BLE001 - refused
            read = header = None

    assert header == reference
    assert read is None or not read.scanned


def test_an_element_of_the_wrong_length_is_left_out_either_way():
    encoded = _read([(0x00080060, "CS", b"MR"), (0x00280010, "US", b"\x00\x02\x00")])

    direct, reference = _both(encoded)

    assert direct == reference == {"Modality": "MR"}


def test_every_pydicom_sample_reads_the_same_directly_as_through_pydicom():
    """pydicom's own samples (those installed with it; nothing is downloaded): every transfer
    syntax, character set, private and odd element they hold."""
    differences, compared, scanned = [], 0, 0
    samples = Path(pydicom.data.__file__).parent
    paths = sorted([*samples.glob("test_files/**/*.dcm"), *samples.glob("charset_files/*.dcm")])
    for path in paths:
        encoded = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dcmread(BytesIO(encoded), stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - a sample pydicom cannot read: refused here too
                with pytest.raises(Exception):  # noqa: B017, PT011
                    ReceivedDataSet(encoded).header  # noqa: B018
                continue
            direct, reference = _both(encoded)
            scanned += ReceivedDataSet(encoded).scanned
        compared += 1
        if direct != reference:
            keys = sorted(k for k in direct.keys() | reference.keys()
                          if direct.get(k) != reference.get(k))
            differences.append((path.name, keys[:5]))

    assert compared > 80
    assert scanned > 60  # the explicit VR little endian ones
    assert differences == []
