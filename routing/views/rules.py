"""Placeholder views until this area is built."""

from django.shortcuts import render

from gateway.web import VIEW, role_required


@role_required(VIEW)
def rule_list(request, **kwargs):
    return render(request, "stub.html", {"title": "rule_list"})


@role_required(VIEW)
def rule_create(request, **kwargs):
    return render(request, "stub.html", {"title": "rule_create"})


@role_required(VIEW)
def rule_test(request, **kwargs):
    return render(request, "stub.html", {"title": "rule_test"})


@role_required(VIEW)
def rule_edit(request, **kwargs):
    return render(request, "stub.html", {"title": "rule_edit"})


@role_required(VIEW)
def rule_delete(request, **kwargs):
    return render(request, "stub.html", {"title": "rule_delete"})


@role_required(VIEW)
def rule_toggle(request, **kwargs):
    return render(request, "stub.html", {"title": "rule_toggle"})


@role_required(VIEW)
def rule_move(request, **kwargs):
    return render(request, "stub.html", {"title": "rule_move"})
