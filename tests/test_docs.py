"""The documents' promises: every name the chapter maps (README.md, LEIA-ME.md) point to is
defined in the file they name, and every relative link leads to a file of the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", REPO / "LEIA-ME.md", *sorted((REPO / "docs").glob("*.md"))]


def defined_names(module: str) -> set[str]:
    """Functions, classes, methods and top-level assignments of `module`.py."""
    tree = ast.parse((REPO / f"{module}.py").read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {target.id for target in targets if isinstance(target, ast.Name)}
    return names


def chapter_map_rows(document: Path) -> list[tuple[list[str], list[str]]]:
    """(the .py files a row names, the identifiers it puts in backticks) for each table row that
    names a .py file: the chapter maps."""
    rows = []
    for line in document.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            continue
        quoted = re.findall(r"`([^`]+)`", line)
        files = [name[:-3] for name in quoted if re.fullmatch(r"\w+\.py", name)]
        identifiers = [re.sub(r"\(.*$", "", name).split(".")[0] for name in quoted
                       if re.fullmatch(r"[A-Za-z_]\w*(\.\w+)?(\(.*\))?", name) and not name.endswith(".py")]
        if files:
            rows.append((files, identifiers))
    return rows


@pytest.mark.parametrize("document", [REPO / "README.md", REPO / "LEIA-ME.md"], ids=lambda path: path.name)
def test_the_chapter_map_names_what_the_files_define(document):
    rows = chapter_map_rows(document)
    assert len(rows) >= 8, "the chapter map is gone"
    flags = {"requires_grad", "random", "last", "mean", "special", "first", "all", "gradual", "head",
             "last-block"}  # torch's attribute, and values of flags
    for files, identifiers in rows:
        known = set().union(*(defined_names(module) for module in files))
        missing = [name for name in identifiers if name not in known and name not in flags]
        assert not missing, f"{document.name}: {missing} not defined in {files}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_relative_link_leads_to_a_file(document):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", document.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        assert (document.parent / target).exists(), f"{document.name}: link to {target}, which does not exist"
