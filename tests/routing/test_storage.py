"""store_instance, the plain function behind the storage SCP, called without sockets: what
is kept when writing fails half-way, what the header holds, which UIDs are refused."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from routing.models import ReceivedInstance, ReceivedStudy
from routing.storage import (
    Origin,
    StorageConfig,
    StoreStatus,
    store_instance,
)
from routing.storage import _unnamed_files_work as UNNAMED_FILES_WORK
from tests.fixtures_storage import sample_file

pytestmark = pytest.mark.django_db

ORIGIN = Origin("CT1", "GATEWAY", "127.0.0.1")


@pytest.fixture
def config(tmp_path) -> StorageConfig:
    return StorageConfig(data_dir=tmp_path / "data", min_free_mb=0)


@pytest.fixture(params=["unnamed", "named"], autouse=True)
def temporary_files(request, monkeypatch) -> str:
    """Each test runs with both kinds of temporary file: one without a name until it is
    the instance's (O_TMPFILE), and a named one renamed into place, as on file systems
    without the first kind."""
    if request.param == "named":
        monkeypatch.setattr("routing.storage._unnamed_files_work", lambda directory: False)
    return request.param


def every_file(config: StorageConfig) -> list[Path]:
    return sorted(p for p in config.data_dir.rglob("*") if p.is_file())


def open_files(config: StorageConfig) -> int:
    """This process's open descriptors, once the writers have opened their files ahead in
    ``config``'s directory (a file without a name only shows as one)."""
    from routing import storage

    config.incoming_dir.mkdir(parents=True, exist_ok=True)
    if storage._unnamed_files_work(config.incoming_dir):
        while len(storage._spares._fds) < storage._Spares.SPARES:
            storage._spares.refill(config.incoming_dir)
    return len(os.listdir("/proc/self/fd"))


def test_an_instance_being_stored_has_no_file_name_until_it_is_recorded(
        config, tmp_path, monkeypatch, temporary_files):
    from routing import storage

    seen = []  # the files there once the bytes are written and fsynced, before the move
    written = storage._written
    monkeypatch.setattr(storage, "_written", lambda future: (
        written(future), seen.append(every_file(config)))[0])
    path = sample_file("explicit", tmp_path / "in")

    assert store_instance(path.read_bytes(), ORIGIN, config).ok

    # Unnamed, a process killed at this point leaves nothing behind; named, it leaves a
    # .part file for remove_abandoned_incoming.
    kept = [p.suffix for p in seen[0]]
    assert kept == ([] if temporary_files == "unnamed" else [".part"])
    row = ReceivedInstance.objects.get()
    assert every_file(config) == [Path(row.path)]
    assert Path(row.path).read_bytes() == path.read_bytes()


def test_a_file_left_under_the_final_name_by_a_killed_process_is_replaced(config, tmp_path):
    path = sample_file("explicit", tmp_path / "in")
    ds = dcmread(path)
    final = (config.store_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID
             / f"{ds.SOPInstanceUID}.dcm")
    final.parent.mkdir(parents=True)
    final.write_bytes(b"stored, then the process died before its commit")

    assert store_instance(path.read_bytes(), ORIGIN, config).ok

    row = ReceivedInstance.objects.get()
    assert Path(row.path) == final
    assert final.read_bytes() == path.read_bytes()


def test_storing_many_instances_keeps_few_files_open(config, tmp_path):
    from routing.storage import _Spares

    open_before = len(os.listdir("/proc/self/fd"))
    for number in range(30):
        path = sample_file("explicit", tmp_path / f"in{number}")
        assert store_instance(path.read_bytes(), ORIGIN, config).ok

    assert ReceivedInstance.objects.count() == 30
    # The files opened ahead, and one being opened.
    assert len(os.listdir("/proc/self/fd")) <= open_before + _Spares.SPARES + 1


def test_it_stores_and_records_the_bytes_it_was_given(config, tmp_path):
    path = sample_file("jpeg_baseline", tmp_path / "in")

    result = store_instance(path.read_bytes(), ORIGIN, config)

    assert (result.status, result.route) == (StoreStatus.SUCCESS, True)
    row = ReceivedInstance.objects.get(pk=result.instance_id)
    assert Path(row.path).read_bytes() == path.read_bytes()
    assert every_file(config) == [Path(row.path)]


@pytest.mark.parametrize(
    "error, status",
    [(OSError(errno.EIO, "I/O error"), StoreStatus.CANNOT_WRITE),
     (OSError(errno.ENOSPC, "No space left on device"), StoreStatus.OUT_OF_RESOURCES)],
)
def test_a_write_that_fails_leaves_no_file_and_no_row(config, tmp_path, monkeypatch,
                                                      error, status):
    path = sample_file("explicit", tmp_path / "in")

    def failing_fsync(fd):
        raise error

    open_before = open_files(config)
    monkeypatch.setattr("routing.storage.os.fsync", failing_fsync)

    result = store_instance(path.read_bytes(), ORIGIN, config)

    assert result.status == status
    assert every_file(config) == []
    assert open_files(config) == open_before
    assert not ReceivedInstance.objects.exists() and not ReceivedStudy.objects.exists()


def test_a_row_that_cannot_be_saved_leaves_no_file(config, tmp_path, monkeypatch):
    path = sample_file("explicit", tmp_path / "in")

    def failing_cursor(*args, **kwargs):
        raise RuntimeError("database went away")

    open_before = open_files(config)
    monkeypatch.setattr("routing.storage.sql.cursor", failing_cursor)

    result = store_instance(path.read_bytes(), ORIGIN, config)

    assert result.status == StoreStatus.CANNOT_WRITE
    assert every_file(config) == []
    assert open_files(config) == open_before
    assert not ReceivedStudy.objects.exists()


