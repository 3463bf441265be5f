"""What 3D Slicer's application does at start-up, headless, on the ``slicer-core`` wheel.

The wheel gives real MRML classes and module logics but no application: no
``slicer.mrmlScene``, no ``slicer.modules``, no logics wired to a scene. :func:`start` does the
wiring the app does (DESIGN.md §7) once per process:

* a ``vtkMRMLScene``, published as ``slicer.mrmlScene``;
* ``vtkSlicerApplicationLogic`` on it (which adds the selection and interaction singletons);
* module logics, each given the scene and the application logic and registered under its
  module name: Colors (the application logic's ``vtkMRMLColorLogic`` with the default colour
  tables; ``vtkSlicerColorLogic`` would want share files the wheel lacks), Volumes, Data (it
  removes a deleted node's display and storage nodes, as in the app; without it every
  ``slicer.util.updateSegmentBinaryLabelmapFromArray`` leaves a display node behind) and
  Segmentations (``SetMRMLScene`` registers the four segmentation converter rules);
* the slice orientation presets (Axial, Sagittal, Coronal; radiological) on the scene's
  default slice node, so slice nodes added to the scene accept ``SetOrientation``;
* ``slicer.modules.<name>.logic()`` for ``colors``, ``volumes``, ``data``, ``segmentations``
  (what ``slicer.util`` calls).

:func:`clear_scene` empties the scene between tests and keeps the logics. Importing this
module (no ``slicer`` import yet) puts the Slicer module folders on ``sys.path`` so tests can
``import SemiSAMSegmentLib``.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

REPO = Path(__file__).resolve().parents[1]
#: Slicer module folders whose ``<Module>Lib`` packages the tests import.
MODULE_DIRS = (REPO / "SemiSAMSegment",)

for _folder in MODULE_DIRS:
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))


@dataclass
class SlicerApp:
    """The headless application: its scene, application logic and module logics by name."""

    scene: Any
    app_logic: Any
    logics: Dict[str, Any] = field(default_factory=dict)

    def logic(self, name: str):
        """A module logic by module name (``"Segmentations"``, ...)."""
        return self.logics[name]

    def clear(self) -> None:
        """Remove every node but the singletons (colour tables, selection, interaction) and the
        subject hierarchy."""
        clear_scene()


_APP: Optional[SlicerApp] = None


def start() -> SlicerApp:
    """Set the headless application up (once per process) and return it."""
    global _APP
    if _APP is not None:
        _publish(_APP)
        return _APP
    import slicer

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)

    colors = app_logic.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.SetMRMLApplicationLogic(app_logic)
    colors.AddDefaultColorNodes()

    logics = {"Colors": colors}
    for module, cls in (
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Data", slicer.vtkSlicerDataModuleLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
    ):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        logics[module] = logic
    for module, logic in logics.items():
        app_logic.SetModuleLogic(module, logic)

    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    _APP = SlicerApp(scene, app_logic, logics)
    _publish(_APP)
    return _APP


def _publish(app: SlicerApp) -> None:
    """The globals ``slicer.util`` reads: ``slicer.mrmlScene`` and ``slicer.modules``."""
    import slicer

    slicer.mrmlScene = app.scene
    slicer.modules = types.SimpleNamespace(
        **{name.lower(): types.SimpleNamespace(name=name, logic=(lambda logic=logic: logic)) for name, logic in app.logics.items()}
    )


def clear_scene() -> None:
    """Empty the scene (singletons stay) and restore what the app restores after closing a
    scene: the subject hierarchy node (else the first segment export adds it) and the colours."""
    import slicer

    app = start()
    app.scene.Clear(0)
    slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(app.scene)
    if app.scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is None:
        app.logics["Colors"].AddDefaultColorNodes()


# ------------------------------------------------------------------ stand-ins for the GUI kits


class _Signal:
    """What a PythonQt object's ``connect(signal, slot)`` records; :meth:`emit` calls the
    slots with the signal's arguments, as PythonQt does."""


class FakeQSettings:
    """``qt.QSettings``: application settings shared by every instance (``FakeQSettings.store``)."""

    store: dict = {}

    def value(self, key, default=None):
        return self.store.get(key, default)

    def setValue(self, key, value):
        self.store[key] = value


