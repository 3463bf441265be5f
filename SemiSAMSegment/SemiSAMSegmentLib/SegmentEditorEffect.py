"""The "SemiSAM" Segment Editor effect: + / − clicks and boxes on any slice view, a previewed
proposal with Apply / Cancel (undoable), and propagation to neighbouring slices or the volume.

Thin: view events become calls on :class:`SemiSAMSegmentLib.interaction.SliceInteraction`
(prompt state), :mod:`SemiSAMSegmentLib.mrml` (view xy → voxel, segment writes) and a
:class:`SemiSAMSegmentLib.worker.ModelWorker` whose thread owns a
:class:`SemiSAMSegmentLib.refine.Refiner` (LiteMedSAM with a per-slice embedding cache; MedSAM2
for propagation when its checkpoint is configured). The GUI polls the worker from a single-shot
QTimer through :class:`SemiSAMSegmentLib.jobs.GilYieldingPoller`, which yields the GIL to the
worker while a job runs (see jobs.py for why). Every callback reports its exceptions
(:func:`SemiSAMSegmentLib.jobs.reportErrors`). Apply goes through the Segment Editor's
``modifySelectedSegmentByLabelmap``, so its masking and overwrite settings apply.

Mouse: left click = + click (Shift+left = − click) in "click" mode; left drag = box (in any
mode). Keys: Enter = Apply, Escape = Cancel, Backspace = undo the last prompt.

Prefetch: while the worker is idle it embeds, at the lowest priority, the slices next to the
one just segmented and, when the user scrolls the view under the mouse, the slice shown there
and its neighbours (``Refiner.prefetch``), so that the first click there finds its embedding.
Any click cancels a running prefetch at once (``ModelWorker.submit_idle``); the poller keeps
yielding the GIL while a prefetch runs.
"""

import logging
import os

import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect
from SemiSAMSegmentLib.jobs import GilYieldingPoller, outcome, reportErrors

