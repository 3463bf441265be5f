"""MRML nodes ⇄ ``semisam`` arrays and geometry, without Qt.

Everything here works on real MRML nodes in ``slicer.mrmlScene`` (inside Slicer, or headless
with the ``slicer-core`` wheel) and numpy; nothing imports ``qt``, ``ctk`` or ``slicer.app``.

Conventions:

* Voxel arrays are indexed ``[k, j, i]`` = ``[z, y, x]``: the order of
  ``slicer.util.arrayFromVolume`` and of :class:`semisam.volume.Volume`. Slicer's IJK index is
  ITK's (x, y, z) index, so no transpose is ever needed.
* A :class:`~semisam.volume.Volume` carries LPS geometry (ITK); MRML nodes carry RAS. The two
  differ by ``F = diag(-1, -1, 1)``: ``IJKToRAS = F @ volume.affine``, exactly, oblique or not.
* Parent transforms. A node under a *linear* parent transform is taken at its place in the
  world: :func:`volume_from_node` returns the world geometry (``TransformToWorld @ IJKToRAS``),
  :func:`node_from_volume` sets the local geometry so that the node's world geometry is the
  volume's, and the slice-view functions map world RAS through the transform. A non-linear
  parent transform (grid, b-spline, thin-plate) has no voxel grid in the world and is refused:
  harden it first. A segmentation must sit under the same parent transform as its reference
  volume (:func:`write_labels_to_segmentation` puts a new one there); otherwise Slicer's
  labelmap import and export place voxels inconsistently, so such pairs are refused.
* Slice views: ``xy`` is a view pixel in VTK display coordinates (origin bottom-left, what
  ``interactor.GetEventPosition()`` returns), mapped by the slice node's ``XYToRAS``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import slicer
import vtk

from semisam.volume import Volume

#: LPS ⇄ RAS (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

#: ``modify_segment`` modes.
MODES = ("add", "replace", "erase")

#: A region of the voxel array: a tuple of slices (one per leading axis) or a boolean array.
Region = Union[Tuple[slice, ...], np.ndarray]


# ---------------------------------------------------------------------------------- helpers


def _scene():
    scene = getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise RuntimeError("slicer.mrmlScene is not set: run inside 3D Slicer, or set a scene up first (Testing/slicer_app.py)")
    return scene


def _is_a(node, class_name: str) -> bool:
    return node is not None and hasattr(node, "IsA") and bool(node.IsA(class_name))


def _describe(obj) -> str:
    if obj is None:
        return "None"
    if hasattr(obj, "GetClassName"):
        name = obj.GetName() if hasattr(obj, "GetName") else None
        return f"{obj.GetClassName()} '{name}'" if name else obj.GetClassName()
    return type(obj).__name__


def _name(node) -> str:
    return node.GetName() or node.GetID() or node.GetClassName()


def _check_volume_node(node, what: str = "volume node", need_image: bool = True):
    """A scalar (or labelmap) volume node with single-component image data."""
    if not _is_a(node, "vtkMRMLScalarVolumeNode"):
        raise TypeError(f"{what} must be a vtkMRMLScalarVolumeNode or vtkMRMLLabelMapVolumeNode, got {_describe(node)}")
    if node.IsA("vtkMRMLTensorVolumeNode"):  # vector and diffusion volumes derive from it
        raise ValueError(f"{what} '{_name(node)}' is a {node.GetClassName()}, not a scalar volume: pick a scalar volume or extract one component first")
    if not need_image:
        return node
    image = node.GetImageData()
    if image is None:
        raise ValueError(f"{what} '{_name(node)}' has no image data (load or compute its voxels first)")
    if image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise ValueError(f"{what} '{_name(node)}' has image data without voxel values")
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise ValueError(f"{what} '{_name(node)}' has {components} components per voxel; only scalar (one-component) volumes are supported")
    return node


def _check_segmentation_node(node, what: str = "segmentation node"):
    if not _is_a(node, "vtkMRMLSegmentationNode"):
        raise TypeError(f"{what} must be a vtkMRMLSegmentationNode, got {_describe(node)}")
    return node


def _check_slice_node(node):
    if not _is_a(node, "vtkMRMLSliceNode"):
        raise TypeError(f"slice node must be a vtkMRMLSliceNode, got {_describe(node)}")
    return node


def _to_world(node) -> np.ndarray:
    """The 4x4 matrix from ``node``'s own frame to world RAS (identity without a parent transform).

    Raises:
        ValueError: the parent transform (or one above it) is not linear.
    """
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise ValueError(
            f"'{_name(node)}' is under the non-linear transform '{_name(transform)}', which has no voxel grid in the world: "
            "harden the transform on it first (Data module: right-click the transform, Harden transform)"
        )
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _ras_to_ijk(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetRASToIJKMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def ijk_to_world_matrix(volume_node) -> np.ndarray:
    """4x4 matrix from a volume's (i, j, k, 1) to world RAS, its parent transform included."""
    _check_volume_node(volume_node, need_image=False)
    return _to_world(volume_node) @ _ijk_to_ras(volume_node)


