"""Django's admin: superusers only, the product's throttled sign-in, every change audited."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, User
from django.test import Client

from gateway.models import AuditEvent
from tests.fixtures_ui import PASSWORD, make_user
from worklist.models import HL7Message, OrderStatusMapping

pytestmark = pytest.mark.django_db


@pytest.fixture
def superuser_client():
    client = Client()
    client.force_login(make_user("root", is_superuser=True, is_staff=True))
    return client


def test_a_staff_administrator_who_is_not_a_superuser_cannot_use_the_admin():
    client = Client()
    client.force_login(make_user("ada", "Administrators", is_staff=True))
    response = client.get("/admin/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_the_admin_sign_in_is_throttled_like_the_product(settings):
    settings.LOGIN_FAILURE_LIMIT = 2
    make_user("root", is_superuser=True, is_staff=True)
    client = Client()
    for _ in range(2):
        client.post("/admin/login/", {"username": "root", "password": "nope"})
    response = client.post("/admin/login/", {"username": "root", "password": PASSWORD})
    assert "Too many failed sign-ins" in response.content.decode()
    assert "_auth_user_id" not in client.session


def test_giving_a_user_a_role_in_the_admin_is_audited(superuser_client):
    otto = make_user("otto")
    operators = Group.objects.get(name="Operators")
    response = superuser_client.post(f"/admin/auth/user/{otto.pk}/change/", {
        "username": "otto", "email": "otto@example.org", "is_active": "on",
        "groups": [operators.pk], "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00",
        "initial-date_joined_0": "2026-01-01", "initial-date_joined_1": "00:00:00",
    })
    assert response.status_code == 302, response.content.decode()[:2000]
    assert list(User.objects.get(pk=otto.pk).groups.values_list("name", flat=True)) == [
        "Operators"]
    event = AuditEvent.objects.get(action="auth.user.updated")
    assert event.actor == "user:root"
    assert event.detail["before"]["groups"] == [] and event.detail["after"]["groups"] == [
        "Operators"]
    assert "password" not in str(event.detail)


def test_a_status_mapping_added_in_the_admin_is_audited(superuser_client):
    response = superuser_client.post("/admin/worklist/orderstatusmapping/add/", {
        "order_control": "ZZ", "order_status": "", "step_status": "SCHEDULED"})
    assert response.status_code == 302
    mapping = OrderStatusMapping.objects.get(order_control="ZZ")
    event = AuditEvent.objects.get(action="worklist.orderstatusmapping.created")
    assert event.object_id == str(mapping.pk)
    assert event.detail["after"]["step_status"] == "SCHEDULED"


def test_received_messages_cannot_be_changed_or_deleted_in_the_admin(superuser_client):
    message = HL7Message.objects.create(control_id="X1", status="ACCEPTED", raw=b"MSH|")
    assert superuser_client.post(f"/admin/worklist/hl7message/{message.pk}/delete/",
                                 {"post": "yes"}).status_code == 403
    assert HL7Message.objects.filter(pk=message.pk).exists()
