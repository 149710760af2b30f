"""Atomic checkpoints with a checksummed manifest, keep-last-K, and resume.

A checkpoint is written under `checkpoints/.tmp-step-N/`, every file fsync'ed, a `manifest.json` with
SHA-256 sums written last, and only then renamed to `checkpoints/step-N/`. A directory without a manifest,
or whose files do not match it, is never picked as the latest.

Contents of `step-N/`:
    trainable.safetensors   the parameters that train (adapter weights, or all weights for full tuning)
    optimizer.pt            optimizer state (tensors only; loaded with weights_only=True)
    scheduler.json          learning-rate scheduler state
    rng.pt                  torch / CUDA / Python / NumPy random states
    state.json              step and anything else the loop needs (data position is derived from step)
    manifest.json           file -> sha256, written last
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep_last: int,
    keep: tuple[int, ...] = (),
) -> Path:
    """Write checkpoint `step` atomically under `root` and prune all but the newest `keep_last` and the steps
    in `keep` (the best checkpoint)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
    manifest = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
    _write_synced(tmp / MANIFEST, json.dumps({"step": step, "files": manifest}, indent=1))
    for p in tmp.iterdir():
        _fsync(p)
    if final.exists():  # a checkpoint of the same step from an earlier attempt
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    prune(root, keep_last, keep)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories with a manifest, oldest first (contents not yet verified)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint whose files match their manifest; damaged ones are skipped with a warning."""
    for path in reversed(complete_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping damaged checkpoint %s: %s", path, problem)
    return None


def verify(path: Path) -> str | None:
    """None if every file listed in the manifest exists with the recorded checksum, else the problem."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        return f"unreadable manifest ({exc})"
    for name, digest in files.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if _sha256(path / name) != digest:
            return f"{name} does not match its checksum"
    return None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore trainable weights, optimizer, scheduler and RNG states; return the saved loop state."""
    load_trainable_state(model, load_file(path / "trainable.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())


def prune(root: Path, keep_last: int, keep: tuple[int, ...] = ()) -> None:
    for path in complete_checkpoints(root)[:-keep_last]:
        if int(STEP_DIR.match(path.name).group(1)) not in keep:
            shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(".tmp-step-*"):  # left by a run killed mid-write
        shutil.rmtree(path, ignore_errors=True)


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


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _to_lists(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": np_state[2],
                  "has_gauss": np_state[3], "cached_gaussian": np_state[4]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
