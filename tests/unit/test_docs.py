"""The docs point at tests and commands that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_test_named_in_the_error_table_exists():
    table = (ROOT / "docs/errors.md").read_text()
    references = re.findall(r"`(tests/[\w/]+\.py)::(\w+)", table)
    assert len(references) > 20
    missing = [
        f"{path}::{name}"
        for path, name in references
        if not re.search(rf"^(async )?def {name}\(", (ROOT / path).read_text(), re.MULTILINE)
    ]
    assert missing == []


def test_the_readme_starts_with_the_two_set_up_commands_that_exist():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line.split("#")[0].strip() for line in readme[2:6] if line.startswith("bash ")]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    for command in commands:
        assert (ROOT / command.split()[1]).is_file()
    assert "bash scripts/test.sh" in (ROOT / ".ci/run").read_text()
