"""SemiSAMSegment self-test, run inside 3D Slicer (Reload and Test, or ctest via
slicer_add_python_unittest): load a phantom, one-click segment it with a student, refine it
with one click through the SemiSAM Segment Editor effect, and check Dice against the phantom's
label at each step.

The student comes from ``$SEMISAM_TEST_STUDENT`` when set (then the one-click Dice must
exceed 0.7); otherwise an untrained student on the real LiteMedSAM encoder checks the plumbing
only (no training in a self-test). Without SemiSAM's packages in ``--testing`` mode nothing is
installed and the test is skipped with a message. Waiting for the worker goes through the
same Qt event loop and GIL-yielding poller as a user's session (:func:`waitUntil`).
"""

import os
from pathlib import Path

import numpy as np
import qt
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest


def dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * (a & b).sum() / total)


def test_student():
    """``(checkpoint, trained)``: $SEMISAM_TEST_STUDENT, or an untrained plumbing student."""
    env = os.environ.get("SEMISAM_TEST_STUDENT")
    if env:
        return Path(env), True
    from semisam.models.student import SlicingSAM3D, StudentConfig
    from semisam.preprocess import PreprocessConfig

    path = Path(slicer.app.temporaryPath) / "SemiSAMSelfTest" / "untrained_student.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    config = PreprocessConfig(target_shape=(4, 64, 64), target_spacing=(1.5, 1.5, 3.0))
    SlicingSAM3D(StudentConfig(channels=(8, 4), block_depth=4, num_labels=1)).save(
        path, extra={"preprocess": config.to_dict(), "labels": {"0": "background", "1": "target"}})
    return path, False


def waitUntil(condition, timeout_s=120.0):
    """Run Qt's event loop (as in a user's session: the effect's poller ticks from its timers
    and yields the GIL to the worker) until ``condition()`` or the timeout. True if met."""
    loop = qt.QEventLoop()
    check = qt.QTimer()
    check.connect("timeout()", lambda: loop.quit() if condition() else None)
    check.start(50)
    deadline = qt.QTimer()
    deadline.setSingleShot(True)
    deadline.connect("timeout()", loop.quit)
    deadline.start(int(timeout_s * 1000))
    if not condition():
        loop.exec_()
    check.stop()
    deadline.stop()
    return bool(condition())


class SemiSAMSegmentSelfTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_effect_is_registered()
        self.test_one_click_then_click_refinement()

    def test_effect_is_registered(self):
        self.delayDisplay("SemiSAM effect registration")
        factory = slicer.qSlicerSegmentEditorEffectFactory.instance()
        names = [factory.registeredEffects()[i].name for i in range(len(factory.registeredEffects()))]
        self.assertIn("SemiSAM", names)

    def test_one_click_then_click_refinement(self):
        from SemiSAMSegment import ensureRequirements
        from SemiSAMSegmentLib import mrml
        from SemiSAMSegmentLib.logic import SemiSAMSegmentLogic
        from semisam.demo import make_test_cases

        if not ensureRequirements():
            if slicer.app.testingEnabled():
                self.skipTest("SemiSAM's Python packages (torch, ...) are not installed; testing mode installs nothing")
            self.fail("SemiSAM's Python requirements are missing")
        case = make_test_cases(1, seed=0)[0]
        volumeNode = mrml.node_from_volume(case.image, "SemiSAM test phantom")
        truth = case.label.array > 0

        self.delayDisplay("One-click segmentation")
        logic = SemiSAMSegmentLogic()
        student, trained = test_student()
        segmentationNode, uncertaintyNode = logic.process(volumeNode, student, device="auto", uncertainty=True)
        segmentId = segmentationNode.GetSegmentation().GetNthSegmentID(0)
        first = mrml.segment_array(segmentationNode, segmentId, volumeNode)
        d1 = dice(first, truth)
        self.delayDisplay(f"One-click Dice {d1:.3f}")
        if trained:
            self.assertGreater(d1, 0.7)
        self.assertIsNotNone(uncertaintyNode)
        self.assertEqual(slicer.util.arrayFromVolume(uncertaintyNode).shape, truth.shape)

        self.delayDisplay("One click with the SemiSAM effect")
        z, (row, col), positive = self._worst_error(first > 0, truth)
        editorWidget = slicer.qMRMLSegmentEditorWidget()
        editorWidget.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editorWidget.setMRMLSegmentEditorNode(editorNode)
        editorWidget.setSegmentationNode(segmentationNode)
        editorWidget.setSourceVolumeNode(volumeNode) if hasattr(editorWidget, "setSourceVolumeNode") else editorWidget.setMasterVolumeNode(volumeNode)
        editorNode.SetSelectedSegmentID(segmentId)
        editorWidget.setActiveEffectByName("SemiSAM")
        effect = editorWidget.activeEffect()
        self.assertIsNotNone(effect)
        sliceWidget = slicer.app.layoutManager().sliceWidget("Red")
        sliceNode = sliceWidget.mrmlSliceNode()
        sliceNode.SetOrientation("Axial")
        xy = self._xy_of_voxel(sliceNode, volumeNode, (col, row, z))
        effect.self().onClick(sliceWidget, xy, positive)
        self.assertTrue(waitUntil(lambda: not effect.self().busy), "the click's proposal did not arrive within 2 minutes")
        effect.self().onApply()
        second = mrml.segment_array(segmentationNode, segmentId, volumeNode)
        self.assertEqual((effect.self()._interaction.axis, effect.self()._interaction.index), (0, z), "the axial view should edit slice z")
        self.assertEqual(bool(second[z, row, col]), positive, "the clicked voxel does not follow the click")
        d2 = dice(second, truth)
        self.delayDisplay(f"Dice after one click {d2:.3f} (before {d1:.3f})")
        if trained:
            self.assertGreater(d2, 0.7)
        editorWidget.setActiveEffect(None)
        self.delayDisplay("Test passed")

    @staticmethod
    def _worst_error(pred, truth):
        """The axial slice with most wrong voxels, the centre of its largest error region, and
        whether a + click (missed) or a − click (wrongly included) fixes it."""
        from scipy import ndimage

        wrong = pred != truth
        z = int(np.argmax(wrong.sum(axis=(1, 2))))
        parts, n = ndimage.label(wrong[z])
        sizes = np.bincount(parts.ravel())[1:]
        region = parts == (int(np.argmax(sizes)) + 1)
        depth = ndimage.distance_transform_edt(region)
        row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
        return z, (int(row), int(col)), bool(truth[z, row, col])

    @staticmethod
    def _xy_of_voxel(sliceNode, volumeNode, ijk):
        """Centre the slice view on voxel ``ijk`` and return its view xy."""
        import vtk

        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        ras = ijkToRas.MultiplyPoint((*[float(v) for v in ijk], 1.0))[:3]
        sliceNode.JumpSliceByCentering(*ras)
        rasToXy = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Invert(sliceNode.GetXYToRAS(), rasToXy)
        xy = rasToXy.MultiplyPoint((*ras, 1.0))
        return (int(round(xy[0])), int(round(xy[1])))