class FakeQObject:
    """A stand-in for any PythonQt widget, layout or timer: it records ``connect`` calls
    (``emit(signal, *args)`` calls the slots) and accepts any property."""

    def __init__(self, *args, **kwargs):
        self.__dict__["_slots"] = {}
        self.__dict__["_props"] = {"visible": True, "enabled": True, "checked": False, "value": 0, "text": ""}
        self.__dict__["started"] = []
        self.__dict__["stopped"] = 0

    def connect(self, signal, slot):
        self._slots.setdefault(signal, []).append(slot)
        return True

    def emit(self, signal, *args):
        for slot in self._slots.get(signal, []):
            slot(*args)

    def __getattr__(self, name):
        if name in self._props:
            return self._props[name]
        return lambda *a, **k: None

    def __setattr__(self, name, value):
        self._props[name] = value

    # QTimer
    def start(self, ms=0):
        self.started.append(ms)

    def stop(self):
        self.__dict__["stopped"] += 1

    # QWidget
    def show(self):
        self._props["visible"] = True

    def hide(self):
        self._props["visible"] = False

    def setValue(self, value):
        self._props["value"] = value


def fake_qt_modules():
    """``{"qt": ..., "SegmentEditorEffects": ...}`` stand-ins, enough to import and drive
    ``SegmentEditorEffect.py`` without Qt (put them in ``sys.modules``)."""
    qt = types.ModuleType("qt")
    for name in ("QTimer", "QRadioButton", "QPushButton", "QHBoxLayout", "QSpinBox", "QProgressBar", "QLabel", "QIcon"):
        setattr(qt, name, type(name, (FakeQObject,), {}))
    qt.QSettings = FakeQSettings
    effects = types.ModuleType("SegmentEditorEffects")

    class AbstractScriptedSegmentEditorEffect:
        def __init__(self, scriptedEffect):
            self.scriptedEffect = scriptedEffect

    effects.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
    return {"qt": qt, "SegmentEditorEffects": effects}


class FakeScriptedEffect:
    """The C++ side of a scripted Segment Editor effect, on real MRML: its parameter node is a
    real ``vtkMRMLSegmentEditorNode`` and ``modifySelectedSegmentByLabelmap`` goes through the
    real ``vtkSlicerSegmentEditorLogic`` (masking and overwrite settings included)."""

    def __init__(self, editor_node):
        import slicer

        self.name = ""
        self.perSegment = False
        self.requireSegments = False
        self._editor = editor_node
        self._logic = slicer.vtkSlicerSegmentEditorLogic()
        self._logic.SetMRMLScene(editor_node.GetScene())
        self._logic.SetSegmentEditorNode(editor_node)
        self.parameters = {}
        self.undo_states = 0

    def parameterSetNode(self):
        return self._editor

    def saveStateForUndo(self):
        self.undo_states += 1

    def modifySelectedSegmentByLabelmap(self, labelmap, mode, bypassMasking=False):
        e = self._editor
        self._logic.ModifySegmentByLabelmap(e.GetSegmentationNode(), e.GetSelectedSegmentID(), labelmap, mode, [0, -1, 0, -1, 0, -1], True, bypassMasking)

    def addOptionsWidget(self, widget):
        pass

    def addLabeledOptionsWidget(self, label, widget):
        pass

    def setParameter(self, name, value):
        self.parameters[name] = value

    def setParameterDefault(self, name, value):
        self.parameters.setdefault(name, value)

    def integerParameter(self, name):
        return int(self.parameters[name])


def fake_slicer_gui_names():
    """What the effect reaches in ``slicer`` beyond MRML: the effect enum class (with the real
    logic's mode values) and ``slicer.util.WaitCursor``/``mainWindow`` no-ops."""
    import contextlib

    import slicer

    logic = slicer.vtkSlicerSegmentEditorLogic
    modes = types.SimpleNamespace(ModificationModeSet=logic.ModificationModeSet, ModificationModeAdd=logic.ModificationModeAdd,
                                  ModificationModeRemove=logic.ModificationModeRemove)
    return {"qSlicerSegmentEditorAbstractEffect": modes}, {"WaitCursor": contextlib.nullcontext, "mainWindow": lambda: None}
