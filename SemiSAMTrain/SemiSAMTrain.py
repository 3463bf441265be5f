"""SemiSAMTrain: configure, launch, monitor, stop and resume Semi-SAM+ training from Slicer.

Training never runs in Slicer's GUI thread: it runs as ``PythonSlicer -m semisam.cli train
--config CFG --progress json`` in a child process that ``SemiSAMTrainLib.runner.TrainingRun``
watches (Qt-free, tested with pytest). This file only wires the GUI to the parameter node and
to that logic: a ``QTimer`` polls the run, fills the progress bars, the metrics line, the log
pane and the chart (MRML table + plot chart, ``SemiSAMTrainLib.chart``). "Use this model"
makes the run's ``best.pt`` SemiSAM Segment's student (the ``SemiSAM/StudentCheckpoint``
setting its path box reads; nothing is copied).

Headless: ``Slicer --no-main-window --python-script scripts/slicer_train.py --config CFG.yaml``.
"""

import os
from pathlib import Path
from typing import Annotated, Optional

import ctk
import qt
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget
from slicer.parameterNodeWrapper import Choice, Decimals, Minimum, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin
from SemiSAMSegmentLib.jobs import reportErrors  # SemiSAM Segment is this module's dependency

MODULE_DIR = Path(__file__).resolve().parent
#: The QSettings key of SemiSAM Segment's student path box (a ctkPathLineEdit history list).
STUDENT_SETTING = "SemiSAM/StudentCheckpoint"
DATASET_SETTING = "SemiSAM/TrainDataset"
OUTPUT_SETTING = "SemiSAM/TrainOutput"
BASE_CONFIG_SETTING = "SemiSAM/TrainBaseConfig"
POLL_MS = 250


class SemiSAMTrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SemiSAM Train"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["SemiSAMSegment"]
        self.parent.contributors = ["SemiSAM developers"]
        self.parent.helpText = (
            "Train a SemiSAM student semi-supervised (Semi-SAM+): a few labeled volumes, many unlabeled ones, SAM-family "
            "teachers whose pseudo-labels are filtered by their variance, an EMA teacher and three phases. Training runs in a "
            "separate process; Stop interrupts it and Resume continues after the last finished epoch. "
            "<b>Use this model</b> hands the best checkpoint to SemiSAM Segment. Headless: "
            "<code>Slicer --no-main-window --python-script scripts/slicer_train.py --config CFG.yaml</code>."
        )
        self.parent.acknowledgementText = "Built on segment-anything, LiteMedSAM (MedSAM), SAM 2, SAM-Med3D and MONAI."


def _configDefaults() -> dict:
    """The GUI fields' defaults from semisam's training config ({} while its packages are missing:
    the widget loads them once the requirements are installed)."""
    try:
        from SemiSAMTrainLib.settings import gui_values

        return gui_values()
    except Exception:  # semisam or PyYAML not importable yet
        return {}


def _guiDevice(device) -> str:
    """The device choice the GUI offers for a config's ``device`` (``cuda:N`` shows as cuda)."""
    if not isinstance(device, str):
        return DEVICES[0]
    return "cuda" if device.startswith("cuda") else device if device in DEVICES else DEVICES[0]


DEVICES = ("auto", "cpu", "cuda")
_D = _configDefaults()


