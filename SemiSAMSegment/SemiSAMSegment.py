"""SemiSAMSegment: one-click segmentation of 3D ultrasound with a trained SemiSAM student, the
uncertainty as an overlay, export (.nii.gz / .nrrd / DICOM SEG), and the "SemiSAM" Segment
Editor effect (clicks and boxes, propagation) registered at start-up.

This file only wires the GUI to the parameter node and to ``SemiSAMSegmentLib`` (Qt-free
logic tested with pytest against real MRML); the model runs on one persistent worker thread.
"""

import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import ctk
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.util import VTKObservationMixin

from SemiSAMSegmentLib.jobs import GilYieldingPoller, outcome, reportErrors

MODULE_DIR = Path(__file__).resolve().parent
EFFECT_SOURCE = MODULE_DIR / "SemiSAMSegmentLib" / "SegmentEditorEffect.py"


class SemiSAMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SemiSAM Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["SemiSAM developers"]
        self.parent.helpText = (
            "One-click segmentation of a 3D ultrasound volume with a SemiSAM student (trained semi-supervised with "
            "SAM-family teachers), a per-voxel uncertainty overlay, and export to NIfTI, NRRD or DICOM SEG. "
            "Refine the result in the Segment Editor with the <b>SemiSAM</b> effect: + and − clicks and boxes on any "
            "slice view, then propagate through the volume."
        )
        self.parent.acknowledgementText = "Built on segment-anything, LiteMedSAM (MedSAM), SAM 2, SAM-Med3D, MONAI and highdicom."
        slicer.app.connect("startupCompleted()", registerEffect)


