"""Routing rules as pure functions: which rules match an instance, how a forwarded copy is
coerced, and what a valid rule looks like. Nothing here touches the database, so the rule
language can be tested (and tried out in the UI) without one.

An instance is seen through :class:`Facts`: the header the storage SCP recorded (keyword →
string or list of strings, see :func:`routing.storage.header_as_json`) plus the association
it came on (``calling_ae``, ``called_ae``, ``source_ip``).

A condition is ``{"attribute": ..., "op": ..., "value": ...}``. ``attribute`` is a DICOM
keyword (``"Modality"``), a tag in any of the forms ``"0008,0060"``, ``"(0008,0060)"``,
``"00080060"``, or one of the association attributes. Operators:

``equals`` / ``not_equals``
    Single value matching (PS3.4 C.2.2.2.1): the whole value, case-sensitive, except for
    PN attributes which compare case-insensitively. ``not_equals`` is true when no value
    equals (so also when the attribute is absent).
``wildcard``
    Wild card matching (PS3.4 C.2.2.2.4): ``*`` any run of characters (also none), ``?``
    exactly one; everything else literal; the whole value must match. Case-sensitive,
    except for PN.
``regex``
    Python :func:`re.search` on the value; checked when the rule is saved or imported.
``in``
    The value equals one of a list (same case rules as ``equals``).
``exists`` / ``missing``
    The attribute is present with a non-empty value / is absent or empty. No ``value``.
``range``
    Range matching (PS3.4 C.2.2.2.5) for numbers and DA/DT/TM: ``"min-max"`` or
    ``[min, max]``, either end may be left open (``"20260101-"``, ``[null, 5]``), both
    ends inclusive. A DT value is in ``"-20261231"`` on any time of that day.

A multi-valued attribute (backslash in DICOM, a list in the header) matches when any of its
values matches. A condition on an attribute the instance does not have is false, except
``missing`` and ``not_equals``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

from pydicom.datadict import dictionary_keyword, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

ASSOCIATION_ATTRIBUTES = ("calling_ae", "called_ae", "source_ip")
OPERATORS = ("equals", "not_equals", "wildcard", "regex", "in", "exists", "missing", "range")
COERCE_ACTIONS = ("set", "remove", "prefix")
MATCH_MODES = ("all", "any")

_NUMERIC_VRS = {"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "UV", "SV"}
_DATETIME_VRS = {"DA", "DT", "TM"}
# Binary and nested values cannot be compared as text, and the header never holds them.
_UNMATCHABLE_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"}
_TAG_FORMS = (
    re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)?$"),
    re.compile(r"^([0-9A-Fa-f]{4})([0-9A-Fa-f]{4})$"),
)


class RuleError(ValueError):
    """A rule, condition or coercion that cannot be used. ``field`` names the part at fault
    (``"op"``, ``"value"``, ...) when there is one; ``str()`` gives ``"field: problem"``."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


# --- Attributes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Attribute:
    """A resolved condition or coercion attribute: the key it has in the stored header
    (keyword, or ``GGGGEEEE`` for tags without one), its tag and dictionary VR (both None
    for the association attributes)."""

    key: str
    tag: int | None = None
    vr: str = ""

    @property
    def is_association(self) -> bool:
        return self.tag is None


@lru_cache(maxsize=1024)
def resolve_attribute(name: str) -> Attribute:
    """``"Modality"``, ``"0008,0060"``, ``"(0008,0060)"``, ``"00080060"`` or an association
    attribute → :class:`Attribute`. Raises :class:`RuleError` for anything else."""
    if not isinstance(name, str) or not name.strip():
        raise RuleError("attribute must be a DICOM keyword, a tag like 0008,0060 or one of "
                        + ", ".join(ASSOCIATION_ATTRIBUTES))
    name = name.strip()
    if name in ASSOCIATION_ATTRIBUTES:
        return Attribute(name)
    for form in _TAG_FORMS:
        if match := form.match(name):
            tag = int(match.group(1) + match.group(2), 16)
            keyword = keyword_for_tag(tag)
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = ""
            return Attribute(keyword or f"{tag:08X}", tag, vr)
    tag = tag_for_keyword(name)
    if tag is None:
        raise RuleError(f"unknown attribute keyword {name!r}")
    return Attribute(dictionary_keyword(tag), tag, dictionary_VR(tag))