@parameterNodeWrapper
class SemiSAMTrainParameterNode:
    defaultsLoaded: bool = bool(_D)
    warmupEpochs: Annotated[int, Minimum(0)] = _D.get("warmupEpochs", 0)
    warmupLr: Annotated[float, Minimum(0.0), Decimals(6)] = _D.get("warmupLr", 0.0)
    semiEpochs: Annotated[int, Minimum(0)] = _D.get("semiEpochs", 0)
    semiLr: Annotated[float, Minimum(0.0), Decimals(6)] = _D.get("semiLr", 0.0)
    finetuneEpochs: Annotated[int, Minimum(0)] = _D.get("finetuneEpochs", 0)
    finetuneLr: Annotated[float, Minimum(0.0), Decimals(6)] = _D.get("finetuneLr", 0.0)
    lambdaMax: Annotated[float, Minimum(0.0), Decimals(4)] = _D.get("lambdaMax", 0.0)
    betaMax: Annotated[float, Minimum(0.0), Decimals(4)] = _D.get("betaMax", 0.0)
    rampUp: Annotated[float, Minimum(0.0), Decimals(2)] = _D.get("rampUp", 0.0)
    rampDown: Annotated[float, Minimum(0.0), Decimals(2)] = _D.get("rampDown", 0.0)
    emaDecay: Annotated[float, WithinRange(0.0, 0.9999), Decimals(4)] = _D.get("emaDecay", 0.0)
    uTh: Annotated[float, WithinRange(0.0, 0.25), Decimals(4)] = _D.get("uTh", 0.0)
    views: Annotated[int, Minimum(0)] = _D.get("views", 0)
    refreshEvery: Annotated[int, Minimum(0)] = _D.get("refreshEvery", 0)
    batchSize: Annotated[int, Minimum(0)] = _D.get("batchSize", 0)
    validationEvery: Annotated[int, Minimum(0)] = _D.get("validationEvery", 0)
    seed: Annotated[int, Minimum(0)] = _D.get("seed", 0)
    device: Annotated[str, Choice(list(DEVICES))] = _guiDevice(_D.get("device"))
    configPath: str = ""
    teachers: str = ""  # JSON: [[name, checkpoint or ""], ...] of the ticked teachers


class SemiSAMTrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._tableNode = None
        self._chartNode = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self._poll)

    # -------------------------------------------------------------- set-up

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SemiSAMTrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SemiSAMTrainLogic()

        paths = ctk.ctkPathLineEdit  # the Filter enum (CTK Libs/Widgets/ctkPathLineEdit.h)
        self.ui.datasetPathLineEdit.filters = paths.Dirs  # a folder (one holding dataset.json counts); a .json path may be typed
        self.ui.datasetPathLineEdit.settingKey = DATASET_SETTING
        self.ui.outputPathLineEdit.filters = paths.Dirs | paths.Writable
        self.ui.outputPathLineEdit.settingKey = OUTPUT_SETTING
        self.ui.baseConfigPathLineEdit.filters = paths.Files | paths.Readable
        self.ui.baseConfigPathLineEdit.nameFilters = ["Training config (*.yaml *.yml)"]
        self.ui.baseConfigPathLineEdit.settingKey = BASE_CONFIG_SETTING
        self._phaseBars = [self.ui.phase0ProgressBar, self.ui.phase1ProgressBar, self.ui.phase2ProgressBar]
        self._phaseLabels = [self.ui.phase0Label, self.ui.phase1Label, self.ui.phase2Label]
        self.ui.logPlainTextEdit.setMinimumHeight(160)
        self.ui.logPlainTextEdit.font = qt.QFontDatabase.systemFont(qt.QFontDatabase.FixedFont)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.checkDatasetButton.connect("clicked(bool)", self.onCheckDataset)
        self.ui.startButton.connect("clicked(bool)", lambda: self.onStart(resume=False))
        self.ui.resumeButton.connect("clicked(bool)", lambda: self.onStart(resume=True))
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.useModelButton.connect("clicked(bool)", self.onUseModel)
        self.ui.showChartButton.connect("clicked(bool)", self.onShowChart)
        self.ui.resetDefaultsButton.connect("clicked(bool)", self.onResetDefaults)
        self.ui.teacherCheckpointButton.connect("clicked(bool)", self.onChooseTeacherCheckpoint)
        self.ui.teachersTableWidget.connect("itemChanged(QTableWidgetItem*)", self._storeTeachers)
        for edit in (self.ui.datasetPathLineEdit, self.ui.outputPathLineEdit):
            edit.connect("currentPathChanged(QString)", self._updateButtons)
        self.ui.baseConfigPathLineEdit.connect("currentPathChanged(QString)", self.onBaseConfigChanged)
        self.initializeParameterNode()
        self._fillTeachers()
        self._updateButtons()

    def cleanup(self) -> None:
        """Slicer closes or the module reloads: stop a running training (it can be resumed)."""
        self.removeObservers()
        self._timer.stop()
        if self._run is not None and self._run.state.value == "running":
            self._run.stop()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    @reportErrors("SemiSAM Train: could not react to the scene being closed.")
    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self._tableNode = self._chartNode = None

    @reportErrors("SemiSAM Train: could not react to the scene being closed.")
    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.defaultsLoaded:
            self.logic.applyDefaults(self._parameterNode, quiet=True)

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    # -------------------------------------------------------------- teachers table

    def _fillTeachers(self) -> None:
        """One row per catalogue teacher: tick box + name, checkpoint (editable; empty = models folder)."""
        import json

        table = self.ui.teachersTableWidget
        try:
            from SemiSAMTrainLib.settings import teacher_names

            names = teacher_names()
        except Exception as exc:  # semisam not importable yet
            self._log(f"teachers unavailable until SemiSAM's packages are installed ({exc})")
            return
        chosen = {}
        try:
            chosen = {n: c for n, c in json.loads(self._parameterNode.teachers or "[]")}
        except (ValueError, TypeError):
            pass
        if not self._parameterNode.teachers:
            chosen = {"litemedsam": ""}  # the config's default teacher
        table.blockSignals(True)
        table.clear()
        table.setColumnCount(2)
        table.setHorizontalHeaderLabels(["Teacher", "Checkpoint (empty: models folder)"])
        table.setRowCount(len(names))
        for row, name in enumerate(names):
            item = qt.QTableWidgetItem(name)
            item.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
            item.setCheckState(qt.Qt.Checked if name in chosen else qt.Qt.Unchecked)
            table.setItem(row, 0, item)
            table.setItem(row, 1, qt.QTableWidgetItem(chosen.get(name, "")))
        table.horizontalHeader().setStretchLastSection(True)
        table.resizeColumnToContents(0)
        table.blockSignals(False)
        self._storeTeachers()

    def _teachers(self):
        """``[(name, checkpoint or None)]`` of the ticked rows; None while the table is empty
        (the catalogue was not readable): the config's teachers are kept."""
        table = self.ui.teachersTableWidget
        if table.rowCount == 0:
            return None
        out = []
        for row in range(table.rowCount):
            item = table.item(row, 0)
            if item is not None and item.checkState() == qt.Qt.Checked:
                path = table.item(row, 1).text().strip() if table.item(row, 1) else ""
                out.append((item.text(), path or None))
        return out

    @reportErrors("SemiSAM Train: could not store the teachers.")
    def _storeTeachers(self, item=None) -> None:
        import json

        teachers = self._teachers()
        if self._parameterNode and teachers is not None:
            self._parameterNode.teachers = json.dumps([[n, c or ""] for n, c in teachers])

    @reportErrors("SemiSAM Train: could not set the teacher's checkpoint.")
    def onChooseTeacherCheckpoint(self) -> None:
        table = self.ui.teachersTableWidget
        row = table.currentRow()
        if row < 0:
            slicer.util.infoDisplay("Select a teacher in the table first.")
            return
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), f"Checkpoint for {table.item(row, 0).text()}", "",
                                              "Checkpoints (*.pth *.pt *.ckpt);;All files (*)")
        if path:
            table.item(row, 1).setText(path)
            table.item(row, 0).setCheckState(qt.Qt.Checked)

    # -------------------------------------------------------------- dataset, defaults

    def _dataset(self) -> str:
        return self.ui.datasetPathLineEdit.currentPath.strip()

    def _output(self) -> str:
        return self.ui.outputPathLineEdit.currentPath.strip()

    @reportErrors("SemiSAM Train: the dataset could not be checked.", default=False)
    def onCheckDataset(self) -> bool:
        """Validate the dataset (every file read) and show ``semisam validate``'s messages."""
        if not self._ensureRequirements():
            return False
        if not self._dataset():
            slicer.util.errorDisplay("Choose a dataset folder or dataset.json first.")
            return False
        with slicer.util.WaitCursor():
            check = self.logic.checkDataset(self._dataset())
        for line in check.messages:
            self._log(line)
        self.ui.statusLabel.text = check.messages[-1]
        if not check.ok:
            slicer.util.errorDisplay("The dataset cannot be used for training:\n\n" + "\n".join(check.messages[:30]))
        self.ui.datasetPathLineEdit.addCurrentPathToHistory()
        return check.ok

    @reportErrors("SemiSAM Train: could not reset the settings.")
    def onResetDefaults(self) -> None:
        if self._ensureRequirements():
            with slicer.util.WaitCursor():
                self.logic.applyDefaults(self._parameterNode, self.ui.baseConfigPathLineEdit.currentPath or None)

    @reportErrors("SemiSAM Train: could not read the base config.")
    def onBaseConfigChanged(self, path: str) -> None:
        """A base config was chosen: show its values (its other settings are used as they are)."""
        if path and os.path.isfile(path):
            with slicer.util.WaitCursor():
                self.logic.applyDefaults(self._parameterNode, path)
                self._log(f"settings from {path}")

    def _ensureRequirements(self) -> bool:
        try:
            from SemiSAMSegment import ensureRequirements
        except ImportError:  # SemiSAM Segment not loaded: nothing to install with
            return True
        ok = ensureRequirements(slicer.util.mainWindow())
        if ok and self._parameterNode and not self._parameterNode.defaultsLoaded:
            self.logic.applyDefaults(self._parameterNode)
            self._fillTeachers()
        return ok

    # -------------------------------------------------------------- start / stop / resume

    @reportErrors("SemiSAM Train: the training could not start.")
    def onStart(self, resume: bool = False) -> None:
        from SemiSAMTrainLib.runner import has_checkpoint

        if not self._ensureRequirements():
            return
        if not self._dataset() or not self._output():
            slicer.util.errorDisplay("Choose a dataset and an output folder first.")
            return
        if not self.onCheckDataset():
            return
        if not resume and has_checkpoint(self._output()):
            if not slicer.util.confirmYesNoDisplay(f"{self._output()} already holds a training run (last.pt).\n\nResume it?"):
                return
            resume = True
        with slicer.util.WaitCursor():
            configPath, _cfg = self.logic.writeConfig(self._parameterNode, self._dataset(), self._output(), self._teachers(),
                                                      self.ui.baseConfigPathLineEdit.currentPath or None)
            self.ui.outputPathLineEdit.addCurrentPathToHistory()
            self._log(f"config written to {configPath}")
            self._run = self.logic.startTraining(configPath, resume=resume)
            self._resetProgress()
            self.onShowChart()
            self._timer.start()
            self._poll()
        self._updateButtons()

    @reportErrors("SemiSAM Train: could not stop the training.")
    def onStop(self) -> None:
        if self._run is not None and self._run.state.value == "running":
            self._run.stop()
            self.ui.statusLabel.text = "Stopping: the training finishes its current step and keeps the last finished epoch..."
        self._updateButtons()

    def _resetProgress(self) -> None:
        for bar, label in zip(self._phaseBars, self._phaseLabels):
            bar.setValue(0)
            bar.format = "pending"
        self.ui.metricsLabel.text = ""

    # -------------------------------------------------------------- polling

    @reportErrors("SemiSAM Train: could not read the training's progress.")
    def _poll(self) -> None:
        from SemiSAMTrainLib import runner

        run = self._run
        if run is None:
            self._timer.stop()
            return
        events = run.poll()
        chart = False
        for e in events:
            line = describe(e)
            if line:
                self._log(line)
            chart = chart or isinstance(e, (runner.EpochEvent, runner.StartEvent))
        self._showProgress(run.progress)
        if chart:
            self._tableNode, self._chartNode = self.logic.updateChart(run.progress.history, self._tableNode, self._chartNode)
        state = run.state.value
        if state == "running":
            self.ui.statusLabel.text = "Training..." + (" (resumed)" if run.resumed else "")
        elif state == "stopping":
            self.ui.statusLabel.text = "Stopping..."
        elif run.state.terminal:
            self._timer.stop()
            best = run.best_checkpoint
            if state == "finished":
                dice = run.progress.best_val_dice
                self.ui.statusLabel.text = f"Finished: best validation Dice {dice:.3f}; student {best}." if dice is not None else f"Finished: student {best}."
            elif state == "stopped":
                self.ui.statusLabel.text = "Stopped. Resume continues after the last finished epoch."
            else:
                self.ui.statusLabel.text = "Training failed: " + run.reason.splitlines()[0]
                slicer.util.errorDisplay("SemiSAM training failed.", detailedText=run.reason)
        self._updateButtons()

    def _showProgress(self, progress) -> None:
        phases = list(progress.phases.values())
        for i, (bar, label) in enumerate(zip(self._phaseBars, self._phaseLabels)):
            p = phases[i] if i < len(phases) else None
            if p is None:
                continue
            label.text = f"{p.phase} {p.name}"
            bar.setValue(int(round(100 * p.fraction)))
            if p.state == "skipped":
                bar.format = "skipped (0 epochs)"
            else:
                bar.format = f"{p.epoch_text}  %p%" if p.state == "running" else p.state
        m = progress.latest
        parts = []
        if m.losses:
            parts.append("loss " + " ".join(f"{k} {v:.4g}" for k, v in m.losses.items() if v is not None))
        for name, value in (("λ", m.lam), ("β", m.beta), ("lr", m.lr)):
            if value is not None:
                parts.append(f"{name} {value:.3g}")
        if m.val_dice is not None:
            parts.append(f"val Dice {m.val_dice:.3f}")
        if progress.best_val_dice is not None:
            parts.append(f"best {progress.best_val_dice:.3f} (epoch {progress.best_epoch})")
        if progress.fraction is not None:
            parts.append(f"{100 * progress.fraction:.0f}% of the plan")
        if progress.eta_s is not None:
            from semisam.progress import format_duration

            parts.append(f"ETA {format_duration(progress.eta_s)}")
        self.ui.metricsLabel.text = "   ".join(parts)

    def _log(self, text: str) -> None:
        self.ui.logPlainTextEdit.appendPlainText(text)

    @reportErrors("SemiSAM Train: could not update the buttons.")
    def _updateButtons(self, *args) -> None:
        from SemiSAMTrainLib.runner import has_checkpoint

        active = self._run is not None and self._run.state.active
        output = self._output()
        ready = bool(self._dataset() and output)
        self.ui.startButton.enabled = ready and not active
        self.ui.stopButton.enabled = self._run is not None and self._run.state.value == "running"
        self.ui.resumeButton.enabled = ready and not active and bool(output) and has_checkpoint(output)
        self.ui.useModelButton.enabled = not active and bool(output) and (Path(output) / "best.pt").is_file()

    # -------------------------------------------------------------- results

    @reportErrors("SemiSAM Train: could not show the chart.")
    def onShowChart(self) -> None:
        history = self._run.progress.history if self._run is not None else []
        self._tableNode, self._chartNode = self.logic.updateChart(history, self._tableNode, self._chartNode)
        slicer.modules.plots.logic().ShowChartInLayout(self._chartNode)

    @reportErrors("SemiSAM Train: could not hand the model to SemiSAM Segment.")
    def onUseModel(self) -> None:
        best = self._run.best_checkpoint if self._run is not None else None
        if best is None:
            candidate = Path(self._output()) / "best.pt"
            best = candidate if candidate.is_file() else None
        if best is None:
            slicer.util.errorDisplay("There is no best.pt in the output folder yet.")
            return
        self.logic.useModel(best)
        self._log(f"SemiSAM Segment's student is now {best}")
        self.ui.statusLabel.text = f"SemiSAM Segment will use {best}."