def _shape_kji(volume_node) -> Tuple[int, int, int]:
    i, j, k = volume_node.GetImageData().GetDimensions()
    return (int(k), int(j), int(i))


def _transform_phrase(transform) -> str:
    return f"transform '{_name(transform)}'" if transform is not None else "no transform"


def _same_parent_transform(segmentation_node, volume_node) -> None:
    a, b = segmentation_node.GetParentTransformNode(), volume_node.GetParentTransformNode()
    if (a.GetID() if a else None) != (b.GetID() if b else None):
        raise ValueError(
            f"segmentation '{_name(segmentation_node)}' is under {_transform_phrase(a)} "
            f"but its reference volume '{_name(volume_node)}' is under {_transform_phrase(b)}: "
            "put both under the same transform (or harden both) first"
        )
    _to_world(volume_node)  # refuses a non-linear one


def _point(values, n: Tuple[int, ...], what: str) -> np.ndarray:
    """``values`` as a finite float vector whose length is one of ``n``."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"{what} must be a sequence of {' or '.join(map(str, n))} numbers, got {type(values).__name__}")
    if len(values) not in n:
        raise ValueError(f"{what} must have {' or '.join(map(str, n))} values, got {len(values)}")
    if not all(isinstance(v, (Real, np.number)) and not isinstance(v, (bool, np.bool_)) for v in values):
        raise TypeError(f"{what} must hold numbers, got {list(values)}")
    out = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{what} must be finite, got {out.tolist()}")
    return out


def _round(values: np.ndarray) -> Tuple[int, ...]:
    """Nearest integers, halves rounded up (not to even), like voxel lookup in Slicer."""
    return tuple(int(math.floor(v + 0.5)) for v in values)


def _voxel_array(array, shape: Tuple[int, int, int], what: str, reference_name: str) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(array).__name__}")
    if array.shape != tuple(shape):
        raise ValueError(f"{what} has shape {array.shape} but volume '{reference_name}' has {tuple(shape)} voxels (z, y, x)")
    return array


# ---------------------------------------------------------------------------------- volumes


def volume_from_node(node) -> Volume:
    """A scalar or labelmap volume node as a :class:`~semisam.volume.Volume` (a copy).

    The array keeps the node's voxel order (``[k, j, i]`` = ``[z, y, x]``); it is float32 for a
    scalar volume and uint8 for a labelmap. Spacing, origin and direction are the node's world
    geometry converted from RAS to LPS (the first two rows negated), exact for oblique grids.
    A linear parent transform is applied (world geometry); the spacing then absorbs any scaling
    of the transform and the direction columns stay unit vectors.

    Raises:
        TypeError: ``node`` is not a scalar or labelmap volume node.
        ValueError: no image data, more than one component per voxel, a non-linear parent
            transform, or labelmap values that do not fit uint8.
    """
    _check_volume_node(node)
    array = slicer.util.arrayFromVolume(node)
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        array = _labels_as_uint8(array, f"labelmap '{_name(node)}'")
    else:
        array = np.array(array, dtype=np.float32, copy=True)
    transform = node.GetParentTransformNode()
    if transform is None:
        # The node's own parameters: exactly what was set, no matrix decomposition.
        directions = np.zeros((3, 3))
        node.GetIJKToRASDirections(directions)
        spacing = np.asarray(node.GetSpacing(), dtype=np.float64)
        origin = np.asarray(node.GetOrigin(), dtype=np.float64)
    else:
        world = ijk_to_world_matrix(node)
        linear = world[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        directions = linear / spacing
        origin = world[:3, 3]
    return Volume(
        array,
        spacing=tuple(spacing),
        origin=tuple(LPS_TO_RAS @ origin),
        direction=LPS_TO_RAS @ directions,
        meta={"slicer_node": node.GetName(), "slicer_node_id": node.GetID()},
    )


def _labels_as_uint8(array: np.ndarray, what: str) -> np.ndarray:
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise TypeError(f"{what} must hold integer labels, got dtype {array.dtype}")
    if array.size:
        lo, hi = array.min(), array.max()
        if lo < 0 or hi > 255:
            raise ValueError(f"{what} holds values {lo}..{hi}; labels must be 0..255")
        if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
            raise ValueError(f"{what} holds non-integer values; labels must be whole numbers 0..255")
    return np.array(array, dtype=np.uint8, copy=True)


def node_from_volume(volume: Volume, name: str, node=None, labelmap: bool = False):
    """Put a :class:`~semisam.volume.Volume` into ``slicer.mrmlScene`` (the inverse of :func:`volume_from_node`).

    Args:
        volume: voxels ``[z, y, x]`` with LPS geometry.
        name: the node's name.
        node: an existing node to update in place (its display settings are kept); a new one
            is added when None. It must be a labelmap node when ``labelmap`` is True and a plain
            scalar volume node otherwise. If it is under a linear parent transform, its local
            geometry is set so that its world geometry is the volume's.
        labelmap: make a ``vtkMRMLLabelMapVolumeNode`` holding uint8 labels (the values must
            be whole numbers 0..255); otherwise a ``vtkMRMLScalarVolumeNode`` holding float32.

    Returns:
        The node. ``arrayFromVolume(node)`` equals ``volume.array`` (cast to float32 or uint8)
        and ``IJKToRAS == diag(-1, -1, 1, 1) @ volume.affine``.

    Raises:
        TypeError: ``volume`` is not a Volume, ``name`` not a string, ``node`` of the wrong class.
        ValueError: empty name, labels that do not fit uint8, a non-linear parent transform.
    """
    if not isinstance(volume, Volume):
        raise TypeError(f"volume must be a semisam.volume.Volume, got {type(volume).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    if not name.strip():
        raise ValueError("name must not be empty")
    if labelmap:
        array = _labels_as_uint8(volume.array, "volume.array for a labelmap")
        class_name = "vtkMRMLLabelMapVolumeNode"
    else:
        if not np.issubdtype(volume.array.dtype, np.number) and volume.array.dtype != np.bool_:
            raise TypeError(f"volume.array must be numeric, got dtype {volume.array.dtype}")
        array = np.ascontiguousarray(volume.array, dtype=np.float32)
        class_name = "vtkMRMLScalarVolumeNode"
    if node is None:
        node = _scene().AddNewNodeByClass(class_name, name)
    else:
        if not _is_a(node, "vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLTensorVolumeNode") or bool(node.IsA("vtkMRMLLabelMapVolumeNode")) != bool(labelmap):
            raise TypeError(f"node must be a {class_name} (labelmap={labelmap}), got {_describe(node)}")
        if node.GetScene() is None:
            raise ValueError(f"node '{_name(node)}' is not in a scene")
        node.SetName(name)
    to_world = _to_world(node)
    ras = LPS_TO_RAS @ volume.direction
    if node.GetParentTransformNode() is None:
        node.SetOrigin(*(LPS_TO_RAS @ np.asarray(volume.origin)))
        node.SetSpacing(*volume.spacing)
        node.SetIJKToRASDirections(ras.tolist())
    else:
        world = np.eye(4)
        world[:3, :3] = ras @ np.diag(volume.spacing)
        world[:3, 3] = LPS_TO_RAS @ np.asarray(volume.origin)
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.linalg.inv(to_world) @ world))
    slicer.util.updateVolumeFromArray(node, array)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


# ---------------------------------------------------------------------------------- segmentations


def default_segment_name(label: int) -> str:
    """Name of an unnamed label value: ``target``, ``target 2``, ``target 3``, ..."""
    return "target" if label == 1 else f"target {label}"


def default_segment_color(label: int) -> Tuple[float, float, float]:
    """The display colour of label value ``label`` (``semisam.export.label_color``) as 0..1 floats."""
    from semisam.export import label_color

    return tuple(c / 255.0 for c in label_color(label))  # type: ignore[return-value]


def _check_label_keys(mapping, what: str) -> Dict[int, object]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{what} must be a dict {{label value: ...}}, got {type(mapping).__name__}")
    out = {}
    for key, value in mapping.items():
        if not isinstance(key, Integral) or isinstance(key, bool):
            raise TypeError(f"{what}: label values must be integers, got {key!r}")
        if not 1 <= int(key) <= 255:
            raise ValueError(f"{what}: label value {key} is outside 1..255")
        out[int(key)] = value
    return out


def _check_color(value, label: int) -> Tuple[float, float, float]:
    rgb = _point(value, (3,), f"colors[{label}]")
    if rgb.min() < 0.0 or rgb.max() > 1.0:
        raise ValueError(f"colors[{label}] must be (r, g, b) in 0..1, got {rgb.tolist()}")
    return tuple(float(c) for c in rgb)  # type: ignore[return-value]


def write_labels_to_segmentation(
    label_array: np.ndarray,
    reference_volume_node,
    segmentation_node=None,
    names: Optional[Mapping[int, str]] = None,
    colors: Optional[Mapping[int, Sequence[float]]] = None,
    present: Optional[Sequence[int]] = None,
):
    """Write a label map (values 0..K) into a segmentation node, one segment per label value.

    Segments are written on the reference volume's voxel grid (the segmentation's reference
    geometry is set from it). A segment is written for every value 1..255 that occurs in
    ``label_array`` or has an entry in ``names`` (an absent named label gives an empty
    segment). An existing segment with the same name (Slicer compares names ignoring case) is
    overwritten and recoloured rather than duplicated; other segments are left alone.

    Args:
        label_array: uint8-compatible integer (or bool) array ``[z, y, x]`` of the reference
            volume's shape; 0 is background.
        reference_volume_node: the scalar volume whose grid the labels are on.
        segmentation_node: the node to write into; a new ``vtkMRMLSegmentationNode`` (named
            after the volume, under the volume's parent transform) when None.
        names: ``{label value: segment name}``; unnamed values are ``target``, ``target 2``, ...
        colors: ``{label value: (r, g, b)}`` in 0..1; the default is ``semisam.export.label_color``.
        present: the label values to write when the caller knows them (skips the full-volume
            ``np.unique``, e.g. for a binary preview on the GUI thread).

    Returns:
        The segmentation node.

    Raises:
        TypeError: wrong node classes, a non-array or non-integer ``label_array``, bad
            ``names``/``colors`` types.
        ValueError: shape mismatch, values outside 0..255, empty or repeated names, colours
            outside 0..1, a segmentation under another transform than the volume.
    """
    _check_volume_node(reference_volume_node, "reference volume node")
    volume_name = _name(reference_volume_node)
    label_array = _voxel_array(label_array, _shape_kji(reference_volume_node), "label_array", volume_name)
    if label_array.dtype != np.bool_ and not np.issubdtype(label_array.dtype, np.integer):
        raise TypeError(f"label_array must hold integer labels (uint8), got dtype {label_array.dtype}")
    labels = _labels_as_uint8(label_array, "label_array")
    names = _check_label_keys(names, "names")
    colors = _check_label_keys(colors, "colors")
    for key, value in names.items():
        if not isinstance(value, str):
            raise TypeError(f"names[{key}] must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"names[{key}] must not be empty")
    found = np.unique(labels) if present is None else [int(v) for v in present]
    values = sorted(set(int(v) for v in found if v > 0) | set(names))
    chosen = {k: names.get(k, default_segment_name(k)) for k in values}
    folded: Dict[str, int] = {}
    for k, segment_name in chosen.items():
        other = folded.setdefault(segment_name.lower(), k)
        if other != k:
            raise ValueError(f"labels {other} and {k} would both be segment '{segment_name}'; give them different names")
    rgb = {k: _check_color(colors[k], k) if k in colors else default_segment_color(k) for k in values}

    if segmentation_node is None:
        segmentation_node = _scene().AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_name} segmentation")
        segmentation_node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
    _check_segmentation_node(segmentation_node)
    _same_parent_transform(segmentation_node, reference_volume_node)
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    segmentation = segmentation_node.GetSegmentation()
    for k in values:
        segment_id = segmentation.GetSegmentIdBySegmentName(chosen[k])
        if segment_id:
            segment = segmentation.GetSegment(segment_id)
            segment.SetName(chosen[k])
            segment.SetColor(*rgb[k])
        else:
            segment_id = segmentation.AddEmptySegment("", chosen[k], list(rgb[k]))
            segment = segmentation.GetSegment(segment_id)
        # Our names and colours are deliberate: Slicer must not replace them from a terminology.
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        slicer.util.updateSegmentBinaryLabelmapFromArray((labels == k).astype(np.uint8), segmentation_node, segment_id, reference_volume_node)
    return segmentation_node


def _check_segment(segmentation_node, segment_id) -> None:
    if not isinstance(segment_id, str):
        raise TypeError(f"segment_id must be a string, got {type(segment_id).__name__}")
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetSegment(segment_id) is None:
        present = [f"{segmentation.GetNthSegmentID(i)} ({segmentation.GetNthSegment(i).GetName()})" for i in range(segmentation.GetNumberOfSegments())]
        raise ValueError(
            f"segmentation '{_name(segmentation_node)}' has no segment with ID '{segment_id}'"
            + (f"; it has {', '.join(present)}" if present else "; it has no segments")
        )


def segment_array(segmentation_node, segment_id: str, reference_volume_node) -> np.ndarray:
    """A segment as a uint8 0/1 array ``[z, y, x]`` on the reference volume's voxel grid (a copy).

    Raises:
        TypeError: wrong node classes or a non-string ``segment_id``.
        ValueError: no such segment, a reference volume without image data, or a segmentation
            under another transform than the volume.
    """
    _check_segmentation_node(segmentation_node)
    _check_volume_node(reference_volume_node, "reference volume node")
    _check_segment(segmentation_node, segment_id)
    _same_parent_transform(segmentation_node, reference_volume_node)
    array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, reference_volume_node)
    shape = _shape_kji(reference_volume_node)
    if array.shape != shape:
        raise RuntimeError(f"Slicer exported segment '{segment_id}' with shape {array.shape}, not the reference volume's {shape}")
    return (array > 0).astype(np.uint8)


def _region_mask(region: Optional[Region], shape: Tuple[int, int, int]) -> np.ndarray:
    if region is None:
        return np.ones(shape, dtype=bool)
    if isinstance(region, np.ndarray):
        if region.dtype != np.bool_:
            raise TypeError(f"region must be a tuple of slices or a bool array, got an array of dtype {region.dtype}")
        if region.shape != shape:
            raise ValueError(f"region has shape {region.shape} but the volume has {shape}")
        return region
    if isinstance(region, slice):
        region = (region,)
    if not isinstance(region, tuple) or not all(isinstance(s, slice) for s in region):
        raise TypeError(f"region must be a tuple of slices (z, y, x) or a bool array, got {region!r}")
    if len(region) > 3:
        raise ValueError(f"region has {len(region)} slices; a volume has 3 axes (z, y, x)")
    out = np.zeros(shape, dtype=bool)
    out[region] = True
    return out


def modify_segment(segmentation_node, segment_id: str, reference_volume_node, mask: np.ndarray, mode: str, region: Optional[Region] = None) -> int:
    """Edit a segment with a voxel mask on the reference volume's grid.

    Only voxels inside ``region`` (default: the whole volume) can change:

    * ``add``: the segment becomes segment ∪ (mask ∩ region);
    * ``replace``: inside the region the segment becomes exactly the mask, outside it is kept
      (so a proposal on one slice, with ``region`` that slice, replaces that slice only);
    * ``erase``: the segment becomes segment \\ (mask ∩ region).

    Args:
        mask: bool (or 0/1 integer) array ``[z, y, x]`` of the reference volume's shape.
        mode: ``"add"``, ``"replace"`` or ``"erase"``.
        region: a tuple of up to three slices indexing ``[z, y, x]`` (e.g.
            ``(slice(5, 6),)`` for slice z = 5) or a bool array of the volume's shape.

    Returns:
        The number of voxels whose membership changed (0: the segment was not touched).

    Raises:
        TypeError: wrong node classes, a non-bool mask, a malformed region.
        ValueError: unknown mode or segment, shape mismatches, mask values other than 0/1.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    _check_volume_node(reference_volume_node, "reference volume node")
    shape = _shape_kji(reference_volume_node)
    mask = _voxel_array(mask, shape, "mask", _name(reference_volume_node))
    if mask.dtype != np.bool_:
        if not np.issubdtype(mask.dtype, np.integer):
            raise TypeError(f"mask must be a bool array (or 0/1 integers), got dtype {mask.dtype}; threshold probabilities first")
        if mask.size and (mask.min() < 0 or mask.max() > 1):
            raise ValueError(f"mask holds values {mask.min()}..{mask.max()}; it must be 0/1")
        mask = mask.astype(bool)
    inside = _region_mask(region, shape)
    current = segment_array(segmentation_node, segment_id, reference_volume_node).astype(bool)
    if mode == "add":
        new = current | (mask & inside)
    elif mode == "erase":
        new = current & ~(mask & inside)
    else:
        new = np.where(inside, mask, current)
    changed = int(np.count_nonzero(new != current))
    if changed:
        slicer.util.updateSegmentBinaryLabelmapFromArray(new.astype(np.uint8), segmentation_node, segment_id, reference_volume_node)
    return changed


# ---------------------------------------------------------------------------------- slice views


def xy_to_ras(slice_node, xy: Sequence[float]) -> Tuple[float, float, float]:
    """A slice view pixel ``(x, y)`` (or ``(x, y, z)``, z the lightbox slice) to world RAS mm."""
    _check_slice_node(slice_node)
    p = _point(xy, (2, 3), "xy")
    xyz1 = np.array([p[0], p[1], p[2] if p.size == 3 else 0.0, 1.0])
    ras = slicer.util.arrayFromVTKMatrix(slice_node.GetXYToRAS()) @ xyz1
    return (float(ras[0]), float(ras[1]), float(ras[2]))


def ras_to_ijk(volume_node, ras: Sequence[float]) -> Tuple[float, float, float]:
    """World RAS mm to the volume's continuous voxel index ``(i, j, k)`` (x, y, z order).

    Goes through the inverse of the volume's parent transform (linear only) and its RASToIJK.
    """
    _check_volume_node(volume_node, need_image=False)
    p = _point(ras, (3,), "ras")
    local = np.linalg.inv(_to_world(volume_node)) @ np.append(p, 1.0)
    ijk = _ras_to_ijk(volume_node) @ local
    return (float(ijk[0]), float(ijk[1]), float(ijk[2]))


def xy_to_ijk(slice_node, volume_node, xy: Sequence[float]) -> Tuple[int, int, int]:
    """A slice view pixel to the nearest voxel index ``(i, j, k)``; not clamped to the volume."""
    return _round(np.asarray(ras_to_ijk(volume_node, xy_to_ras(slice_node, xy))))  # type: ignore[return-value]


def slice_plane(slice_node, volume_node) -> Tuple[int, int]:
    """Which array plane of the volume a slice view shows: ``(axis, index)``.

    ``axis`` is the array axis (0 = k/z, 1 = j/y, 2 = i/x) whose IJK direction in world RAS is
    most parallel (largest ``|cos|``) to the slice normal; ``index`` is the nearest slice along
    it through the view's plane centre (the SliceToRAS origin). ``array.take(index, axis)`` is
    then the plane the user looks at (exactly when the view is aligned with the volume).

    Raises:
        ValueError: the view's plane lies outside the volume.
    """
    _check_slice_node(slice_node)
    _check_volume_node(volume_node)
    slice_to_ras = slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS())
    normal = slice_to_ras[:3, 2] / np.linalg.norm(slice_to_ras[:3, 2])
    axes = ijk_to_world_matrix(volume_node)[:3, :3]
    axes = axes / np.linalg.norm(axes, axis=0)
    ijk_axis = int(np.argmax(np.abs(axes.T @ normal)))
    index = _round(np.asarray(ras_to_ijk(volume_node, slice_to_ras[:3, 3])))[ijk_axis]
    axis = 2 - ijk_axis
    count = _shape_kji(volume_node)[axis]
    if not 0 <= index < count:
        raise ValueError(
            f"slice view '{slice_node.GetName() or slice_node.GetID()}' shows plane {index} along array axis {axis} "
            f"({'kji'[axis]}), outside volume '{_name(volume_node)}' (0..{count - 1}): scroll into the volume"
        )
    return axis, index


