"""The README's set-up commands are the ones CI runs, they name real commands, and its links
and the docs' links lead somewhere."""

import re
from pathlib import Path

from click.testing import CliRunner

from aabl_cli.cli import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


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


def test_readme_links_every_docs_page_and_each_link_resolves():
    readme = (ROOT / "README.md").read_text()
    linked = {target.split("#")[0] for target in LINK.findall(readme) if target.startswith("docs/")}
    missing = sorted(target for target in linked if not (ROOT / target).is_file())
    assert not missing, f"README links to docs that do not exist: {missing}"
    assert DOCS, "docs/ holds no pages"
    unlinked = sorted({page.relative_to(ROOT).as_posix() for page in DOCS} - linked)
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def _anchor(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_relative_links_in_readme_and_docs_resolve():
    broken = []
    for page in [ROOT / "README.md", *DOCS]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.MULTILINE)
                if anchor not in {_anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
