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

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction

from gateway import audit

from .models import MatchMode, Node, RoutingMode, Rule
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
                _record(result, node, "node", created, changes)
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
                _record(result, rule, "rule", created, changes)
            else:
                result.unchanged.append(f"rule:{rule.name}")
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


def _record(result: ImportResult, obj, kind: str, created: bool, changes: dict) -> None:
    (result.created if created else result.updated).append(f"{kind}:{obj.name}")
    audit.record(
        f"routing.{kind}.{'created' if created else 'updated'}",
        obj,
        {"source": "import_config", "changes": changes},
    )
