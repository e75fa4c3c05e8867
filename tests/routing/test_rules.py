"""Rule evaluation and coercion as pure functions: no database, no network (but for one
check that a configuration import refuses what validate_rule refuses)."""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from routing.config import ConfigError, import_config
from routing.header import header_as_json
from routing.models import Rule
from routing.rules import (
    ORDER_MAX,
    ORDER_MIN,
    Facts,
    RuleError,
    apply_coercions,
    matching_rules,
    parse_condition,
    resolve_attribute,
    rule_matches,
    validate_rule,
    wildcard_to_regex,
)

HEADER = {
    "Modality": "CT",
    "StudyDescription": "CT THORAX",
    "PatientName": "Smith^John",
    "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
    "StudyDate": "20260315",
    "AcquisitionDateTime": "20260315143000.000000",
    "SeriesNumber": "12",
    "SliceThickness": "2.5",
    "InstitutionName": "",
    "00291010": "private value",
}
ASSOCIATION = {"calling_ae": "CT1", "called_ae": "GATEWAY", "source_ip": "10.1.2.3"}


def holds(attribute, op, value=None, header=HEADER) -> bool:
    condition = {"attribute": attribute, "op": op}
    if value is not None:
        condition["value"] = value
    return parse_condition(condition).matches(Facts(header, ASSOCIATION))


@dataclass
class R:
    """A rule as evaluation sees it."""

    name: str
    conditions: list = field(default_factory=list)
    match: str = "all"
    enabled: bool = True
    stop: bool = False


# --- attributes -----------------------------------------------------------------------


@pytest.mark.parametrize("form", ["Modality", "0008,0060", "(0008,0060)", "00080060",
                                  "(0008, 0060)", "0008,0060".lower()])
def test_an_attribute_can_be_named_by_keyword_or_tag(form):
    assert resolve_attribute(form).key == "Modality"
    assert holds(form, "equals", "CT")


def test_a_private_tag_is_looked_up_by_its_hex_number():
    assert holds("0029,1010", "equals", "private value")


def test_association_attributes_are_conditions_too():
    assert holds("calling_ae", "equals", "CT1")
    assert holds("called_ae", "wildcard", "GATE*")
    assert holds("source_ip", "regex", r"^10\.1\.")
    assert not holds("calling_ae", "in", ["MR1", "MR2"])


def test_an_unknown_keyword_is_refused():
    with pytest.raises(RuleError, match="unknown attribute keyword 'Modallity'"):
        parse_condition({"attribute": "Modallity", "op": "equals", "value": "CT"})


# --- operators ------------------------------------------------------------------------


def test_equals_compares_the_whole_value_case_sensitively():
    assert holds("Modality", "equals", "CT")
    assert not holds("Modality", "equals", "ct")
    assert not holds("StudyDescription", "equals", "CT")


def test_person_names_compare_case_insensitively():
    assert holds("PatientName", "equals", "SMITH^JOHN")
    assert holds("PatientName", "wildcard", "smith*")
    assert holds("PatientName", "in", ["DOE^JANE", "SMITH^JOHN"])


def test_not_equals_is_true_when_no_value_equals_or_the_attribute_is_absent():
    assert holds("Modality", "not_equals", "MR")
    assert not holds("Modality", "not_equals", "CT")
    assert holds("BodyPartExamined", "not_equals", "HEAD")


@pytest.mark.parametrize(
    "pattern, expected",
    [("CT*", True), ("*THORAX", True), ("CT?THORAX", True), ("CT THORA?", True),
     ("*", True), ("ct*", False), ("CT", False), ("?T THORAX", True), ("CT.*", False),
     ("C[T] THORAX", False)],
)
def test_wildcard_follows_dicom_star_and_question_mark(pattern, expected):
    assert holds("StudyDescription", "wildcard", pattern) is expected


def test_wildcard_treats_regex_characters_literally():
    assert wildcard_to_regex("a.b*") == r"^a\.b.*$"
    assert holds("StudyDescription", "wildcard", "CT (THORAX)*") is False
    assert holds("StudyDescription", "wildcard", "CT (THORAX)",
                 header={"StudyDescription": "CT (THORAX)"})


def test_regex_searches_anywhere_in_the_value():
    assert holds("StudyDescription", "regex", "THO")
    assert holds("StudyDescription", "regex", "^CT\\s")
    assert not holds("StudyDescription", "regex", "^THO")


def test_an_invalid_regex_is_refused_with_the_reason():
    with pytest.raises(RuleError, match="value: invalid regex"):
        parse_condition({"attribute": "StudyDescription", "op": "regex", "value": "CT("})


