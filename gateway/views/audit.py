"""Placeholder views until this area is built."""

from django.shortcuts import render

from gateway.web import VIEW, role_required


@role_required(VIEW)
def audit_list(request, **kwargs):
    return render(request, "stub.html", {"title": "audit_list"})


@role_required(VIEW)
def audit_export(request, **kwargs):
    return render(request, "stub.html", {"title": "audit_export"})


@role_required(VIEW)
def audit_detail(request, **kwargs):
    return render(request, "stub.html", {"title": "audit_detail"})
