"""README and docker-compose.yml stay true to the code."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ENV_READ = re.compile(
    r"""(?:env_\w+\(\s*|os\.environ\.get\(\s*|os\.environ\[\s*|getenv\(\s*)["']([A-Z][A-Z0-9_]+)["']"""
)
NOT_SETTINGS = {"DJANGO_SETTINGS_MODULE"}


def variables_the_code_reads() -> set[str]:
    names: set[str] = set()
    for package in ("gateway", "worklist", "routing"):
        for path in (ROOT / package).rglob("*.py"):
            names.update(ENV_READ.findall(path.read_text()))
    return names - NOT_SETTINGS


def test_the_readme_documents_every_environment_variable():
    readme = (ROOT / "README.md").read_text()
    table_rows = {m.group(1) for m in re.finditer(r"^\| `([A-Z][A-Z0-9_]+)` \|", readme, re.M)}
    missing = variables_the_code_reads() - table_rows
    assert not missing, f"README's configuration table lacks {sorted(missing)}"


def test_the_readme_gives_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme


def test_compose_runs_every_part_from_one_image_with_settings_in_the_environment():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("postgres", "redis", "web", "worker", "beat", "hl7listener", "dicomserver"):
        assert name in services, f"docker-compose.yml has no {name} service"
    for name in ("web", "worker", "beat", "hl7listener", "dicomserver"):
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgres://")
        assert env["REDIS_URL"].startswith("redis://")
        assert services[name]["image"] == services["web"]["image"]
        assert "gateway-data:/data" in services[name]["volumes"]
