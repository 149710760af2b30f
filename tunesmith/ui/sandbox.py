"""The folders the studio may read, write and launch from: the runs folder (--runs) and the project's configs/.

Every path a request names is relative to one of them; an absolute path, a `..` component, or a link whose
target lies outside is refused (`Refused`, answered 403). A config the studio launches must write inside the runs
folder: its train.output_dir (and eval.output_dir, data.cache_dir when set) are checked the same way.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.errors import TunesmithError


class Refused(TunesmithError):
    """A path outside what the studio may touch."""


class Sandbox:
    """The project root (where launched commands run, so relative paths in configs mean what they mean to the
    CLI), the runs folder and the configs folder, all resolved once."""

    def __init__(self, root: Path, runs: Path, configs: Path) -> None:
        self.root = Path(root).resolve()
        self.runs = self._absolute(runs)
        self.configs = self._absolute(configs)

    def _absolute(self, path: Path) -> Path:
        path = Path(path).expanduser()
        return (path if path.is_absolute() else self.root / path).resolve()

    def run_dir(self, run_id: str) -> Path:
        """The run folder `run_id` (a path relative to the runs folder, e.g. "demo/sft"); it must exist."""
        path = inside(self.runs, run_id, "run")
        if not path.is_dir():
            raise Refused(f"run {run_id!r}: no such run in {self.runs}")
        return path

    def run_id(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.runs).as_posix()

    def config_file(self, ref: str) -> Path:
        """A config to launch: "recipe:NAME.yaml" (under configs/) or "run:RUN_ID" (that run's config.yaml)."""
        kind, _, name = ref.partition(":")
        if kind == "recipe":
            path = inside(self.configs, name, "recipe")
        elif kind == "run":
            path = inside(self.run_dir(name), "config.yaml", "run config")
        else:
            raise Refused(f"config {ref!r}: expected recipe:NAME.yaml or run:RUN_ID")
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            raise Refused(f"config {ref!r}: no such YAML file")
        return path

    def output(self, value: str | Path, key: str) -> Path:
        """A folder a launched command writes (`key` names the config key): inside the runs folder."""
        path = self._absolute(Path(value))
        if not path.is_relative_to(self.runs):
            raise Refused(f"{key}: {value} is outside the runs folder {self.runs}; the studio only writes there")
        return path

    def recipes(self) -> list[str]:
        """The YAML files under configs/ (links leading outside are left out), as "recipe:NAME" references."""
        if not self.configs.is_dir():
            return []
        found = sorted(p for p in self.configs.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
        return [f"recipe:{p.relative_to(self.configs).as_posix()}" for p in found
                if p.resolve().is_relative_to(self.configs)]


def inside(base: Path, relative: str, what: str) -> Path:
    """`base / relative`, resolved, refused unless it stays inside `base` (links are followed first)."""
    if not relative or "\x00" in relative or "\\" in relative:
        raise Refused(f"{what} {relative!r}: not a relative path")
    path = Path(relative)
    if path.is_absolute() or ".." in path.parts:
        raise Refused(f"{what} {relative!r}: only paths inside {base} are allowed")
    target = (base / path).resolve()
    if not target.is_relative_to(base):
        raise Refused(f"{what} {relative!r}: leads outside {base} (through a link)")
    return target