#: For each array axis of the plane, the IJK components that are its (row, col).
_PLANE_ROW_COL = {0: (1, 0), 1: (2, 0), 2: (2, 1)}


def slice_xy_to_plane_rc(slice_node, volume_node, xy: Sequence[float]) -> Tuple[int, int, int, int]:
    """A slice view pixel to ``(axis, index, row, col)`` in the plane ``array.take(index, axis)``.

    ``(axis, index)`` come from :func:`slice_plane` (so every point of one view gets the same
    plane); ``(row, col)`` is ``(j, i)`` for axis 0, ``(k, i)`` for axis 1 and ``(k, j)`` for axis 2.

    Raises:
        ValueError: the plane or the point lies outside the volume.
    """
    axis, index = slice_plane(slice_node, volume_node)
    ijk = xy_to_ijk(slice_node, volume_node, xy)
    r, c = _PLANE_ROW_COL[axis]
    row, col = ijk[r], ijk[c]
    shape = _shape_kji(volume_node)
    rows, cols = (s for a, s in enumerate(shape) if a != axis)
    if not (0 <= row < rows and 0 <= col < cols):
        raise ValueError(
            f"view point {tuple(float(v) for v in xy)} is outside volume '{_name(volume_node)}' "
            f"(row {row} of 0..{rows - 1}, column {col} of 0..{cols - 1} on plane {index} of axis {axis})"
        )
    return axis, index, row, col