def describe(event) -> Optional[str]:
    """One log-pane line for an event (None for the step lines, which only move the bars)."""
    from SemiSAMTrainLib import runner

    if isinstance(event, runner.LogEvent):
        return event.text if event.stream != "stderr" else f"[stderr] {event.text}"
    if isinstance(event, runner.MessageEvent):
        return event.text if event.level == "info" else f"{event.level}: {event.text}"
    if isinstance(event, runner.StartEvent):
        plan = ", ".join(f"{p.get('name')} {p.get('epochs')}x{p.get('steps_per_epoch')}" for p in event.plan)
        return f"{'resumed' if event.resumed else 'started'} on {event.device}: {plan} (epochs x steps); output {event.output}"
    if isinstance(event, runner.PhaseStartEvent):
        return f"phase {event.phase} {event.phase_name}" + (f", from epoch {event.start_epoch + 1}" if event.start_epoch else "")
    if isinstance(event, runner.EpochEvent):
        losses = " ".join(f"{k} {v:.4g}" for k, v in event.losses.items() if v is not None)
        dice = f"  val Dice {event.val_dice:.3f}" if event.val_dice is not None else ""
        return f"{event.phase_name} epoch {(event.epoch or 0) + 1}/{event.epochs} (all {event.global_epoch})  loss {losses}{dice}"
    if isinstance(event, runner.PhaseEndEvent):
        return f"phase {event.phase} {event.phase_name} done"
    if isinstance(event, runner.FinalEvent):
        return f"training reports: {event.status}" + (f": {event.error}" if event.error else "")
    if isinstance(event, runner.StateEvent):
        return f"state: {event.state.value}" + (f" ({event.reason})" if event.reason and event.state.terminal else "")
    return None


