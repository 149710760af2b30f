"""What the studio may start, checked before anything runs, as the command line would check it.

A config comes from configs/ or from a run (its resolved config.yaml); `key=value` overrides go through the same
`load_config` and `check_paths` as on the command line, so a mistake is the CLI's one-line error, shown before a
process starts. Everything a command writes must lie inside the runs folder (`Sandbox.output`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.compare import STRATEGIES, parse_strategy
from tunesmith.config import Config, check_paths, load_config
from tunesmith.errors import ConfigError
from tunesmith.eval.command import eval_sets
from tunesmith.train.checkpoint import complete_checkpoints
from tunesmith.ui.sandbox import Sandbox

COMMANDS = ("train", "prepare", "eval", "compare-strategies", "estimate")
DELIVERIES = ("merge", "export-hf", "export-gguf")
QUANTS = ("f32", "f16", "q8_0")


@dataclass
class Plan:
    """A checked command: `python -m tunesmith ARGV`, recorded in (and writing under) `home`."""

    command: str
    argv: list[str]
    home: Path
    notes: list[str] = field(default_factory=list)


def plan_command(sandbox: Sandbox, command: str, config: str, overrides: list[str],
                 strategies: list[str] | None = None, compare: list[str] | None = None) -> Plan:
    """Check a train / prepare / eval / compare-strategies / estimate launch; raises ConfigError or Refused."""
    if command not in COMMANDS:
        raise ConfigError(f"command: {command!r} is not one the studio starts ({', '.join(COMMANDS)})")
    path = sandbox.config_file(config)
    overrides = clean_overrides(overrides)
    cfg = load_config(path, overrides)
    home = check_outputs(sandbox, cfg)
    argv = [command, str(path), *overrides]
    if command in ("train", "prepare", "estimate"):
        check_paths(cfg)  # as the CLI does before it imports the training stack
    if command == "train" and _holds_a_run(home):
        raise ConfigError(f"train.output_dir: {sandbox.run_id(home)} already holds a run; resume it from its "
                          "page or choose another train.output_dir")
    if command == "eval":
        argv += _eval_arguments(sandbox, cfg, compare)
    if command == "compare-strategies":
        argv += _strategies(strategies or [])
    return Plan(command, argv, home)


def plan_resume(sandbox: Sandbox, run_id: str, overrides: list[str]) -> Plan:
    """Continue a stopped run from its latest checkpoint: `train RUN/config.yaml --resume` (plus overrides, e.g.
    train.max_steps, which changes the schedule from there on)."""
    run = sandbox.run_dir(run_id)
    path = sandbox.config_file(f"run:{run_id}")
    overrides = clean_overrides(overrides)
    cfg = load_config(path, [*overrides, "train.resume=true"])
    home = check_outputs(sandbox, cfg)
    if home != run:
        raise ConfigError(f"train.output_dir: {cfg.train.output_dir} is not this run's folder; resume runs in place")
    check_paths(cfg)
    if not complete_checkpoints(run / "checkpoints"):
        raise ConfigError(f"--resume: {run_id} has no complete checkpoint to continue from")
    return Plan("train", ["train", str(path), *overrides, "--resume"], run)


def plan_delivery(sandbox: Sandbox, run_id: str, action: str, quant: str = "q8_0") -> Plan:
    """Merge a finished run's adapter, or export it (merged on the way) as Hugging Face files or GGUF; the
    output goes inside the run folder (merged/, export/hf/, export/model-QUANT.gguf)."""
    run = sandbox.run_dir(run_id)
    if action not in DELIVERIES:
        raise ConfigError(f"action: {action!r} is not one of {', '.join(DELIVERIES)}")
    if not (run / "final").is_dir():
        raise ConfigError(f"{run_id}: no final/ yet (training has not finished); nothing to {action}")
    if action == "merge":
        return Plan("merge", ["merge", str(run), "--output", str(run / "merged")], run)
    if action == "export-hf":
        return Plan("export", ["export", str(run), "--output", str(run / "export" / "hf"), "--format", "hf"], run)
    if quant not in QUANTS:
        raise ConfigError(f"quant: {quant!r} is not one of {', '.join(QUANTS)}")
    output = run / "export" / f"model-{quant}.gguf"
    output.parent.mkdir(exist_ok=True)
    return Plan("export", ["export", str(run), "--output", str(output), "--format", "gguf", "--quant", quant], run)


def check_outputs(sandbox: Sandbox, cfg: Config) -> Path:
    """Every folder the config writes lies inside the runs folder; returns train.output_dir, resolved."""
    home = sandbox.output(cfg.train.output_dir, "train.output_dir")
    if cfg.eval.output_dir:
        sandbox.output(cfg.eval.output_dir, "eval.output_dir")
    if cfg.data.cache_dir:
        sandbox.output(cfg.data.cache_dir, "data.cache_dir")
    return home


def clean_overrides(overrides: list[str]) -> list[str]:
    """Overrides as the command line takes them: `key.sub=value`, blank lines and comments dropped."""
    kept = [o.strip() for o in overrides if o.strip() and not o.strip().startswith("#")]
    for item in kept:
        if "=" not in item or item.startswith("-"):
            raise ConfigError(f"override {item!r}: expected key.sub=value")
    return kept


def _holds_a_run(folder: Path) -> bool:
    return (folder / "final").exists() or bool(complete_checkpoints(folder / "checkpoints"))


def _eval_arguments(sandbox: Sandbox, cfg: Config, compare: list[str] | None) -> list[str]:
    eval_sets(cfg)  # the sets' files and options, checked before any model loads
    if not compare:
        return []
    if len(compare) != 2:
        raise ConfigError("--compare: name two runs")
    return ["--compare", *(str(_model_of(sandbox.run_dir(run_id))) for run_id in compare)]


def _model_of(run: Path) -> Path:
    return run / "final" if (run / "final").is_dir() else run


def _strategies(specs: list[str]) -> list[str]:
    specs = [s.strip() for s in specs if s.strip()]
    for spec in specs:
        name = parse_strategy(spec)[0]
        if name not in STRATEGIES:
            raise ConfigError(f"--strategies: unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")
    return ["--strategies", *specs] if specs else []