# --- Facts ------------------------------------------------------------------------------


class Facts:
    """What conditions look at: the stored header and the association. ``fallback`` is asked
    for header keys the stored header does not have (the routing service reads them from the
    stored file); it returns None when the instance has no such attribute."""

    def __init__(
        self,
        header: Mapping[str, Any],
        association: Mapping[str, str] | None = None,
        fallback: Callable[[Attribute], Any] | None = None,
    ):
        self.header = header
        self.association = association or {}
        self._fallback = fallback
        self._fetched: dict[str, Any] = {}

    def values(self, attribute: Attribute) -> list[str]:
        """The attribute's values as strings (empty list when absent or empty)."""
        if attribute.is_association:
            raw = self.association.get(attribute.key)
        elif attribute.key in self.header:
            raw = self.header[attribute.key]
        elif self._fallback is not None:
            if attribute.key not in self._fetched:
                self._fetched[attribute.key] = self._fallback(attribute)
            raw = self._fetched[attribute.key]
        else:
            raw = None
        return as_strings(raw)


def as_strings(raw: Any) -> list[str]:
    """A header value (None, string, number or list) → its non-empty values as strings."""
    if raw is None:
        return []
    if isinstance(raw, list | tuple | MultiValue):
        items = raw
    elif isinstance(raw, str) and "\\" in raw:
        items = raw.split("\\")
    else:
        items = [raw]
    out = []
    for item in items:
        text = "" if item is None else str(item).strip(" \x00")
        if text:
            out.append(text)
    return out


# --- Conditions -------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """A checked condition, ready to evaluate."""

    attribute: Attribute
    op: str
    value: Any = None
    pattern: re.Pattern | None = None
    bounds: tuple[str | None, str | None] | None = None
    choices: frozenset[str] = field(default_factory=frozenset)

    def matches(self, facts: Facts) -> bool:
        values = facts.values(self.attribute)
        if self.op == "exists":
            return bool(values)
        if self.op == "missing":
            return not values
        if self.op == "not_equals":
            return not any(self._equal(v, self.value) for v in values)
        if self.op == "equals":
            return any(self._equal(v, self.value) for v in values)
        if self.op == "in":
            return any(self._fold(v) in self.choices for v in values)
        if self.op in ("wildcard", "regex"):
            return any(self.pattern.search(v) for v in values)
        if self.op == "range":
            return any(_in_range(v, self.bounds, self.attribute.vr) for v in values)
        raise RuleError(f"unknown operator {self.op!r}")

    def _fold(self, text: str) -> str:
        # PS3.4 C.2.2.2.1: PN may be matched case-insensitively; other VRs are exact.
        return text.casefold() if self.attribute.vr == "PN" else text

    def _equal(self, value: str, expected: str) -> bool:
        return self._fold(value) == self._fold(expected)


