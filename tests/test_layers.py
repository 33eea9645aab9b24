"""The layers stay visible: `aabl_cli.core` imports no stage, and a stage imports `core` and no other
stage (`run` and `demo`, which compose stages, excepted); only cli.py and options.py, at the top, may
import anything. Every import counts, also one inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "aabl_cli"
COMPOSERS = ("run", "demo")  # stages that put other stages together
TOP = ("cli", "options", "__init__", "__main__")


def module_name(path: Path, root: Path) -> str:
    """aabl_cli/stages/poison/folder.py -> aabl_cli.stages.poison.folder; a package's __init__ is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> tuple[str, str | None]:
    """("core", None), ("stage", its name), ("top", None) or ("package", None) for the bare package."""
    parts = name.split(".")
    if parts[:2] == [PACKAGE, "core"]:
        return "core", None
    if parts[:2] == [PACKAGE, "stages"]:
        return ("stage", parts[2]) if len(parts) > 2 else ("stages", None)
    return ("package", None) if parts == [PACKAGE] else ("top", None)


def imported(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> list[str]:
    """Every aabl_cli module `tree` imports, anywhere in it (`from M import x` counts as M.x when that is a module)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package upwards
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    return [target for target in found if target == PACKAGE or target.startswith(PACKAGE + ".")]


def forbidden_edges(root: Path) -> list[str]:
    """Each import that crosses the layers the wrong way, named as
    `aabl_cli/stages/train.py imports aabl_cli.stages.evaluate`."""
    files = sorted((root / PACKAGE).rglob("*.py"))
    modules = {module_name(path, root) for path in files}
    edges = []
    for path in files:
        name = module_name(path, root)
        kind, stage = layer(name)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for target in imported(tree, name, path.name == "__init__.py", modules):
            target_kind, target_stage = layer(target)
            if kind == "core":
                allowed = target_kind == "core" or target == PACKAGE  # aabl_cli.__version__
            elif kind == "stage":
                allowed = (target_kind in ("core", "package") or target_stage == stage
                           or (stage in COMPOSERS and target_kind in ("stage", "stages")))
            elif kind == "stages":
                allowed = target_kind in ("core", "package")
            else:  # cli.py, options.py, the package itself
                allowed = True
            if not allowed:
                edges.append(f"{path.relative_to(root).as_posix()} imports {target}")
    return sorted(set(edges))


def test_no_module_imports_across_the_layers_the_wrong_way():
    edges = forbidden_edges(ROOT)
    assert edges == [], "forbidden imports:\n" + "\n".join(edges)


def test_the_top_holds_only_the_command_line():
    top = sorted(p.stem for p in (ROOT / PACKAGE).glob("*.py"))
    assert top == sorted(TOP), f"modules at the top besides the command line: {sorted(set(top) - set(TOP))}"
    folders = sorted(p.name for p in (ROOT / PACKAGE).iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == ["core", "stages"]


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(("rel", "text", "edge"), [
    ("aabl_cli/stages/train.py", "def f():\n    from aabl_cli.stages.evaluate import accuracy\n",
     "aabl_cli/stages/train.py imports aabl_cli.stages.evaluate"),
    ("aabl_cli/core/loop.py", "import aabl_cli.stages.train\n", "aabl_cli/core/loop.py imports aabl_cli.stages.train"),
    ("aabl_cli/core/loop.py", "from aabl_cli.stages import train\n",
     "aabl_cli/core/loop.py imports aabl_cli.stages.train"),
    ("aabl_cli/stages/poison/backdoors/clb.py", "from aabl_cli.stages.train import fit\n",
     "aabl_cli/stages/poison/backdoors/clb.py imports aabl_cli.stages.train"),
    ("aabl_cli/core/data.py", "from aabl_cli.options import BUDGET\n",
     "aabl_cli/core/data.py imports aabl_cli.options"),
    ("aabl_cli/stages/scan.py", "from ..stages import split\n",
     "aabl_cli/stages/scan.py imports aabl_cli.stages.split"),
])
def test_a_forbidden_import_is_found_and_named(tmp_path, rel, text, edge):
    base = {"aabl_cli/__init__.py": "", "aabl_cli/options.py": "", "aabl_cli/core/__init__.py": "",
            "aabl_cli/core/data.py": "", "aabl_cli/core/loop.py": "", "aabl_cli/stages/__init__.py": "",
            "aabl_cli/stages/train.py": "", "aabl_cli/stages/evaluate.py": "", "aabl_cli/stages/split.py": "",
            "aabl_cli/stages/scan.py": "", "aabl_cli/stages/poison/__init__.py": "",
            "aabl_cli/stages/poison/backdoors/__init__.py": "", "aabl_cli/stages/poison/backdoors/clb.py": ""}
    root = _write(tmp_path, {**base, rel: text})
    assert forbidden_edges(root) == [edge]


def test_allowed_imports_pass(tmp_path):
    root = _write(tmp_path, {
        "aabl_cli/__init__.py": "", "aabl_cli/cli.py": "from aabl_cli.stages.train import train\n",
        "aabl_cli/core/__init__.py": "", "aabl_cli/core/loop.py": "from aabl_cli import __version__\n",
        "aabl_cli/stages/__init__.py": "", "aabl_cli/stages/train.py": "from aabl_cli.core.loop import fit\n",
        "aabl_cli/stages/run.py": "from aabl_cli.stages.train import train\n",
        "aabl_cli/stages/poison/__init__.py": "from aabl_cli.stages.poison.folder import x\n",
        "aabl_cli/stages/poison/folder.py": "from .backdoors import BACKDOORS\n",
        "aabl_cli/stages/poison/backdoors/__init__.py": ""})
    assert forbidden_edges(root) == []
