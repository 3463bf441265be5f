"""SemiSAMSegmentLib.mrml against real MRML (slicer-core): volume nodes ⇄ Volume, label maps ⇄
segmentations, segment edits, and slice-view pixels → voxels through real vtkMRMLSliceNodes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from semisam.volume import Volume

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402

import slicer_app  # noqa: E402
from SemiSAMSegmentLib import mrml  # noqa: E402

F = np.diag([-1.0, -1.0, 1.0])
F4 = np.diag([-1.0, -1.0, 1.0, 1.0])
AXIS_ALIGNED = np.eye(3)
OBLIQUE = Rotation.from_euler("xyz", [17.0, -23.0, 31.0], degrees=True).as_matrix()


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def linear_transform(scene, matrix, name="T"):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return node


def rigid(angles=(0.0, 0.0, 40.0), shift=(5.0, -3.0, 7.0)) -> np.ndarray:
    t = np.eye(4)
    t[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    t[:3, 3] = shift
    return t


def box_labels(shape, seed=0, k=2) -> np.ndarray:
    """Random overlapping boxes with labels 1..k (later ones win)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    for value in range(1, k + 1):
        lo = [int(rng.integers(0, n // 2)) for n in shape]
        hi = [int(rng.integers(l + 2, n + 1)) for l, n in zip(lo, shape)]
        labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
    return labels


# ---------------------------------------------------------------------------------- the app


def test_headless_app_is_wired_like_slicer(slicer_scene):
    app = slicer_app.start()
    assert slicer.mrmlScene is slicer_scene is app.scene
    assert slicer.modules.segmentations.logic() is app.logic("Segmentations")
    assert slicer.modules.volumes.logic() is app.logic("Volumes")
    assert app.app_logic.GetModuleLogic("Colors") is slicer.modules.colors.logic()
    volume = mrml.node_from_volume(Volume(np.zeros((3, 4, 5), np.float32)), "v")
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[1, 1:3, 1:4] = 1
    segmentation = mrml.write_labels_to_segmentation(labels, volume)
    nodes = slicer_scene.GetNumberOfNodes()
    mrml.segment_array(segmentation, segmentation.GetSegmentation().GetNthSegmentID(0), volume)
    assert slicer_scene.GetNumberOfNodes() == nodes, "temporary labelmap nodes (or their display nodes) were left behind"
    assert segmentation.CreateClosedSurfaceRepresentation(), "segmentation converter rules are not registered"
    app.clear()
    kept = [slicer_scene.GetNthNode(i) for i in range(slicer_scene.GetNumberOfNodes())]
    assert all(n.GetSingletonTag() or n.IsA("vtkMRMLSubjectHierarchyNode") for n in kept)
    assert slicer_scene.GetFirstNodeByClass("vtkMRMLSegmentationNode") is None
    slice_node = slicer_scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    assert slice_node.SetOrientation("Coronal"), "slice orientation presets are gone after clearing"


# ---------------------------------------------------------------------------------- volumes


@pytest.mark.parametrize("direction", [AXIS_ALIGNED, OBLIQUE], ids=["axis-aligned", "oblique"])
def test_volume_node_round_trip_is_exact(slicer_scene, make_volume, direction):
    volume = make_volume(shape=(12, 14, 16), spacing=(0.7, 0.55, 1.3), origin=(-10.5, 20.25, 3.125), direction=direction)
    node = mrml.node_from_volume(volume, "image")
    assert node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")
    assert slicer.util.arrayFromVolume(node).tobytes() == volume.array.tobytes()
    assert slicer.util.arrayFromVolume(node).shape == (12, 14, 16)
    np.testing.assert_allclose(ijk_to_ras(node), F4 @ volume.affine, atol=1e-12, rtol=0)

    # A known voxel: ITK's physical point (LPS) is the node's RAS point with x, y negated.
    i, j, k = 3, 5, 7
    lps = np.array(volume.to_sitk().TransformIndexToPhysicalPoint((i, j, k)))
    np.testing.assert_allclose(volume.origin + volume.direction @ (np.array(volume.spacing) * (i, j, k)), lps, atol=1e-12)
    ras = ijk_to_ras(node) @ (i, j, k, 1.0)
    np.testing.assert_allclose(ras[:3], F @ lps, atol=1e-12)
    assert slicer.util.arrayFromVolume(node)[k, j, i] == volume.array[k, j, i]

    back = mrml.volume_from_node(node)
    assert back.array.dtype == np.float32 and back.array.tobytes() == volume.array.tobytes()
    np.testing.assert_allclose(back.spacing, volume.spacing, atol=1e-12, rtol=0)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-12, rtol=0)
    np.testing.assert_allclose(back.direction, volume.direction, atol=1e-12, rtol=0)
    np.testing.assert_allclose(back.index_to_physical((i, j, k)), lps, atol=1e-12)
    back.array[0, 0, 0] += 1.0  # a copy: the node keeps its voxels
    assert slicer.util.arrayFromVolume(node)[0, 0, 0] == volume.array[0, 0, 0]


def test_volume_from_a_node_built_by_slicer_matches_itk(slicer_scene):
    """The other direction, from geometry set with Slicer's own setters: the Volume's LPS
    voxel positions (through SimpleITK) are the node's RAS positions with x, y negated."""
    node = slicer_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "slicer made")
    directions = Rotation.from_euler("zyx", [-50.0, 12.0, 71.0], degrees=True).as_matrix()
    node.SetIJKToRASDirections(directions.tolist())
    node.SetSpacing(0.3, 1.7, 2.2)
    node.SetOrigin(40.0, -12.5, 8.0)
    slicer.util.updateVolumeFromArray(node, np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7))
    volume = mrml.volume_from_node(node)
    assert volume.shape == (5, 6, 7) and volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, np.arange(5 * 6 * 7).reshape(5, 6, 7))
    image = volume.to_sitk()
    for ijk in [(0, 0, 0), (6, 5, 4), (2, 3, 1)]:
        ras = ijk_to_ras(node) @ (*ijk, 1.0)
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(ijk), F @ ras[:3], atol=1e-12)
    again = mrml.node_from_volume(volume, "again")
    np.testing.assert_allclose(ijk_to_ras(again), ijk_to_ras(node), atol=1e-12, rtol=0)


