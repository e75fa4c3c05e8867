"""Export routing nodes and rules as JSON that import_config accepts."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from routing.config import export_config


class Command(BaseCommand):
    help = "Write every routing node and rule as JSON (standard output, or -o FILE)."

    def add_arguments(self, parser):
        parser.add_argument("-o", "--output", help="file to write instead of standard output")

    def handle(self, *args, output: str | None, **options):
        text = json.dumps(export_config(), indent=2, ensure_ascii=False) + "\n"
        if not output:
            self.stdout.write(text, ending="")
            return
        try:
            with open(output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            raise CommandError(f"cannot write {output}: {exc.strerror}") from exc
