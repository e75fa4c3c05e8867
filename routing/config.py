"""Routing configuration as code: nodes and rules to and from a JSON document.

::

    {"nodes": [{"name": "pacs1", "ae_title": "PACS1", "host": "10.0.0.5", "port": 104,
                "enabled": true, "max_associations": 2}],
     "rules": [{"name": "CT to pacs1", "order": 10, "enabled": true, "match": "all",
                "conditions": [{"attribute": "Modality", "op": "equals", "value": "CT"}],
                "destinations": ["pacs1"],
                "coerce": [{"attribute": "InstitutionName", "action": "set", "value": "General"}],
                "stop": false, "mode": "instance", "study_quiet_seconds": 60}]}

Import matches nodes and rules by name: it creates the missing ones and updates the fields a
document gives (a field left out keeps its value; a new object gets the model default).
Nothing is deleted. The whole document is checked first and refused whole, with one message
per problem naming where it is (``rules[0].conditions[1].op: unknown operator 'equal'``);
the changes are then made in one transaction and audited. Importing an export changes
nothing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Count, ProtectedError
from django.utils import timezone

from gateway import audit

from . import delivery
from .models import DeliveryStatus, MatchMode, Node, RoutingMode, Rule
from .rules import validate_rule

NODE_FIELDS = ("ae_title", "host", "port", "enabled", "max_associations")
RULE_FIELDS = ("order", "enabled", "match", "conditions", "coerce", "stop", "mode",
               "study_quiet_seconds")


class ConfigError(ValueError):
    """A configuration document that cannot be imported; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class ImportResult:
    """What an import did, by object: ``created`` / ``updated`` / ``unchanged`` names,
    prefixed ``node:`` or ``rule:``."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated)


def export_config() -> dict:
    """Every node and rule as a document that :func:`import_config` accepts."""
    nodes = [
        {"name": node.name, **{f: getattr(node, f) for f in NODE_FIELDS}}
        for node in Node.objects.order_by("name")
    ]
    rules = [
        {
            "name": rule.name,
            **{f: getattr(rule, f) for f in RULE_FIELDS},
            "destinations": sorted(n.name for n in rule.destinations.all()),
        }
        for rule in Rule.objects.prefetch_related("destinations").order_by("order", "name")
    ]
    return {"nodes": nodes, "rules": rules}


def validate_ae_title(value: Any) -> str | None:
    """The problem with an AE title (PS3.5 AE: 1-16 characters, no backslash or control
    characters, not all spaces), or None."""
    if not isinstance(value, str) or not value.strip():
        return "required"
    if len(value) > 16:
        return f"AE title {value!r} is longer than 16 characters"
    if not value.isascii() or "\\" in value or any(ord(c) < 32 for c in value):
        return f"AE title {value!r} may only hold printable ASCII without backslash"
    return None


def validate_node(data: Any) -> list[str]:
    """Every problem with a node as a document gives it, each prefixed with its field."""
    if not isinstance(data, Mapping):
        return ["must be an object"]
    errors = [f"{key}: unknown field" for key in sorted(set(data) - {"name", *NODE_FIELDS})]
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        errors.append("name: required")
    elif len(name) > 64:
        errors.append("name: at most 64 characters")
    if "ae_title" in data or not _exists(Node, name):
        if problem := validate_ae_title(data.get("ae_title")):
            errors.append(f"ae_title: {problem}")
    if "host" in data or not _exists(Node, name):
        host = data.get("host")
        if not isinstance(host, str) or not host.strip() or len(host) > 255 or " " in host:
            errors.append("host: a host name or address is required")
    if "port" in data or not _exists(Node, name):
        port = data.get("port")
        if not _is_int(port) or not 1 <= port <= 65535:
            errors.append(f"port: must be 1-65535, got {port!r}")
    if "enabled" in data and not isinstance(data["enabled"], bool):
        errors.append("enabled: must be true or false")
    if "max_associations" in data and (
        not _is_int(data["max_associations"]) or not 1 <= data["max_associations"] <= 64
    ):
        errors.append("max_associations: must be 1-64")
    return errors


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _exists(model, name: Any) -> bool:
    return isinstance(name, str) and model.objects.filter(name=name).exists()


def validate_config(document: Any) -> list[str]:
    """Every problem with a configuration document; empty when it can be imported."""
    if not isinstance(document, Mapping):
        return ["the document must be a JSON object with nodes and rules"]
    problems = [f"{key}: unknown section" for key in sorted(set(document) - {"nodes", "rules"})]
    nodes = document.get("nodes", [])
    rules = document.get("rules", [])
    for section, items in (("nodes", nodes), ("rules", rules)):
        if not isinstance(items, list):
            return [*problems, f"{section}: must be a list"]
    node_names = set(Node.objects.values_list("name", flat=True))
    seen: set[str] = set()
    for i, node in enumerate(nodes):
        problems += [f"nodes[{i}].{p}" if not p.startswith("must") else f"nodes[{i}]: {p}"
                     for p in validate_node(node)]
        name = node.get("name") if isinstance(node, Mapping) else None
        if isinstance(name, str):
            if name in seen:
                problems.append(f"nodes[{i}].name: {name!r} appears twice")
            seen.add(name)
            node_names.add(name)
    seen = set()
    for i, rule in enumerate(rules):
        problems += [f"rules[{i}].{p}" if not p.startswith("must") else f"rules[{i}]: {p}"
                     for p in validate_rule(rule, node_names)]
        name = rule.get("name") if isinstance(rule, Mapping) else None
        if isinstance(name, str):
            if name in seen:
                problems.append(f"rules[{i}].name: {name!r} appears twice")
            seen.add(name)
    return problems


def import_config(document: Any, actor: str = "system", dry_run: bool = False) -> ImportResult:
    """Check ``document`` whole, then create or update its nodes and rules by name in one
    transaction, auditing each change as ``actor``. Raises :class:`ConfigError` (nothing
    changed) when anything is wrong. ``dry_run`` reports what would change and rolls back."""
    problems = validate_config(document)
    if problems:
        raise ConfigError(problems)
    result = ImportResult()
    events: list[dict] = []
    with transaction.atomic(), audit.acting_as(actor):
        nodes = {n.name: n for n in Node.objects.select_for_update()}
        for data in document.get("nodes", []):
            node = nodes.get(data["name"])
            created = node is None
            node = node or Node(name=data["name"])
            changes = _assign(node, data, NODE_FIELDS)
            if created or changes:
                node.save()
                nodes[node.name] = node
                events.append(_imported(result, node, "node", created, changes))
            else:
                result.unchanged.append(f"node:{node.name}")
        for data in document.get("rules", []):
            rule = Rule.objects.select_for_update().filter(name=data["name"]).first()
            created = rule is None
            rule = rule or Rule(name=data["name"])
            changes = _assign(rule, _normalised(data), RULE_FIELDS)
            before = set() if created else {n.name for n in rule.destinations.all()}
            wanted = set(data["destinations"]) if "destinations" in data else before
            if wanted != before:
                changes["destinations"] = [sorted(before), sorted(wanted)]
            if created or changes:
                rule.save()
                if wanted != before or created:
                    rule.destinations.set([nodes[name] for name in sorted(wanted)])
                events.append(_imported(result, rule, "rule", created, changes))
            else:
                result.unchanged.append(f"rule:{rule.name}")
        # Last in the transaction: appending holds the audit trail's lock until the commit.
        audit.append(events)
        if dry_run:
            transaction.set_rollback(True)
    return result


def _normalised(data: Mapping) -> dict:
    out = dict(data)
    if "match" in out:
        out["match"] = MatchMode(out["match"]).value
    if "mode" in out:
        out["mode"] = RoutingMode(out["mode"]).value
    return out


def _assign(obj, data: Mapping, fields: tuple[str, ...]) -> dict:
    """Set the given fields; return ``{field: [old, new]}`` for those that changed."""
    changes = {}
    for name in fields:
        if name in data and getattr(obj, name) != data[name]:
            changes[name] = [getattr(obj, name), data[name]]
            setattr(obj, name, data[name])
    return changes


def _imported(result: ImportResult, obj, kind: str, created: bool, changes: dict) -> dict:
    """Note the change in ``result`` and return its audit event, in the same before / after
    form as a change made on the pages."""
    (result.created if created else result.updated).append(f"{kind}:{obj.name}")
    before = None if created else {f: old for f, (old, _new) in changes.items()}
    after = {f: new for f, (_old, new) in changes.items()}
    return {
        "actor": audit.current_actor(),
        "action": f"routing.{kind}.{'created' if created else 'updated'}",
        "object_type": obj._meta.label, "object_id": str(obj.pk), "object_repr": str(obj),
        "detail": {"source": "import_config", "before": before, "after": after},
    }


# --- Changes one at a time (the administrator's pages) ----------------------------------
#
# The pages check a node or rule with the same validate_node / validate_rule as an import,
# plus the one thing an import cannot get wrong: a name another object already has. Every
# change is audited with the values before and after, in the transaction that makes it.

NODE_AUDIT_FIELDS = ["name", *NODE_FIELDS]
RULE_AUDIT_FIELDS = ["name", *RULE_FIELDS, "destinations"]


class NodeInUse(Exception):
    """A node that cannot be deleted; the message says why and what to do instead."""


def node_problems(data: Mapping[str, Any], node: Node | None = None) -> list[str]:
    """Every problem with a node as a form gives it (name and every field of NODE_FIELDS),
    each prefixed with its field; ``node`` is the one being edited (None: a new node)."""
    return validate_node(data) + _name_taken(Node, data.get("name"), node)


def _name_taken(model, name: Any, obj) -> list[str]:
    """The problem of a name another row of ``model`` (not ``obj``) already has."""
    if not isinstance(name, str) or not name.strip():
        return []
    others = model.objects.filter(name=name)
    if obj is not None and obj.pk:
        others = others.exclude(pk=obj.pk)
    if others.exists():
        return [f"name: a {model._meta.verbose_name} named {name!r} already exists"]
    return []


def save_node(node: Node | None, data: Mapping[str, Any]) -> tuple[Node, bool]:
    """Create (``node`` None) or update a node from ``data`` (name and NODE_FIELDS), audited
    as ``routing.node.created`` / ``routing.node.updated`` with the values before and after.
    Returns (node, changed). Raises :class:`ConfigError` when the data has problems."""
    problems = node_problems(data, node)
    if problems:
        raise ConfigError(problems)
    with transaction.atomic():
        if node is None:
            node = Node(name=data["name"])
            before = None
        else:
            node = Node.objects.select_for_update().get(pk=node.pk)
            before = audit.snapshot(node, NODE_AUDIT_FIELDS)
        for name in NODE_AUDIT_FIELDS:
            if name in data:
                setattr(node, name, data[name])
        after = audit.snapshot(node, NODE_AUDIT_FIELDS)
        if before == after:
            return node, False
        _save_named(node, "node")
        action = "routing.node.created" if before is None else "routing.node.updated"
        audit.record_change(action, node, before, after)
    return node, True


def _save_named(obj, kind: str) -> None:
    # The name was free when checked; another administrator may have taken it since.
    try:
        with transaction.atomic():
            obj.save()
    except IntegrityError:
        raise ConfigError([f"name: a {kind} named {obj.name!r} already exists"]) from None


def set_node_enabled(node_id: int, enabled: bool) -> Node:
    """Enable or disable a node, audited as ``routing.node.updated``. A disabled node still
    gets deliveries decided for it; they wait until it is enabled again."""
    return _set_enabled(Node, node_id, enabled, "routing.node.updated")


def _set_enabled(model, pk: int, enabled: bool, action: str):
    """Set ``enabled`` on a node or rule (locked), audited with before and after when it
    changes; returns the row."""
    with transaction.atomic():
        obj = model.objects.select_for_update().get(pk=pk)
        if obj.enabled != enabled:
            obj.enabled = enabled
            obj.save(update_fields=["enabled", "updated_at"])
            audit.record_change(action, obj, {"enabled": not enabled}, {"enabled": enabled})
    return obj


def delete_node(node_id: int) -> tuple[str, list[str]]:
    """Delete a node that no delivery refers to, taking it out of the rules that send to it
    (each audited as ``routing.rule.updated``); returns its name and those rules' names.

    Raises :class:`NodeInUse` while deliveries refer to it: open ones still have to go there,
    and delivered, dead or abandoned ones are the record of what was sent where, which the
    database keeps (``Delivery.node`` is PROTECT). Disabling the node and taking it out of
    its rules retires it without losing that record."""
    with transaction.atomic():
        node = Node.objects.select_for_update().get(pk=node_id)
        counts = dict(
            node.deliveries.order_by().values_list("status").annotate(n=Count("id"))
        )
        open_count = sum(counts.get(s, 0) for s in DeliveryStatus.open())
        if open_count:
            raise NodeInUse(
                f"{node.name} cannot be deleted: {deliveries_text(open_count)} to it "
                "still have to be sent (pending, sending or failed). Let them be delivered "
                "or abandon them on the Deliveries page first. To stop sending to it, take "
                "it out of its rules and disable it."
            )
        if counts:
            kinds = ", ".join(f"{counts[s]} {s.label.split(' ')[0].lower()}"
                              for s in DeliveryStatus if s in counts)
            raise NodeInUse(
                f"{node.name} cannot be deleted: {deliveries_text(sum(counts.values()))} "
                f"({kinds}) refer to it and are kept as the record of what was sent where. "
                "To retire it, take it out of its rules and disable it."
            )
        rules = list(node.rules.select_for_update().prefetch_related("destinations"))
        for rule in rules:
            before = audit.snapshot(rule, ["destinations"])
            rule.destinations.remove(node)
            audit.record_change("routing.rule.updated", rule, before,
                                {"destinations": [n for n in before["destinations"]
                                                  if n != node.name]},
                                reason=f"node {node.name} deleted")
        snapshot = audit.snapshot(node, NODE_AUDIT_FIELDS)
        audit.record_change("routing.node.deleted", node, snapshot, None)
        name = node.name
        try:
            with transaction.atomic():
                node.delete()
        except (ProtectedError, IntegrityError):
            # A delivery decided for it since the check above (the lock makes this rare).
            raise NodeInUse(f"{name} cannot be deleted: deliveries to it were just decided."
                            ) from None
    return name, [rule.name for rule in rules]


def deliveries_text(count: int) -> str:
    """The count with its noun: "1 delivery", "3 deliveries"."""
    return f"{count} {'delivery' if count == 1 else 'deliveries'}"


VERIFY_TIMEOUT = 5


def verify_node(node_id: int) -> tuple[str, int]:
    """C-ECHO a node now, record the answer on it (last_echo_*) and audit it as
    ``routing.node.verified``. Returns ("" or the error, milliseconds it took)."""
    started = time.monotonic()
    # Someone waits for the page, and a web worker that takes longer than gunicorn's 30 s
    # is killed: each step of the echo gets at most a few seconds.
    error = delivery.echo_node(node_id, timeout=VERIFY_TIMEOUT)
    ms = round((time.monotonic() - started) * 1000)
    with transaction.atomic():
        node = Node.objects.get(pk=node_id)
        audit.record("routing.node.verified", node, {"ok": not error, "error": error, "ms": ms})
    return error, ms


def rule_problems(data: Mapping[str, Any], rule: Rule | None = None) -> list[str]:
    """Every problem with a rule as a form gives it (:func:`routing.rules.validate_rule` with
    the existing nodes, plus a name another rule already has); ``rule`` is the one being
    edited (None: a new rule)."""
    problems = validate_rule(data, Node.objects.values_list("name", flat=True))
    return problems + _name_taken(Rule, data.get("name"), rule)


def save_rule(rule: Rule | None, data: Mapping[str, Any]) -> tuple[Rule, bool]:
    """Create (``rule`` None) or update a rule from ``data`` as validate_rule takes it
    (destinations by node name), audited as ``routing.rule.created`` /
    ``routing.rule.updated`` with the values before and after. Returns (rule, changed).
    Raises :class:`ConfigError` when the data has problems."""
    problems = rule_problems(data, rule)
    if problems:
        raise ConfigError(problems)
    data = _normalised(data)
    with transaction.atomic():
        if rule is None:
            rule, before, kept = Rule(name=data["name"]), None, []
        else:
            rule = Rule.objects.select_for_update().get(pk=rule.pk)
            before = audit.snapshot(rule, RULE_AUDIT_FIELDS)
            kept = before["destinations"]
        for name in ("name", *RULE_FIELDS):
            if name in data:
                setattr(rule, name, data[name])
        wanted = sorted(set(data["destinations"])) if "destinations" in data else kept
        after = {**audit.snapshot(rule, ["name", *RULE_FIELDS]), "destinations": wanted}
        if before == after:
            return rule, False
        _save_named(rule, "rule")
        rule.destinations.set(Node.objects.filter(name__in=wanted))
        action = "routing.rule.created" if before is None else "routing.rule.updated"
        audit.record_change(action, rule, before, after)
    return rule, True


def set_rule_enabled(rule_id: int, enabled: bool) -> Rule:
    """Enable or disable a rule, audited as ``routing.rule.updated``."""
    return _set_enabled(Rule, rule_id, enabled, "routing.rule.updated")


def delete_rule(rule_id: int) -> str:
    """Delete a rule, audited as ``routing.rule.deleted`` with everything it said. Deliveries
    it decided keep its name (``Delivery.rule_name``). Returns its name."""
    with transaction.atomic():
        rule = Rule.objects.select_for_update().get(pk=rule_id)
        audit.record_change("routing.rule.deleted", rule,
                            audit.snapshot(rule, RULE_AUDIT_FIELDS), None)
        name = rule.name
        rule.delete()
    return name


def move_rule(rule_id: int, direction: str) -> Rule | None:
    """Swap a rule with its neighbour in evaluation order (``direction`` "up": earlier,
    "down": later), audited as ``routing.rule.moved``. Returns the neighbour, or None when
    the rule is already first (last).

    Two rules with the same order are evaluated by name, so swapping order values only
    works while every order is distinct; otherwise every rule is renumbered 10, 20, 30...
    in the new sequence (the audit event lists each rule whose order changed)."""
    if direction not in ("up", "down"):
        raise ValueError(f"direction must be up or down, got {direction!r}")
    with transaction.atomic():
        rules = list(Rule.objects.select_for_update().order_by("order", "name"))
        index = next(i for i, r in enumerate(rules) if r.pk == rule_id)
        other = index - 1 if direction == "up" else index + 1
        if not 0 <= other < len(rules):
            return None
        moved, neighbour = rules[index], rules[other]
        old = {r.pk: r.order for r in rules}
        sequence = rules[:]
        sequence[index], sequence[other] = neighbour, moved
        if len(set(old.values())) == len(rules):
            new = {**old, moved.pk: neighbour.order, neighbour.pk: moved.order}
        else:
            new = {r.pk: (i + 1) * 10 for i, r in enumerate(sequence)}
        changed = [r for r in rules if new[r.pk] != old[r.pk]]
        now = timezone.now()
        for r in changed:
            r.order, r.updated_at = new[r.pk], now
        Rule.objects.bulk_update(changed, ["order", "updated_at"])
        audit.record_change(
            "routing.rule.moved", moved, {"order": old[moved.pk]}, {"order": new[moved.pk]},
            direction=direction, swapped_with=neighbour.name,
            orders={r.name: [old[r.pk], new[r.pk]] for r in changed},
        )
    return neighbour