def proposal_modifiers(mask: np.ndarray, region: Region, reference_volume_node):
    """The two modifier labelmaps that make a segment equal ``mask`` inside ``region`` through
    the Segment Editor's ``modifySelectedSegmentByLabelmap`` (so its masking and overwrite
    settings apply): first ``ModificationModeRemove`` with the region's voxels outside the mask,
    then ``ModificationModeAdd`` with the mask. (``ModificationModeSet`` would clear the
    segment everywhere, not only in the region.) Both are ``vtkOrientedImageData`` on the
    reference volume's grid (IJK to RAS, its parent transform excluded, like the segmentation
    under the same transform), cropped to the region's extent.

    Returns:
        ``(remove, add)``.
    """
    _check_volume_node(reference_volume_node, "reference volume node")
    shape = _shape_kji(reference_volume_node)
    mask = _voxel_array(mask, shape, "mask", _name(reference_volume_node)).astype(bool)
    inside = _region_mask(region, shape)
    zs, ys, xs = (np.flatnonzero(inside.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    if not len(zs):
        raise ValueError("the region holds no voxel of the volume")
    box = (slice(zs[0], zs[-1] + 1), slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    extent = (int(xs[0]), int(xs[-1]), int(ys[0]), int(ys[-1]), int(zs[0]), int(zs[-1]))
    matrix = vtk.vtkMatrix4x4()
    reference_volume_node.GetIJKToRASMatrix(matrix)

    def image(values: np.ndarray):
        from vtk.util import numpy_support

        out = slicer.vtkOrientedImageData()
        out.SetExtent(*extent)
        out.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        flat = np.ascontiguousarray(values[box].astype(np.uint8)).ravel()  # x fastest, as VTK stores it
        out.GetPointData().GetScalars().DeepCopy(numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
        out.SetImageToWorldMatrix(matrix)
        return out

    return image(inside & ~mask), image(inside & mask)


def preview_node(node, reference_volume_node, name: str = "SemiSAM preview"):
    """The hidden segmentation node that shows a proposal: ``node`` when it is still in the
    scene, else a new one; either way under the reference volume's parent transform (the
    proposal is on its grid)."""
    _check_volume_node(reference_volume_node, "reference volume node")
    if node is None or node.GetScene() is None:
        node = _scene().AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.SetHideFromEditors(True)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetOpacity2DFill(0.25)
        display.SetOpacity2DOutline(1.0)
    node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
    return node
