"""The administrator's day in headless Chromium against the real running gateway (web UI,
DICOM AE, Celery worker with beat), a real Orthanc as the destination PACS and DCMTK as the
modality. Screenshots of every page go to TEST_OUTPUT_DIR/screenshots/<test name>/."""

from __future__ import annotations

import re
import time

import hl7.client
import pytest
from playwright.sync_api import expect

from tests.fixtures_pacs import wait_until, write_copy
from tests.fixtures_storage import dcmsend
from tests.fixtures_ui import PASSWORD, make_user

pytestmark = pytest.mark.django_db(transaction=True)


def sign_in(page, gateway, username="ada"):
    page.goto(gateway.url + "/")
    expect(page).to_have_url(re.compile(r"/login/"))
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Dashboard")


@pytest.fixture
def ada(transactional_db):
    """The administrator, created before the browser opens (see the chromium fixture)."""
    return make_user("ada", "Administrators")


def test_an_administrator_signs_in_and_out(live_gateway, ada, browser_page):
    page = browser_page
    page.goto(live_gateway.url + "/")
    page.screens.shot(page, "login")
    page.get_by_label("Username").fill("ada")
    page.get_by_label("Password").fill("wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("correct username and password")
    sign_in(page, live_gateway)
    page.screens.shot(page, "dashboard")
    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile(r"/login/"))
    assert not page.console_errors


def reload_until(page, locator, timeout: float = 40.0):
    """Reload the page until ``locator`` shows (lists that don't refresh themselves)."""
    deadline = time.monotonic() + timeout
    while True:
        if locator.count():
            return
        assert time.monotonic() < deadline, f"{locator} never appeared on {page.url}"
        time.sleep(0.5)
        page.reload()


ORDER = (
    "MSH|^~\\&|RIS|HOSP|GATEWAY|HOSP|20261127090000||ORM^O01|UI-E2E-1|P|2.3.1\r"
    "PID|1||UI-PAT-1^^^HOSP||BROWSER^BETTY||19700101|F\r"
    "PV1|1|O\r"
    "ORC|NW|PO-UI-1|FO-UI-1||SC||^^^20261127100000^^R\r"
    "OBR|1|PO-UI-1|FO-UI-1|^^^CTHEAD^CT Head^LOCAL||||||||||||||ACC-UI-1|RP-UI-1|SPS-UI-1||||CT\r"
)