def same_instance_again(path: Path, tmp_path: Path, **changes) -> Path:
    ds = dcmread(path)
    return sample_file("explicit", tmp_path / "again", **changes, **{
        keyword: ds[keyword].value
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")})


def test_a_replacement_that_fails_at_the_last_step_leaves_the_previous_version_whole(
        config, tmp_path, monkeypatch):
    first = sample_file("explicit", tmp_path / "in", InstitutionName="First")
    assert store_instance(first.read_bytes(), ORIGIN, config).ok
    second = same_instance_again(first, tmp_path, InstitutionName="Second")

    def failing_fsync_dir(directory):
        raise OSError(errno.EIO, "I/O error")

    # The new file is in place; the directory cannot be made durable, so nothing commits.
    open_before = open_files(config)
    monkeypatch.setattr("routing.storage._fsync_dir", failing_fsync_dir)
    result = store_instance(second.read_bytes(), ORIGIN, config)
    assert open_files(config) == open_before

    assert result.status == StoreStatus.CANNOT_WRITE
    row = ReceivedInstance.objects.get()
    assert (row.version, row.header["InstitutionName"]) == (1, "First")
    assert Path(row.path).read_bytes() == first.read_bytes()
    assert every_file(config) == [Path(row.path)]


def test_a_replacement_is_stored_beside_the_previous_version_then_takes_its_place(
        config, tmp_path):
    first = sample_file("explicit", tmp_path / "in", InstitutionName="First")
    assert store_instance(first.read_bytes(), ORIGIN, config).ok
    before = ReceivedInstance.objects.get().path
    second = same_instance_again(first, tmp_path, InstitutionName="Second")

    assert store_instance(second.read_bytes(), ORIGIN, config).ok

    row = ReceivedInstance.objects.get()
    assert (row.version, row.path) == (2, before.replace(".dcm", ".v2.dcm"))
    assert Path(row.path).read_bytes() == second.read_bytes()
    assert every_file(config) == [Path(row.path)]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("study_uid", ["../../../etc", "1.2.3/4", "1.2.x", ""])
def test_a_uid_that_is_not_a_uid_is_refused_before_anything_is_written(config, tmp_path,
                                                                        study_uid):
    path = sample_file("explicit", tmp_path / "in", StudyInstanceUID=study_uid)

    result = store_instance(path.read_bytes(), ORIGIN, config)

    assert result.status == StoreStatus.CANNOT_PARSE
    assert every_file(config) == [] and not ReceivedInstance.objects.exists()


def test_a_data_set_without_a_series_is_refused(config, tmp_path):
    path = sample_file("explicit", tmp_path / "in", SeriesInstanceUID=None)

    assert store_instance(path.read_bytes(), ORIGIN, config).status == StoreStatus.CANNOT_PARSE


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_garbage_is_refused_as_unparsable(config):
    result = store_instance(b"\x00" * 128 + b"DICM" + b"\xff" * 50, ORIGIN, config)

    assert result.status == StoreStatus.CANNOT_PARSE
    assert every_file(config) == []


def test_the_study_collects_its_modalities(config, tmp_path):
    study = "1.2.826.0.1.3680043.8.498.1"
    ct = sample_file("explicit", tmp_path / "in", StudyInstanceUID=study)
    mr = sample_file("rle", tmp_path / "in", StudyInstanceUID=study)

    for path in (ct, mr, ct):
        assert store_instance(path.read_bytes(), ORIGIN, config).ok

    received = ReceivedStudy.objects.get()
    assert received.modalities == "CT\\MR"
    assert received.instances.count() == 2
    assert dcmread(ct).Modality == "CT"


@pytest.mark.parametrize("calling_ae", ["", "CT1", "MODALITY_AE_16CH"])
@pytest.mark.parametrize("sop_instance", ["1.2.3", "1.2.826.0.1.3680043.8.498.10"])
def test_the_file_meta_is_encoded_as_pynetdicom_would(calling_ae, sop_instance):
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from routing.dicom_handlers import _file_meta

    meta = create_file_meta(sop_class_uid=CTImageStorage, sop_instance_uid=sop_instance,
                            transfer_syntax=ExplicitVRLittleEndian)
    if calling_ae:
        meta.SourceApplicationEntityTitle = calling_ae

    assert _file_meta(str(CTImageStorage), sop_instance, str(ExplicitVRLittleEndian),
                      calling_ae) == encode_file_meta(meta)


def test_temporary_files_a_killed_process_left_are_removed_an_hour_later(config):
    from routing.storage import remove_abandoned_incoming

    config.incoming_dir.mkdir(parents=True)
    abandoned, writing = config.incoming_dir / "tmpa.part", config.incoming_dir / "tmpb.part"
    abandoned.write_bytes(b"half an instance")
    writing.write_bytes(b"an instance being received")
    two_hours_ago = time.time() - 7200
    os.utime(abandoned, (two_hours_ago, two_hours_ago))

    assert remove_abandoned_incoming(config) == 1

    assert not abandoned.exists() and writing.exists()


def test_a_directory_not_there_yet_does_not_settle_whether_unnamed_files_work(tmp_path):
    # The probe itself, whichever kind of file the fixture has the stores use.
    directory = tmp_path / "later"

    assert UNNAMED_FILES_WORK(directory) is False  # ENOENT: asked again next time
    directory.mkdir()
    assert UNNAMED_FILES_WORK(directory) is True
    assert list(directory.iterdir()) == []  # the probe's name is gone
