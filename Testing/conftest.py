"""Shared fixtures: real-data locations and geometric test volumes."""

from __future__ import annotations

import atexit
import gzip
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from semisam.volume import Volume

REPO = Path(__file__).resolve().parents[1]

# Converted encoders (semisam.models.backends) go to a folder of this test session, never to the
# user's ~/.semisam/cache; it is made once per session and removed at exit.
os.environ["SEMISAM_CACHE"] = tempfile.mkdtemp(prefix="semisam-test-cache-")
atexit.register(shutil.rmtree, os.environ["SEMISAM_CACHE"], True)
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data {path} is absent (only development checkouts have ../shared/data)")
    return path


def load_npy_gz(path: Path) -> np.ndarray:
    with gzip.open(path) as fh:
        return np.load(fh)


def oblique(angles_deg=(17.0, -23.0, 31.0)) -> np.ndarray:
    return Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()


def blob_label(shape, centre=None, radius=None, spacing=(1.0, 1.0, 1.0), two=False) -> np.ndarray:
    """An ellipsoid in mm (so anisotropic spacing is respected); optionally a second label."""
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    centre = centre or [n / 2 for n in shape]
    radius = radius or 0.3 * min(n * s for n, s in zip(shape, spacing[::-1]))
    d = ((zz - centre[0]) * spacing[2]) ** 2 + ((yy - centre[1]) * spacing[1]) ** 2 + ((xx - centre[2]) * spacing[0]) ** 2
    label = (d < radius**2).astype(np.uint8)
    if two:
        label[(label == 1) & (xx > centre[2])] = 2
    return label


@pytest.fixture
def make_volume():
    """Factory for a random image Volume with given shape/spacing/direction/origin."""

    def _make(shape=(12, 14, 16), spacing=(0.7, 0.55, 1.3), direction=None, origin=(-10.5, 20.25, 3.125), seed=0, dtype=np.float32):
        rng = np.random.default_rng(seed)
        arr = (rng.random(shape) * 100).astype(dtype)
        return Volume(arr, spacing, origin, oblique() if direction is None else direction)

    return _make


import slicer_app  # noqa: E402  (puts the Slicer module folders on sys.path; imports slicer lazily)


@pytest.fixture
def slicer_scene():
    """A clean MRML scene wired like Slicer's at start-up (``slicer.mrmlScene``,
    ``slicer.modules.<name>.logic()``); skipped without the ``slicer-core`` wheel. The logics
    live for the whole session; the scene is cleared before and after each test."""
    pytest.importorskip("slicer")
    app = slicer_app.start()
    app.clear()
    yield app.scene
    app.clear()
