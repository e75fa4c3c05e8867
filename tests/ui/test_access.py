"""Signing in and out, roles, and the pages every role may or may not reach."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from gateway.models import AuditEvent
from tests.fixtures_ui import PASSWORD, make_user

pytestmark = pytest.mark.django_db


def _product_urls():
    """Every URL of the product's pages (not the admin, login or health check), with 1 for
    each id it takes."""

    def walk(patterns, prefix=""):
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                if str(pattern.pattern).startswith("admin"):
                    continue
                yield from walk(pattern.url_patterns, prefix + str(pattern.pattern))
            elif isinstance(pattern, URLPattern) and pattern.name not in (None, "login",
                                                                           "logout"):
                yield pattern.name, pattern.pattern.converters

    for name, converters in walk(get_resolver().url_patterns):
        yield reverse(name, kwargs={key: 1 for key in converters})


PRODUCT_URLS = sorted(set(_product_urls()))


def test_every_product_page_is_known():
    assert "/" in PRODUCT_URLS and "/audit/" in PRODUCT_URLS and "/nodes/" in PRODUCT_URLS


@pytest.mark.parametrize("url", PRODUCT_URLS)
def test_every_page_sends_an_anonymous_visitor_to_sign_in(url):
    response = Client().get(url)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login") + "?next=")


@pytest.mark.parametrize("url", PRODUCT_URLS)
def test_a_user_without_a_role_sees_nothing(client_as, url):
    response = client_as("norole").get(url)
    assert response.status_code == 403
    assert "nora has no role" in response.content.decode()


def test_the_login_page_signs_in_and_audits_it():
    make_user("ada", "Administrators")
    client = Client()
    page = client.get(reverse("login"))
    assert b'<label for="id_username">' in page.content
    response = client.post(reverse("login"), {"username": "ada", "password": PASSWORD})
    assert response.status_code == 302 and response["Location"] == reverse("dashboard")
    event = AuditEvent.objects.get(action="auth.login")
    assert event.actor == "user:ada" and event.detail["ip"] == "127.0.0.1"


def test_a_wrong_password_is_refused_and_audited():
    make_user("ada", "Administrators")
    response = Client().post(reverse("login"), {"username": "ada", "password": "nope"})
    assert response.status_code == 200
    assert "Please enter a correct username and password" in response.content.decode()
    event = AuditEvent.objects.get(action="auth.login_failed")
    assert event.detail == {"username": "ada", "ip": "127.0.0.1"}


def test_repeated_failures_lock_the_user_out_even_with_the_right_password(settings):
    settings.LOGIN_FAILURE_LIMIT = 3
    make_user("ada", "Administrators")
    client = Client()
    for _ in range(3):
        client.post(reverse("login"), {"username": "ada", "password": "nope"})
    response = client.post(reverse("login"), {"username": "ada", "password": PASSWORD})
    assert response.status_code == 429
    assert "Too many failed sign-ins" in response.content.decode()
    assert "_auth_user_id" not in client.session
    client.post(reverse("login"), {"username": "ada", "password": PASSWORD})
    assert AuditEvent.objects.filter(action="auth.login_throttled").count() == 1


def test_failures_from_one_address_do_not_lock_the_user_out_elsewhere(settings):
    settings.LOGIN_FAILURE_LIMIT = 3
    make_user("ada", "Administrators")
    attacker = Client(REMOTE_ADDR="203.0.113.9")
    for _ in range(3):
        attacker.post(reverse("login"), {"username": "ada", "password": "nope"})
    assert attacker.post(reverse("login"), {"username": "ada",
                                            "password": PASSWORD}).status_code == 429
    response = Client(REMOTE_ADDR="10.1.2.3").post(reverse("login"),
                                                   {"username": "ada", "password": PASSWORD})
    assert response.status_code == 302


def test_an_address_trying_many_names_is_refused(settings):
    settings.LOGIN_FAILURE_LIMIT = 2
    make_user("ada", "Administrators")
    client = Client(REMOTE_ADDR="203.0.113.9")
    for n in range(8):
        client.post(reverse("login"), {"username": f"guess{n}", "password": "nope"})
    assert client.post(reverse("login"), {"username": "ada",
                                          "password": PASSWORD}).status_code == 429


def test_behind_the_tls_proxy_the_browser_address_is_the_one_the_proxy_appended(settings):
    settings.BEHIND_TLS_PROXY = True
    make_user("ada", "Administrators")
    Client(REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="1.2.3.4, 198.51.100.7").post(
        reverse("login"), {"username": "ada", "password": "nope"})
    assert AuditEvent.objects.get(action="auth.login_failed").detail["ip"] == "198.51.100.7"


def test_logout_is_a_post_and_is_audited(client_as):
    client = client_as("auditor")
    response = client.post(reverse("logout"))
    assert response.status_code == 302
    assert AuditEvent.objects.filter(action="auth.logout", actor="user:audrey").exists()
    assert client.get(reverse("dashboard")).status_code == 302


def test_an_idle_session_is_signed_out_but_the_dashboard_refresh_does_not_keep_it(
        client_as, settings):
    settings.SESSION_IDLE_MINUTES = 30
    client = client_as("operator")
    assert client.get(reverse("worklist-list")).status_code == 200
    session = client.session
    session["gateway_last_activity"] -= 31 * 60
    session.save()
    assert client.get(reverse("dashboard-data")).status_code == 302  # refreshes don't count
    response = client.get(reverse("worklist-list"))
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))
    assert AuditEvent.objects.filter(action="auth.logout", detail__idle=True).exists()
