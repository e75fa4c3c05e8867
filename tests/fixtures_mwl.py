"""Fixtures for the Modality Worklist tests: the gateway's AE listening on 127.0.0.1 in this
process, and DCMTK's findscu as the modality."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

GATEWAY_AE = "GATEWAY"
MODALITY_AE = "MODALITY1"


@dataclass
class RunningServer:
    """An AE started for a test: where it listens and the server to stop."""

    port: int
    ae_title: str
    server: object


@dataclass
class FindResult:
    """What findscu received: the response identifiers in order and the final status text
    as DCMTK names it ("Success", "Cancel", "Error: DataSetDoesNotMatchSOPClass", ...)."""

    responses: list[Dataset]
    final_status: str
    output: str


def _start(config=None, ae_title: str = GATEWAY_AE) -> RunningServer:
    from gateway.dicom import services, start_server

    server = start_server("127.0.0.1", 0, ae_title, services(config))
    return RunningServer(server.server_address[1], ae_title, server)


@pytest.fixture(scope="session")
def mwl_server() -> Iterator[RunningServer]:
    """The gateway AE with the default worklist configuration (no station restriction,
    a cap far above what tests create). Tests that need rows use transactional_db, so the
    association threads see them."""
    from worklist.dicom_handlers import WorklistConfig

    running = _start(WorklistConfig(restrict_to_calling_station=False, max_results=5000))
    yield running
    running.server.shutdown()


@pytest.fixture
def start_mwl_server() -> Iterator[Callable[..., RunningServer]]:
    """Start an AE with its own WorklistConfig for one test: ``start_mwl_server(config)``."""
    started: list[RunningServer] = []

    def start(config=None) -> RunningServer:
        running = _start(config)
        started.append(running)
        return running

    yield start
    for running in started:
        running.server.shutdown()


def run_findscu(
    port: int,
    keys: list[str | bytes],
    out_dir: Path,
    calling_ae: str = MODALITY_AE,
    called_ae: str = GATEWAY_AE,
    extra: list[str] | None = None,
) -> FindResult:
    """One DCMTK ``findscu -W`` query with ``-k`` keys; responses are read back from the
    files findscu extracts (-X), so tests assert on exactly what the modality received.
    Keys may be bytes to send values in a non-UTF-8 character set."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("rsp*.dcm"):
        old.unlink()
    argv: list[str | bytes] = ["findscu", "-v", "-W", "-aet", calling_ae, "-aec", called_ae]
    argv += extra or []
    for key in keys:
        argv += ["-k", key]
    argv += ["-X", "-od", str(out_dir), "127.0.0.1", str(port)]
    proc = subprocess.run(
        argv,
        capture_output=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    output = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    final = re.search(r"Received Final Find Response \(([^)]*)\)", output)
    responses = [dcmread(path) for path in sorted(out_dir.glob("rsp*.dcm"))]
    return FindResult(responses, final.group(1) if final else "", output)


@pytest.fixture
def findscu(mwl_server: RunningServer, tmp_path: Path) -> Callable[..., FindResult]:
    """``findscu("PatientName=SMITH*", "PatientID")`` against the session's gateway AE."""

    def query(*keys: str | bytes, port: int | None = None, **kwargs) -> FindResult:
        return run_findscu(port or mwl_server.port, list(keys), tmp_path / "rsp", **kwargs)

    return query
