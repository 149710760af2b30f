"""Write a model as a Hugging Face directory that plain `transformers` loads: safetensors (sharded above a size),
config, tokenizer with its chat template, and a generation_config.json whose EOS list holds the end-of-turn token.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch

from tunesmith.errors import ConfigError
from tunesmith.model.stops import set_stop_tokens

log = logging.getLogger(__name__)

SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)


def check_output_dir(output: Path, option: str = "--output") -> None:
    """Refuse to write into a directory that already holds something (nothing is overwritten)."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"{option}: {output} already exists and is not empty; choose a new directory")


def check_shard_size(max_shard_size: str | int) -> None:
    if isinstance(max_shard_size, int) or SIZE.match(str(max_shard_size)):
        return
    raise ConfigError(f"--max-shard-size: {max_shard_size!r} is not a size such as 5GB, 500MB or 100KB")


def save_hf(model, tokenizer, output: str | Path, max_shard_size: str | int = "5GB",
            dtype: torch.dtype | None = None) -> Path:
    """Save `model` (a plain transformers model) and `tokenizer` into the new directory `output`, atomically.

    Args:
        max_shard_size: safetensors files are split above this size (an index file lists the shards).
        dtype: cast the weights to this dtype first (None: keep them).
    Returns:
        The output directory.
    """
    output = Path(output)
    check_output_dir(output)
    check_shard_size(max_shard_size)
    if dtype is not None:
        model = model.to(dtype)
    stops = set_stop_tokens(model, tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        log.warning("the tokenizer has no chat template: the export has none either")
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    if output.exists():
        output.rmdir()  # empty, checked above
    os.rename(tmp, output)
    shards = sorted(p.name for p in output.glob("*.safetensors"))
    log.info("saved %s: %d safetensors file(s), stop tokens %s", output, len(shards), stops)
    return output
