"""Which adapters the server loads, and under which model names.

Names and paths are fixed at startup; a request's `model` field only picks one of these names (a dictionary
lookup), so no request can name a path or load anything.

    --adapter NAME=PATH    PATH: an adapter directory (adapter_config.json) or a run whose final/ is one
    --adapter-dir DIR      every such folder directly inside DIR, served under the folder's name

A name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit (so never '..', never a path).
An --adapter-dir adapter's own files must lie inside DIR once symbolic links are resolved: a folder, its final/,
or anything under them that links outside DIR is refused, so that whoever can write into DIR cannot make the
server load weights from elsewhere. (The base an adapter names must be the served base, checked at load.)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tunesmith.errors import ConfigError
from tunesmith.model.resolve import ADAPTER_CONFIG

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def configured_adapters(specs: list[str], adapter_dir: str | None = None) -> list[tuple[str, Path]]:
    """(model name, resolved adapter directory) of each --adapter NAME=PATH, then of each adapter in
    --adapter-dir; a name used twice is an error."""
    found = [parse_spec(spec) for spec in specs] + (adapters_in(adapter_dir) if adapter_dir else [])
    seen: set[str] = set()
    for name, _ in found:
        if name in seen:
            raise ConfigError(f"--adapter/--adapter-dir: the model name {name!r} is used twice")
        seen.add(name)
    return found


def check_name(name: str, option: str) -> str:
    if not NAME.fullmatch(name):
        raise ConfigError(f"{option}: the model name {name!r} is not allowed; use 1-64 letters, digits, '.', '_' "
                          "or '-', starting with a letter or digit")
    return name


def parse_spec(spec: str) -> tuple[str, Path]:
    """"NAME=PATH" -> (NAME, the resolved directory holding adapter_config.json)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--adapter: {spec!r} should be NAME=PATH")
    check_name(name, "--adapter")
    return name, adapter_target(Path(path), f"--adapter {name}")


def adapter_target(path: Path, option: str) -> Path:
    """The resolved directory holding adapter_config.json: `path` itself, or the final/ of a run at `path`."""
    if not path.is_dir():
        raise ConfigError(f"{option}: {path} is not a directory")
    target = _target(path.resolve())
    if target is None:
        raise ConfigError(f"{option}: {path} holds no {ADAPTER_CONFIG} (neither an adapter directory nor a run "
                          "whose final/ is one)")
    return target


def adapters_in(adapter_dir: str) -> list[tuple[str, Path]]:
    """(folder name, resolved adapter directory) of each adapter folder directly inside `adapter_dir`, by name;
    folders holding no adapter are skipped, an adapter with a bad name or reaching outside is an error."""
    root = Path(adapter_dir)
    if not root.is_dir():
        raise ConfigError(f"--adapter-dir: {adapter_dir} is not a directory")
    root = root.resolve()
    found = []
    for entry in sorted(root.iterdir()):
        target = _target(entry.resolve()) if entry.is_dir() else None
        if target is None:
            continue
        option = f"--adapter-dir {adapter_dir}"
        check_name(entry.name, option)
        outside = _first_outside(root, [entry, target]) or _first_outside(root, _tree(target))
        if outside is not None:
            raise ConfigError(f"{option}: {entry.name} reads {outside}, outside {root} (a symbolic link); copy "
                              "the adapter into the directory or serve it with --adapter")
        found.append((entry.name, target))
    if not found:
        raise ConfigError(f"--adapter-dir: {adapter_dir} holds no adapter folder (one with {ADAPTER_CONFIG}, or a "
                          "run whose final/ has one)")
    return found


def _target(path: Path) -> Path | None:
    for target in (path, path / "final"):
        if (target / ADAPTER_CONFIG).is_file():
            return target.resolve()
    return None


def _tree(folder: Path) -> list[Path]:
    """Every file and folder under `folder`, without following links (a linked folder is listed, not entered)."""
    return [Path(top, name) for top, dirs, files in os.walk(folder) for name in dirs + files]


def _first_outside(root: Path, paths: list[Path]) -> Path | None:
    return next((p.resolve() for p in paths if not p.resolve().is_relative_to(root)), None)
