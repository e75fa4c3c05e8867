"""Rules: the ordered list, the editor, and trying a rule out before saving it.

Everyone with a role sees the rules; administrators change them. The editor turns its rows
into the document :func:`routing.rules.validate_rule` checks (the same check as a
configuration import) and puts each problem next to the row it is about. Test runs the
editor's unsaved contents against the last received instances and an uploaded file, with the
same :class:`routing.rules.Facts` the router uses, and saves nothing.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.db.models import Max
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from gateway.web import CONFIGURE, VIEW, can, posted_switch, role_required

from .. import config
from ..header import header_as_json
from ..models import MatchMode, Node, ReceivedInstance, RoutingMode, Rule
from ..routing import facts_for
from ..rules import (
    COERCE_ACTIONS,
    OPERATORS,
    ORDER_MAX,
    Attribute,
    Facts,
    RuleError,
    apply_coercions,
    resolve_attribute,
    rule_matches,
)
from .nodes import add_problems

# How many of the last received instances Test tries the rule on.
RECENT_INSTANCES = 20

OPERATOR_LABELS = {
    "equals": "equals",
    "not_equals": "does not equal",
    "wildcard": "matches wildcard (* ?)",
    "regex": "matches regular expression",
    "in": "is one of",
    "exists": "exists",
    "missing": "is missing",
    "range": "is in range (low-high)",
}
ACTION_LABELS = {"set": "set to", "remove": "remove", "prefix": "prefix with"}
# Attributes rules often use, offered as suggestions (any keyword or tag can be typed).
SUGGESTED_ATTRIBUTES = (
    "Modality", "StudyDescription", "SeriesDescription", "InstitutionName", "StationName",
    "BodyPartExamined", "AccessionNumber", "PatientID", "ReferringPhysicianName",
    "StudyDate", "SOPClassUID", "Manufacturer", "calling_ae", "called_ae", "source_ip",
)


# --- Summaries for the list --------------------------------------------------------------


def describe_condition(condition: Any) -> str:
    """``{"attribute": "Modality", "op": "equals", "value": "CT"}`` → ``Modality equals CT``."""
    if not isinstance(condition, dict):
        return str(condition)
    op = condition.get("op", "")
    words = OPERATOR_LABELS.get(op, op).split(" (")[0]
    if op in ("exists", "missing"):
        return f"{condition.get('attribute')} {words}"
    return f"{condition.get('attribute')} {words} {_shown(condition.get('value'), op)}"


def describe_coercion(coercion: Any) -> str:
    """``{"attribute": "InstitutionName", "action": "set", "value": "General"}`` →
    ``InstitutionName set to General``."""
    if not isinstance(coercion, dict):
        return str(coercion)
    action = coercion.get("action", "")
    text = f"{coercion.get('attribute')} {ACTION_LABELS.get(action, action)}"
    if action == "remove":
        return text
    return f"{text} {_shown(coercion.get('value'), 'set')}"


def _shown(value: Any, op: str) -> str:
    """A condition or coercion value as the editor shows it in its one text box."""
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        if op == "range":
            low, high = (list(value) + [None, None])[:2]
            return f"{'' if low is None else low}-{'' if high is None else high}"
        return ("\\" if op == "set" else ", ").join(str(v) for v in value)
    return str(value)


@role_required(VIEW)
def rule_list(request: HttpRequest) -> HttpResponse:
    rules = list(Rule.objects.prefetch_related("destinations").order_by("order", "name"))
    for rule in rules:
        joiner = " and " if rule.match == MatchMode.ALL else " or "
        rule.condition_texts = [describe_condition(c) for c in rule.conditions or []]
        rule.condition_joiner = joiner.strip()
        rule.coercion_texts = [describe_coercion(c) for c in rule.coerce or []]
    return render(request, "routing/rule_list.html", {"title": "Rules", "rules": rules})


# --- The editor ---------------------------------------------------------------------------


class RuleForm(forms.Form):
    name = forms.CharField(label="Name")
    order = forms.IntegerField(label="Order", help_text="Rules are evaluated from the lowest "
                               "order up (equal orders by name).")
    enabled = forms.BooleanField(label="Enabled", required=False)
    match = forms.ChoiceField(label="Match", choices=MatchMode.choices,
                              help_text="Whether every condition must hold, or one is enough.")
    mode = forms.ChoiceField(label="Mode", choices=RoutingMode.choices)
    study_quiet_seconds = forms.IntegerField(
        label="Quiet seconds", help_text="Whole-study mode: route the study once no instance "
        "of it arrived for this long.")
    stop = forms.BooleanField(label="Stop", required=False,
                              help_text="When this rule matches, evaluate no further rules.")
    destinations = forms.ModelMultipleChoiceField(
        label="Destinations", queryset=Node.objects.order_by("name"), to_field_name="name",
        required=False, widget=forms.CheckboxSelectMultiple,
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["destinations"].label_from_instance = (
            lambda node: node.name if node.enabled else f"{node.name} (disabled)"
        )


class ConditionForm(forms.Form):
    attribute = forms.CharField(label="Attribute", required=False, widget=forms.TextInput(
        attrs={"list": "rule-attributes", "autocomplete": "off"}))
    op = forms.ChoiceField(label="Operator", required=False, choices=[
        ("", "—"), *((op, OPERATOR_LABELS.get(op, op)) for op in OPERATORS)])
    value = forms.CharField(label="Value", required=False, widget=forms.Textarea(
        attrs={"rows": 1, "class": "row-value"}))

    def clean(self):
        data = super().clean()
        if not data.get("op") and (data.get("attribute") or data.get("value")):
            self.add_error("op", "Choose an operator.")
        return data

    def is_blank(self) -> bool:
        data = self.cleaned_data
        return not (data.get("attribute") or data.get("op") or data.get("value"))

    def as_document(self) -> dict:
        """The condition as a rule stores it: ``in`` takes a comma or newline separated
        list; ``exists``/``missing`` take no value."""
        data = self.cleaned_data
        op, value = data["op"], data["value"].strip()
        condition = {"attribute": data["attribute"], "op": op}
        if op == "in":
            condition["value"] = [v.strip() for v in re.split(r"[,\n]", value) if v.strip()]
        elif op not in ("exists", "missing") or value:
            condition["value"] = value
        return condition


class CoercionForm(forms.Form):
    attribute = forms.CharField(label="Attribute", required=False, widget=forms.TextInput(
        attrs={"list": "rule-attributes", "autocomplete": "off"}))
    action = forms.ChoiceField(label="Action", required=False, choices=[
        ("", "—"), *((a, ACTION_LABELS.get(a, a)) for a in COERCE_ACTIONS)])
    value = forms.CharField(label="Value", required=False,
                            widget=forms.TextInput(attrs={"autocomplete": "off"}))
    # A private tag's VR, kept from a configuration import (the editor does not show it).
    vr = forms.CharField(required=False, widget=forms.HiddenInput)

    def clean(self):
        data = super().clean()
        if not data.get("action") and (data.get("attribute") or data.get("value")):
            self.add_error("action", "Choose an action.")
        return data

    def is_blank(self) -> bool:
        data = self.cleaned_data
        return not (data.get("attribute") or data.get("action") or data.get("value"))

    def as_document(self) -> dict:
        """The coercion as a rule stores it: ``set`` with backslashes sets several values."""
        data = self.cleaned_data
        action, value = data["action"], data["value"]
        coercion = {"attribute": data["attribute"], "action": action}
        if action == "set" and "\\" in value:
            coercion["value"] = value.split("\\")
        elif action != "remove" or value:
            coercion["value"] = value
        if data.get("vr"):
            coercion["vr"] = data["vr"]
        return coercion


class RowFormSet(forms.BaseFormSet):
    """Rows with a "Remove" box; rows left empty are ignored."""

    def add_fields(self, form, index):
        super().add_fields(form, index)
        if forms.formsets.DELETION_FIELD_NAME in form.fields:
            form.fields[forms.formsets.DELETION_FIELD_NAME].label = "Remove"

    def rows(self) -> list[forms.Form]:
        """The rows that say something, in order (cleaned, not removed, not blank)."""
        return [
            form for form in self.forms
            if not (self.can_delete and self._should_delete_form(form))
            and hasattr(form, "cleaned_data") and not form.is_blank()
        ]


ConditionFormSet = forms.formset_factory(ConditionForm, RowFormSet, extra=3, can_delete=True)
CoercionFormSet = forms.formset_factory(CoercionForm, RowFormSet, extra=2, can_delete=True)
ReadOnlyConditions = forms.formset_factory(ConditionForm, RowFormSet, extra=0)
ReadOnlyCoercions = forms.formset_factory(CoercionForm, RowFormSet, extra=0)

_ROW_PROBLEM = re.compile(r"^(conditions|coerce)\[(\d+)\](?:\.(\w+))?: (.*)$", re.DOTALL)


class RuleEditor:
    """The rule form with its condition and coercion rows. ``is_valid()`` checks them with
    :func:`routing.config.rule_problems`; ``document`` is then the rule as validate_rule
    and :func:`routing.config.save_rule` take it."""

    def __init__(self, data=None, rule: Rule | None = None, editable: bool = True):
        self.rule = rule
        self.editable = editable
        self.document: dict = {}
        if rule is not None:
            initial = {name: getattr(rule, name) for name in ("name", *config.RULE_FIELDS)}
            initial["destinations"] = [n.name for n in rule.destinations.all()]
        else:
            highest = Rule.objects.aggregate(top=Max("order"))["top"]
            initial = {"order": 10 if highest is None else min(highest + 10, ORDER_MAX),
                       "enabled": True,
                       "match": MatchMode.ALL, "mode": RoutingMode.INSTANCE,
                       "study_quiet_seconds": 60}
        conditions = [
            {**c, "value": _shown(c.get("value"), c.get("op"))} if isinstance(c, dict) else {}
            for c in initial.pop("conditions", None) or []
        ]
        coercions = [
            {**c, "value": _shown(c.get("value"), c.get("action"))} if isinstance(c, dict)
            else {}
            for c in initial.pop("coerce", None) or []
        ]
        condition_set = ConditionFormSet if editable else ReadOnlyConditions
        coercion_set = CoercionFormSet if editable else ReadOnlyCoercions
        self.form = RuleForm(data, initial=initial)
        self.conditions = condition_set(data, initial=conditions, prefix="conditions")
        self.coercions = coercion_set(data, initial=coercions, prefix="coerce")
        if not editable:
            for form in [self.form, *self.conditions.forms, *self.coercions.forms]:
                for field in form.fields.values():
                    field.disabled = True

    def is_valid(self) -> bool:
        valid = [part.is_valid() for part in (self.form, self.conditions, self.coercions)]
        data = self.form.cleaned_data
        document = {name: data[name] for name in self.form.fields if name in data}
        if "destinations" in document:
            document["destinations"] = sorted(n.name for n in document["destinations"])
        # Problems name rows by their place in the document, which skips the empty rows and
        # those Django already found wrong.
        rows = {part: [form for form in formset.rows() if form.is_valid()]
                for part, formset in (("conditions", self.conditions),
                                      ("coerce", self.coercions))}
        for part, forms_ in rows.items():
            document[part] = [form.as_document() for form in forms_]
        problems = config.rule_problems(document, self.rule)
        for problem in problems:
            if match := _ROW_PROBLEM.match(problem):
                part, index, field, message = match.groups()
                form = rows[part][int(index)]
                message = message[:1].upper() + message[1:]
                form.add_error(field if field in form.fields else None, message)
            else:
                add_problems(self.form, [problem])
        self.document = document
        return all(valid) and not problems


def _editor_page(request: HttpRequest, editor: RuleEditor, test=None,
                 test_form: TryForm | None = None, status: int = 200) -> HttpResponse:
    rule = editor.rule
    return render(request, "routing/rule_form.html", {
        "title": f"Rule {rule.name}" if rule else "Add rule",
        "rule": rule,
        "editor": editor,
        "form": editor.form,
        "conditions": editor.conditions,
        "coercions": editor.coercions,
        "editable": editor.editable,
        "test": test,
        "test_form": test_form or TryForm(),
        "suggested_attributes": SUGGESTED_ATTRIBUTES,
        "recent_count": RECENT_INSTANCES,
    }, status=status)


@role_required(CONFIGURE)
def rule_create(request: HttpRequest) -> HttpResponse:
    editor = RuleEditor(request.POST or None)
    if request.method == "POST" and editor.is_valid():
        return _save(request, editor)
    return _editor_page(request, editor)


@role_required(VIEW)
def rule_edit(request: HttpRequest, pk: int) -> HttpResponse:
    rule = get_object_or_404(Rule.objects.prefetch_related("destinations"), pk=pk)
    editable = can(request.user, CONFIGURE)
    if request.method == "POST":
        if not editable:
            raise PermissionDenied("Changing a rule needs the Administrators role.")
        editor = RuleEditor(request.POST, rule=rule)
        if editor.is_valid():
            return _save(request, editor)
    else:
        editor = RuleEditor(rule=rule, editable=editable)
    return _editor_page(request, editor)


def _save(request: HttpRequest, editor: RuleEditor) -> HttpResponse:
    try:
        rule, changed = config.save_rule(editor.rule, editor.document)
    except config.ConfigError as exc:
        # Someone else took the name meanwhile, or a destination was deleted.
        add_problems(editor.form, exc.problems)
        return _editor_page(request, editor)
    if changed:
        messages.success(request, f"Rule {rule.name} saved.")
    else:
        messages.info(request, f"Nothing changed in rule {rule.name}.")
    return redirect("rule-list")


@role_required(CONFIGURE)
@require_POST
def rule_delete(request: HttpRequest, pk: int) -> HttpResponse:
    rule = get_object_or_404(Rule, pk=pk)
    name = config.delete_rule(rule.pk)
    messages.success(request, f"Rule {name} deleted.")
    return redirect("rule-list")


@role_required(CONFIGURE)
@require_POST
def rule_toggle(request: HttpRequest, pk: int) -> HttpResponse:
    rule = get_object_or_404(Rule, pk=pk)
    enabled = posted_switch(request, rule.enabled)
    rule = config.set_rule_enabled(rule.pk, enabled)
    messages.success(request, f"Rule {rule.name} {'enabled' if rule.enabled else 'disabled'}.")
    return redirect("rule-list")


@role_required(CONFIGURE)
@require_POST
def rule_move(request: HttpRequest, pk: int) -> HttpResponse:
    rule = get_object_or_404(Rule, pk=pk)
    direction = request.POST.get("direction")
    if direction not in ("up", "down"):
        messages.error(request, "Move the rule up or down.")
        return redirect("rule-list")
    neighbour = config.move_rule(rule.pk, direction)
    if neighbour is None:
        place = "first" if direction == "up" else "last"
        messages.info(request, f"Rule {rule.name} is already {place}.")
    else:
        where = "before" if direction == "up" else "after"
        messages.success(request, f"Rule {rule.name} now comes {where} {neighbour.name}.")
    return redirect("rule-list")


# --- Test ---------------------------------------------------------------------------------


# Test reads the uploaded file whole (headers only, but the upload itself is kept): a
# generous bound for one instance, checked before pydicom sees it.
MAX_TEST_FILE_BYTES = 64 * 1024 * 1024


class TryForm(forms.Form):
    """What Test tries the rule on, besides the last received instances: a DICOM file, seen
    as if it came from this association."""

    dicom_file = forms.FileField(
        label="DICOM file", required=False,
        help_text="Optional: a file to try the rule on (at most 64 MB); nothing is stored or "
        "sent.",
    )
    calling_ae = forms.CharField(label="Calling AE", required=False, max_length=16,
                                 help_text="For the file: the AE title it came from.")
    called_ae = forms.CharField(label="Called AE", required=False, max_length=16)
    source_ip = forms.CharField(label="Source IP", required=False, max_length=64)

    def clean_dicom_file(self):
        upload = self.cleaned_data.get("dicom_file")
        if upload:
            if upload.size > MAX_TEST_FILE_BYTES:
                raise forms.ValidationError(
                    f"This file is {upload.size / 1024 / 1024:.0f} MB; Test takes files of at "
                    f"most {MAX_TEST_FILE_BYTES // 1024 // 1024} MB.")
            self.cleaned_data["dataset"] = read_dicom(upload)
        return upload


def read_dicom(upload) -> Dataset:
    """An uploaded file as a dataset (header only), or a ValidationError that says why not.
    Files without the DICM preamble are read too, as the storage SCP would; what comes out
    must still have a SOP Class and Instance UID to count as DICOM. pydicom decodes values
    lazily, so every element (in sequences too) is decoded here: a garbled one is reported
    on the form rather than failing the rule's test later."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(upload, force=True, stop_before_pixels=True)
            uids = ds.get("SOPClassUID"), ds.get("SOPInstanceUID")
    except Exception as exc:
        raise forms.ValidationError(f"This is not a DICOM file pydicom can read ({exc}).") \
            from None
    if not all(uids):
        raise forms.ValidationError(
            "This is not a DICOM file: it has no SOP Class UID and SOP Instance UID.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for element in ds.iterall():
                str(element.value)
    except Exception as exc:
        raise forms.ValidationError(f"This DICOM file could not be read: {exc}.") from None
    return ds


@dataclass
class FileResult:
    """Test on an uploaded file: whether the rule matches and what its coercions change."""

    name: str
    sop_instance_uid: str
    modality: str
    patient: str
    matches: bool
    changes: list[tuple[str, str, str]]
    coercion_error: str = ""


def _probe(document: dict) -> SimpleNamespace:
    # Tested as if enabled: a disabled rule is worth trying out before switching it on.
    return SimpleNamespace(enabled=True, match=document.get("match", MatchMode.ALL),
                           conditions=document.get("conditions", []), stop=False)


def try_on_recent(document: dict) -> list[dict]:
    """The rule against the last received instances, as routing sees them (facts_for)."""
    probe = _probe(document)
    instances = ReceivedInstance.objects.select_related("study").order_by("-id")
    return [
        {"instance": instance, "matches": rule_matches(probe, facts_for(instance))}
        for instance in instances[:RECENT_INSTANCES]
    ]


def try_on_file(document: dict, ds: Dataset, name: str, association: dict) -> FileResult:
    """The rule against one dataset, with the facts storage would record for it, and the
    attributes its coercions change in the copy a delivery would send."""

    def from_dataset(attribute: Attribute):
        element = ds.get(attribute.tag) if attribute.tag is not None else None
        if element is None or isinstance(element.value, bytes | bytearray):
            return None
        return _text(element.value)

    facts = Facts(header_as_json(ds), association, fallback=from_dataset)
    matches = rule_matches(_probe(document), facts)
    coerced = copy.deepcopy(ds)
    changes, error = [], ""
    try:
        apply_coercions(coerced, document.get("coerce", []))
    except (RuleError, ValueError, TypeError) as exc:
        error = str(exc)
    seen = set()
    for item in document.get("coerce", []):
        attribute = resolve_attribute(item["attribute"])
        if attribute.tag in seen:
            continue
        seen.add(attribute.tag)
        changes.append((attribute.key, _value(ds, attribute.tag), _value(coerced, attribute.tag)))
    return FileResult(
        name=name,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        modality=str(ds.get("Modality", "")),
        patient=f"{ds.get('PatientName', '')} ({ds.get('PatientID', '')})",
        matches=matches,
        changes=changes,
        coercion_error=error,
    )


def _text(value) -> str | list[str]:
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    return str(value)


def _value(ds: Dataset, tag: int) -> str:
    element = ds.get(tag)
    if element is None:
        return "(absent)"
    value = _text(element.value)
    return "\\".join(value) if isinstance(value, list) else value


@role_required(CONFIGURE)
@require_POST
def rule_test(request: HttpRequest) -> HttpResponse:
    """Re-render the editor with its unsaved contents and what the rule would match."""
    rule_id = request.POST.get("rule", "")
    # The rule being edited, if any (str.isdigit() would also take "²").
    rule = get_object_or_404(Rule, pk=rule_id) if re.fullmatch(r"[0-9]+", rule_id) else None
    editor = RuleEditor(request.POST, rule=rule)
    test_form = TryForm(request.POST, request.FILES)
    valid = editor.is_valid()
    file_ok = test_form.is_valid()
    if not valid:
        messages.error(request, "The rule has problems (shown next to each); fix them to "
                       "test it.")
        return _editor_page(request, editor, test_form=test_form)
    document = editor.document
    destinations = document.get("destinations", [])
    test = {"recent": try_on_recent(document), "destinations": destinations,
            "disabled": not document.get("enabled", True), "file": None}
    if file_ok and test_form.cleaned_data.get("dataset") is not None:
        data = test_form.cleaned_data
        association = {key: data.get(key, "") for key in ("calling_ae", "called_ae",
                                                          "source_ip")}
        test["file"] = try_on_file(document, data["dataset"], data["dicom_file"].name,
                                 association)
    matched = sum(row["matches"] for row in test["recent"])
    summary = f"Test: the rule matches {matched} of the last {len(test['recent'])} instances " \
        "received"
    if test["file"]:
        summary += f"; {test['file'].name} {'matches' if test['file'].matches else 'does not'}"
    messages.info(request, summary + ". Nothing was saved.")
    return _editor_page(request, editor, test=test, test_form=test_form)
