"""SemiSAMTrain self-test, run inside 3D Slicer (Reload and Test, or ctest via
slicer_add_python_unittest).

On a tiny phantom cohort (3 labeled + 1 unlabeled + 1 validation volume, a 4 x 32 x 32
training grid) it checks what only a real Slicer has: the widget shows the training config's
defaults; training started through the module logic runs as a ``PythonSlicer`` child process
while the GUI keeps processing events, and ends ``finished`` with ``best.pt`` and every phase
done; Stop interrupts a second run and Resume finishes it without repeating an epoch; the
chart nodes hold one row per epoch; "Use this model" puts ``best.pt`` first in SemiSAM
Segment's student setting. The first run embeds 20 slices with the real LiteMedSAM encoder
(a minute or two on a CPU); later runs reuse the embedding cache.
"""

import shutil
import time
from pathlib import Path

import qt
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

#: Seconds a tiny training may take (the first one embeds every slice on a CPU).
RUN_TIMEOUT = 900.0


def tiny_overrides(phases=(1, 1, 1)):
    """A seconds-long schedule on a small grid (dotted config keys)."""
    warmup, semi, finetune = phases
    return {
        "preprocess.target_spacing": [1.5, 1.5, 4.0],
        "preprocess.target_shape": [4, 32, 32],
        "student.channels": [16, 8],
        "student.block_depth": 4,
        "pseudo.refresh_every": 1,
        "pseudo.inplane_views": False,
        "validation.hd95": False,
        "phases.warmup.epochs": warmup, "phases.warmup.lr": 0.005,
        "phases.semi.epochs": semi, "phases.semi.lr": 0.003,
        "phases.finetune.epochs": finetune, "phases.finetune.lr": 0.001,
        "device": "cpu",
    }


class SemiSAMTrainSelfTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()
        self.work = Path(slicer.app.temporaryPath) / "SemiSAMTrainSelfTest"

    def runTest(self):
        self.setUp()
        self.test_widget_shows_the_config_defaults()
        self.test_train_stop_resume_and_use_the_model()

    # ------------------------------------------------------------------ helpers

    def _cohort(self) -> Path:
        from semisam.phantom import write_cohort

        cohort = self.work / "cohort"
        if not (cohort / "dataset.json").is_file():
            write_cohort(cohort, 4, 3, validation=1, overwrite=True)
        return cohort

    def _config(self, name, phases):
        from SemiSAMTrainLib import settings

        overrides = tiny_overrides(phases)
        overrides["data.cache_dir"] = str(self.work / "cache")
        output = self.work / name
        if output.exists():
            shutil.rmtree(output)
        output.mkdir(parents=True)
        path = output / settings.CONFIG_NAME
        settings.write_training_config(path, self._cohort(), output, overrides)
        return path, output

    def _pump(self, run, until, timeout=RUN_TIMEOUT):
        """Poll the run and keep Slicer's event loop going until ``until(events)`` or the end."""
        events = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            new = run.poll()
            events.extend(new)
            if until(new) or run.state.terminal:
                return events
            # Qt's event loop for 50 ms, as in a user's session (no sleeping outside it)
            loop = qt.QEventLoop()
            qt.QTimer.singleShot(50, loop.quit)
            loop.exec_()
        run.kill()
        self.fail(f"training still {run.state.value} after {timeout:.0f} s; stderr tail:\n" + "\n".join(run.stderr_tail))

    # ------------------------------------------------------------------ tests

    def test_widget_shows_the_config_defaults(self):
        from SemiSAMSegment import ensureRequirements
        from SemiSAMTrainLib.settings import gui_values

        if not ensureRequirements():
            if slicer.app.testingEnabled():
                self.skipTest("SemiSAM's Python packages (torch, ...) are not installed; testing mode installs nothing")
            self.fail("SemiSAM's Python requirements are missing")
        self.delayDisplay("Widget defaults")
        widget = slicer.modules.semisamtrain.widgetRepresentation().self()
        widget.logic.applyDefaults(widget._parameterNode)
        defaults = gui_values()
        self.assertEqual(widget._parameterNode.warmupEpochs, defaults["warmupEpochs"])
        self.assertEqual(widget.ui.semiEpochsSpinBox.value, defaults["semiEpochs"])
        self.assertAlmostEqual(widget.ui.semiLrSpinBox.value, defaults["semiLr"], places=6)
        self.assertAlmostEqual(widget.ui.uThSpinBox.value, defaults["uTh"], places=4)
        self.assertFalse(widget.ui.stopButton.enabled)

    def test_train_stop_resume_and_use_the_model(self):
        from SemiSAMTrainLib import runner
        from SemiSAMTrainLib.chart import series_columns

        logic = slicer.modules.semisamtrain.widgetRepresentation().self().logic
        self.delayDisplay("Training a tiny student in a child process")
        config, output = self._config("run", (1, 1, 1))
        run = logic.startTraining(config)
        self.assertEqual(run.state, runner.RunState.RUNNING)
        self.assertTrue(Path(run.command()[0]).name.startswith("PythonSlicer"), f"the child must run in Slicer's Python: {run.command()}")
        events = self._pump(run, lambda new: False)
        self.assertEqual(run.state, runner.RunState.FINISHED, run.reason)
        self.assertTrue((output / "best.pt").is_file())
        self.assertEqual(run.best_checkpoint, output / "best.pt")
        last = run.progress.last_phase
        self.assertEqual(last, 2)
        self.assertTrue(all(p.state == "done" for p in run.progress.phases.values()))
        self.assertEqual(run.progress.current_phase, last)
        self.assertEqual([r["global_epoch"] for r in run.progress.history], [1, 2, 3])
        self.assertTrue(any(isinstance(e, runner.EpochEvent) and e.val_dice is not None for e in events))
        table, chart = logic.updateChart(run.progress.history)
        self.assertEqual(table.GetTable().GetNumberOfRows(), 3)
        self.assertIn("val dice", series_columns(chart))

        self.delayDisplay("Stop, then Resume")
        config2, output2 = self._config("stop_resume", (2, 3, 1))
        run2 = logic.startTraining(config2)
        self._pump(run2, lambda new: any(isinstance(e, runner.EpochEvent) for e in new))
        self.assertEqual(run2.state, runner.RunState.RUNNING, run2.reason)
        run2.stop()
        self._pump(run2, lambda new: False, timeout=120)
        self.assertEqual(run2.state, runner.RunState.STOPPED, run2.reason)
        self.assertTrue((output2 / "last.pt").is_file())
        run2.start(resume=True)
        self._pump(run2, lambda new: False)
        self.assertEqual(run2.state, runner.RunState.FINISHED, run2.reason)
        from semisam.progress import read_metrics

        self.assertEqual([r["global_epoch"] for r in read_metrics(output2 / "metrics.jsonl")], list(range(1, 7)))

        self.delayDisplay("Use this model")
        path = logic.useModel(output / "best.pt")
        stored = qt.QSettings().value("SemiSAM/StudentCheckpoint")
        first = stored if isinstance(stored, str) else list(stored)[0]
        self.assertEqual(first, path)
        self.delayDisplay("Test passed")