HERE = os.path.dirname(os.path.abspath(__file__))
DRAG_PIXELS = 5  # a press and release further apart than this is a box
PREFETCH_DELAY_MS = 150  # after the last scroll step, prefetch around the slice shown


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
        self._volume = None  # the source volume's voxels for _volumeKey, sent with every job
        self._pending = None  # (future, kind)
        self._progress = (0, 0)
        self._press = None  # (viewWidget, xy) of a left-button press
        self._previewNode = None
        self._stopRequested = False
        self._timer = qt.QTimer()
        self._timer.setSingleShot(True)
        self._timer.connect("timeout()", self._tick)
        self._poller = GilYieldingPoller(self._poll, self._timer.start)
        self._hoverView = None  # the slice view under the mouse
        self._prefetchFuture = None
        self._scrollTimer = qt.QTimer()
        self._scrollTimer.setSingleShot(True)
        self._scrollTimer.connect("timeout()", self._onScrolled)

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

    @reportErrors("SemiSAM: the effect's options could not be built.")
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

        self.neighboursSpinBox.connect("valueChanged(int)", self.updateMRMLFromGUI)
        self.applyButton.connect("clicked()", self.onApply)
        self.cancelButton.connect("clicked()", self.onCancel)
        self.propagateNeighboursButton.connect("clicked()", lambda: self.onPropagate(self.neighboursSpinBox.value))
        self.propagateVolumeButton.connect("clicked()", lambda: self.onPropagate(None))
        self.stopButton.connect("clicked()", self.onStop)
        self._updateButtons()

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor

    @reportErrors("SemiSAM could not start.")
    def activate(self):
        # The same one-confirmation install as the module, before anything imports torch.
        self._ensureWorker()

    @reportErrors("SemiSAM: could not deactivate the effect.")
    def deactivate(self):
        self.onCancel()

    def cleanup(self):
        """Slicer deletes the effect (or reloads the module): stop the poller and the worker."""
        self._poller.stop()
        self._timer.stop()
        self._scrollTimer.stop()
        self._prefetchFuture = None
        if self._worker is not None:
            self._worker.shutdown(wait=False)
            self._worker = None
        self._pending = None
        self._clearPreview()

    @reportErrors("SemiSAM: could not set the effect's defaults.")
    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("Neighbours", 5)

    @reportErrors("SemiSAM: could not update the effect's options.")
    def updateGUIFromMRML(self):
        self.neighboursSpinBox.blockSignals(True)
        self.neighboursSpinBox.value = self.scriptedEffect.integerParameter("Neighbours")
        self.neighboursSpinBox.blockSignals(False)

    @reportErrors("SemiSAM: could not store the effect's options.")
    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter("Neighbours", self.neighboursSpinBox.value)

    @reportErrors("SemiSAM: could not switch to the new source volume.")
    def sourceVolumeNodeChanged(self):
        self.onCancel()
        self._volumeKey = None
        self._volume = None

    masterVolumeNodeChanged = sourceVolumeNodeChanged  # Slicer < 5.4

    @reportErrors("SemiSAM could not handle this mouse or key event.", default=False)
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
        if eventId == vtk.vtkCommand.MouseMoveEvent and self._press is None:
            self._hoverView = viewWidget  # scrolling this view prefetches its slice
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
            if moved > DRAG_PIXELS or self.boxModeButton.checked:
                self.onBox(viewWidget, start, end)
            else:
                positive = self.clickModeButton.checked and not shift
                self.onClick(viewWidget, start, positive)
            return True
        return False

    @reportErrors("SemiSAM could not follow the slice view.")
    def processViewNodeEvents(self, callerViewNode, eventId, viewWidget):
        """A slice node changed (scroll, pan, zoom): when it is the view under the mouse,
        prefetch around the slice it shows once the scrolling pauses."""
        if self._worker is None or viewWidget is not self._hoverView:
            return
        if callerViewNode is None or not callerViewNode.IsA("vtkMRMLSliceNode"):
            return
        self._scrollTimer.start(PREFETCH_DELAY_MS)

    @reportErrors("SemiSAM could not prefetch the slice under the mouse.")
    def _onScrolled(self):
        from SemiSAMSegmentLib import mrml

        view = self._hoverView
        segmentationNode, segmentId, source = self._nodes()
        if view is None or source is None:
            return
        try:
            axis, index = mrml.slice_plane(view.sliceLogic().GetSliceNode(), source)
        except ValueError:  # an oblique view or a slice outside the volume: nothing to embed
            return
        self._prefetch(axis, index)

    def _prefetch(self, axis, index):
        """Embed slice ``index`` along ``axis`` and its neighbours while the worker is idle.
        Only for the volume the worker already has (a new volume goes with the next click)."""
        if self._worker is None or self._pending is not None:
            return
        segmentationNode, segmentId, source = self._nodes()
        image = source.GetImageData() if source is not None else None
        if image is None or (source.GetID(), image.GetMTime()) != self._volumeKey:
            return

        def job(refiner, cancel):
            return refiner.prefetch(axis, index, cancel=cancel.is_set)

        self._prefetchFuture = self._worker.submit_idle(job)
        self._poller.start()  # the worker needs the GIL while it prefetches

    def _prefetching(self):
        return self._prefetchFuture is not None and not self._prefetchFuture.done()

    # -------------------------------------------------------------- prompts

    def _nodes(self):
        p = self.scriptedEffect.parameterSetNode()
        source = p.GetSourceVolumeNode() if hasattr(p, "GetSourceVolumeNode") else p.GetMasterVolumeNode()
        return p.GetSegmentationNode(), p.GetSelectedSegmentID(), source

    def _ensureWorker(self):
        """The model worker, built after SemiSAM's requirements are confirmed installed (one
        dialog, as in the module). torch is imported in the worker thread, never here."""
        if self._worker is None:
            import importlib.util

            from SemiSAMSegment import ensureRequirements

            if not ensureRequirements(slicer.util.mainWindow()):
                raise RuntimeError("SemiSAM's Python packages are not installed (see the dialog or the Python console); "
                                   "activate the effect again to install them")
            from SemiSAMSegmentLib.refine import Refiner, medsam2_checkpoint
            from SemiSAMSegmentLib.worker import ModelWorker

            medsam2 = None
            if medsam2_checkpoint() is not None:  # MedSAM2 is optional: sam2 only when its checkpoint is there
                if importlib.util.find_spec("sam2") is not None or ensureRequirements(slicer.util.mainWindow(), extras=("medsam2",)):
                    medsam2 = "auto"
                else:
                    self._status("MedSAM2's package (sam2) is not installed: propagation uses LiteMedSAM slice by slice.")
            backend = str(qt.QSettings().value("SemiSAM/EncoderBackend", "auto") or "auto")  # chosen in SemiSAM Segment
            self._worker = ModelWorker(lambda: Refiner(_bestDevice(), medsam2=medsam2, backend=backend), name="SemiSAM effect worker")
        return self._worker

    def _status(self, text):
        if hasattr(self, "statusLabel"):
            self.statusLabel.text = text
        logging.info(f"SemiSAM effect: {text}")

    def _prepareVolume(self):
        """The source volume's voxels for the worker (read here: MRML is not thread-safe), read
        again only when the volume changed. Every job carries them: a job may be superseded by
        the next click before it starts, and the worker must still get the volume
        (``Refiner.set_volume`` with the same key keeps its embeddings and costs nothing)."""
        from SemiSAMSegmentLib import interaction, mrml

        segmentationNode, segmentId, source = self._nodes()
        if source is None or segmentationNode is None or not segmentId:
            raise ValueError("select a source volume and a segment first")
        image = source.GetImageData()
        key = (source.GetID(), image.GetMTime() if image is not None else 0)
        if key != self._volumeKey or self._interaction is None or self._volume is None:
            self._volume = mrml.volume_from_node(source)
            self._interaction = interaction.SliceInteraction(self._volume.shape)
            self._volumeKey = key
        return segmentationNode, segmentId, source, key, self._volume

    def _previousMask(self, axis, index):
        from SemiSAMSegmentLib import mrml

        segmentationNode, segmentId, source = self._nodes()
        return mrml.segment_array(segmentationNode, segmentId, source).take(index, axis) > 0

    @reportErrors("SemiSAM could not use this click.")
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

    @reportErrors("SemiSAM could not use this box.")
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

    @reportErrors("SemiSAM could not undo the last prompt.", default=False)
    def onUndoPrompt(self):
        if self._interaction is None or not self._interaction.undo_prompt():
            return False
        if self._interaction.has_prompts:
            self._submitPredict(self._volumeKey, self._volume)
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
        self.statusLabel.text = "Predicting (a slice seen for the first time is embedded first, once)..."

    # -------------------------------------------------------------- propagation

    @reportErrors("SemiSAM could not propagate.")
    def onPropagate(self, neighbours):
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

        self._start(self._ensureWorker().submit(job), ("volume",))
        self.progressBar.setValue(0)
        self.progressBar.show()
        self.stopButton.show()
        self.statusLabel.text = "Propagating..."

    def _setProgress(self, done, total):  # worker thread: numbers only
        self._progress = (done, total)

    @reportErrors("SemiSAM could not stop.")
    def onStop(self):
        self._stopRequested = True
        if self._worker is not None:
            self._worker.cancel()
        self._status("Stopping...")

    # -------------------------------------------------------------- results

    def _start(self, future, kind):
        self._pending = (future, kind)
        self._stopRequested = False
        self._poller.start()
        self._updateButtons()

    @property
    def busy(self):
        """True while a prompt or a propagation is being computed (self-tests wait on it)."""
        return self._pending is not None

    @reportErrors("SemiSAM: the model's answer could not be shown.")
    def _tick(self):
        self._poller.tick()

    def _poll(self):
        """One poller tick: progress, and the result once the job is done. True while a job or
        a prefetch is pending."""
        pending = self._pollJob()
        return pending or self._prefetching()

    def _pollJob(self):
        done, total = self._progress
        if total and self.progressBar.visible:
            self.progressBar.setValue(int(100 * done / total))
        if self._pending is None:
            return False
        future, kind = self._pending
        if not future.done():
            return True
        self._pending = None
        self.progressBar.hide()
        self.stopButton.hide()
        self._updateButtons()
        state, exc = outcome(future)
        if state == "cancelled":
            self._status("Cancelled.")
            return False
        if state == "failed":
            self._status(f"Failed: {exc}")
            from SemiSAMSegmentLib.jobs import show_error

            show_error("SemiSAM: the model failed.", exc)
            return False
        self._showResult(future.result(), kind)
        return False

    def _showResult(self, mask, kind):
        if kind[0] == "slice":
            if (kind[1], kind[2]) != (self._interaction.axis, self._interaction.index):
                return  # the user moved on to another slice
            self._interaction.set_slice_proposal(mask)
            self.statusLabel.text = f"Preview: {int(mask.sum())} pixels on this slice. Apply (Enter) or keep clicking."
            self._showPreview()
            self._updateButtons()
            self._prefetch(kind[1], kind[2])  # the neighbours, while the user looks at the preview
            return
        else:
            self._interaction.set_volume_proposal(mask)
            stopped = "Stopped early: preview of the slices done so far. " if self._stopRequested else "Preview: "
            self.statusLabel.text = f"{stopped}{int(mask.sum())} voxels through {int(mask.any(axis=(1, 2)).sum()) if mask.ndim == 3 else 0} slice(s). Apply or Cancel."
        self._showPreview()
        self._updateButtons()

    def _showPreview(self):
        from SemiSAMSegmentLib import mrml

        segmentationNode, segmentId, source = self._nodes()
        # Under the source volume's parent transform, like the proposal's voxels.
        self._previewNode = mrml.preview_node(self._previewNode, source)
        mrml.write_labels_to_segmentation(self._interaction.proposal.astype("uint8"), source, self._previewNode,
                                          names={1: "SemiSAM proposal"}, colors={1: (1.0, 0.85, 0.1)}, present=[1])

    def _clearPreview(self):
        if self._previewNode is not None and self._previewNode.GetScene() is not None:
            slicer.mrmlScene.RemoveNode(self._previewNode)
        self._previewNode = None

    @reportErrors("SemiSAM could not apply the proposal.")
    def onApply(self):
        from SemiSAMSegmentLib import mrml

        if self._interaction is None or self._interaction.proposal is None:
            return
        segmentationNode, segmentId, source = self._nodes()
        with slicer.util.WaitCursor():
            # Through the editor, so that its editable area, intensity range and overwrite
            # settings apply: remove the region's voxels outside the proposal, then add it.
            remove, add = mrml.proposal_modifiers(self._interaction.proposal, self._interaction.region, source)
            self.scriptedEffect.saveStateForUndo()
            mask, region = self._interaction.commit()
            modes = slicer.qSlicerSegmentEditorAbstractEffect
            self.scriptedEffect.modifySelectedSegmentByLabelmap(remove, modes.ModificationModeRemove)
            self.scriptedEffect.modifySelectedSegmentByLabelmap(add, modes.ModificationModeAdd)
        self._clearPreview()
        self.statusLabel.text = "Applied (within the editor's masking settings). Undo with Ctrl+Z."
        self._updateButtons()

    @reportErrors("SemiSAM could not cancel.")
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


def _bestDevice():
    """cuda when usable, else cpu. Called in the worker thread (the factory): importing torch
    takes seconds and must not happen on the GUI thread."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
