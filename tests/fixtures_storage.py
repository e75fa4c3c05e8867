"""Fixtures for the storage SCP and rule tests: the gateway's AE listening on 127.0.0.1 in
this process with its data directory in a temporary folder, DCMTK's dcmsend / storescu as
the modality, and sample instances copied from pydicom's test files with fresh UIDs."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

GATEWAY_AE = "GATEWAY"
MODALITY_AE = "CT1"

# Local pydicom test files by what they exercise (none of these is downloaded).
SAMPLES = {
    "explicit": "CT_small.dcm",
    "implicit": "MR_small_implicit.dcm",
    "big_endian": "MR_small_bigendian.dcm",
    "deflated": "image_dfl.dcm",
    "jpeg_baseline": "SC_rgb_jpeg_dcmtk.dcm",
    "jpeg_extended": "JPGExtended.dcm",
    "jpeg_lossless_sv1": "SC_rgb_jpeg_gdcm.dcm",
    "jpeg_ls_lossless": "MR_small_jpeg_ls_lossless.dcm",
    "jpeg_ls_near_lossless": "JPEGLSNearLossless_16.dcm",
    "j2k_lossless": "MR_small_jp2klossless.dcm",
    "j2k": "JPEG2000.dcm",
    "rle": "MR_small_RLE.dcm",
}


@dataclass
class StorageServer:
    """An AE started for a test: where it listens and where it stores."""

    port: int
    data_dir: Path
    server: object
    ae_title: str = GATEWAY_AE


@dataclass
class SendResult:
    """What a DCMTK sender reported: its exit code, the C-STORE response statuses it logged
    (e.g. ``["0x0000"]``, ``["0xa700"]``), and its output."""

    returncode: int
    statuses: list[str] = field(default_factory=list)
    output: str = ""


def sample_file(kind: str, directory: Path, **changes) -> Path:
    """A copy of a pydicom sample with fresh SOP Instance, Series and Study UIDs (overridable:
    ``StudyInstanceUID=...``, ``Modality="MR"``, any keyword), saved without re-encoding the
    pixel data (encapsulated fragments are written back byte for byte)."""
    from pydicom.data import get_testdata_file

    ds = dcmread(get_testdata_file(SAMPLES.get(kind, kind)))
    values = {
        "SOPInstanceUID": generate_uid(),
        "SeriesInstanceUID": generate_uid(),
        "StudyInstanceUID": generate_uid(),
    }
    values.update(changes)
    for keyword, value in values.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def dataset_bytes(path: Path | str) -> bytes:
    """The bytes of a Part 10 file after its file meta information: the data set exactly as
    encoded in the file's transfer syntax."""
    from pynetdicom.dsutils import split_dataset

    _, offset = split_dataset(Path(path))
    return Path(path).read_bytes()[offset:]


def _run(argv: list[str], timeout: float = 60) -> SendResult:
    proc = subprocess.run(
        argv, capture_output=True, timeout=timeout, env={**os.environ, "TCP_NODELAY": "1"}
    )
    output = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    statuses = re.findall(r"DIMSE Status\s*:\s*(0x[0-9a-fA-F]{4})", output)
    return SendResult(proc.returncode, [s.lower() for s in statuses], output)


def dcmsend(port: int, *files: Path, calling_ae: str = MODALITY_AE,
            called_ae: str = GATEWAY_AE, extra: list[str] | None = None) -> SendResult:
    """DCMTK ``dcmsend --decompress-never`` (the files go in their own transfer syntax)."""
    argv = ["dcmsend", "-d", "--decompress-never", "-aet", calling_ae, "-aec", called_ae,
            *(extra or []), "127.0.0.1", str(port), *map(str, files)]
    return _run(argv)


def storescu(port: int, *files: Path, calling_ae: str = MODALITY_AE,
             called_ae: str = GATEWAY_AE, extra: list[str] | None = None) -> SendResult:
    """DCMTK ``storescu -R`` (proposes exactly each file's SOP class and transfer syntax,
    so also SOP classes DCMTK does not know)."""
    argv = ["storescu", "-d", "-R", "-aet", calling_ae, "-aec", called_ae, *(extra or []),
            "127.0.0.1", str(port), *map(str, files)]
    return _run(argv)


