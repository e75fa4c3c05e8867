"""Fixtures for the administrator's pages: one user per role, and clients signed in as them."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import Group, User
from django.test import Client

from gateway.web import ADMINISTRATORS, AUDITORS, OPERATORS
from tests.servers import ROOT, free_port, process_env

# Every role, plus a signed-in user with no role and an anonymous visitor.
ROLE_NAMES = ("admin", "operator", "auditor", "norole", "anonymous")
PASSWORD = "correct horse battery staple"


@functools.cache
def _password_hash() -> str:
    # Hashing takes ~0.3 s by design; every test user shares one real hash of PASSWORD (which a
    # separately started gateway process can check too).
    return make_password(PASSWORD)


def make_user(username: str, group: str | None = None, **fields) -> User:
    user = User.objects.create(username=username, email=f"{username}@example.org",
                               password=_password_hash(), **fields)
    if group:
        user.groups.add(Group.objects.get_or_create(name=group)[0])
    return user


@pytest.fixture
def role_users(db) -> dict[str, User]:
    return {
        "admin": make_user("ada", ADMINISTRATORS),
        "operator": make_user("otto", OPERATORS),
        "auditor": make_user("audrey", AUDITORS),
        "norole": make_user("nora"),
    }


@pytest.fixture
def client_as(role_users):
    """``client_as("operator")``: a test client signed in as that role's user
    (``"anonymous"``: not signed in)."""

    def make(role: str) -> Client:
        client = Client()
        if role != "anonymous":
            client.force_login(role_users[role])
        return client

    return make


# --- The running product and a real browser -----------------------------------------------

# Debian's Chromium; Playwright cannot download its own browser here.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--no-first-run"]
OUTPUT_DIR = Path(os.environ.get("TEST_OUTPUT_DIR", ROOT / "test-output"))


@dataclass
class LiveGateway:
    """``rungateway`` as a user meets it: web UI, HL7 listener, DICOM AE, Celery worker and
    beat, on the test database and the tests' own Redis."""

    proc: subprocess.Popen
    log: Path
    http_port: int
    hl7_port: int
    dicom_port: int
    ae_title: str = "GATEWAY"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def start_gateway(transactional_db, celery_broker,
                  tmp_path) -> Iterator[Callable[..., LiveGateway]]:
    """``start_gateway(**env)``: ``rungateway`` on the test database and the tests' Redis, with
    the short retry and sweep times of the worker tests unless ``env`` says otherwise."""
    from django.db import connection

    from tests.fixtures_pacs import WORKER_ENV

    assert connection.vendor == "postgresql", "the live gateway needs DATABASE_URL=postgres://"
    started: list[LiveGateway] = []

    def start(**overrides: str) -> LiveGateway:
        ports = {"HTTP_PORT": free_port(), "HL7_PORT": free_port(), "DICOM_PORT": free_port()}
        env = process_env(
            connection.settings_dict["NAME"],
            REDIS_URL=celery_broker.url,
            GATEWAY_DATA_DIR=str(tmp_path / f"var{len(started)}"),
            HL7_HOST="127.0.0.1",
            DICOM_HOST="127.0.0.1",
            WEB_CONCURRENCY="2",
            CELERY_CONCURRENCY="2",
            GATEWAY_MIN_FREE_MB="0",
            **{k: str(v) for k, v in ports.items()},
            **{**WORKER_ENV, **overrides},
        )
        log = tmp_path / f"rungateway{len(started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "manage.py"), "rungateway",
                 "--http-host", "127.0.0.1"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        gateway = LiveGateway(proc, log, ports["HTTP_PORT"], ports["HL7_PORT"],
                              ports["DICOM_PORT"], env["DICOM_AE_TITLE"])
        started.append(gateway)
        deadline = time.monotonic() + 90
        for port in ports.values():
            while True:
                assert proc.poll() is None, f"rungateway exited:\n{gateway.output()[-3000:]}"
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    assert time.monotonic() < deadline, (
                        f"nothing on {port}:\n{gateway.output()[-3000:]}")
                    time.sleep(0.2)
        return gateway

    yield start
    for gateway in started:
        if gateway.proc.poll() is None:
            gateway.proc.send_signal(signal.SIGTERM)
            try:
                gateway.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(gateway.proc.pid, signal.SIGKILL)
                gateway.proc.wait()
    if started:
        _wait_for_other_sessions_to_end(connection)


def _wait_for_other_sessions_to_end(connection, timeout: float = 10.0) -> None:
    """The gateway's processes have exited, but PostgreSQL ends their sessions a moment later;
    the test database can only be flushed and dropped once they are gone."""
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                           "current_database() AND pid <> pg_backend_pid()")
            if cursor.fetchone()[0] == 0:
                return
            time.sleep(0.1)


@pytest.fixture
def live_gateway(start_gateway) -> LiveGateway:
    return start_gateway()


@pytest.fixture
def chromium():
    """Headless Debian Chromium driven by Playwright, for one test. While it is open, Playwright
    keeps an event loop running on this thread and Django refuses ORM calls here: a browser
    test prepares its rows in fixtures requested before this one."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


class Screens:
    """Saves numbered screenshots of a test's pages under TEST_OUTPUT_DIR/screenshots/."""

    def __init__(self, name: str):
        self.directory = OUTPUT_DIR / "screenshots" / name
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)
        self.count = 0

    def shot(self, page, label: str) -> Path:
        self.count += 1
        path = self.directory / f"{self.count:02d}-{label}.png"
        page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def browser_page(chromium, request):
    """A fresh browser context at 1280x800 and its page, plus ``page.screens`` for
    screenshots; the context's console errors are collected in ``page.console_errors``."""
    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(15_000)
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.screens = Screens(request.node.name)
    yield page
    context.close()
