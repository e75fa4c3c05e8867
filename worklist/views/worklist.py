"""Placeholder views until this area is built."""

from django.shortcuts import render

from gateway.web import VIEW, role_required


@role_required(VIEW)
def step_list(request, **kwargs):
    return render(request, "stub.html", {"title": "step_list"})


@role_required(VIEW)
def step_detail(request, **kwargs):
    return render(request, "stub.html", {"title": "step_detail"})


@role_required(VIEW)
def step_set_status(request, **kwargs):
    return render(request, "stub.html", {"title": "step_set_status"})
