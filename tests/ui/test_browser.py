"""The administrator's day in headless Chromium against the real running gateway (web UI,
DICOM AE, Celery worker with beat), a real Orthanc as the destination PACS and DCMTK as the
modality. Screenshots of every page go to TEST_OUTPUT_DIR/screenshots/<test name>/."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.fixtures_ui import PASSWORD, make_user

pytestmark = pytest.mark.django_db(transaction=True)


def sign_in(page, gateway, username="ada"):
    page.goto(gateway.url + "/")
    expect(page).to_have_url(re.compile(r"/login/"))
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Dashboard")


def test_an_administrator_signs_in_and_out(live_gateway, browser_page):
    make_user("ada", "Administrators")
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
