"""What SemiSAM needs inside 3D Slicer and how it gets installed (Qt-free).

Slicer ships its own Python with numpy, SimpleITK and VTK; those are never replaced. torch
(and torchvision) come from the PyTorch extension's ``PyTorchUtils``, which chooses the build
that matches the GPU and driver. Everything else is pip-installed from
``Resources/requirements.txt`` with a constraints file that pins the protected packages to the
versions already present, so pip fails loudly rather than replacing them.

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

_LINE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(==\s*([A-Za-z0-9.+!_-]+))?\s*(#.*)?$")

VersionOf = Callable[[str], Optional[str]]


def installed_version(name: str) -> Optional[str]:
    """The installed distribution's version, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: Path = REQUIREMENTS) -> List[Tuple[str, Optional[str]]]:
    """``(name, pinned version or None)`` per requirement line; refuses anything else."""
    out = []
    for n, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise ValueError(f"{path}:{n}: cannot read requirement {line!r} (expected 'name' or 'name==version')")
        name = m.group(1)
        if _canonical(name) in {_canonical(p) for p in PROTECTED}:
            raise ValueError(f"{path}:{n}: {name} is installed by Slicer or the PyTorch extension and must not be listed")
        out.append((name, m.group(3)))
    return out


@dataclass
class InstallPlan:
    """What is missing: torch (through PyTorchUtils) and pip requirements (``name==version``)."""

    torch: bool
    pip: List[str] = field(default_factory=list)
    constraints: List[str] = field(default_factory=list)  # ``name==version`` of protected packages present

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
        lines += ["", "Slicer's own packages (" + ", ".join(p for p in PROTECTED if p not in ("torch", "torchvision")) + ") are kept as they are.",
                  "The download can take several minutes; Slicer may ask to restart afterwards. Install now?"]
        return "\n".join(lines)

    def pip_arguments(self, constraints_file: Optional[Path] = None) -> List[str]:
        """Arguments for ``pip install`` (``slicer.util.pip_install`` takes them as one string)."""
        args = list(self.pip)
        if constraints_file is not None and self.constraints:
            args = ["--constraint", str(constraints_file)] + args
        return args


def plan(requirements: Optional[List[Tuple[str, Optional[str]]]] = None, version_of: VersionOf = installed_version) -> InstallPlan:
    """What has to be installed so that ``import semisam`` and its models work."""
    reqs = read_requirements() if requirements is None else requirements
    torch_missing = version_of("torch") is None or version_of("torchvision") is None
    pip = []
    for name, pin in reqs:
        have = version_of(name)
        if have is None or (pin is not None and have != pin):
            pip.append(f"{name}=={pin}" if pin else name)
    constraints = [f"{p}=={v}" for p in PROTECTED if (v := version_of(p)) is not None]
    return InstallPlan(torch_missing, pip, constraints)


def write_constraints(plan_: InstallPlan, folder: Path) -> Path:
    """The constraints file that keeps pip from replacing Slicer's packages."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "semisam-constraints.txt"
    path.write_text("".join(f"{c}\n" for c in plan_.constraints), encoding="utf-8")
    return path
