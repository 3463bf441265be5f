"""Rules that keep the extension working inside the real 3D Slicer application (issue 15).

The slicer-core wheel has MRML but no Qt, so these checks encode, statically or with stand-ins,
the classes of bug that only the application would show:

1. every ``slicer.<name>`` / ``slicer.util.<name>`` / ``ctk.<class>.<member>`` the modules use
   exists in Slicer (``Testing/slicer_api.json``, read from Slicer's and CTK's sources), and
   Qt / CTK classes are reached through ``qt.`` / ``ctk.``, never ``slicer.``;
2. GUI-side polling of a worker thread yields the GIL (Slicer's main thread holds it while Qt
   waits for events): a real LiteMedSAM embedding polled from a simulated event loop that holds
   the GIL between ticks finishes within 2x its solo time;
5. every Qt slot and Segment Editor callback reports its exceptions to the user;
6. scene handling: colour node IDs that exist, preview under the source's transform, results
   for the node that was submitted, no torch import on the GUI thread for a click.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
API = json.loads((REPO / "Testing" / "slicer_api.json").read_text(encoding="utf-8"))
#: Python files that run inside Slicer (modules, their Libs, self-tests, the headless entry).
SLICER_FILES = sorted(
    [p for m in ("SemiSAMSegment", "SemiSAMTrain") for p in (REPO / m).rglob("*.py") if "__pycache__" not in p.parts]
    + [REPO / "scripts" / "slicer_train.py"]
)


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _attribute_chains(tree: ast.AST, root: str):
    """``(lineno, [root, a, b, ...])`` for every outermost ``root.a.b...`` attribute chain."""
    inner = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            inner.add(id(node.value))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        chain = []
        cur = node
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        if isinstance(cur, ast.Name) and cur.id == root:
            yield node.lineno, [root] + chain[::-1]


# ------------------------------------------------------------------ 1. Slicer's namespace


def _slicer_core_names() -> set:
    import slicer

    return set(dir(slicer))


def slicer_namespace_problems(path: Path) -> list[str]:
    """What ``path`` uses of ``slicer.`` / ``ctk.`` that Slicer does not have (see slicer_api.json)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    core = _slicer_core_names()
    known = set(API["slicer_namespace"])
    submodules = {
        "util": set(API["slicer_util"]),
        "ScriptedLoadableModule": set(API["slicer_ScriptedLoadableModule"]),
        "parameterNodeWrapper": set(API["slicer_parameterNodeWrapper"]),
        "packaging": set(API["slicer_packaging"]),
    }
    problems = []
    for line, chain in _attribute_chains(tree, "slicer"):
        name = chain[1]
        where = f"{_rel(path)}:{line}: slicer.{name}"
        if name.startswith(("ctk", "Q")) or (name.startswith("q") and name[1:2].isupper() and not name.startswith(("qSlicer", "qMRML"))):
            problems.append(f"{where}: Qt/CTK classes live in the qt / ctk modules, not in slicer")
        elif name in submodules:
            if len(chain) > 2 and chain[2] not in submodules[name]:
                problems.append(f"{where}.{chain[2]} is not defined in Slicer's slicer/{name}")
        elif name == "app":
            if len(chain) > 2 and chain[2] not in API["slicer_app"]:
                problems.append(f"{where}.{chain[2]} is not in the checked list of slicer.app members")
        elif name in known:
            continue
        elif name.startswith("vtk") and name in core:
            continue  # a real MRML / Slicer logic class (checked against the slicer-core wheel)
        else:
            problems.append(f"{where} does not exist in Slicer's slicer namespace")
    for line, chain in _attribute_chains(tree, "ctk"):
        cls = chain[1]
        if cls not in API["ctk"]:
            problems.append(f"{_rel(path)}:{line}: ctk.{cls} is not in the checked list of CTK classes")
        elif len(chain) > 2 and chain[2] not in API["ctk"][cls]["members"]:
            problems.append(f"{_rel(path)}:{line}: ctk.{cls}.{chain[2]} is not a member of {API['ctk'][cls]['file']}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slicer."):
            sub = node.module.split(".")[1]
            if sub not in submodules:
                problems.append(f"{_rel(path)}:{node.lineno}: slicer.{sub} is not a Slicer submodule in the checked list")
                continue
            for alias in node.names:
                if alias.name not in submodules[sub]:
                    problems.append(f"{_rel(path)}:{node.lineno}: {alias.name} is not defined in slicer.{sub}")
    return problems


def test_api_list_names_its_sources():
    assert re.match(r"Slicer/Slicer [0-9a-f]{40} \d{4}-\d\d-\d\d$", API["slicer_source"])
    assert re.match(r"commontk/CTK [0-9a-f]{40} \d{4}-\d\d-\d\d$", API["ctk_source"])
    for name in ("errorDisplay", "tryWithErrorDisplay", "pip_install", "loadUI", "VTKObservationMixin"):
        assert name in API["slicer_util"]


def test_the_namespace_rule_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import slicer, ctk\n"
        "a = slicer.ctkPathLineEdit().Files\n"          # the bug of issue 15 item 1
        "b = slicer.QTimer()\n"
        "c = slicer.util.noSuchHelper()\n"
        "d = slicer.vtkMRMLNoSuchNode()\n"
        "e = ctk.ctkPathLineEdit.NoSuchFilter\n"
        "from slicer.util import noSuchName\n",
        encoding="utf-8",
    )
    problems = slicer_namespace_problems_at(bad)
    assert len(problems) == 6, problems
    for line, what in ((2, "slicer.ctkPathLineEdit: Qt/CTK classes live in the qt / ctk modules"), (3, "slicer.QTimer: Qt/CTK"),
                       (4, "slicer.util.noSuchHelper is not defined"), (5, "slicer.vtkMRMLNoSuchNode does not exist"),
                       (6, "ctk.ctkPathLineEdit.NoSuchFilter is not a member"), (7, "noSuchName is not defined in slicer.util")):
        assert any(p.startswith(f"bad.py:{line}: ") and what in p for p in problems), (line, what, problems)
    good = tmp_path / "good.py"
    good.write_text(
        "import slicer, ctk\n"
        "a = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Readable\n"
        "b = slicer.util.errorDisplay\nc = slicer.vtkMRMLScalarVolumeNode\nd = slicer.mrmlScene.GetFirstNodeByClass\n",
        encoding="utf-8",
    )
    assert slicer_namespace_problems_at(good) == []


def slicer_namespace_problems_at(path: Path) -> list[str]:
    """:func:`slicer_namespace_problems` for a file outside the repository (rule self-test)."""
    global _rel
    saved = _rel
    _rel = lambda p: p.name  # noqa: E731
    try:
        return slicer_namespace_problems(path)
    finally:
        _rel = saved


@pytest.mark.parametrize("path", SLICER_FILES, ids=_rel)
def test_every_slicer_and_ctk_name_exists_in_slicer(path):
    problems = slicer_namespace_problems(path)
    assert not problems, "\n".join(problems)