@contextmanager
def _started(config) -> Iterator[StorageServer]:
    from gateway.dicom import services, start_server

    server = start_server("127.0.0.1", 0, GATEWAY_AE, services(storage=config))
    try:
        yield StorageServer(server.server_address[1], config.data_dir, server)
    finally:
        server.shutdown()


@pytest.fixture
def start_storage_server(tmp_path: Path) -> Iterator[Callable[..., StorageServer]]:
    """``start_storage_server(duplicate_policy="keep", min_free_mb=0)``: the gateway AE with
    its data directory under tmp_path. Tests that use it need transactional_db, so the
    association threads see and write committed rows."""
    from routing.storage import StorageConfig

    opened: list = []

    def start(**options) -> StorageServer:
        values = {"data_dir": tmp_path / "data", "min_free_mb": 0}
        values.update(options)
        manager = _started(StorageConfig(**values))
        opened.append(manager)
        return manager.__enter__()

    yield start
    for manager in reversed(opened):
        manager.__exit__(None, None, None)


@pytest.fixture
def storage_server(start_storage_server) -> StorageServer:
    """The gateway AE with default storage options (duplicates replaced, no free-space
    floor)."""
    return start_storage_server()


@pytest.fixture
def enqueued(monkeypatch) -> list[int]:
    """The node ids routing asked the delivery tasks to work on, in order (no broker)."""
    calls: list[int] = []
    monkeypatch.setattr("routing.routing.enqueue_nodes", lambda ids: calls.extend(ids))
    return calls


def send_raw(port: int, *files: Path, calling_ae: str = MODALITY_AE, called_ae: str = GATEWAY_AE,
             abort: bool = False) -> list[int]:
    """Send files with a pynetdicom SCU that streams each file's data set bytes exactly as they
    are in the file (no decoding), each in a context with the file's own SOP class and
    transfer syntax; return the C-STORE response statuses (-1 when none came). ``abort``
    ends with A-ABORT instead of A-RELEASE."""
    from pynetdicom import AE, _config
    from pynetdicom.dsutils import split_dataset

    ae = AE(ae_title=calling_ae)
    for path in files:
        meta, _ = split_dataset(Path(path))
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
        assert assoc.is_established, "the gateway refused the association"
        statuses = []
        for path in files:
            response = assoc.send_c_store(Path(path))
            statuses.append(int(response.Status) if "Status" in response else -1)
        if abort:
            assoc.abort()
        else:
            assoc.release()
        return statuses
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def received_instance(header: dict | None = None, study_uid: str | None = None,
                      received_at=None, **fields):
    """A ReceivedInstance row (and its study) as the storage SCP would record it, without a
    file: for routing tests that only look at the header and the association."""
    from django.utils import timezone

    from routing.models import ReceivedInstance, ReceivedStudy

    now = received_at or timezone.now()
    study, _ = ReceivedStudy.objects.get_or_create(
        study_instance_uid=study_uid or generate_uid(), defaults={"last_received_at": now}
    )
    if study.last_received_at < now:
        study.last_received_at = now
        study.save(update_fields=["last_received_at"])
    values = {
        "study": study,
        "sop_instance_uid": generate_uid(),
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "series_instance_uid": generate_uid(),
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "header": {"Modality": "CT", **(header or {})},
        "calling_ae": "CT1",
        "called_ae": "GATEWAY",
        "source_ip": "127.0.0.1",
        "size": 1000,
        "path": "",
        "received_at": now,
    }
    values.update(fields)
    return ReceivedInstance.objects.create(**values)


def make_rule(name: str, conditions: list | None = None, destinations=(), **fields):
    """A Rule sending to the given Node rows."""
    from routing.models import Rule

    rule = Rule.objects.create(name=name, conditions=conditions or [], **fields)
    rule.destinations.set(destinations)
    return rule


def make_node(name: str, **fields):
    from routing.models import Node

    values = {"ae_title": name.upper()[:16], "host": "127.0.0.1", "port": 11112}
    values.update(fields)
    return Node.objects.create(name=name, **values)
