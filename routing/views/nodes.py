"""Nodes: the PACS and archives studies are forwarded to.

Everyone with a role sees the nodes and each node's page; administrators add, change,
enable, disable and delete them. Verify (a C-ECHO now) changes no configuration, so operators
may run it too. Changes go through :mod:`routing.config`, which checks them as an import
would and audits them.
"""

from __future__ import annotations

from collections.abc import Iterable

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from gateway.web import (
    CONFIGURE,
    OPERATE,
    VIEW,
    can,
    posted_switch,
    redirect_back,
    role_required,
)

from .. import config
from ..models import Node


class NodeForm(forms.Form):
    """A node as an administrator types it; checked by :func:`routing.config.node_problems`
    (the import's rules) once Django has read the numbers."""

    name = forms.CharField(label="Name", help_text="How the gateway's pages and rules call it.")
    ae_title = forms.CharField(label="AE title", help_text="The node's own AE title: 1-16 "
                               "characters, printable ASCII, no backslash.")
    host = forms.CharField(label="Host", help_text="Host name or IP address.")
    port = forms.IntegerField(label="Port", help_text="1-65535; DICOM's usual ports are 104 "
                              "and 11112.")
    enabled = forms.BooleanField(label="Enabled", required=False, initial=True,
                                 help_text="A disabled node keeps its deliveries waiting.")
    max_associations = forms.IntegerField(
        label="Max parallel associations", initial=2,
        help_text="Most associations the gateway opens to this node at the same time (1-64).",
    )

    def __init__(self, *args, node: Node | None = None, read_only: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.node = node
        for field in self.fields.values():
            field.disabled = read_only

    def clean(self):
        data = super().clean()
        add_problems(self, config.node_problems(data, self.node))
        return data


def add_problems(form: forms.Form, problems: Iterable[str]) -> None:
    """Put each ``"field: problem"`` from the configuration checks next to its field (or at
    the top of the form), unless Django already found that field wrong."""
    for problem in problems:
        field, _, message = problem.partition(": ")
        if field in form.fields and message:
            if field not in form.errors:
                form.add_error(field, message[:1].upper() + message[1:])
        else:
            form.add_error(None, problem)


@role_required(VIEW)
def node_list(request: HttpRequest) -> HttpResponse:
    nodes = Node.objects.with_activity()
    return render(request, "routing/node_list.html", {"title": "Nodes", "nodes": nodes})


@role_required(CONFIGURE)
def node_create(request: HttpRequest) -> HttpResponse:
    form = NodeForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            node, _ = config.save_node(None, form.cleaned_data)
        except config.ConfigError as exc:
            add_problems(form, exc.problems)
        else:
            messages.success(request, f"Node {node.name} added. Verify it to check that it "
                             "answers.")
            return redirect("node-list")
    return render(request, "routing/node_form.html", {"title": "Add node", "form": form})


@role_required(VIEW)
def node_edit(request: HttpRequest, pk: int) -> HttpResponse:
    node = get_object_or_404(Node.objects.with_activity(), pk=pk)
    editable = can(request.user, CONFIGURE)
    if request.method == "POST":
        if not editable:
            raise PermissionDenied("Changing a node needs the Administrators role.")
        form = NodeForm(request.POST, node=node)
        if form.is_valid():
            try:
                node, changed = config.save_node(node, form.cleaned_data)
            except config.ConfigError as exc:
                add_problems(form, exc.problems)
            else:
                if changed:
                    messages.success(request, f"Node {node.name} saved.")
                else:
                    messages.info(request, f"Nothing changed on node {node.name}.")
                return redirect("node-list")
    else:
        form = NodeForm(initial=_initial(node), node=node, read_only=not editable)
    return render(request, "routing/node_form.html", {
        "title": f"Node {node.name}", "form": form, "node": node, "editable": editable,
    })


def _initial(node: Node) -> dict:
    return {name: getattr(node, name) for name in config.NODE_AUDIT_FIELDS}


@role_required(CONFIGURE)
@require_POST
def node_delete(request: HttpRequest, pk: int) -> HttpResponse:
    node = get_object_or_404(Node, pk=pk)
    try:
        name, rules = config.delete_node(node.pk)
    except config.NodeInUse as exc:
        messages.error(request, str(exc))
        return redirect("node-edit", pk=node.pk)
    text = f"Node {name} deleted."
    if rules:
        text += f" It was taken out of the rules {', '.join(rules)}."
    messages.success(request, text)
    return redirect("node-list")


@role_required(CONFIGURE)
@require_POST
def node_toggle(request: HttpRequest, pk: int) -> HttpResponse:
    node = get_object_or_404(Node, pk=pk)
    enabled = posted_switch(request, node.enabled)
    node = config.set_node_enabled(node.pk, enabled)
    if node.enabled:
        messages.success(request, f"Node {node.name} enabled.")
    else:
        messages.success(request, f"Node {node.name} disabled: deliveries to it wait until "
                         "it is enabled again.")
    return redirect_back(request, reverse("node-list"))


@role_required(OPERATE)
@require_POST
def node_verify(request: HttpRequest, pk: int) -> HttpResponse:
    node = get_object_or_404(Node, pk=pk)
    error, ms = config.verify_node(node.pk)
    if error:
        messages.error(request, f"C-ECHO to {node.name} failed: {error}")
    else:
        messages.success(request, f"C-ECHO to {node.name} succeeded in {ms} ms")
    return redirect_back(request, reverse("node-list"))