def test_in_matches_one_of_a_list():
    assert holds("Modality", "in", ["MR", "CT"])
    assert not holds("Modality", "in", ["MR", "US"])
    with pytest.raises(RuleError, match="non-empty list"):
        parse_condition({"attribute": "Modality", "op": "in", "value": "CT"})


def test_exists_and_missing_treat_an_empty_value_as_missing():
    assert holds("Modality", "exists")
    assert not holds("Modality", "missing")
    assert holds("InstitutionName", "missing")
    assert holds("BodyPartExamined", "missing")
    assert not holds("BodyPartExamined", "exists")


@pytest.mark.parametrize(
    "value, expected",
    [("20260101-20261231", True), ("20260315-20260315", True), ("20260316-", False),
     ("-20260315", True), ("20260101-", True), (["20260301", None], True),
     ("20270101-20271231", False), ("20260315", True)],
)
def test_range_matches_dicom_dates(value, expected):
    assert holds("StudyDate", "range", value) is expected


def test_a_date_range_covers_every_time_of_its_last_day():
    assert holds("AcquisitionDateTime", "range", "20260301-20260315")
    assert not holds("AcquisitionDateTime", "range", "20260301-20260314")


@pytest.mark.parametrize(
    "attribute, value, expected",
    [("SeriesNumber", "10-20", True), ("SeriesNumber", "2-9", False),
     ("SeriesNumber", [12, 12], True), ("SliceThickness", [None, 3], True),
     ("SliceThickness", "2.6-", False), ("SliceThickness", [-5, 2.5], True)],
)
def test_range_matches_numbers_numerically(attribute, value, expected):
    assert holds(attribute, "range", value) is expected


def test_a_range_with_min_above_max_is_refused():
    with pytest.raises(RuleError, match="empty"):
        parse_condition({"attribute": "SeriesNumber", "op": "range", "value": "20-10"})


def test_a_multi_valued_attribute_matches_when_any_value_matches():
    assert holds("ImageType", "equals", "AXIAL")
    assert holds("ImageType", "in", ["LOCALIZER", "PRIMARY"])
    assert not holds("ImageType", "equals", "LOCALIZER")
    assert not holds("ImageType", "not_equals", "AXIAL")
    assert holds("ImageType", "equals", "PRIMARY", header={"ImageType": "ORIGINAL\\PRIMARY"})


def test_a_condition_on_an_absent_attribute_does_not_match():
    for op, value in [("equals", "X"), ("wildcard", "*"), ("regex", "."), ("in", ["X"]),
                      ("range", "1-2")]:
        assert not holds("BodyPartExamined", op, value), op


def test_an_attribute_missing_from_the_header_is_asked_for():
    asked = []

    def fallback(attribute):
        asked.append(attribute.key)
        return "CHEST"

    facts = Facts({}, ASSOCIATION, fallback=fallback)
    condition = parse_condition({"attribute": "BodyPartExamined", "op": "equals",
                                 "value": "CHEST"})
    assert condition.matches(facts)
    assert condition.matches(facts)
    assert asked == ["BodyPartExamined"]  # once per instance


# --- rules ----------------------------------------------------------------------------

CT = {"attribute": "Modality", "op": "equals", "value": "CT"}
MR = {"attribute": "Modality", "op": "equals", "value": "MR"}
FROM_CT1 = {"attribute": "calling_ae", "op": "equals", "value": "CT1"}


def test_match_all_needs_every_condition_and_any_needs_one():
    facts = Facts(HEADER, ASSOCIATION)
    assert rule_matches(R("all", [CT, FROM_CT1]), facts)
    assert not rule_matches(R("all", [CT, MR]), facts)
    assert rule_matches(R("any", [CT, MR], match="any"), facts)
    assert not rule_matches(R("none", [MR], match="any"), facts)


def test_a_rule_without_conditions_matches_everything():
    assert rule_matches(R("catch-all"), Facts({}, {}))


def test_rules_apply_in_order_until_one_with_stop():
    rules = [R("first", [CT]), R("disabled", [CT], enabled=False), R("mr", [MR]),
             R("stopper", [FROM_CT1], stop=True), R("after stop", [CT])]

    matched = matching_rules(rules, Facts(HEADER, ASSOCIATION))

    assert [r.name for r in matched] == ["first", "stopper"]


def test_a_stored_rule_that_no_longer_parses_is_skipped():
    broken = R("broken", [{"attribute": "Modality", "op": "sounds_like", "value": "CT"}])

    assert [r.name for r in matching_rules([broken, R("ok", [CT])], Facts(HEADER))] == ["ok"]


# --- validation -----------------------------------------------------------------------


