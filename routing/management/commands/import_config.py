"""Import routing nodes and rules from a JSON file (see :mod:`routing.config`)."""

from __future__ import annotations

import json
import sys

from django.core.management.base import BaseCommand, CommandError

from routing.config import ConfigError, import_config


class Command(BaseCommand):
    help = (
        "Create or update routing nodes and rules by name from a JSON file ('-' for stdin). "
        "A file with any problem is refused whole."
    )

    def add_arguments(self, parser):
        parser.add_argument("file", help="JSON file, or - for standard input")
        parser.add_argument("--actor", default="system", help="who the audit trail names")
        parser.add_argument("--dry-run", action="store_true", help="check and report only")

    def handle(self, *args, file: str, actor: str, dry_run: bool, **options):
        try:
            if file == "-":
                document = json.load(sys.stdin)
            else:
                with open(file, encoding="utf-8") as f:
                    document = json.load(f)
        except OSError as exc:
            raise CommandError(f"cannot read {file}: {exc.strerror}") from exc
        except json.JSONDecodeError as exc:
            raise CommandError(f"{file} is not valid JSON: {exc}") from exc
        try:
            result = import_config(document, actor=actor, dry_run=dry_run)
        except ConfigError as exc:
            raise CommandError(
                f"{file} was not imported ({len(exc.problems)} problem"
                f"{'s' if len(exc.problems) != 1 else ''}):\n  " + "\n  ".join(exc.problems)
            ) from exc
        prefix = "would be " if dry_run else ""
        for label, names in (("created", result.created), ("updated", result.updated)):
            for name in names:
                self.stdout.write(f"{prefix}{label}: {name}")
        self.stdout.write(
            f"{len(result.created)} {prefix}created, {len(result.updated)} {prefix}updated, "
            f"{len(result.unchanged)} unchanged"
        )