def parse_condition(data: Any) -> Condition:
    """A condition as stored or imported → :class:`Condition`; raises :class:`RuleError`
    naming the field (``"op: unknown operator 'equal'"``)."""
    if not isinstance(data, Mapping):
        raise RuleError("must be an object with attribute, op and value")
    unknown = set(data) - {"attribute", "op", "value"}
    if unknown:
        raise RuleError(f"unknown field {sorted(unknown)[0]!r}")
    try:
        attribute = resolve_attribute(data.get("attribute"))
    except RuleError as exc:
        raise RuleError(exc.message, "attribute") from None
    if attribute.vr in _UNMATCHABLE_VRS:
        raise RuleError(f"{attribute.key} has VR {attribute.vr} and cannot be matched",
                        "attribute")
    op = data.get("op")
    if op not in OPERATORS:
        raise RuleError(f"unknown operator {op!r} (one of {', '.join(OPERATORS)})", "op")
    value = data.get("value")
    if op in ("exists", "missing"):
        if value not in (None, ""):
            raise RuleError(f"{op} takes no value", "value")
        return Condition(attribute, op)
    if op in ("equals", "not_equals"):
        return Condition(attribute, op, _scalar(value))
    if op == "wildcard":
        text = _scalar(value)
        flags = re.DOTALL | (re.IGNORECASE if attribute.vr == "PN" else 0)
        return Condition(attribute, op, text, pattern=re.compile(wildcard_to_regex(text), flags))
    if op == "regex":
        text = _scalar(value)
        try:
            pattern = re.compile(text)
        except re.error as exc:
            raise RuleError(f"invalid regex {text!r}: {exc}", "value") from None
        return Condition(attribute, op, text, pattern=pattern)
    if op == "in":
        if not isinstance(value, list) or not value:
            raise RuleError("'in' takes a non-empty list of values", "value")
        items = [_scalar(v) for v in value]
        folded = frozenset(v.casefold() if attribute.vr == "PN" else v for v in items)
        return Condition(attribute, op, items, choices=folded)
    bounds = parse_range(value)
    return Condition(attribute, op, value, bounds=bounds)


