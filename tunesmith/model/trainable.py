"""The trainable weights of a model, by parameter name, and the manifest that vouches for a checkpoint's files.

Training writes checkpoints (`tunesmith.train.checkpoint`); evaluation, resume and the tests read them back. What
both sides must agree on lives here: the file names, the manifest of SHA-256 sums, and how trainable weights are
named and loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

MANIFEST = "manifest.json"
WEIGHTS = "trainable.safetensors"
FILES = (WEIGHTS, "optimizer.pt", "scheduler.json", "rng.pt", "state.json")  # all in the manifest
SHARDED_FILES = (".metadata", "scheduler.json", "rng.pt", "state.json")  # and a .distcp file per process


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (a tied parameter appears once)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        missing = sorted(set(params) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(params))[:3]
        raise ValueError(f"checkpoint does not match the model's trainable parameters (missing {missing}, extra {extra})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


def verify(path: Path) -> str | None:
    """None if every file listed in the manifest exists with the recorded checksum, else the problem."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest ({type(exc).__name__}: {exc})"
    if not (isinstance(files, dict) and files and all(isinstance(n, str) and isinstance(d, str) and n == Path(n).name
                                                        and n not in ("", ".", "..") for n, d in files.items())):
        return "unreadable manifest (expected a mapping of file names in the checkpoint to checksums)"
    required = SHARDED_FILES if ".metadata" in files else FILES
    unlisted = [name for name in required if name not in files]
    if unlisted:
        return f"the manifest does not list {', '.join(unlisted)}"
    for name, digest in files.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if sha256(path / name) != digest:
            return f"{name} does not match its checksum"
    return None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
