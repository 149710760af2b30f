"""The versions tunesmith runs with: the ranges pyproject.toml declares, checked when a command starts.

pip honours those ranges when it installs tunesmith, but an environment can change afterwards (`pip install -U
transformers`), and a major release that renamed an argument fails far from its cause. So each command first
reads the installed versions (package metadata only: no library is imported) and stops with one line that names
the package, the version found, the range tunesmith needs and the command that installs it.
"""

from __future__ import annotations

from importlib import metadata

from packaging.requirements import Requirement

from tunesmith.errors import TunesmithError

CHECKED = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "tokenizers", "safetensors")


class IncompatibleVersion(TunesmithError):
    """An installed library outside the range tunesmith declares."""


def declared_ranges() -> dict[str, Requirement]:
    """name -> requirement, for the libraries in CHECKED, as this installed tunesmith declares them."""
    try:
        declared = metadata.requires("tunesmith") or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed: nothing declared
        return {}
    ranges = {}
    for line in declared:
        requirement = Requirement(line)
        if requirement.marker is None and requirement.name in CHECKED:
            ranges[requirement.name] = requirement
    return ranges


def incompatible(ranges: dict[str, Requirement] | None = None,
                 installed: dict[str, str | None] | None = None) -> list[str]:
    """One message per checked library that is missing or outside its declared range."""
    ranges = declared_ranges() if ranges is None else ranges
    problems = []
    for name, requirement in ranges.items():
        found = installed.get(name) if installed is not None else _installed(name)
        if found is None:
            problems.append(f"{name} is not installed; tunesmith needs {requirement}: pip install '{requirement}'")
        elif not requirement.specifier.contains(found, prereleases=True):
            problems.append(f"{name} {found} is installed; tunesmith needs {requirement} "
                            f"(tested versions: requirements/lock-cpu.txt): pip install '{requirement}'")
    return problems


def check_versions() -> None:
    """Raise IncompatibleVersion naming every library outside its range (the CLI prints it as one line)."""
    problems = incompatible()
    if problems:
        raise IncompatibleVersion("; ".join(problems))


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
