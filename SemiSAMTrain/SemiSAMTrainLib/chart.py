"""The live training chart as MRML nodes (Qt-free): a table of epoch records and a plot chart
with one series per loss term and one for validation Dice, over the epochs of all phases.

:func:`epoch_table` turns epoch records (the ``epoch`` JSON lines / ``metrics.jsonl``) into
columns; :func:`update_chart` writes them into a ``vtkMRMLTableNode`` and keeps the series of a
``vtkMRMLPlotChartNode`` in step. Tested against real MRML from the ``slicer-core`` wheel.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

X_COLUMN = "epoch"
DICE_COLUMN = "val dice"
#: Series colours (RGB 0..1): losses first, validation Dice last in its own colour.
PALETTE = ((0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.58, 0.4, 0.74), (0.55, 0.34, 0.29), (0.5, 0.5, 0.5))
DICE_COLOR = (0.84, 0.15, 0.16)
SERIES_ATTRIBUTE = "SemiSAMTrain.column"


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return float("nan")
    return float(value)


def epoch_table(history: Iterable[Mapping[str, Any]]) -> Tuple[List[str], List[List[float]]]:
    """``(columns, rows)``: ``epoch`` (global, 1-based), ``loss <term>`` for every loss term
    seen (in order of appearance), ``val dice``. Missing values are NaN (gaps in the plot)."""
    records = [r for r in history if isinstance(r.get("global_epoch"), (int, float))]
    terms: List[str] = []
    for r in records:
        losses = r.get("losses")
        if isinstance(losses, Mapping):
            terms.extend(k for k in losses if k not in terms)
    columns = [X_COLUMN] + [f"loss {t}" for t in terms] + [DICE_COLUMN]
    rows = []
    for r in records:
        losses = r.get("losses") if isinstance(r.get("losses"), Mapping) else {}
        rows.append([float(r["global_epoch"])] + [_number(losses.get(t)) for t in terms] + [_number(r.get("val_dice"))])
    return columns, rows


def update_chart(scene, history: Iterable[Mapping[str, Any]], table_node=None, chart_node=None,
                 name: str = "SemiSAM training") -> Tuple[Any, Any]:
    """Fill (or create) the table and chart nodes from epoch records; returns ``(table, chart)``.

    Series are created once per column and reused; a column that disappears loses its series.
    """
    import slicer
    import vtk

    columns, rows = epoch_table(history)
    if table_node is None or table_node.GetScene() is not scene:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} metrics")
    table = vtk.vtkTable()
    for c, column in enumerate(columns):
        array = vtk.vtkDoubleArray()
        array.SetName(column)
        array.SetNumberOfTuples(len(rows))
        for r, row in enumerate(rows):
            array.SetValue(r, row[c])
        table.AddColumn(array)
    table_node.SetAndObserveTable(table)
    table_node.Modified()

    if chart_node is None or chart_node.GetScene() is not scene:
        chart_node = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
        chart_node.SetTitle(name)
        chart_node.SetXAxisTitle("epoch (all phases)")
        chart_node.SetYAxisTitle("loss / validation Dice")
        chart_node.SetLegendVisibility(True)
    existing = {}
    for i in range(chart_node.GetNumberOfPlotSeriesNodes()):
        series = chart_node.GetNthPlotSeriesNode(i)
        if series is not None and series.GetAttribute(SERIES_ATTRIBUTE):
            existing[series.GetAttribute(SERIES_ATTRIBUTE)] = series
    for i, column in enumerate(columns[1:]):
        series = existing.pop(column, None)
        if series is None:
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name}: {column}")
            series.SetAttribute(SERIES_ATTRIBUTE, column)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
            series.SetColor(*(DICE_COLOR if column == DICE_COLUMN else PALETTE[i % len(PALETTE)]))
            chart_node.AddAndObservePlotSeriesNodeID(series.GetID())
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName(X_COLUMN)
        series.SetYColumnName(column)
    for series in existing.values():
        chart_node.RemovePlotSeriesNodeID(series.GetID())
        scene.RemoveNode(series)
    return table_node, chart_node


def series_columns(chart_node) -> Sequence[str]:
    """The columns the chart's series plot (for tests and the GUI)."""
    out = []
    for i in range(chart_node.GetNumberOfPlotSeriesNodes()):
        series = chart_node.GetNthPlotSeriesNode(i)
        if series is not None:
            out.append(series.GetYColumnName())
    return out


def remove_chart(scene, table_node: Optional[Any], chart_node: Optional[Any]) -> None:
    """Remove the chart, its series and the table from ``scene`` (nodes may be None)."""
    if chart_node is not None and chart_node.GetScene() is scene:
        for i in reversed(range(chart_node.GetNumberOfPlotSeriesNodes())):
            series = chart_node.GetNthPlotSeriesNode(i)
            if series is not None:
                scene.RemoveNode(series)
        scene.RemoveNode(chart_node)
    if table_node is not None and table_node.GetScene() is scene:
        scene.RemoveNode(table_node)
