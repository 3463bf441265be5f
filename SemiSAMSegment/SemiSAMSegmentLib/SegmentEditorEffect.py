"""The "SemiSAM" Segment Editor effect: + / − clicks and boxes on any slice view, a previewed
proposal with Apply / Cancel (undoable), and propagation to neighbouring slices or the volume.

Thin: view events become calls on :class:`SemiSAMSegmentLib.interaction.SliceInteraction`
(prompt state), :mod:`SemiSAMSegmentLib.mrml` (view xy → voxel, segment writes) and a
:class:`SemiSAMSegmentLib.worker.ModelWorker` whose thread owns a
:class:`SemiSAMSegmentLib.refine.Refiner` (LiteMedSAM with a per-slice embedding cache; MedSAM2
for propagation when its checkpoint is configured). The GUI polls the worker with a QTimer.

Mouse: left click = + click (Shift+left = − click) in "click" mode; left drag = box (in any
mode). Keys: Enter = Apply, Escape = Cancel, Backspace = undo the last prompt.
"""

import logging
import os

import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

HERE = os.path.dirname(os.path.abspath(__file__))
DRAG_PIXELS = 5  # a press and release further apart than this is a box


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """SemiSAM: SAM-family clicks and boxes with 3D propagation."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "SemiSAM"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self._worker = None
        self._interaction = None
        self._volumeKey = None
        self._pending = None  # (future, kind)
        self._progress = (0, 0)
        self._press = None  # (viewWidget, xy) of a left-button press
        self._previewNode = None
        self._timer = qt.QTimer()
        self._timer.setInterval(50)
        self._timer.connect("timeout()", self._poll)

    # -------------------------------------------------------------- what the editor calls

    def register(self):
        slicer.qSlicerSegmentEditorEffectFactory.instance().registerEffect(self.scriptedEffect)

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        path = os.path.join(HERE, "..", "Resources", "Icons", "SegmentEditorSemiSAM.png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self):
        return (
            "<html>SAM-family interactive segmentation of the selected segment.<p>"
            "<b>Left click</b>: add a + click (<b>Shift+click</b>: − click). <b>Drag</b>: draw a box. "
            "Each prompt refines a preview on that slice; <b>Apply</b> (Enter) writes it into the segment, "
            "<b>Cancel</b> (Esc) drops it. <b>Propagate</b> extends the applied slice to its neighbours or the whole "
            "volume (MedSAM2 when its checkpoint is in the models folder, otherwise LiteMedSAM slice by slice).</html>"
        )

    def setupOptionsFrame(self):
        self.clickModeButton = qt.QRadioButton("+ / − clicks")
        self.clickModeButton.toolTip = "Left click: + click; Shift+left click: − click. Dragging draws a box in any mode."
        self.negativeModeButton = qt.QRadioButton("− clicks")
        self.negativeModeButton.toolTip = "Left click: − click (remove what is wrongly included)"
        self.boxModeButton = qt.QRadioButton("box")
        self.boxModeButton.toolTip = "Drag a box around the structure"
        self.clickModeButton.checked = True
        modes = qt.QHBoxLayout()
        for b in (self.clickModeButton, self.negativeModeButton, self.boxModeButton):
            modes.addWidget(b)
        self.scriptedEffect.addLabeledOptionsWidget("Prompt:", modes)

        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.toolTip = "Write the preview into the selected segment (Enter)"
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.toolTip = "Drop the preview and this slice's prompts (Esc)"
        row = qt.QHBoxLayout()
        row.addWidget(self.applyButton)
        row.addWidget(self.cancelButton)
        self.scriptedEffect.addOptionsWidget(row)

        self.neighboursSpinBox = qt.QSpinBox()
        self.neighboursSpinBox.minimum = 1
        self.neighboursSpinBox.maximum = 1000
        self.neighboursSpinBox.value = 5
        self.neighboursSpinBox.toolTip = "Slices on each side for 'Propagate to neighbours'"
        self.propagateNeighboursButton = qt.QPushButton("Propagate to neighbours")
        self.propagateVolumeButton = qt.QPushButton("Propagate through the volume")
        prop = qt.QHBoxLayout()
        prop.addWidget(self.neighboursSpinBox)
        prop.addWidget(self.propagateNeighboursButton)
        self.scriptedEffect.addLabeledOptionsWidget("Slices:", prop)
        self.scriptedEffect.addOptionsWidget(self.propagateVolumeButton)

        self.progressBar = qt.QProgressBar()
        self.progressBar.hide()
        self.stopButton = qt.QPushButton("Stop")
        self.stopButton.hide()
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        self.scriptedEffect.addOptionsWidget(self.stopButton)
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        self.applyButton.connect("clicked()", self.onApply)
        self.cancelButton.connect("clicked()", self.onCancel)
        self.propagateNeighboursButton.connect("clicked()", lambda: self.onPropagate(self.neighboursSpinBox.value))
        self.propagateVolumeButton.connect("clicked()", lambda: self.onPropagate(None))
        self.stopButton.connect("clicked()", self.onStop)
        self._updateButtons()

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor

    def activate(self):
        self._ensureWorker()

    def deactivate(self):
        self.onCancel()

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("Neighbours", 5)

    def updateGUIFromMRML(self):
        self.neighboursSpinBox.blockSignals(True)
        self.neighboursSpinBox.value = self.scriptedEffect.integerParameter("Neighbours")
        self.neighboursSpinBox.blockSignals(False)

    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter("Neighbours", self.neighboursSpinBox.value)

    def sourceVolumeNodeChanged(self):
        self.onCancel()
        self._volumeKey = None

    masterVolumeNodeChanged = sourceVolumeNodeChanged  # Slicer < 5.4

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        if eventId == vtk.vtkCommand.KeyPressEvent:
            key = callerInteractor.GetKeySym()
            if key in ("Return", "KP_Enter"):
                self.onApply()
                return True
            if key == "Escape":
                self.onCancel()
                return True
            if key == "BackSpace":
                return self.onUndoPrompt()
            return False
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            self._press = (viewWidget, callerInteractor.GetEventPosition(), callerInteractor.GetShiftKey())
            return True
        if eventId == vtk.vtkCommand.MouseMoveEvent and self._press is not None:
            return True  # a drag in progress: keep the view from panning
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent and self._press is not None:
            pressView, start, shift = self._press
            self._press = None
            if pressView is not viewWidget:
                return True
            end = callerInteractor.GetEventPosition()
            moved = max(abs(end[0] - start[0]), abs(end[1] - start[1]))
            with slicer.util.tryWithErrorDisplay("SemiSAM could not use this prompt.", waitCursor=False):
                if moved > DRAG_PIXELS or self.boxModeButton.checked:
                    self.onBox(viewWidget, start, end)
                else:
                    positive = self.clickModeButton.checked and not shift
                    self.onClick(viewWidget, start, positive)
            return True
        return False

    # -------------------------------------------------------------- prompts

    def _nodes(self):
        p = self.scriptedEffect.parameterSetNode()
        source = p.GetSourceVolumeNode() if hasattr(p, "GetSourceVolumeNode") else p.GetMasterVolumeNode()
        return p.GetSegmentationNode(), p.GetSelectedSegmentID(), source

    def _ensureWorker(self):
        if self._worker is None:
            from SemiSAMSegmentLib.refine import Refiner
            from SemiSAMSegmentLib.worker import ModelWorker

            device = "cuda" if _cudaAvailable() else "cpu"
            self._worker = ModelWorker(lambda: Refiner(device), name="SemiSAM effect worker")
        return self._worker

    def _prepareVolume(self):
        """The source volume's voxels for the worker (read here: MRML is not thread-safe)."""
        from SemiSAMSegmentLib import interaction, mrml

        segmentationNode, segmentId, source = self._nodes()
        if source is None or segmentationNode is None or not segmentId:
            raise ValueError("select a source volume and a segment first")
        image = source.GetImageData()
        key = (source.GetID(), image.GetMTime() if image is not None else 0)
        volume = None
        if key != self._volumeKey or self._interaction is None:
            volume = mrml.volume_from_node(source)
            self._interaction = interaction.SliceInteraction(volume.shape)
            self._volumeKey = key
        return segmentationNode, segmentId, source, key, volume

    def _previousMask(self, axis, index):
        from SemiSAMSegmentLib import mrml

        segmentationNode, segmentId, source = self._nodes()
        return mrml.segment_array(segmentationNode, segmentId, source).take(index, axis) > 0

    def onClick(self, viewWidget, xy, positive):
        from SemiSAMSegmentLib import mrml

        segmentationNode, segmentId, source, key, volume = self._prepareVolume()
        sliceNode = viewWidget.sliceLogic().GetSliceNode()
        axis, index, row, col = mrml.slice_xy_to_plane_rc(sliceNode, source, xy)
        previous = None
        if (axis, index) != (self._interaction.axis, self._interaction.index):
            previous = self._previousMask(axis, index)
        self._interaction.add_click(axis, index, row, col, positive, previous=previous)
        self._submitPredict(key, volume)

    def onBox(self, viewWidget, start, end):
        from SemiSAMSegmentLib import mrml

        segmentationNode, segmentId, source, key, volume = self._prepareVolume()
        sliceNode = viewWidget.sliceLogic().GetSliceNode()
        a0, i0, r0, c0 = mrml.slice_xy_to_plane_rc(sliceNode, source, start)
        a1, i1, r1, c1 = mrml.slice_xy_to_plane_rc(sliceNode, source, end)
        if (a0, i0) != (a1, i1):
            raise ValueError("the box's corners fall on different slices: draw it within one slice view")
        previous = self._previousMask(a0, i0) if (a0, i0) != (self._interaction.axis, self._interaction.index) else None
        self._interaction.set_box(a0, i0, (r0, c0), (r1, c1), previous=previous)
        self._submitPredict(key, volume)

    def onUndoPrompt(self):
        if self._interaction is None or not self._interaction.undo_prompt():
            return False
        if self._interaction.has_prompts:
            self._submitPredict(self._volumeKey, None)
        else:
            self._clearPreview()
        return True

    def _submitPredict(self, key, volume):
        spacing = tuple(volume.spacing) if volume is not None else None
        array = volume.array if volume is not None else None
        request = self._interaction.request()

        def job(refiner, cancel):
            if array is not None:
                refiner.set_volume(array, spacing, key=key)
            return refiner.predict(**request)

        self._start(self._ensureWorker().submit(job, key="predict"), ("slice", request["axis"], request["index"]))
        self.statusLabel.text = "Thinking..." if volume is None else "Embedding this slice (once), then predicting..."

    # -------------------------------------------------------------- propagation

    def onPropagate(self, neighbours):
        with slicer.util.tryWithErrorDisplay("SemiSAM could not propagate.", waitCursor=False):
            segmentationNode, segmentId, source, key, volume = self._prepareVolume()
            inter = self._interaction
            if inter.axis is None:
                raise ValueError("click or draw a box on a slice first, then Apply, then propagate from that slice")
            mask = inter.proposal[inter.region].reshape(inter.plane_shape(inter.axis)) if inter.proposal is not None else self._previousMask(inter.axis, inter.index)
            axis, index = inter.axis, inter.index
            spacing = tuple(volume.spacing) if volume is not None else None
            array = volume.array if volume is not None else None
            self._progress = (0, 0)

            def job(refiner, cancel):
                if array is not None:
                    refiner.set_volume(array, spacing, key=key)
                return refiner.propagate(axis, index, mask, slices=neighbours, progress=self._setProgress, cancel=cancel.is_set)

            self._start(self._worker.submit(job), ("volume",))
            self.progressBar.setValue(0)
            self.progressBar.show()
            self.stopButton.show()
            self.statusLabel.text = "Propagating..."

    def _setProgress(self, done, total):  # worker thread: numbers only
        self._progress = (done, total)

    def onStop(self):
        if self._worker is not None:
            self._worker.cancel()

    # -------------------------------------------------------------- results

    def _start(self, future, kind):
        self._pending = (future, kind)
        self._timer.start()
        self._updateButtons()

    def _poll(self):
        done, total = self._progress
        if total and self.progressBar.visible:
            self.progressBar.setValue(int(100 * done / total))
        if self._pending is None:
            self._timer.stop()
            return
        future, kind = self._pending
        if not future.done():
            return
        self._pending = None
        self._timer.stop()
        self.progressBar.hide()
        self.stopButton.hide()
        self._updateButtons()
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self.statusLabel.text = f"Failed: {exc}"
            logging.error(f"SemiSAM effect: {exc}")
            return
        mask = future.result()
        if kind[0] == "slice":
            if (kind[1], kind[2]) != (self._interaction.axis, self._interaction.index):
                return  # the user moved on to another slice
            self._interaction.set_slice_proposal(mask)
            self.statusLabel.text = f"Preview: {int(mask.sum())} pixels on this slice. Apply (Enter) or keep clicking."
        else:
            self._interaction.set_volume_proposal(mask)
            self.statusLabel.text = f"Preview: {int(mask.sum())} voxels through {int(mask.any(axis=(1, 2)).sum()) if mask.ndim == 3 else 0} slice(s). Apply or Cancel."
        self._showPreview()
        self._updateButtons()

    def _showPreview(self):
        from SemiSAMSegmentLib import mrml

        segmentationNode, segmentId, source = self._nodes()
        if self._previewNode is None or self._previewNode.GetScene() is None:
            self._previewNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "SemiSAM preview")
            self._previewNode.SetHideFromEditors(True)
            self._previewNode.CreateDefaultDisplayNodes()
            display = self._previewNode.GetDisplayNode()
            display.SetOpacity2DFill(0.25)
            display.SetOpacity2DOutline(1.0)
        mrml.write_labels_to_segmentation(self._interaction.proposal.astype("uint8"), source, self._previewNode,
                                          names={1: "SemiSAM proposal"}, colors={1: (1.0, 0.85, 0.1)})

    def _clearPreview(self):
        if self._previewNode is not None and self._previewNode.GetScene() is not None:
            slicer.mrmlScene.RemoveNode(self._previewNode)
        self._previewNode = None

    def onApply(self):
        with slicer.util.tryWithErrorDisplay("SemiSAM could not apply the proposal.", waitCursor=True):
            from SemiSAMSegmentLib import mrml

            if self._interaction is None or self._interaction.proposal is None:
                return
            segmentationNode, segmentId, source = self._nodes()
            self.scriptedEffect.saveStateForUndo()
            mask, region = self._interaction.commit()
            changed = mrml.modify_segment(segmentationNode, segmentId, source, mask, "replace", region=region)
            self._clearPreview()
            self.statusLabel.text = f"Applied: {changed} voxel(s) changed. Undo with Ctrl+Z."
            self._updateButtons()

    def onCancel(self):
        if self._worker is not None and self._pending is not None:
            self._worker.cancel()
        self._pending = None
        if self._interaction is not None:
            self._interaction.cancel()
        self._clearPreview()
        if hasattr(self, "statusLabel"):
            self.statusLabel.text = ""
            self._updateButtons()

    def _updateButtons(self):
        if not hasattr(self, "applyButton"):
            return
        has = self._interaction is not None and self._interaction.proposal is not None
        busy = self._pending is not None
        self.applyButton.enabled = has and not busy
        self.cancelButton.enabled = has or busy or (self._interaction is not None and self._interaction.has_prompts)
        plane = self._interaction is not None and self._interaction.axis is not None
        self.propagateNeighboursButton.enabled = plane and not busy
        self.propagateVolumeButton.enabled = plane and not busy


def _cudaAvailable():
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
