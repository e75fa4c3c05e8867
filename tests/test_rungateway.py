"""`make run`'s command: every part starts on the embedded defaults (SQLite, filesystem broker),
the whole flow RIS -> worklist -> modality works, and SIGTERM stops every part."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import hl7.client
import pytest

from tests.servers import findscu_worklist, free_port

ROOT = Path(__file__).resolve().parent.parent

ORDER = (
    "MSH|^~\\&|RIS|HOSP|GATEWAY|HOSP|20261127090000||ORM^O01|RUNGW1|P|2.3.1\r"
    "PID|1||EMB-1^^^HOSP||EMBEDDED^EDNA||19700101|F\r"
    "PV1|1|O\r"
    "ORC|NW|PO-EMB-1|FO-EMB-1||SC\r"
    "OBR|1|PO-EMB-1|FO-EMB-1|^^^CTHEAD^CT Head^LOCAL||||||||||||||ACC-EMB-1|RP-EMB-1|SPS-EMB-1|"
    "|||CT\r"
    "ZDS|1.2.826.0.1.3680043.8.498.777\r"
)


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"rungateway exited early with {proc.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listens on {port} after {timeout}s")


@pytest.fixture
def embedded_gateway(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    ports = {"HTTP_PORT": free_port(), "HL7_PORT": free_port(), "DICOM_PORT": free_port()}
    env.update({k: str(v) for k, v in ports.items()})
    env.update(
        GATEWAY_DATA_DIR=str(tmp_path / "var"),
        HL7_HOST="127.0.0.1",
        DICOM_HOST="127.0.0.1",
        DICOM_AE_TITLE="EMBEDDED",
        WEB_CONCURRENCY="1",
        CELERY_CONCURRENCY="1",
        TCP_NODELAY="1",
    )
    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run([*manage, "migrate", "--noinput"], env=env, check=True, capture_output=True)
    log = open(tmp_path / "rungateway.log", "wb")
    proc = subprocess.Popen(
        [*manage, "rungateway", "--http-host", "127.0.0.1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        for port in ports.values():
            wait_for_port(port, proc)
        yield proc, ports, tmp_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_it_runs_the_whole_flow_on_embedded_defaults_and_stops_on_sigterm(embedded_gateway):
    proc, ports, tmp_path = embedded_gateway

    with urllib.request.urlopen(f"http://127.0.0.1:{ports['HTTP_PORT']}/health") as response:
        assert response.status == 200

    web = f"http://127.0.0.1:{ports['HTTP_PORT']}"
    with urllib.request.urlopen(f"{web}/") as response:  # the pages need a sign-in first
        assert response.url.startswith(f"{web}/login/")
        assert "Sign in" in response.read().decode()
    with urllib.request.urlopen(f"{web}/static/gateway/app.css") as response:
        assert response.status == 200 and b"table.list" in response.read()

    with hl7.client.MLLPClient("127.0.0.1", ports["HL7_PORT"]) as client:
        ack = client.send_message(ORDER).decode()
    assert "MSA|AA|RUNGW1" in ack

    echo = subprocess.run(
        ["echoscu", "-aec", "EMBEDDED", "127.0.0.1", str(ports["DICOM_PORT"])],
        capture_output=True, text=True, timeout=30,
    )
    assert echo.returncode == 0, echo.stderr

    [item] = findscu_worklist(
        ports["DICOM_PORT"],
        ["AccessionNumber=ACC-EMB-1", "PatientName", "PatientID", "StudyInstanceUID"],
        called_ae="EMBEDDED",
    )
    assert str(item.PatientName) == "EMBEDDED^EDNA"
    assert item.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.777"

    assert (tmp_path / "var" / "gateway.sqlite3").exists()

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=40) == 0
    # Every part is gone: nothing listens any more on any of the gateway's ports.
    for port in ports.values():
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    leftover = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"processes left in the group: {leftover.stdout}"