@reportErrors("SemiSAM: the Segment Editor effect could not be registered.")
def registerEffect():
    """Register the SemiSAM Segment Editor effect (called once Slicer has started)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    factory = slicer.qSlicerSegmentEditorEffectFactory.instance()
    if "SemiSAM" in [factory.registeredEffects()[i].name for i in range(len(factory.registeredEffects()))]:
        return
    effect = effects.qSlicerSegmentEditorScriptedEffect(None)
    effect.setPythonSource(str(EFFECT_SOURCE).replace("\\", "/"))
    effect.self().register()


def ensureRequirements(parent=None, extras=()) -> bool:
    """Check SemiSAM's Python requirements; install what is missing after ONE confirmation that
    lists everything. torch comes from the PyTorch extension; Slicer's own packages are kept.
    ``extras``: optional groups (``"medsam2"``: the sam2 package, built from source).

    In testing mode (``slicer.app.testingEnabled()``) nothing is installed: missing packages
    make it return False after logging what is missing (self-tests skip on that)."""
    from SemiSAMSegmentLib import dependencies

    plan = dependencies.plan(extras=extras)
    if plan.conflicts:
        slicer.util.errorDisplay("SemiSAM cannot use this Slicer's Python packages:\n" + "\n".join(plan.conflicts))
        return False
    if not plan.needed:
        return True
    if slicer.app.testingEnabled():
        logging.warning("SemiSAM: testing mode, nothing is installed; missing:\n" + plan.summary())
        return False
    if not slicer.util.confirmOkCancelDisplay(plan.summary(), "SemiSAM: install Python packages", parent=parent):
        return False
    with slicer.util.WaitCursor():
        if plan.torch:
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay("SemiSAM needs the PyTorch extension for torch: install 'PyTorch' from the Extensions Manager, restart Slicer and try again.")
                return False
            torch_logic = PyTorchUtils.PyTorchUtilsLogic()
            if not torch_logic.torchInstalled():
                torch = torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=dependencies.TORCH_REQUIREMENT)
                if torch is None:
                    slicer.util.errorDisplay("PyTorch could not be installed; see the Python console for pip's output.")
                    return False
        plan = dependencies.plan(extras=extras)  # torch may have brought some of them
        if plan.pip:
            constraints = dependencies.write_constraints(plan, Path(slicer.app.temporaryPath))
            packaging = _slicerPackaging()
            if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer >= 5.12
                from packaging.requirements import Requirement

                packaging.pip_ensure([Requirement(spec) for spec in plan.pip], constraints=str(constraints), prompt_install=False, requester="SemiSAM")
            else:  # older Slicer: plain pip, constrained to Slicer's own versions. A list, not one
                # string: a string is shlex.split, which eats the backslashes of a Windows path.
                slicer.util.pip_install(plan.pip_arguments(constraints))
    missing = dependencies.plan(extras=extras)
    if missing.needed:
        slicer.util.errorDisplay("Some packages are still missing after the installation:\n" + missing.summary())
        return False
    return True


def _slicerPackaging():
    """``slicer.packaging`` (Slicer >= 5.12), or None. It is a submodule: ``slicer.packaging``
    is only an attribute once something imported it, so import it here."""
    try:
        import slicer.packaging

        return slicer.packaging
    except ImportError:
        return None


#: Application setting holding the encoder runtime chosen in the module (read by the effect).
BACKEND_SETTING = "SemiSAM/EncoderBackend"

#: Colour table of the uncertainty overlay (one of Slicer's colour files, Base/Logic/Resources/ColorFiles).
UNCERTAINTY_COLOR_FILE = "Inferno.txt"


@parameterNodeWrapper
class SemiSAMSegmentParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    studentCheckpoint: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    backend: Annotated[str, Choice(["auto", "openvino", "onnxruntime", "torch"])] = "auto"
    uncertainty: bool = True
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    uncertaintyVolume: slicer.vtkMRMLScalarVolumeNode


class SemiSAMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._worker = None
        self._job = None  # (Future, SemiSAMSegmentLib.logic.OneClickJob) while a segmentation runs
        self._progress = (0, 0)
        self._cancelled = False
        # A single-shot timer drives the poller: while a job runs it ticks at once again after
        # yielding the GIL to the worker (SemiSAMSegmentLib/jobs.py explains why).
        self._timer = qt.QTimer()
        self._timer.setSingleShot(True)
        self._timer.connect("timeout()", self._tick)
        self._poller = GilYieldingPoller(self._poll, self._timer.start)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SemiSAMSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SemiSAMSegmentLogic()
        self.ui.studentPathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Readable
        self.ui.studentPathLineEdit.nameFilters = ["SemiSAM student (*.pt)"]
        self.ui.studentPathLineEdit.settingKey = "SemiSAM/StudentCheckpoint"
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.refineButton.connect("clicked(bool)", self.onRefineButton)
        self.ui.studentPathLineEdit.connect("currentPathChanged(QString)", self._onStudentChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self._onModelChosen)
        self._fillModelList()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self._poller.stop()
        self._timer.stop()
        if self._worker is not None:
            self._worker.shutdown(wait=False)
            self._worker = None

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    @reportErrors("SemiSAM: could not react to the scene being closed.")
    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    @reportErrors("SemiSAM: could not react to the scene being closed.")
    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first
        if not self._parameterNode.studentCheckpoint and self.ui.studentPathLineEdit.currentPath:
            self._parameterNode.studentCheckpoint = self.ui.studentPathLineEdit.currentPath

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _fillModelList(self) -> None:
        """Students in the models folder (``<models>/students/*.pt``) as quick choices."""
        from SemiSAMSegmentLib.logic import student_checkpoints

        self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        self.ui.modelComboBox.addItem("(choose a file below)", "")
        try:
            for path in student_checkpoints():
                self.ui.modelComboBox.addItem(path.stem, str(path))
        except Exception as exc:  # the models folder is optional: say why the list is empty
            logging.warning(f"SemiSAM: cannot list students: {exc}")
            self.ui.statusLabel.text = f"No student list: {exc}"
        self.ui.modelComboBox.blockSignals(False)

    @reportErrors("SemiSAM: could not use the chosen student.")
    def _onModelChosen(self, index: int) -> None:
        path = self.ui.modelComboBox.itemData(index)
        if path:
            self.ui.studentPathLineEdit.currentPath = path

    @reportErrors("SemiSAM: could not use the chosen student.")
    def _onStudentChanged(self, path: str) -> None:
        if self._parameterNode:
            self._parameterNode.studentCheckpoint = path

    @reportErrors("SemiSAM: could not update the buttons.")
    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        ready = bool(p and p.inputVolume and p.studentCheckpoint)
        busy = self._job is not None
        self.ui.applyButton.enabled = ready and not busy
        self.ui.applyButton.toolTip = (
            "Segment the input volume with the student" if ready else "Choose an input volume and a trained student (.pt) first"
        )
        self.ui.exportButton.enabled = bool(p and p.outputSegmentation and p.inputVolume) and not busy

    # -------------------------------------------------------------- one-click

    def _workerInstance(self):
        from SemiSAMSegmentLib.worker import ModelWorker

        if self._worker is None:
            self._worker = ModelWorker(lambda: None, name="SemiSAM one-click worker")
        return self._worker

    @reportErrors("SemiSAM segmentation could not start.")
    def onApplyButton(self) -> None:
        with slicer.util.WaitCursor():
            if not ensureRequirements(slicer.util.mainWindow()):
                return
            from SemiSAMSegmentLib.logic import OneClickJob

            p = self._parameterNode
            # Everything the result belongs to is fixed now: the volume that was submitted (not
            # whatever is selected when the result arrives) and the scene it lives in.
            target = OneClickJob.submit(p.inputVolume, p.outputSegmentation, p.uncertaintyVolume)
            volume = target.volume  # read on the GUI thread (MRML is not thread-safe)
            checkpoint, device, uncertainty, backend = p.studentCheckpoint, p.device, p.uncertainty, p.backend
            qt.QSettings().setValue(BACKEND_SETTING, backend)  # the Segment Editor effect uses the same runtime
            self._cancelled = False
            self._progress = (0, 0)

            def job(_model, cancel_event):
                return self.logic.segment_arrays(volume, checkpoint, device, uncertainty, progress=self._setProgress, cancel=cancel_event.is_set,
                                                 backend=backend)

            self._job = (self._workerInstance().submit(job), target)
            self.ui.progressBar.setValue(0)
            self.ui.progressBar.show()
            self.ui.cancelButton.show()
            self.ui.statusLabel.text = "Embedding slices..."
            self._checkCanApply()
            self._poller.start()

    def _setProgress(self, done: int, total: int) -> None:  # worker thread: only store numbers
        self._progress = (done, total)

    @reportErrors("SemiSAM: could not cancel.")
    def onCancelButton(self) -> None:
        self._cancelled = True
        if self._worker is not None:
            self._worker.cancel()
        self.ui.statusLabel.text = "Cancelling..."

    @reportErrors("SemiSAM: the segmentation's result could not be handled.")
    def _tick(self) -> None:
        self._poller.tick()

    @property
    def busy(self) -> bool:
        """True while a one-click segmentation runs (self-tests wait on it)."""
        return self._job is not None

    def _poll(self) -> bool:
        """One poller tick: progress, and the result once the job is done. True while pending."""
        done, total = self._progress
        if total:
            self.ui.progressBar.setValue(int(100 * done / total))
            self.ui.statusLabel.text = f"Embedding slices: {done} / {total}" if done < total else "Decoding..."
        if self._job is None:
            return False
        future, target = self._job
        if not future.done():
            return True
        self._job = None
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        self._checkCanApply()
        state, exc = outcome(future, self._cancelled)
        if state == "cancelled":
            self.ui.statusLabel.text = "Cancelled."
            return False
        if state == "failed":
            self.ui.statusLabel.text = f"Failed: {exc}"
            from SemiSAMSegmentLib.jobs import show_error

            show_error("SemiSAM segmentation failed.", exc)
            return False
        self._applyResult(future.result(), target)
        return False

    def _applyResult(self, result, target) -> None:
        with slicer.util.WaitCursor():
            written = self.logic.core.apply_job(result, target)
        if written is None:
            self.ui.statusLabel.text = target.dropped_reason()
            return
        seg, unc = written
        p = self._parameterNode
        if p is not None and p.inputVolume is target.volume_node:
            p.outputSegmentation = seg
            if unc is not None:
                p.uncertaintyVolume = unc
        if unc is not None:
            slicer.util.setSliceViewerLayers(background=target.volume_node, foreground=unc, foregroundOpacity=0.4)
            colorId = slicer.vtkMRMLColorLogic.GetFileColorNodeID(UNCERTAINTY_COLOR_FILE)
            if slicer.mrmlScene.GetNodeByID(colorId) is not None:
                unc.GetDisplayNode().SetAndObserveColorNodeID(colorId)
            else:
                logging.warning(f"SemiSAM: colour table {colorId} is not in the scene; the uncertainty keeps the default colours")
        seg.CreateClosedSurfaceRepresentation()
        voxels = int((result.label > 0).sum())
        self.ui.statusLabel.text = f"Done in {result.seconds:.1f} s: {len(result.names)} structure(s), {voxels} voxels in '{seg.GetName()}'."
        if result.refined:
            logging.info(f"SemiSAM Segment: {result.refined}")

    # -------------------------------------------------------------- export / refine

    @reportErrors("Export failed.")
    def onExportButton(self) -> None:
        p = self._parameterNode
        fromDicom = bool(p.inputVolume.GetAttribute("DICOM.instanceUIDs"))
        filters = "NIfTI (*.nii.gz);;NRRD (*.nrrd)" + (";;DICOM SEG (*.dcm)" if fromDicom else "")
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Export segmentation", p.outputSegmentation.GetName() + ".nii.gz", filters)
        if not path:
            return
        database = getattr(slicer, "dicomDatabase", None)
        with slicer.util.WaitCursor():
            written = self.logic.export(p.outputSegmentation, p.inputVolume, path, database.fileForInstance if database else None)
        self.ui.statusLabel.text = f"Exported {written}"

    @reportErrors("SemiSAM: could not open the Segment Editor.")
    def onRefineButton(self) -> None:
        """Open the Segment Editor on the result with the SemiSAM effect active."""
        p = self._parameterNode
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        if p.outputSegmentation:
            editor.setSegmentationNode(p.outputSegmentation)
        if p.inputVolume:
            editor.setSourceVolumeNode(p.inputVolume)
        editor.setActiveEffectByName("SemiSAM")


class SemiSAMSegmentLogic(ScriptedLoadableModuleLogic):
    """The module logic: the parameter node plus SemiSAMSegmentLib's Qt-free logic."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from SemiSAMSegmentLib.logic import SemiSAMSegmentLogic as CoreLogic

        self.core = CoreLogic()

    def getParameterNode(self):
        return SemiSAMSegmentParameterNode(super().getParameterNode())

    def segment_arrays(self, *args, **kwargs):
        return self.core.segment_arrays(*args, **kwargs)

    def apply(self, *args, **kwargs):
        return self.core.apply(*args, **kwargs)

    def process(self, *args, **kwargs):
        return self.core.process(*args, **kwargs)

    def export(self, *args, **kwargs):
        return self.core.export(*args, **kwargs)


def _selfTestModule():
    """Load Testing/Python/SemiSAMSegmentSelfTest.py from the source tree (the extension's install does
    not carry it); None when absent."""
    import importlib.util

    candidate = MODULE_DIR / "Testing" / "Python" / "SemiSAMSegmentSelfTest.py"
    if not candidate.is_file():
        return None
    spec = importlib.util.spec_from_file_location("SemiSAMSegmentSelfTest", candidate)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SemiSAMSegmentTest(ScriptedLoadableModuleTest):
    """What "Reload and Test" runs (ScriptedLoadableModule.runTest looks up <Module>Test): the
    self-test of Testing/Python when this is a source checkout; otherwise it says so and fails
    clearly (never a TypeError from a missing class)."""

    def runTest(self):
        tests = _selfTestModule()
        if tests is None:
            raise AssertionError("SemiSAMSegment's self-tests are not installed with the extension: run them from a source checkout "
                                 "(Testing/Python/SemiSAMSegmentSelfTest.py) or with ctest in a build tree")
        test = tests.SemiSAMSegmentSelfTest()
        test.messageDelay = getattr(self, "messageDelay", 50)
        test.runTest()
