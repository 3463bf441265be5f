"""Static checks of the Slicer extension (3D Slicer itself cannot run here): CMake file lists,
.ui names used by the widgets, parameter-node bindings, byte-compilation, the Segment Editor
effect's interface, and the in-Slicer requirements against pyproject's pins."""

from __future__ import annotations

import ast
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(p.parent.name for p in REPO.glob("*/CMakeLists.txt") if (p.parent / f"{p.parent.name}.py").is_file())


def cmake_list(text: str, variable: str, module: str = "") -> list[str]:
    """Entries of ``set(VARIABLE ...)`` with ``${MODULE_NAME}`` expanded."""
    m = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert m, f"set({variable} ...) not found"
    entries = [e for e in m.group(1).split() if not e.startswith("#")]
    return [e.replace("${MODULE_NAME}", module) for e in entries]


def ui_widgets(path: Path) -> dict[str, ET.Element]:
    root = ET.parse(path).getroot()
    return {w.get("name"): w for w in root.iter("widget")} | {l.get("name"): l for l in root.iter("layout")}


def test_there_are_modules():
    assert "SemiSAMSegment" in MODULES


def test_top_level_cmake_declares_the_extension_and_every_module():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({key}\s", text), f"{key} missing from CMakeLists.txt"
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"?PyTorch', text)
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text
    subdirs = re.findall(r"^add_subdirectory\((\w+)\)", text, re.M)
    assert sorted(subdirs) == MODULES


def test_core_package_files_are_all_installed():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set(cmake_list(text, "SEMISAM_CORE_SCRIPTS"))
    present = {p.relative_to(REPO).as_posix() for p in (REPO / "semisam").rglob("*.py")}
    assert listed == present, f"not listed: {sorted(present - listed)}; listed but absent: {sorted(listed - present)}"
    for res in cmake_list(text, "SEMISAM_CORE_RESOURCES"):
        assert (REPO / res).is_file(), res


@pytest.mark.parametrize("module", MODULES)
def test_module_cmake_lists_every_file(module):
    folder = REPO / module
    text = (folder / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set(cmake_list(text, "MODULE_PYTHON_SCRIPTS", module)) | set(cmake_list(text, "MODULE_PYTHON_RESOURCES", module))
    present = {
        p.relative_to(folder).as_posix() for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.parts[len(folder.parts)] != "Testing" and p.name != "CMakeLists.txt"
    }
    assert listed == present, f"not listed in {module}/CMakeLists.txt: {sorted(present - listed)}; listed but absent: {sorted(listed - present)}"
    assert f"NAME ${{MODULE_NAME}}" in text and f"set(MODULE_NAME {module})" in text
    tests = folder / "Testing" / "Python"
    assert tests.is_dir(), f"{module} has no Testing/Python self-tests"
    registered = re.findall(r"slicer_add_python_unittest\(SCRIPT\s+\$\{CMAKE_CURRENT_SOURCE_DIR\}/(\S+)\)", (tests / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert registered and all((tests / r).is_file() for r in registered)
    assert sorted(registered) == sorted(p.name for p in tests.glob("*.py"))


@pytest.mark.parametrize("module", MODULES)
def test_module_python_byte_compiles(module, tmp_path):
    for path in (REPO / module).rglob("*.py"):
        py_compile.compile(str(path), cfile=str(tmp_path / (path.name + "c")), doraise=True)


@pytest.mark.parametrize("module", MODULES)
def test_every_ui_name_used_exists(module):
    source = (REPO / module / f"{module}.py").read_text(encoding="utf-8")
    ui = REPO / module / "Resources" / "UI" / f"{module}.ui"
    names = ui_widgets(ui)
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the widget uses no .ui names?"
    missing = sorted(used - set(names))
    assert not missing, f"{module}.py uses self.ui.{missing} which {ui.name} does not define"


@pytest.mark.parametrize("module", MODULES)
def test_parameter_node_bindings_match_the_wrapper(module):
    """Every SlicerParameterName in the .ui is a field of the module's parameterNodeWrapper class."""
    tree = ast.parse((REPO / module / f"{module}.py").read_text(encoding="utf-8"))
    wrappers = [n for n in tree.body if isinstance(n, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in n.decorator_list)]
    assert len(wrappers) == 1, "one @parameterNodeWrapper class expected"
    fields = {s.target.id for s in wrappers[0].body if isinstance(s, ast.AnnAssign)}
    root = ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui").getroot()
    bound = {p.find("string").text for p in root.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound and bound <= fields, f"bound in the .ui but not in the wrapper: {sorted(bound - fields)}"


@pytest.mark.parametrize("module", MODULES)
def test_lib_imports_exist(module):
    """``from <Module>Lib.x import ...`` / ``from <Module>Lib import x`` refer to real files."""
    lib = REPO / module / f"{module}Lib"
    for path in (REPO / module).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(f"{module}Lib"):
                parts = node.module.split(".")[1:]
                if parts:
                    assert (lib / ("/".join(parts) + ".py")).is_file(), f"{path.name}: {node.module} does not exist"
                else:
                    for alias in node.names:
                        assert (lib / f"{alias.name}.py").is_file(), f"{path.name}: {module}Lib.{alias.name} does not exist"


def test_segment_editor_effect_implements_what_the_editor_calls():
    path = REPO / "SemiSAMSegment" / "SemiSAMSegmentLib" / "SegmentEditorEffect.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegmentEditorEffect")
    assert any(getattr(b, "id", None) == "AbstractScriptedSegmentEditorEffect" for b in cls.bases)
    methods = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}
    signatures = {
        "__init__": ["self", "scriptedEffect"], "clone": ["self"], "icon": ["self"], "helpText": ["self"],
        "setupOptionsFrame": ["self"], "createCursor": ["self", "widget"], "activate": ["self"], "deactivate": ["self"],
        "processInteractionEvents": ["self", "callerInteractor", "eventId", "viewWidget"],
        "setMRMLDefaults": ["self"], "updateGUIFromMRML": ["self"], "updateMRMLFromGUI": ["self"],
    }
    for name, args in signatures.items():
        assert name in methods, f"SegmentEditorEffect lacks {name}()"
        assert [a.arg for a in methods[name].args.args] == args, f"{name} has the wrong signature"
    init = ast.unparse(methods["__init__"])
    assert "scriptedEffect.name = 'SemiSAM'" in init or 'scriptedEffect.name = "SemiSAM"' in init
    assert "saveStateForUndo" in ast.unparse(methods["onApply"]), "Apply must save the editor's undo state first"
    # clone() must point the copy at this very file
    assert "setPythonSource(__file__" in ast.unparse(methods["clone"])
    # registration at start-up from the module
    module = (REPO / "SemiSAMSegment" / "SemiSAMSegment.py").read_text(encoding="utf-8")
    assert 'slicer.app.connect("startupCompleted()", registerEffect)' in module
    assert "SegmentEditorEffect.py" in module


def test_in_slicer_requirements_match_pyproject():
    import tomllib

    pins = {}
    for dep in tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]:
        name, _, version = dep.partition("==")
        pins[name.strip().lower()] = version.strip()
    import sys

    sys.path.insert(0, str(REPO / "SemiSAMSegment"))
    try:
        from SemiSAMSegmentLib import dependencies
    finally:
        sys.path.pop(0)
    reqs = dependencies.read_requirements() + [r for f in dependencies.EXTRAS.values() for r in dependencies.read_requirements(f)]
    for name, spec in reqs:
        if spec is not None and spec.startswith(">="):  # shipped by Slicer: the tested pin must satisfy the bound
            assert dependencies._release(pins[name.lower()]) >= dependencies._release(spec[2:]), f"{name}{spec} excludes the tested {pins[name.lower()]}"
        else:
            assert pins.get(name.lower()) == spec, f"{name}=={spec} in requirements but pyproject pins {pins.get(name.lower())}"
    listed = {n.lower() for n, _ in reqs} | {p.lower() for p in dependencies.PROTECTED}
    assert set(pins) <= listed, f"pyproject dependencies missing from the requirements files: {sorted(set(pins) - listed)}"


def test_core_never_imports_slicer_or_qt():
    for path in (REPO / "semisam").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                assert n.split(".")[0] not in ("slicer", "qt", "ctk", "vtk"), f"{path} imports {n}"


def test_lib_logic_is_qt_free():
    """Everything in <Module>Lib except the effect (which is GUI by nature) stays Qt-free."""
    for module in MODULES:
        for path in (REPO / module / f"{module}Lib").glob("*.py"):
            if path.name == "SegmentEditorEffect.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                for n in names:
                    assert n.split(".")[0] not in ("qt", "ctk"), f"{path} imports {n}"
