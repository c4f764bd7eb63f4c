"""pyproject.toml gives ranges, constraints.txt the tested versions, and the two agree."""
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# Requires-Python of each pinned release, read from its wheel's METADATA (`pip download --no-deps`).
# Bumping a pin means reading it again: the test fails until the new version is recorded here.
PIN_REQUIRES_PYTHON = {
    "torch": ("2.14.1", ">=3.10"),
    "torchvision": ("0.29.1", ">=3.10,!=3.14.1"),
    "open-clip-torch": ("3.3.0", ">=3.9"),
    "submitit": ("1.5.4", ">=3.8"),
    "tensorboard": ("2.21.0", ">=3.9"),
    "pandas": ("3.1.1", ">=3.11"),
    "pillow": ("13.0.0", ">=3.11"),
    "numpy": ("2.4.6", ">=3.11"),
    "pyyaml": ("6.0.4", ">=3.10"),
    "tqdm": ("4.70.1", ">=3.8"),
    "safetensors": ("0.8.0", ">=3.10"),
    "pytest": ("9.2.0", ">=3.10"),
    "pytest-timeout": ("2.4.0", ">=3.7"),
    "webdataset": ("1.0.2", ">=3.10"),
    "packaging": ("26.4", ">=3.8"),
    "torch-fidelity": ("0.4.0", ">=3.6"),
    "diffusers": ("0.42.1", ">=3.11.0"),
}


def _requirements() -> dict[str, Requirement]:
    reqs = PROJECT["dependencies"] + [r for extra in PROJECT["optional-dependencies"].values() for r in extra]
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            specs = list(req.specifier)
            assert len(specs) == 1 and specs[0].operator == "==", f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(req.name)] = Version(specs[0].version)
    return pins


def test_dependencies_are_ranges_not_pins():
    # An exact pin would replace a cluster's own torch/NCCL build when installed into its environment.
    for name, req in _requirements().items():
        ops = {s.operator for s in req.specifier}
        assert ops & {">", ">="} and not ops & {"==", "==="}, \
            f"pyproject.toml: {req} should be a range like >=LOW,<HIGH (exact pins go in constraints.txt)"


def test_constraints_pin_every_dependency_inside_its_range():
    reqs, pins = _requirements(), _pins()
    assert not reqs.keys() - pins.keys(), f"constraints.txt lacks pins for {sorted(reqs.keys() - pins.keys())}"
    for name, req in reqs.items():
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {req}"


def test_requires_python_admits_no_python_a_pin_rejects():
    pins = _pins()
    ours = SpecifierSet(PROJECT["requires-python"])
    for name, pin in pins.items():
        recorded, theirs = PIN_REQUIRES_PYTHON.get(name, (None, None))
        assert str(pin) == recorded, \
            f"{name}=={pin}: record its Requires-Python in PIN_REQUIRES_PYTHON (recorded for {recorded})"
        for python in (Version(f"3.{minor}") for minor in range(8, 20)):
            assert not (python in ours and python not in SpecifierSet(theirs)), \
                f"requires-python {ours} admits Python {python}, which {name}=={pin} does not support ({theirs})"


def test_make_installs_under_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^CONSTRAINTS := constraints\.txt$", makefile, re.M)
    assert re.search(r"^\$\(STAMP\):.*\$\(CONSTRAINTS\)", makefile, re.M), "the venv must reinstall when pins change"
    assert re.search(r"pip install .*-c \$\(CONSTRAINTS\)", makefile)