def test_labelmap_round_trip_and_update_in_place(slicer_scene, make_volume):
    volume = make_volume(direction=OBLIQUE)
    labels = volume.with_array(box_labels(volume.shape, k=3))
    node = mrml.node_from_volume(labels, "labels", labelmap=True)
    assert node.IsA("vtkMRMLLabelMapVolumeNode")
    back = mrml.volume_from_node(node)
    assert back.array.dtype == np.uint8 and back.array.tobytes() == labels.array.tobytes()
    np.testing.assert_allclose(F4 @ back.affine, ijk_to_ras(node), atol=1e-12, rtol=0)
    # update in place: same node, new shape and geometry
    smaller = Volume(np.ones((2, 3, 4), np.uint8), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0))
    assert mrml.node_from_volume(smaller, "relabelled", node=node, labelmap=True) is node
    assert node.GetName() == "relabelled" and slicer.util.arrayFromVolume(node).shape == (2, 3, 4)
    np.testing.assert_allclose(ijk_to_ras(node), F4 @ smaller.affine, atol=1e-12, rtol=0)


def test_linear_parent_transform_is_applied_and_nonlinear_refused(slicer_scene, make_volume):
    volume = make_volume(direction=OBLIQUE)
    node = mrml.node_from_volume(volume, "moved")
    local = ijk_to_ras(node)
    transform = linear_transform(slicer_scene, rigid())
    node.SetAndObserveTransformNodeID(transform.GetID())
    world = mrml.volume_from_node(node)
    np.testing.assert_allclose(F4 @ world.affine, rigid() @ local, atol=1e-9, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(world.direction, axis=0), 1.0, atol=1e-12)
    # a fresh node gets the world geometry; a transformed node gets it through its transform
    np.testing.assert_allclose(ijk_to_ras(mrml.node_from_volume(world, "hardened")), rigid() @ local, atol=1e-9, rtol=0)
    mrml.node_from_volume(volume, "moved", node=node)
    np.testing.assert_allclose(rigid() @ ijk_to_ras(node), F4 @ volume.affine, atol=1e-9, rtol=0)
    # world RAS of a voxel maps back to its index through the transform
    ras = F @ volume.index_to_physical((4.0, 6.0, 2.0))
    np.testing.assert_allclose(mrml.ras_to_ijk(node, ras), (4.0, 6.0, 2.0), atol=1e-9)

    grid = slicer_scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    node.SetAndObserveTransformNodeID(grid.GetID())
    for call in (lambda: mrml.volume_from_node(node), lambda: mrml.ras_to_ijk(node, (0.0, 0.0, 0.0)), lambda: mrml.node_from_volume(volume, "x", node=node)):
        with pytest.raises(ValueError, match="non-linear transform 'warp'.*harden"):
            call()