class SemiSAMTrainLogic(ScriptedLoadableModuleLogic):
    """The module logic: the parameter node, and calls into SemiSAMTrainLib (Qt-free) and semisam."""

    def getParameterNode(self):
        return SemiSAMTrainParameterNode(super().getParameterNode())

    def applyDefaults(self, parameterNode, configPath: Optional[str] = None, quiet: bool = False) -> bool:
        """Set the GUI fields from semisam's defaults, or from a config file's values."""
        from SemiSAMTrainLib import settings

        try:
            values = settings.gui_values(settings.read_base_config(configPath) if configPath else None)
        except ImportError:
            if quiet:
                return False
            raise
        for name, value in values.items():
            setattr(parameterNode, name, _guiDevice(value) if name == "device" else value)
        parameterNode.defaultsLoaded = True
        return True

    @staticmethod
    def guiFields(parameterNode) -> dict:
        """The parameter node's values of the GUI settings (``settings.GUI_SETTINGS`` names)."""
        from SemiSAMTrainLib.settings import GUI_SETTINGS

        return {name: getattr(parameterNode, name) for name in GUI_SETTINGS}

    def checkDataset(self, path: str):
        from SemiSAMTrainLib.settings import check_dataset

        return check_dataset(path)

    def writeConfig(self, parameterNode, dataset: str, output: str, teachers, base: Optional[str] = None):
        """Write ``<output>/slicer_train.yaml`` from the GUI values; returns ``(path, config)``."""
        from SemiSAMTrainLib import settings

        path = Path(output) / settings.CONFIG_NAME
        cfg = settings.write_training_config(path, dataset, output, settings.overrides_from_gui(self.guiFields(parameterNode)), teachers, base)
        parameterNode.configPath = str(path)
        return path, cfg

    def startTraining(self, configPath, resume: bool = False, **kwargs):
        """Start training in a child process (Slicer's Python); returns the ``TrainingRun``."""
        from SemiSAMTrainLib.runner import TrainingRun

        run = TrainingRun(configPath, **kwargs)
        run.start(resume=resume)
        return run

    def updateChart(self, history, tableNode=None, chartNode=None):
        from SemiSAMTrainLib.chart import update_chart

        return update_chart(slicer.mrmlScene, history, tableNode, chartNode)

    def useModel(self, checkpoint) -> str:
        """Make ``checkpoint`` SemiSAM Segment's student: first in its path box's history
        (QSettings ``SemiSAM/StudentCheckpoint``) and, when its widget exists, its current path."""
        from SemiSAMTrainLib.settings import history_with

        path = str(Path(checkpoint).resolve())
        settings = qt.QSettings()
        settings.setValue(STUDENT_SETTING, history_with(path, settings.value(STUDENT_SETTING)))
        settings.sync()
        module = getattr(slicer.modules, "semisamsegment", None)
        if module is not None:
            widget = module.widgetRepresentation()
            if widget is not None and hasattr(widget.self(), "ui"):
                widget.self().ui.studentPathLineEdit.currentPath = path
        return path


def _selfTestModule():
    """Load Testing/Python/SemiSAMTrainSelfTest.py from the source tree (the extension's install does
    not carry it); None when absent."""
    import importlib.util

    candidate = MODULE_DIR / "Testing" / "Python" / "SemiSAMTrainSelfTest.py"
    if not candidate.is_file():
        return None
    spec = importlib.util.spec_from_file_location("SemiSAMTrainSelfTest", candidate)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SemiSAMTrainTest(ScriptedLoadableModuleTest):
    """What "Reload and Test" runs (ScriptedLoadableModule.runTest looks up <Module>Test): the
    self-test of Testing/Python when this is a source checkout; otherwise it says so and fails
    clearly (never a TypeError from a missing class)."""

    def runTest(self):
        tests = _selfTestModule()
        if tests is None:
            raise AssertionError("SemiSAMTrain's self-tests are not installed with the extension: run them from a source checkout "
                                 "(Testing/Python/SemiSAMTrainSelfTest.py) or with ctest in a build tree")
        test = tests.SemiSAMTrainSelfTest()
        test.messageDelay = getattr(self, "messageDelay", 50)
        test.runTest()
