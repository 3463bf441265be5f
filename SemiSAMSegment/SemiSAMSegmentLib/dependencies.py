"""What SemiSAM needs inside 3D Slicer and how it gets installed (Qt-free).

Slicer ships its own Python with numpy, SimpleITK and VTK; those are never replaced. torch
(and torchvision) come from the PyTorch extension's ``PyTorchUtils``, which chooses the build
that matches the GPU and driver. Everything else is pip-installed from
``Resources/requirements.txt`` with a constraints file that pins the protected packages to the
versions already present, so pip fails loudly rather than replacing them.

Packages that Slicer itself ships (scipy, requests, pydicom, highdicom: SuperBuild's
``External_python-*-requirements.cmake``) are listed with a lower bound (``name>=X``), never a
pin: when Slicer has them, their installed versions go into the constraints file with the
protected ones (kept as they are); one older than the bound is a conflict, reported, never
replaced. Our own packages are pinned (``name==X``, as in pyproject.toml).

Optional groups (``extras``) have their own file: ``requirements-medsam2.txt`` holds ``sam2``,
which PyPI has only as a source archive (its build needs a compiler and torch inside pip's
isolated build environment), so it is installed only when a MedSAM2 checkpoint is configured,
after its own confirmation.

The widget shows :meth:`InstallPlan.summary` in one confirmation dialog and then runs the
plan; this module only decides.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

#: Packages Slicer (or the PyTorch extension) owns: never installed or replaced by our pip step.
PROTECTED = ("numpy", "SimpleITK", "vtk", "torch", "torchvision")
#: The torch the core is tested with; PyTorchUtils is asked for at least this.
TORCH_REQUIREMENT = ">=2.5"

REQUIREMENTS = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
#: Optional groups: name -> requirements file.
EXTRAS = {"medsam2": REQUIREMENTS.with_name("requirements-medsam2.txt")}

_LINE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*((==|>=)\s*([A-Za-z0-9.+!_-]+))?\s*(#.*)?$")

VersionOf = Callable[[str], Optional[str]]


def installed_version(name: str) -> Optional[str]:
    """The installed distribution's version, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _release(version: str) -> Tuple[int, ...]:
    """The numeric release part of a version (``"1.17.1rc1"`` -> (1, 17, 1))."""
    out = []
    for part in version.split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    return tuple(out)


def read_requirements(path: Path = REQUIREMENTS) -> List[Tuple[str, Optional[str]]]:
    """``(name, spec)`` per requirement line: spec is the pinned version (``name==X``), ``">=X"``
    for a lower bound, or None; refuses anything else."""
    out = []
    for n, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise ValueError(f"{path}:{n}: cannot read requirement {line!r} (expected 'name', 'name==version' or 'name>=version')")
        name = m.group(1)
        if _canonical(name) in {_canonical(p) for p in PROTECTED}:
            raise ValueError(f"{path}:{n}: {name} is installed by Slicer or the PyTorch extension and must not be listed")
        spec = None if m.group(3) is None else m.group(4) if m.group(3) == "==" else ">=" + m.group(4)
        out.append((name, spec))
    return out


@dataclass
class InstallPlan:
    """What is missing: torch (through PyTorchUtils) and pip requirements (``name==version``)."""

    torch: bool
    pip: List[str] = field(default_factory=list)
    constraints: List[str] = field(default_factory=list)  # ``name==version`` of protected packages present
    conflicts: List[str] = field(default_factory=list)  # Slicer's packages older than SemiSAM needs

    @property
    def needed(self) -> bool:
        return self.torch or bool(self.pip)

    def summary(self) -> str:
        """The text of the one confirmation dialog: everything that will be installed."""
        if not self.needed:
            return "All SemiSAM requirements are installed."
        lines = ["SemiSAM needs these Python packages, which are not installed yet:", ""]
        if self.torch:
            lines.append(f"- PyTorch (torch{TORCH_REQUIREMENT} and torchvision), through the PyTorch extension, which picks the build for this computer's GPU")
        lines += [f"- {spec}" for spec in self.pip]
        if any(s.split("=")[0].split(">")[0] == "sam2" for s in self.pip):
            lines += ["", "sam2 (for MedSAM2) is built from source: this needs a C++ compiler and several minutes."]
        lines += ["", "Slicer's own packages (" + ", ".join(p for p in PROTECTED if p not in ("torch", "torchvision")) + ") are kept as they are.",
                  "The download can take several minutes; Slicer may ask to restart afterwards. Install now?"]
        return "\n".join(lines)

    def pip_arguments(self, constraints_file: Optional[Path] = None) -> List[str]:
        """Arguments for ``pip install``, as a list (``slicer.util.pip_install`` splits a single
        string with shlex, which would eat the backslashes of a Windows constraints path)."""
        args = list(self.pip)
        if constraints_file is not None and self.constraints:
            args = ["--constraint", str(constraints_file)] + args
        return args


def plan(requirements: Optional[List[Tuple[str, Optional[str]]]] = None, version_of: VersionOf = installed_version,
         extras: Tuple[str, ...] = ()) -> InstallPlan:
    """What has to be installed so that ``import semisam`` and its models work (plus the
    optional groups named in ``extras``)."""
    unknown = [e for e in extras if e not in EXTRAS]
    if unknown:
        raise ValueError(f"unknown optional requirement group(s) {unknown}; known: {sorted(EXTRAS)}")
    reqs = list(read_requirements() if requirements is None else requirements)
    for extra in extras:
        reqs += read_requirements(EXTRAS[extra])
    torch_missing = version_of("torch") is None or version_of("torchvision") is None
    pip, kept, conflicts = [], [], []
    for name, spec in reqs:
        have = version_of(name)
        if spec is not None and spec.startswith(">="):  # shipped by Slicer: keep its version
            bound = spec[2:]
            if have is None:
                pip.append(f"{name}>={bound}")
            elif _release(have) < _release(bound):
                conflicts.append(f"{name} {have} (this Slicer's) is older than SemiSAM needs (>= {bound}); SemiSAM will not replace "
                                 "Slicer's own packages: use a newer Slicer")
            else:
                kept.append(f"{name}=={have}")
        elif have is None or (spec is not None and have != spec):
            pip.append(f"{name}=={spec}" if spec else name)
    constraints = [f"{p}=={v}" for p in PROTECTED if (v := version_of(p)) is not None] + kept
    return InstallPlan(torch_missing, pip, constraints, conflicts)


def write_constraints(plan_: InstallPlan, folder: Path) -> Path:
    """The constraints file that keeps pip from replacing Slicer's packages."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "semisam-constraints.txt"
    path.write_text("".join(f"{c}\n" for c in plan_.constraints), encoding="utf-8")
    return path
