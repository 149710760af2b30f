"""Installs: the lock files are exact and complete, pyproject's ranges admit them, and a library outside its
range stops a command with one line that says what to install."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tunesmith.cli import main
from tunesmith.compat import declared_ranges, incompatible

ROOT = Path(__file__).resolve().parents[1]
LOCKS = {kind: ROOT / "requirements" / f"lock-{kind}.txt" for kind in ("cpu", "cuda")}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[^=\s]+", line) for line in lines), "only exact pins"
    return {_canonical(line.split("==")[0]): line.split("==")[1] for line in lines}


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_each_lock_pins_every_dependency_within_the_declared_ranges(kind):
    pins = _pins(LOCKS[kind])
    for line in metadata.requires("tunesmith"):
        requirement = Requirement(line)
        extra = requirement.marker is not None and re.search(r'extra == "(\w+)"', str(requirement.marker))
        if requirement.name == "tunesmith" or extra and extra.group(1) not in ("test", "bench", "track", "serve",
                                                                                  "export", "models"):
            continue  # an extra that names other extras, or one the locks do not install
        name = _canonical(requirement.name)
        assert name in pins, f"{kind} lock lacks {requirement.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {requirement}"


def test_the_cuda_lock_is_the_cpu_lock_plus_torchs_cuda_build():
    cpu, cuda = _pins(LOCKS["cpu"]), _pins(LOCKS["cuda"])
    assert all(cuda[name] == version for name, version in cpu.items()), "the same versions of the shared packages"
    assert any(name.startswith("nvidia-") for name in cuda) and not any(n.startswith("nvidia-") for n in cpu)


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="not in the project's virtual environment")
def test_this_environment_is_the_cpu_lock():
    """What `make install` installed is what the lock says (the local label of torch's CPU build aside)."""
    pins = _pins(LOCKS["cpu"])
    installed = {_canonical(d.metadata["Name"]): d.version.split("+")[0] for d in metadata.distributions()}
    differ = {n: (v, installed.get(n)) for n, v in pins.items() if installed.get(n) != v}
    assert not differ, f"installed versions differ from requirements/lock-cpu.txt: {differ}"


def test_a_library_outside_its_range_is_named_with_the_install_command():
    ranges = {"transformers": Requirement("transformers>=5.25,<6"), "peft": Requirement("peft>=0.17,<1")}
    problems = incompatible(ranges, {"transformers": "6.0.0", "peft": None})
    assert problems == [
        "transformers 6.0.0 is installed; tunesmith needs transformers<6,>=5.25 (tested versions: "
        "requirements/lock-cpu.txt): pip install 'transformers<6,>=5.25'",
        "peft is not installed; tunesmith needs peft<1,>=0.17: pip install 'peft<1,>=0.17'"]
    assert incompatible(ranges, {"transformers": "5.25.0", "peft": "0.21.2"}) == []


def test_every_major_library_has_an_upper_bound():
    assert all(r.specifier and any(s.operator == "<" for s in r.specifier) for r in declared_ranges().values()), \
        declared_ranges()


def test_a_command_stops_with_one_line_before_it_starts(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("tunesmith.compat._installed", lambda name: "6.1.0" if name == "transformers" else
                        metadata.version(name))
    assert main(["prepare", str(tmp_path / "absent.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: transformers 6.1.0 is installed; tunesmith needs transformers<6") and \
        err.count("\n") == 1