def test_volume_inputs_are_checked(slicer_scene, make_volume):
    with pytest.raises(TypeError, match="vtkMRMLScalarVolumeNode"):
        mrml.volume_from_node(None)
    with pytest.raises(TypeError, match="vtkMRMLScalarVolumeNode.*vtkMRMLSegmentationNode"):
        mrml.volume_from_node(slicer_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s"))
    with pytest.raises(ValueError, match="'empty' has no image data"):
        mrml.volume_from_node(slicer_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"))
    vector = slicer_scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(vector, np.zeros((2, 3, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="vtkMRMLVectorVolumeNode, not a scalar volume"):
        mrml.volume_from_node(vector)
    scalar = slicer_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "three components")
    image = vtk.vtkImageData()
    image.SetDimensions(4, 3, 2)
    image.AllocateScalars(vtk.VTK_FLOAT, 3)
    scalar.SetAndObserveImageData(image)
    with pytest.raises(ValueError, match="3 components per voxel"):
        mrml.volume_from_node(scalar)
    big = slicer_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "big labels")
    slicer.util.updateVolumeFromArray(big, np.full((2, 2, 2), 300, np.int16))
    with pytest.raises(ValueError, match="300..300; labels must be 0..255"):
        mrml.volume_from_node(big)

    volume = make_volume()
    with pytest.raises(TypeError, match="semisam.volume.Volume"):
        mrml.node_from_volume(volume.array, "raw")
    with pytest.raises(ValueError, match="name must not be empty"):
        mrml.node_from_volume(volume, " ")
    with pytest.raises(ValueError, match="non-integer values"):
        mrml.node_from_volume(volume, "probabilities", labelmap=True)
    with pytest.raises(TypeError, match="vtkMRMLLabelMapVolumeNode"):
        mrml.node_from_volume(volume.with_array(np.zeros(volume.shape, np.uint8)), "l", node=scalar, labelmap=True)


# ---------------------------------------------------------------------------------- segmentations


@pytest.mark.parametrize("direction", [AXIS_ALIGNED, OBLIQUE], ids=["axis-aligned", "oblique"])
def test_labels_round_trip_through_a_segmentation(slicer_scene, make_volume, direction):
    volume = make_volume(direction=direction)
    node = mrml.node_from_volume(volume, "image")
    labels = box_labels(volume.shape, seed=1, k=3)
    labels[labels == 2] = 0  # label 2 absent but named; label 3 present but unnamed
    segmentation = mrml.write_labels_to_segmentation(labels, node, names={1: "kidney", 2: "cyst"}, colors={1: (1.0, 0.0, 0.0)})
    s = segmentation.GetSegmentation()
    assert [s.GetNthSegment(n).GetName() for n in range(s.GetNumberOfSegments())] == ["kidney", "cyst", "target 3"]
    assert s.GetSegment(s.GetSegmentIdBySegmentName("kidney")).GetColor() == (1.0, 0.0, 0.0)
    np.testing.assert_allclose(s.GetSegment(s.GetSegmentIdBySegmentName("target 3")).GetColor(), mrml.default_segment_color(3))
    for value, name in [(1, "kidney"), (2, "cyst"), (3, "target 3")]:
        array = mrml.segment_array(segmentation, s.GetSegmentIdBySegmentName(name), node)
        assert array.dtype == np.uint8
        np.testing.assert_array_equal(array, (labels == value).astype(np.uint8))
    assert (labels == 1).sum() > 0 and (labels == 3).sum() > 0
    # the segment lies on the volume's grid in space, not merely round-trips
    sid = s.GetSegmentIdBySegmentName("kidney")
    image_to_world = vtk.vtkMatrix4x4()
    segmentation.GetBinaryLabelmapInternalRepresentation(sid).GetImageToWorldMatrix(image_to_world)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(image_to_world), ijk_to_ras(node), atol=1e-9, rtol=0)

    # writing again replaces same-named segments (names compare ignoring case) and keeps others
    s.AddEmptySegment("mine", "manual", [0.0, 0.0, 1.0])
    relabelled = np.zeros_like(labels)
    relabelled[2:4, 3:5, 4:9] = 1
    assert mrml.write_labels_to_segmentation(relabelled, node, segmentation, names={1: "Kidney"}) is segmentation
    assert [s.GetNthSegment(n).GetName() for n in range(s.GetNumberOfSegments())] == ["Kidney", "cyst", "target 3", "manual"]
    assert s.GetSegmentIdBySegmentName("kidney") == sid
    np.testing.assert_array_equal(mrml.segment_array(segmentation, sid, node), relabelled)
    np.testing.assert_array_equal(mrml.segment_array(segmentation, s.GetSegmentIdBySegmentName("target 3"), node), labels == 3)


def test_segmentation_follows_the_volume_transform(slicer_scene, make_volume):
    volume = make_volume(direction=OBLIQUE)
    node = mrml.node_from_volume(volume, "moved")
    transform = linear_transform(slicer_scene, rigid())
    node.SetAndObserveTransformNodeID(transform.GetID())
    labels = box_labels(volume.shape, seed=2, k=1)
    segmentation = mrml.write_labels_to_segmentation(labels, node)
    assert segmentation.GetTransformNodeID() == transform.GetID()
    sid = segmentation.GetSegmentation().GetSegmentIdBySegmentName("target")
    np.testing.assert_array_equal(mrml.segment_array(segmentation, sid, node), labels)
    image_to_parent = vtk.vtkMatrix4x4()
    segmentation.GetBinaryLabelmapInternalRepresentation(sid).GetImageToWorldMatrix(image_to_parent)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(image_to_parent), ijk_to_ras(node), atol=1e-9, rtol=0)

    elsewhere = slicer_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "untransformed")
    with pytest.raises(ValueError, match="'untransformed' is under no transform but its reference volume 'moved' is under transform 'T'"):
        mrml.write_labels_to_segmentation(labels, node, elsewhere)
    with pytest.raises(ValueError, match="same transform"):
        mrml.segment_array(segmentation, sid, mrml.node_from_volume(volume, "unmoved"))