def test_an_administrator_runs_the_gateway_from_the_browser(start_gateway, start_orthanc,
                                                              status_mappings, ada,
                                                              browser_page, tmp_path):
    # Failed deliveries wait ten minutes for their next attempt: long enough that only the
    # administrator's Retry can send one before the test ends.
    gateway = start_gateway(DELIVERY_RETRY_BASE_SECONDS="600", DELIVERY_RETRY_MAX_SECONDS="600")
    pacs = start_orthanc()
    page = browser_page
    shot = page.screens.shot
    sign_in(page, gateway)
    shot(page, "dashboard")

    # A destination PACS, verified with a real C-ECHO.
    page.get_by_role("link", name="Nodes", exact=True).click()
    page.get_by_role("link", name="Add node").click()
    page.get_by_label("Name").fill("PACS1")
    page.get_by_label("AE title").fill("BAD AE TITLE THAT IS TOO LONG")
    page.get_by_label("Host").fill("127.0.0.1")
    page.get_by_label("Port").fill(str(pacs.dicom_port))
    page.get_by_role("button", name="Add node").click()
    expect(page.locator("#id_ae_title_errors")).to_be_visible()
    shot(page, "node-form-error")
    page.get_by_label("AE title").fill(pacs.ae_title)
    page.get_by_role("button", name="Add node").click()
    page.get_by_role("link", name="Nodes", exact=True).click()
    expect(page.get_by_role("cell", name="PACS1", exact=True).first).to_be_visible()
    page.get_by_role("button", name="Verify").first.click()
    expect(page.get_by_text("C-ECHO to PACS1 succeeded")).to_be_visible()
    shot(page, "nodes")

    # A rule, tested against a file before it is saved.
    ct_file = write_copy(tmp_path / "test", InstitutionName="Old Name")
    page.get_by_role("link", name="Rules", exact=True).click()
    page.get_by_role("link", name="Add rule").click()
    page.get_by_label("Name", exact=True).fill("CT to PACS1")
    page.get_by_label("Order").fill("10")
    page.get_by_label("Condition 1 attribute").fill("Modality")
    page.get_by_label("Condition 1 operator").select_option("equals")
    page.get_by_label("Condition 1 value").fill("CT")
    page.get_by_label("PACS1").check()
    page.get_by_label("Coercion 1 attribute").fill("InstitutionName")
    page.get_by_label("Coercion 1 action").select_option("set")
    page.get_by_label("Coercion 1 value").fill("General")
    page.get_by_label("DICOM file").set_input_files(str(ct_file))
    page.get_by_role("button", name="Test rule").click()
    expect(page.get_by_text("The coerced copy")).to_be_visible()
    expect(page.get_by_role("cell", name="General", exact=True)).to_be_visible()
    shot(page, "rule-test")
    page.get_by_role("button", name="Save rule").click()
    page.get_by_role("link", name="Rules", exact=True).click()
    expect(page.get_by_role("cell", name="CT to PACS1")).to_be_visible()
    shot(page, "rules")

    # An order from the RIS shows on the worklist.
    with hl7.client.MLLPClient("127.0.0.1", gateway.hl7_port) as client:
        assert "MSA|AA|UI-E2E-1" in client.send_message(ORDER).decode()
    page.get_by_role("link", name="Worklist", exact=True).click()
    page.get_by_label("Patient").fill("browser")
    page.get_by_role("button", name="Filter").click()
    expect(page.get_by_text("BROWSER^BETTY")).to_be_visible()
    shot(page, "worklist")
    page.get_by_role("link", name="2026-11-27 10:00").click()
    expect(page.get_by_role("heading", name="What a modality receives")).to_be_visible()
    expect(page.get_by_text("ACC-UI-1").first).to_be_visible()
    shot(page, "worklist-item")
    page.get_by_role("link", name="HL7 messages").click()
    expect(page.get_by_text("UI-E2E-1")).to_be_visible()
    shot(page, "hl7-messages")
    page.locator("tbody a").first.click()
    expect(page.get_by_role("heading", name="Segments and fields")).to_be_visible()
    shot(page, "hl7-message")

    # A modality sends a study; the rule forwards it to the PACS.
    first = write_copy(tmp_path / "study")
    assert dcmsend(gateway.dicom_port, first, calling_ae="CT1").statuses == ["0x0000"]
    page.get_by_role("link", name="Deliveries", exact=True).click()
    reload_until(page, page.locator(".badge.DELIVERED"))
    wait_until(lambda: len(pacs.instances()) == 1, 30, "Orthanc to hold the instance")
    shot(page, "delivered")
    page.get_by_role("link", name="Studies", exact=True).click()
    expect(page.get_by_text("PACS1: 1 delivered")).to_be_visible()
    shot(page, "studies")
    page.locator("tbody a").first.click()
    expect(page.get_by_role("heading", name="Delivery by node")).to_be_visible()
    shot(page, "study")

    # The PACS goes down: the next instance's delivery fails and waits.
    pacs.stop()
    second = write_copy(tmp_path / "study")
    assert dcmsend(gateway.dicom_port, second, calling_ae="CT1").statuses == ["0x0000"]
    page.get_by_role("link", name="Deliveries", exact=True).click()
    reload_until(page, page.locator(".badge.FAILED"))
    shot(page, "delivery-failed")

    # Back up: the administrator retries it and it arrives.
    pacs.start()
    page.get_by_role("button", name=re.compile(r"^Retry delivery \d+$")).click()
    expect(page.get_by_text("queued again")).to_be_visible()
    deadline = time.monotonic() + 40
    while page.locator(".badge.DELIVERED").count() < 2:
        assert time.monotonic() < deadline, "the retried delivery never arrived"
        time.sleep(0.5)
        page.reload()
    wait_until(lambda: len(pacs.instances()) == 2, 30, "Orthanc to hold both instances")
    shot(page, "delivery-retried")

    page.get_by_role("link", name="Dashboard").click()
    expect(page.locator(".cards")).to_contain_text("2")
    shot(page, "dashboard-after")

    # All of it is in the audit trail.
    page.get_by_role("link", name="Audit trail").click()
    for action in ("auth.login", "routing.node.created", "routing.node.verified",
                   "routing.rule.created", "hl7.message.received", "dicom.association",
                   "delivery.delivered", "delivery.failed", "delivery.retry"):
        page.get_by_label("Action").fill(action)
        page.get_by_role("button", name="Filter").click()
        expect(page.locator("tbody td").filter(has_text=action).first).to_be_visible()
    page.get_by_label("Action").fill("")
    page.get_by_role("button", name="Filter").click()
    shot(page, "audit-trail")
    page.get_by_label("Action").fill("routing.node.created")
    page.get_by_role("button", name="Filter").click()
    page.locator("tbody a").first.click()
    expect(page.get_by_text("intact")).to_be_visible()
    shot(page, "audit-event")

    # The same pages on a phone.
    page.set_viewport_size({"width": 390, "height": 844})
    for name, path in (("dashboard", "/"), ("deliveries", "/deliveries/"),
                       ("worklist", "/worklist/"), ("audit", "/audit/")):
        page.goto(gateway.url + path)
        shot(page, f"phone-{name}")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390 + 1, f"{path} is {width}px wide on a 390px phone"

    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile(r"/login/"))
    assert not page.console_errors
    # The pages were filtered by patient name; no process of the gateway logged it.
    assert "?patient=" not in gateway.output() and "BROWSER" not in gateway.output().upper()
