"""Placeholder views until this area is built."""

from django.shortcuts import render

from gateway.web import VIEW, role_required


@role_required(VIEW)
def study_list(request, **kwargs):
    return render(request, "stub.html", {"title": "study_list"})


@role_required(VIEW)
def study_detail(request, **kwargs):
    return render(request, "stub.html", {"title": "study_detail"})


@role_required(VIEW)
def delivery_list(request, **kwargs):
    return render(request, "stub.html", {"title": "delivery_list"})


@role_required(VIEW)
def delivery_retry(request, **kwargs):
    return render(request, "stub.html", {"title": "delivery_retry"})


@role_required(VIEW)
def delivery_abandon(request, **kwargs):
    return render(request, "stub.html", {"title": "delivery_abandon"})


@role_required(VIEW)
def node_retry_failed(request, **kwargs):
    return render(request, "stub.html", {"title": "node_retry_failed"})
