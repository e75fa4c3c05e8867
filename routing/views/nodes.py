"""Placeholder views until this area is built."""

from django.shortcuts import render

from gateway.web import VIEW, role_required


@role_required(VIEW)
def node_list(request, **kwargs):
    return render(request, "stub.html", {"title": "node_list"})


@role_required(VIEW)
def node_create(request, **kwargs):
    return render(request, "stub.html", {"title": "node_create"})


@role_required(VIEW)
def node_edit(request, **kwargs):
    return render(request, "stub.html", {"title": "node_edit"})


@role_required(VIEW)
def node_delete(request, **kwargs):
    return render(request, "stub.html", {"title": "node_delete"})


@role_required(VIEW)
def node_toggle(request, **kwargs):
    return render(request, "stub.html", {"title": "node_toggle"})


@role_required(VIEW)
def node_verify(request, **kwargs):
    return render(request, "stub.html", {"title": "node_verify"})
