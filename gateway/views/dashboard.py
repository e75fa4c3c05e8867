"""Placeholder views until this area is built."""

from django.shortcuts import render

from gateway.web import VIEW, role_required


@role_required(VIEW)
def dashboard(request, **kwargs):
    return render(request, "stub.html", {"title": "dashboard"})


@role_required(VIEW)
def dashboard_data(request, **kwargs):
    return render(request, "stub.html", {"title": "dashboard_data"})
