"""The README's set-up commands are the ones CI runs, and they name real commands."""

import re
from pathlib import Path

from click.testing import CliRunner

from aabl_cli.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_exactly():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(line.strip() for line in readme.splitlines() if "pytest" in line and "pip install" in line)
    assert test_command in [line.strip() for line in ci.splitlines()]


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text()
    code = "\n".join(line for line in readme.splitlines() if line.startswith("    "))
    used = set(re.findall(r"\baabl (\w+)", code))
    assert {"demo", "scan", "split", "train", "evaluate", "poison"} <= used
    for name in used:
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0, result.output
