"""Shared test set-up. Feature fixtures live in plugin modules so each area owns its own."""

import os

os.environ.setdefault("TCP_NODELAY", "1")

pytest_plugins = [
    "tests.fixtures_hl7",
    "tests.fixtures_mwl",
    "tests.fixtures_storage",
    "tests.fixtures_pacs",
    "tests.fixtures_ui",
]
