"""Routing configuration as code: ``manage.py import_config`` / ``export_config``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from gateway.models import AuditEvent
from routing.config import validate_config
from routing.models import Node, Rule

pytestmark = pytest.mark.django_db

CONFIG = {
    "nodes": [
        {"name": "pacs1", "ae_title": "PACS1", "host": "10.0.0.5", "port": 104,
         "enabled": True},
        {"name": "archive", "ae_title": "ARCHIVE", "host": "archive.example.org", "port": 11112,
         "enabled": False, "max_associations": 4},
    ],
    "rules": [
        {"name": "CT to pacs1", "order": 10, "enabled": True, "match": "all",
         "conditions": [{"attribute": "Modality", "op": "equals", "value": "CT"},
                        {"attribute": "calling_ae", "op": "in", "value": ["CT1", "CT2"]}],
         "destinations": ["pacs1"],
         "coerce": [{"attribute": "InstitutionName", "action": "set", "value": "General"}],
         "stop": False},
        {"name": "everything to archive", "order": 90, "mode": "study",
         "study_quiet_seconds": 120, "destinations": ["archive", "pacs1"]},
    ],
}


def import_file(tmp_path: Path, document, *args: str) -> str:
    path = tmp_path / "routing.json"
    path.write_text(json.dumps(document))
    out = io.StringIO()
    call_command("import_config", str(path), *args, stdout=out)
    return out.getvalue()


def export() -> dict:
    out = io.StringIO()
    call_command("export_config", stdout=out)
    return json.loads(out.getvalue())


def test_it_imports_nodes_and_rules(tmp_path):
    output = import_file(tmp_path, CONFIG)

    assert "4 created, 0 updated, 0 unchanged" in output
    assert Node.objects.get(name="archive").max_associations == 4
    rule = Rule.objects.get(name="everything to archive")
    assert (rule.mode, rule.study_quiet_seconds, rule.match) == ("study", 120, "all")
    assert sorted(n.name for n in rule.destinations.all()) == ["archive", "pacs1"]
    assert Rule.objects.get(name="CT to pacs1").conditions == CONFIG["rules"][0]["conditions"]


def test_importing_the_export_changes_nothing(tmp_path):
    import_file(tmp_path, CONFIG)
    exported = export()
    events = AuditEvent.objects.count()

    output = import_file(tmp_path, exported)

    assert "0 created, 0 updated, 4 unchanged" in output
    assert AuditEvent.objects.count() == events
    assert export() == exported
    assert exported["rules"][1] == {
        "name": "everything to archive", "order": 90, "enabled": True, "match": "all",
        "conditions": [], "coerce": [], "stop": False, "mode": "study",
        "study_quiet_seconds": 120, "destinations": ["archive", "pacs1"],
    }


def test_import_updates_by_name_and_audits_with_the_actor(tmp_path):
    import_file(tmp_path, CONFIG)
    changed = {"nodes": [{"name": "pacs1", "port": 4242}],
               "rules": [{"name": "CT to pacs1", "destinations": ["archive"]}]}

    output = import_file(tmp_path, changed, "--actor", "user:alice")

    assert "0 created, 2 updated, 0 unchanged" in output
    node = Node.objects.get(name="pacs1")
    assert (node.port, node.ae_title) == (4242, "PACS1")  # fields left out keep their value
    rule = Rule.objects.get(name="CT to pacs1")
    assert [n.name for n in rule.destinations.all()] == ["archive"]
    assert rule.coerce == CONFIG["rules"][0]["coerce"]
    event = AuditEvent.objects.get(action="routing.node.updated")
    assert event.actor == "user:alice"
    assert (event.detail["before"], event.detail["after"]) == ({"port": 104}, {"port": 4242})
    assert AuditEvent.objects.get(action="routing.rule.updated").actor == "user:alice"
    assert AuditEvent.objects.filter(action="routing.node.created", actor="system").count() == 2


def test_a_bad_file_is_refused_whole_naming_each_problem(tmp_path):
    bad = json.loads(json.dumps(CONFIG))
    bad["nodes"][0]["ae_title"] = "A_TITLE_TOO_LONG_X"
    bad["nodes"][1]["port"] = 70000
    bad["rules"][0]["conditions"][1]["op"] = "equal"
    bad["rules"][0]["conditions"].append(
        {"attribute": "StudyDescription", "op": "regex", "value": "CT("})
    bad["rules"][0]["conditions"].append({"attribute": "Modallity", "op": "equals",
                                          "value": "CT"})
    bad["rules"].append({"name": "nowhere", "destinations": ["pacs9"]})

    with pytest.raises(CommandError) as refused:
        import_file(tmp_path, bad)

    message = str(refused.value)
    assert "was not imported (6 problems)" in message
    for problem in [
        "nodes[0].ae_title: AE title 'A_TITLE_TOO_LONG_X' is longer than 16 characters",
        "nodes[1].port: must be 1-65535, got 70000",
        "rules[0].conditions[1].op: unknown operator 'equal'",
        "rules[0].conditions[2].value: invalid regex 'CT('",
        "rules[0].conditions[3].attribute: unknown attribute keyword 'Modallity'",
        "rules[2].destinations: unknown node 'pacs9'",
    ]:
        assert problem in message
    assert not Node.objects.exists() and not Rule.objects.exists()
    assert not AuditEvent.objects.exists()


def test_a_rule_may_send_to_a_node_that_already_exists(tmp_path):
    import_file(tmp_path, {"nodes": CONFIG["nodes"]})

    import_file(tmp_path, {"rules": [{"name": "CT", "destinations": ["pacs1"]}]})

    assert [n.name for n in Rule.objects.get(name="CT").destinations.all()] == ["pacs1"]


def test_a_new_node_needs_its_address_and_names_must_be_unique():
    problems = validate_config({
        "nodes": [{"name": "pacs1"}, {"name": "pacs1", "ae_title": "X", "host": "h",
                                      "port": 104}],
        "rules": [{"name": "r"}, {"name": "r", "mode": "series"}],
        "routes": [],
    })

    assert problems == [
        "routes: unknown section",
        "nodes[0].ae_title: required",
        "nodes[0].host: a host name or address is required",
        "nodes[0].port: must be 1-65535, got None",
        "nodes[1].name: 'pacs1' appears twice",
        "rules[1].mode: must be instance or study, got 'series'",
        "rules[1].name: 'r' appears twice",
    ]


def test_dry_run_reports_and_changes_nothing(tmp_path):
    output = import_file(tmp_path, CONFIG, "--dry-run")

    assert "4 would be created" in output
    assert not Node.objects.exists() and not AuditEvent.objects.exists()


def test_export_writes_a_file_with_o(tmp_path):
    import_file(tmp_path, CONFIG)
    target = tmp_path / "out.json"

    call_command("export_config", "-o", str(target), stdout=io.StringIO())

    assert json.loads(target.read_text()) == export()


def test_an_unreadable_file_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{nodes: []}")

    with pytest.raises(CommandError, match="is not valid JSON"):
        call_command("import_config", str(path))


def test_the_admin_refuses_a_rule_the_import_would_refuse(admin_client):
    pacs1 = Node.objects.create(name="pacs1", ae_title="PACS1", host="h", port=104)

    response = admin_client.post("/admin/routing/rule/add/", {
        "name": "bad regex", "order": 10, "enabled": "on", "match": "all",
        "conditions": json.dumps([{"attribute": "StudyDescription", "op": "regex",
                                   "value": "CT("}]),
        "destinations": [pacs1.pk], "coerce": "[]", "mode": "instance",
        "study_quiet_seconds": 60,
    })

    assert response.status_code == 200
    assert "conditions[0].value: invalid regex" in response.content.decode()
    assert not Rule.objects.exists()


def test_the_admin_saves_a_good_rule_and_audits_it(admin_client):
    pacs1 = Node.objects.create(name="pacs1", ae_title="PACS1", host="h", port=104)

    response = admin_client.post("/admin/routing/rule/add/", {
        "name": "CT", "order": 10, "enabled": "on", "match": "all",
        "conditions": json.dumps([{"attribute": "Modality", "op": "equals", "value": "CT"}]),
        "destinations": [pacs1.pk], "coerce": "[]", "mode": "instance",
        "study_quiet_seconds": 60,
    })

    assert response.status_code == 302
    assert Rule.objects.get().conditions[0]["value"] == "CT"
    assert AuditEvent.objects.get(action="routing.rule.created").actor == "user:admin"