def test_segmentation_inputs_are_checked(slicer_scene, make_volume):
    volume = make_volume()
    node = mrml.node_from_volume(volume, "image")
    labels = np.zeros(volume.shape, np.uint8)
    with pytest.raises(ValueError, match=r"label_array has shape \(12, 14\) but volume 'image' has \(12, 14, 16\)"):
        mrml.write_labels_to_segmentation(labels[..., 0], node)
    with pytest.raises(TypeError, match="integer labels"):
        mrml.write_labels_to_segmentation(labels.astype(np.float32), node)
    with pytest.raises(TypeError, match="numpy array"):
        mrml.write_labels_to_segmentation(labels.tolist(), node)
    negative = labels.astype(np.int16)
    negative[0, 0, 0] = -1
    with pytest.raises(ValueError, match="-1..0; labels must be 0..255"):
        mrml.write_labels_to_segmentation(negative, node)
    with pytest.raises(ValueError, match="labels 1 and 2 would both be segment 'Organ'"):
        mrml.write_labels_to_segmentation(labels, node, names={1: "organ", 2: "Organ"})
    with pytest.raises(ValueError, match=r"colors\[1\] must be \(r, g, b\) in 0..1"):
        mrml.write_labels_to_segmentation(labels, node, names={1: "a"}, colors={1: (255, 0, 0)})
    with pytest.raises(ValueError, match="label value 0 is outside 1..255"):
        mrml.write_labels_to_segmentation(labels, node, names={0: "background"})
    with pytest.raises(TypeError, match="vtkMRMLSegmentationNode"):
        mrml.write_labels_to_segmentation(labels, node, segmentation_node=node)
    segmentation = mrml.write_labels_to_segmentation(labels, node, names={1: "a"})
    with pytest.raises(ValueError, match="no segment with ID 'nope'; it has S_.* \\(a\\)"):
        mrml.segment_array(segmentation, "nope", node)
    with pytest.raises(TypeError, match="segment_id must be a string"):
        mrml.segment_array(segmentation, 0, node)


