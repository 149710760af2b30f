"""`tunesmith interpolate RUN --weight W --output DIR`: a tuned LoRA model moved part of the way back to its base.

Weight-space interpolation (WiSE-FT, Wortsman et al. 2022): the weights (1 - W) x base + W x tuned. For LoRA the
tuned weights are base + B.A x scaling, so the interpolation is the same adapter with every B multiplied by W:
an adapter like any other, which eval, chat, serve, merge and export load without knowing. Fine-tuning on a narrow
task moves a model away from what it knew; a weight below 1 keeps more of it at some cost to the task
(docs/PERFORMANCE.md, "The real-model quickstart": SmolLM2 taught invented facts kept 78% of its real-world
answers at W = 1 and 93% at W = 0.65, with the new facts still answered). Pick W on held-out data:
`tunesmith eval` on a few outputs of this command.

The output is a run directory: the run's config.yaml, and final/ holding the scaled adapter and everything else
final/ holds, plus interpolated.json (source, weight, what was scaled and what was kept). Weights an adapter trains
in full (modules_to_save, the rows of added tokens) are kept as trained: they have no base value to move towards
(added tokens) or are the task's own (a new head). DoRA is refused: its magnitude vector rescales each weight's
column norms, so a scaled B is not an interpolation.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from tunesmith.errors import ConfigError
from tunesmith.model.resolve import read_json, resolve_source

log = logging.getLogger(__name__)

SCALED = ("lora_B", "lora_embedding_B")  # the factors of a LoRA update that come last: scaling them scales it
FACTORS = SCALED + ("lora_A", "lora_embedding_A")


def interpolate_command(source: str, output: str, weight: float) -> dict:
    """Write the run (or adapter) `source` interpolated towards its base by `weight` to `output`.

    Args:
        weight: the share of the update kept, > 0: 1 is the tuned model, towards 0 the base; above 1
            extrapolates.
    Returns:
        What interpolated.json records.
    Raises:
        ConfigError: not a LoRA adapter, a DoRA one, a weight <= 0 or not finite, an existing non-empty output.
    """
    if not (math.isfinite(weight) and weight > 0):
        raise ConfigError(f"--weight {weight}: must be a number above 0 (1 is the tuned model, towards 0 its base)")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--output {out}: exists and is not an empty directory")
    src = resolve_source(source)
    if src.kind != "adapter":
        raise ConfigError(f"{source}: not a LoRA adapter or a run that trained one ({src.kind}); interpolate moves "
                          "a LoRA update towards its base")
    config = read_json(src.adapter / "adapter_config.json")
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        what = "DoRA" if config.get("use_dora") else config.get("peft_type")
        raise ConfigError(f"{src.adapter}: a {what} adapter; interpolate handles LoRA (and QLoRA) adapters only")
    out.mkdir(parents=True, exist_ok=True)
    if src.run is not None and (src.run / "config.yaml").is_file():
        shutil.copy2(src.run / "config.yaml", out / "config.yaml")
    final = out / "final"
    shutil.copytree(src.adapter, final)
    scaled, kept = _scale_updates(final, weight)
    record = {"source": str(Path(source).resolve()), "weight": weight, "scaled_tensors": scaled, "kept": kept}
    (out / "interpolated.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    log.info("%s: %d LoRA updates x %g%s", out, scaled, weight,
             f"; kept as trained: {', '.join(kept)}" if kept else "")
    return record


def _scale_updates(adapter: Path, weight: float) -> tuple[int, list[str]]:
    """Multiply every LoRA B factor in the adapter's safetensors by `weight`, in place; returns how many were scaled
    and the names of the tensors that are not LoRA factors (weights trained in full: kept as they are)."""
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    if not path.is_file():
        raise ConfigError(f"{adapter}: no adapter_model.safetensors (an adapter saved as a pickle file is not "
                          "read here)")
    tensors = load_file(str(path))
    scaled = [name for name in tensors if _is_part(name, SCALED)]
    if not scaled:
        raise ConfigError(f"{path}: no LoRA B factors found (tensor names holding {' or '.join(SCALED)})")
    for name in scaled:
        tensors[name] = (tensors[name].float() * weight).to(tensors[name].dtype)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return len(scaled), sorted(name for name in tensors if not _is_part(name, FACTORS))


def _is_part(name: str, parts: tuple[str, ...]) -> bool:
    """Whether a tensor name of a peft state dict belongs to one of the LoRA factors `parts`."""
    return any(f".{part}." in name or name.endswith(f".{part}") for part in parts)