def _scalar(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise RuleError("must be a string or a number", "value")
    return str(value).strip()


def wildcard_to_regex(pattern: str) -> str:
    """PS3.4 C.2.2.2.4 wild card matching → an anchored regular expression: ``*`` matches
    any sequence of characters (including none), ``?`` any single character."""
    parts = []
    for char in pattern:
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        else:
            parts.append(re.escape(char))
    return "^" + "".join(parts) + "$"


def parse_range(value: Any) -> tuple[str | None, str | None]:
    """``"min-max"`` / ``"min-"`` / ``"-max"`` / ``[min, max]`` → (min, max), None for an open
    end; a value without a dash is a range of one. A leading dash opens the lower end (as in
    PS3.4 ``-20261231``): a negative number needs the list form, ``[-5, -1]``."""
    if isinstance(value, list | tuple):
        if len(value) != 2:
            raise RuleError("a range list must be [min, max]", "value")
        low, high = (None if v in (None, "") else _scalar(v) for v in value)
    elif isinstance(value, str | int | float) and not isinstance(value, bool):
        low, high = _split_range(str(value).strip())
    else:
        raise RuleError("a range is 'min-max' or [min, max]", "value")
    if low is None and high is None:
        raise RuleError("a range needs at least one end", "value")
    if low is not None and high is not None:
        numbers = _number(low), _number(high)
        if None not in numbers and numbers[0] > numbers[1] or (
            None in numbers and low > high
        ):
            raise RuleError(f"range {low}-{high} is empty (min > max)", "value")
    return low, high


def _split_range(text: str) -> tuple[str | None, str | None]:
    if "-" not in text:
        return (text or None), (text or None)
    for i, char in enumerate(text):
        if char != "-":
            continue
        low, high = text[:i].strip(), text[i + 1 :].strip()
        if all(not part or "-" not in part or _number(part) is not None for part in (low, high)):
            return low or None, high or None
    raise RuleError(f"cannot read range {text!r}", "value")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _in_range(value: str, bounds: tuple[str | None, str | None], vr: str) -> bool:
    low, high = bounds
    if vr in _DATETIME_VRS or (vr not in _NUMERIC_VRS and _number(value) is None):
        # PS3.4 C.2.2.2.5: DA/DT/TM compare in time order, which for their fixed-width
        # formats is text order; the upper end covers everything it is a prefix of.
        value = value.replace(":", "") if vr == "TM" else value
        if low is not None and value < low:
            return False
        return high is None or value[: len(high)] <= high
    number = _number(value)
    if number is None:
        return False
    for bound, ok in ((low, lambda b: number >= b), (high, lambda b: number <= b)):
        if bound is not None:
            limit = _number(bound)
            if limit is None or not ok(limit):
                return False
    return True


# --- Rules ------------------------------------------------------------------------------


class RuleLike(Protocol):
    """What evaluation needs of a rule (a :class:`routing.models.Rule` satisfies it)."""

    enabled: bool
    match: str
    conditions: list
    stop: bool


@lru_cache(maxsize=512)
def _parsed(conditions_json: str) -> tuple[Condition, ...]:
    import json

    return tuple(parse_condition(c) for c in json.loads(conditions_json))


def compile_conditions(conditions: list) -> tuple[Condition, ...]:
    """The conditions of a rule, parsed once per distinct list (rules rarely change)."""
    import json

    return _parsed(json.dumps(conditions, sort_keys=True))


def rule_matches(rule: RuleLike, facts: Facts) -> bool:
    """Whether an enabled rule's conditions hold: all of them (``match == "all"``) or at
    least one (``"any"``). A rule without conditions matches everything."""
    if not rule.enabled:
        return False
    conditions = compile_conditions(rule.conditions or [])
    if not conditions:
        return True
    if rule.match == "any":
        return any(c.matches(facts) for c in conditions)
    return all(c.matches(facts) for c in conditions)


def matching_rules(rules: Iterable[RuleLike], facts: Facts) -> list[RuleLike]:
    """The rules that match, in the order given (callers pass them by ``order``); the first
    matching rule with ``stop`` ends the evaluation. A rule whose stored conditions no longer
    parse is skipped, never half-applied."""
    matched = []
    for rule in rules:
        try:
            hit = rule_matches(rule, facts)
        except RuleError:
            continue
        if hit:
            matched.append(rule)
            if rule.stop:
                break
    return matched


# --- Coercions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Coercion:
    attribute: Attribute
    action: str
    value: Any = None
    vr: str = ""


def parse_coercion(data: Any) -> Coercion:
    """``{"attribute": ..., "action": "set" | "remove" | "prefix", "value": ...}`` (plus an
    optional ``"vr"`` to set a tag the dictionary does not know) → :class:`Coercion`."""
    if not isinstance(data, Mapping):
        raise RuleError("must be an object with attribute, action and value")
    unknown = set(data) - {"attribute", "action", "value", "vr"}
    if unknown:
        raise RuleError(f"unknown field {sorted(unknown)[0]!r}")
    try:
        attribute = resolve_attribute(data.get("attribute"))
    except RuleError as exc:
        raise RuleError(exc.message, "attribute") from None
    if attribute.is_association:
        raise RuleError(f"{attribute.key} is not a DICOM attribute", "attribute")
    if attribute.tag >> 16 in (0x0002, 0x0000) or attribute.key in (
        "SOPInstanceUID", "SOPClassUID", "PixelData"
    ):
        raise RuleError(f"{attribute.key} cannot be coerced", "attribute")
    action = data.get("action")
    if action not in COERCE_ACTIONS:
        raise RuleError(
            f"unknown action {action!r} (one of {', '.join(COERCE_ACTIONS)})", "action"
        )
    vr = data.get("vr") or attribute.vr
    if action == "remove":
        if data.get("value") not in (None, ""):
            raise RuleError("remove takes no value", "value")
        return Coercion(attribute, action)
    if vr in _UNMATCHABLE_VRS or not vr:
        raise RuleError(f"{attribute.key} needs a text VR to be {action}", "attribute")
    value = data.get("value")
    if action == "set" and isinstance(value, list):
        return Coercion(attribute, action, [_scalar(v) for v in value], vr)
    if value is None and action == "set":
        return Coercion(attribute, action, "", vr)
    return Coercion(attribute, action, _scalar(value), vr)


def apply_coercions(dataset: Dataset, coerce: list) -> None:
    """Apply a rule's coercions to ``dataset`` in place. The delivery side calls this on the
    copy it is about to send (``copy.deepcopy``: ``Dataset.copy()`` shares the elements);
    the received original on disk is never changed.

    ``set`` replaces or adds the attribute (a list sets several values), ``remove`` deletes
    it when present, ``prefix`` puts the text before each value of an attribute that is
    present and leaves an absent one absent. Only top-level attributes are coerced.
    """
    for item in coerce:
        coercion = parse_coercion(item)
        tag = Tag(coercion.attribute.tag)
        # New elements rather than changed ones, so that no element object shared with
        # another dataset is ever modified.
        if coercion.action == "remove":
            if tag in dataset:
                del dataset[tag]
        elif coercion.action == "set":
            vr = dataset[tag].VR if tag in dataset else coercion.vr
            dataset.add_new(tag, vr, coercion.value)
        elif tag in dataset and dataset[tag].value not in (None, ""):
            element = dataset[tag]
            if isinstance(element.value, MultiValue | list):
                value = [f"{coercion.value}{v}" for v in element.value]
            else:
                value = f"{coercion.value}{element.value}"
            dataset.add_new(tag, element.VR, value)


# --- Validation -------------------------------------------------------------------------


# Rule.order is a PostgreSQL integer; rules are numbered 10, 20, 30..., so a million either
# way is plenty and far from the column's limits.
ORDER_MIN, ORDER_MAX = -1_000_000, 1_000_000


def validate_rule(data: Mapping[str, Any], node_names: Iterable[str] | None = None) -> list[str]:
    """Every problem with a rule as the UI or a config file gives it, each prefixed with the
    field it is about (``"conditions[1].op: unknown operator 'equal'"``); empty when valid.
    ``node_names``: the nodes destinations may name (None skips that check)."""
    errors: list[str] = []
    if not isinstance(data, Mapping):
        return ["must be an object"]
    known = {"name", "order", "enabled", "match", "conditions", "destinations", "coerce",
             "stop", "mode", "study_quiet_seconds"}
    for key in sorted(set(data) - known):
        errors.append(f"{key}: unknown field")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        errors.append("name: required")
    elif len(name) > 100:
        errors.append("name: at most 100 characters")
    order = data.get("order", 0)
    if not isinstance(order, int) or isinstance(order, bool) or not ORDER_MIN <= order <= ORDER_MAX:
        errors.append(f"order: must be an integer from {ORDER_MIN} to {ORDER_MAX}")
    for flag in ("enabled", "stop"):
        if flag in data and not isinstance(data[flag], bool):
            errors.append(f"{flag}: must be true or false")
    if "match" in data and data["match"] not in MATCH_MODES:
        errors.append(f"match: must be one of {', '.join(MATCH_MODES)}, got {data['match']!r}")
    if "mode" in data and data["mode"] not in ("instance", "study"):
        errors.append(f"mode: must be instance or study, got {data['mode']!r}")
    quiet = data.get("study_quiet_seconds", 0)
    if not isinstance(quiet, int) or isinstance(quiet, bool) or not 0 <= quiet <= 86400 * 7:
        errors.append("study_quiet_seconds: must be an integer from 0 to 604800")
    for field_name, parse in (("conditions", parse_condition), ("coerce", parse_coercion)):
        items = data.get(field_name, [])
        if not isinstance(items, list):
            errors.append(f"{field_name}: must be a list")
            continue
        for i, item in enumerate(items):
            try:
                parse(item)
            except RuleError as exc:
                where = f"{field_name}[{i}].{exc.field}" if exc.field else f"{field_name}[{i}]"
                errors.append(f"{where}: {exc.message}")
    destinations = data.get("destinations", [])
    if not isinstance(destinations, list) or not all(isinstance(d, str) for d in destinations):
        errors.append("destinations: must be a list of node names")
    elif node_names is not None:
        known_nodes = set(node_names)
        for dest in destinations:
            if dest not in known_nodes:
                errors.append(f"destinations: unknown node {dest!r}")
    return errors