def test_modify_segment_add_replace_erase(slicer_scene):
    node = mrml.node_from_volume(Volume(np.zeros((6, 7, 8), np.float32), (0.8, 0.9, 2.0), (3.0, -4.0, 5.0)), "small")
    a = np.zeros((6, 7, 8), np.uint8)
    a[1:4, 2:5, 2:6] = 1  # 36 voxels
    segmentation = mrml.write_labels_to_segmentation(a, node)
    sid = segmentation.GetSegmentation().GetSegmentIdBySegmentName("target")
    read = lambda: mrml.segment_array(segmentation, sid, node).astype(bool)  # noqa: E731

    b = np.zeros(a.shape, bool)
    b[2:5, 3:6, 4:7] = True  # 27 voxels, 8 of them in a
    assert mrml.modify_segment(segmentation, sid, node, b, "add") == 19
    expected = a.astype(bool) | b
    assert expected.sum() == 55
    np.testing.assert_array_equal(read(), expected)
    assert mrml.modify_segment(segmentation, sid, node, b, "add") == 0

    # replace inside one plane only: a 2x2 proposal on z = 3; mask voxels elsewhere are ignored
    proposal = np.zeros(a.shape, bool)
    proposal[3, 0:2, 0:2] = True
    proposal[0, 6, 7] = True
    changed = mrml.modify_segment(segmentation, sid, node, proposal, "replace", region=(slice(3, 4),))
    assert changed == int(np.count_nonzero(expected[3])) + 4
    expected[3] = proposal[3]
    np.testing.assert_array_equal(read(), expected)

    # replace with a boolean region: the segment becomes empty there
    region = np.zeros(a.shape, bool)
    region[2, 3:5, 4:6] = True
    assert mrml.modify_segment(segmentation, sid, node, np.zeros(a.shape, np.uint8), "replace", region=region) == 4
    expected[region] = False
    np.testing.assert_array_equal(read(), expected)

    # erase a slab given as 0/1 integers
    everything = np.ones(a.shape, np.int64)
    assert mrml.modify_segment(segmentation, sid, node, everything, "erase", region=(slice(0, 3),)) == int(expected[:3].sum()) > 0
    expected[:3] = False
    np.testing.assert_array_equal(read(), expected)
    assert mrml.modify_segment(segmentation, sid, node, everything, "erase", region=(slice(0, 3),)) == 0
    assert mrml.modify_segment(segmentation, sid, node, everything, "replace") == expected.size - expected.sum()
    assert read().all()

    with pytest.raises(ValueError, match="mode must be one of add, replace, erase, got 'union'"):
        mrml.modify_segment(segmentation, sid, node, b, "union")
    with pytest.raises(ValueError, match=r"mask has shape \(7, 8\) but volume 'small' has \(6, 7, 8\)"):
        mrml.modify_segment(segmentation, sid, node, b[0], "add")
    with pytest.raises(TypeError, match="threshold probabilities first"):
        mrml.modify_segment(segmentation, sid, node, b.astype(np.float32), "add")
    with pytest.raises(ValueError, match="0..2; it must be 0/1"):
        mrml.modify_segment(segmentation, sid, node, b.astype(np.uint8) * 2, "add")
    with pytest.raises(TypeError, match="tuple of slices"):
        mrml.modify_segment(segmentation, sid, node, b, "replace", region=(3,))
    with pytest.raises(ValueError, match=r"region has shape \(6, 7, 7\)"):
        mrml.modify_segment(segmentation, sid, node, b, "replace", region=np.ones((6, 7, 7), bool))


