"""Fixtures for the administrator's pages: one user per role, and clients signed in as them."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, User
from django.test import Client

from gateway.web import ADMINISTRATORS, AUDITORS, OPERATORS

# Every role, plus a signed-in user with no role and an anonymous visitor.
ROLE_NAMES = ("admin", "operator", "auditor", "norole", "anonymous")
PASSWORD = "correct horse battery staple"


def make_user(username: str, group: str | None = None, **fields) -> User:
    user = User.objects.create_user(username, f"{username}@example.org", PASSWORD, **fields)
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