def test_validate_rule_names_every_problem_by_field():
    problems = validate_rule(
        {
            "name": "bad",
            "match": "most",
            "conditions": [CT, {"attribute": "Modality", "op": "equal", "value": "CT"},
                           {"attribute": "Modallity", "op": "equals", "value": "CT"},
                           {"attribute": "StudyDescription", "op": "regex", "value": "("}],
            "destinations": ["pacs1", "pacs9"],
            "coerce": [{"attribute": "InstitutionName", "action": "replace", "value": "X"}],
            "destination": ["pacs1"],
        },
        node_names={"pacs1"},
    )

    assert problems[0] == "destination: unknown field"
    assert "match: must be one of all, any, got 'most'" in problems
    assert any(p.startswith("conditions[1].op: unknown operator 'equal'") for p in problems)
    assert "conditions[2].attribute: unknown attribute keyword 'Modallity'" in problems
    assert any(p.startswith("conditions[3].value: invalid regex") for p in problems)
    assert any(p.startswith("coerce[0].action: unknown action 'replace'") for p in problems)
    assert "destinations: unknown node 'pacs9'" in problems
    assert len(problems) == 7


def test_validate_rule_accepts_a_good_rule():
    assert validate_rule({"name": "CT", "conditions": [CT], "destinations": ["pacs1"],
                          "coerce": [{"attribute": "InstitutionName", "action": "set",
                                      "value": "General"}]}, {"pacs1"}) == []


@pytest.mark.parametrize("order,refused", [
    (3_000_000_000, True), (-3_000_000_000, True), (ORDER_MAX + 1, True), (ORDER_MIN - 1, True),
    (ORDER_MAX, False), (ORDER_MIN, False), (0, False),
])
def test_the_order_must_fit_the_bounds(order, refused):
    problems = validate_rule({"name": "CT", "order": order})
    assert problems == (["order: must be an integer from -1000000 to 1000000"] if refused
                        else [])


@pytest.mark.django_db
def test_an_import_refuses_an_order_the_database_cannot_hold():
    # 3,000,000,000 overflows PostgreSQL's integer column: refused before saving anything.
    with pytest.raises(ConfigError) as refused:
        import_config({"rules": [{"name": "CT", "order": 3_000_000_000}]})

    assert refused.value.problems == [
        "rules[0].order: must be an integer from -1000000 to 1000000"]
    assert not Rule.objects.exists()


# --- the header rules see -------------------------------------------------------------


def test_an_element_that_does_not_decode_is_left_out_of_the_header_alone():
    with open(get_testdata_file("CT_small.dcm"), "rb") as f:
        raw = f.read()  # explicit VR little endian
    at = raw.index(b"\x09\x00\x01\x10") + 4  # private (0009,1001), LO
    broken = dcmread(BytesIO(raw[:at] + b"ZZ" + raw[at + 2:]), stop_before_pixels=True)
    intact = dcmread(BytesIO(raw), stop_before_pixels=True)

    header = header_as_json(broken)

    expected = header_as_json(intact)
    assert expected.pop("00091001") == "GE_GENESIS_FF"
    assert header == expected
    assert header["Modality"] == "CT" and header["PatientID"] == "1CT1"
    facts = Facts(header, ASSOCIATION)
    assert parse_condition({"attribute": "(0009,1001)", "op": "missing"}).matches(facts)


# --- coercions ------------------------------------------------------------------------


def test_coercions_set_remove_and_prefix_the_forwarded_copy():
    original = dcmread(get_testdata_file("CT_small.dcm"))
    copy = deepcopy(original)  # Dataset.copy() would share the original's elements

    apply_coercions(copy, [
        {"attribute": "InstitutionName", "action": "set", "value": "General"},
        {"attribute": "0010,1040", "action": "set", "value": "1 Main St"},  # added
        {"attribute": "PatientBirthDate", "action": "remove"},
        {"attribute": "PatientID", "action": "prefix", "value": "EXT-"},
        {"attribute": "ImageType", "action": "prefix", "value": "X"},
        {"attribute": "OtherPatientIDs", "action": "prefix", "value": "EXT-"},  # absent
    ])

    assert copy.InstitutionName == "General"
    assert copy.PatientAddress == "1 Main St"
    assert "PatientBirthDate" not in copy
    assert copy.PatientID == f"EXT-{original.PatientID}"
    assert list(copy.ImageType) == [f"X{v}" for v in original.ImageType]
    assert "OtherPatientIDs" not in copy
    assert original.InstitutionName != "General" and "PatientBirthDate" in original
    assert copy.PixelData == original.PixelData


def test_a_coercion_may_not_touch_the_identity_of_the_instance():
    with pytest.raises(RuleError, match="SOPInstanceUID cannot be coerced"):
        apply_coercions(Dataset(), [{"attribute": "SOPInstanceUID", "action": "set",
                                     "value": "1.2.3"}])
