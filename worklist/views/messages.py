"""Placeholder views until this area is built."""

from django.shortcuts import render

from gateway.web import VIEW, role_required


@role_required(VIEW)
def message_list(request, **kwargs):
    return render(request, "stub.html", {"title": "message_list"})


@role_required(VIEW)
def message_detail(request, **kwargs):
    return render(request, "stub.html", {"title": "message_detail"})


@role_required(VIEW)
def message_reprocess(request, **kwargs):
    return render(request, "stub.html", {"title": "message_reprocess"})