# ---------------------------------------------------------------------------------- slice views


def slice_view(scene, orientation, dimensions=(200, 160), field_of_view=(100.0, 80.0)):
    """A slice node as a slice view has it: 0.5 mm per pixel."""
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    node.SetLayoutName("Red")
    assert node.SetOrientation(orientation)
    node.SetDimensions(dimensions[0], dimensions[1], 1)
    node.SetFieldOfView(field_of_view[0], field_of_view[1], 1.0)
    return node


# view (Axial, Sagittal, Coronal) on an LPS-identity volume: the array axis it shows, and the
# (di, dj, dk) voxel steps of +1 mm along screen x and screen y (radiological convention:
# screen x points to patient left in axial and coronal views, posterior in sagittal views).
AXIS_ALIGNED_VIEWS = {
    "Axial": (0, (1, 0, 0), (0, -1, 0)),
    "Sagittal": (2, (0, 1, 0), (0, 0, 1)),
    "Coronal": (1, (1, 0, 0), (0, 0, 1)),
}


@pytest.mark.parametrize("orientation", list(AXIS_ALIGNED_VIEWS))
def test_slice_view_pixels_hit_the_expected_voxels(slicer_scene, make_volume, orientation):
    volume = make_volume(shape=(12, 14, 16), spacing=(0.7, 0.55, 1.3), direction=AXIS_ALIGNED)
    node = mrml.node_from_volume(volume, "image")
    i0, j0, k0 = 5, 6, 4
    view = slice_view(slicer_scene, orientation)
    view.JumpSliceByCentering(*(F @ volume.index_to_physical((i0, j0, k0))))
    centre = (100.0, 80.0)
    np.testing.assert_allclose(mrml.xy_to_ras(view, centre), F @ volume.index_to_physical((i0, j0, k0)), atol=1e-9)
    np.testing.assert_allclose(mrml.ras_to_ijk(node, mrml.xy_to_ras(view, centre)), (i0, j0, k0), atol=1e-9)
    assert mrml.xy_to_ijk(view, node, centre) == (i0, j0, k0)

    axis, along_x, along_y = AXIS_ALIGNED_VIEWS[orientation]
    index = (k0, j0, i0)[axis]
    assert mrml.slice_plane(view, node) == (axis, index)
    row, col = {0: (j0, i0), 1: (k0, i0), 2: (k0, j0)}[axis]
    assert mrml.slice_xy_to_plane_rc(view, node, centre) == (axis, index, row, col)
    assert volume.array.take(index, axis)[row, col] == volume.array[k0, j0, i0]

    # two voxels along screen x, three along screen y (0.5 mm per pixel)
    spacing = np.array(volume.spacing)
    steps_x, steps_y = np.array(along_x), np.array(along_y)
    dx = 2 * float(spacing @ np.abs(steps_x)) / 0.5
    dy = 3 * float(spacing @ np.abs(steps_y)) / 0.5
    assert mrml.xy_to_ijk(view, node, (centre[0] + dx, centre[1])) == tuple(np.array((i0, j0, k0)) + 2 * steps_x)
    assert mrml.xy_to_ijk(view, node, (centre[0], centre[1] + dy)) == tuple(np.array((i0, j0, k0)) + 3 * steps_y)
    _, _, row2, col2 = mrml.slice_xy_to_plane_rc(view, node, (centre[0] + dx, centre[1] + dy))
    i2, j2, k2 = np.array((i0, j0, k0)) + 2 * steps_x + 3 * steps_y
    assert (row2, col2) == {0: (j2, i2), 1: (k2, i2), 2: (k2, j2)}[axis]

    with pytest.raises(ValueError, match="outside volume 'image'"):
        mrml.slice_xy_to_plane_rc(view, node, (0.0, 0.0))
    view.JumpSliceByCentering(*(F @ volume.index_to_physical((i0, j0, k0)) + 100.0 * np.array(view.GetSliceToRAS().MultiplyPoint((0, 0, 1, 0))[:3])))
    with pytest.raises(ValueError, match="outside volume 'image'.*scroll into the volume"):
        mrml.slice_plane(view, node)


@pytest.mark.parametrize("orientation,axis", [("Axial", 2), ("Sagittal", 1), ("Coronal", 0)])
def test_slice_plane_picks_the_most_aligned_axis_of_an_oblique_volume(slicer_scene, make_volume, orientation, axis):
    # i points (roughly) superior, j left, k posterior; then tilted by 10 degrees
    permuted = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    direction = Rotation.from_euler("xyz", [10.0, -6.0, 8.0], degrees=True).as_matrix() @ permuted
    volume = make_volume(shape=(12, 14, 16), spacing=(0.7, 0.55, 1.3), direction=direction)
    node = mrml.node_from_volume(volume, "oblique")
    transform = linear_transform(slicer_scene, rigid(angles=(0.0, 0.0, 5.0)))
    node.SetAndObserveTransformNodeID(transform.GetID())
    i0, j0, k0 = 9, 4, 7
    world = rigid(angles=(0.0, 0.0, 5.0)) @ np.append(F @ volume.index_to_physical((i0, j0, k0)), 1.0)
    view = slice_view(slicer_scene, orientation)
    view.JumpSliceByCentering(*world[:3])
    assert mrml.xy_to_ijk(view, node, (100, 80)) == (i0, j0, k0)
    index = (k0, j0, i0)[axis]
    assert mrml.slice_plane(view, node) == (axis, index)
    axis_, index_, row, col = mrml.slice_xy_to_plane_rc(view, node, (100, 80))
    assert (axis_, index_) == (axis, index)
    assert volume.array.take(index, axis)[row, col] == volume.array[k0, j0, i0]


def test_slice_view_inputs_are_checked(slicer_scene, make_volume):
    node = mrml.node_from_volume(make_volume(), "image")
    view = slice_view(slicer_scene, "Axial")
    with pytest.raises(TypeError, match="vtkMRMLSliceNode, got vtkMRMLScalarVolumeNode 'image'"):
        mrml.xy_to_ras(node, (1, 2))
    with pytest.raises(ValueError, match="xy must have 2 or 3 values, got 1"):
        mrml.xy_to_ras(view, (1,))
    with pytest.raises(TypeError, match="xy must be a sequence"):
        mrml.xy_to_ras(view, "12")
    with pytest.raises(ValueError, match="ras must be finite"):
        mrml.ras_to_ijk(node, (0.0, float("nan"), 0.0))
    with pytest.raises(TypeError, match="vtkMRMLScalarVolumeNode"):
        mrml.slice_plane(view, view)
