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

A sharded checkpoint (FSDP, `save_sharded_checkpoint`) holds, instead of trainable.safetensors and
optimizer.pt, each process's shard of the trainable weights and optimizer state written by
torch.distributed.checkpoint (`__<rank>_0.distcp`, `.metadata`); it is renamed into place only after every
process has written its shard, and the manifest lists every file. It resumes with any number of processes.

A write that fails (a full disk, a file size limit) removes its temporary directory and raises
`CheckpointError` naming the checkpoint, the file and the reason; the checkpoints already on disk, and so
what `latest_checkpoint` returns, are untouched (pruning happens only after a checkpoint is complete).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.model.trainable import MANIFEST, WEIGHTS, load_trainable_state, sha256, trainable_state, verify

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(TunesmithError):
    """A checkpoint could not be written (the checkpoints before it are intact) or loaded safely."""


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
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    files = {
        WEIGHTS: lambda path: save_file(trainable_state(model), path),
        "optimizer.pt": lambda path: _torch_save(optimizer.state_dict(), path),
        **_loop_files(scheduler, state, step),
    }
    return _complete(root, step, files, keep_last, keep)


def _loop_files(scheduler: Any, state: dict[str, Any], step: int) -> dict[str, Any]:
    """Writers of the files every checkpoint has besides the weights and optimizer state."""
    return {
        "scheduler.json": lambda path: path.write_text(json.dumps(scheduler.state_dict())),
        "rng.pt": lambda path: _torch_save(rng_state(), path),
        "state.json": lambda path: path.write_text(json.dumps({**state, "step": step})),
    }


def _complete(root: Path, step: int, files: dict[str, Any], keep_last: int, keep: tuple[int, ...]) -> Path:
    """Write `files` (name -> writer) into `root/.tmp-step-N` (which may already hold files), then the manifest
    of everything there, fsync, rename to `step-N` and prune. A failed write removes the temporary directory."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    writing = tmp
    try:
        tmp.mkdir(exist_ok=True)
        for name, write in files.items():
            writing = tmp / name
            write(writing)
        writing = tmp / MANIFEST
        manifest = {p.name: sha256(p) for p in sorted(tmp.iterdir())}
        _write_synced(writing, json.dumps({"step": step, "files": manifest}, indent=1))
        for writing in tmp.iterdir():
            _fsync(writing)
    except (OSError, RuntimeError, SafetensorError) as exc:  # torch.save reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)  # gives back the space the partial checkpoint took
        raise CheckpointError(_write_failure(final, writing, exc)) from exc
    if final.exists():  # a checkpoint of the same step from an earlier attempt
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    prune(root, keep_last, keep)
    return final


def _torch_save(obj: Any, path: Path) -> None:
    # Through a Python file, so a failed write surfaces its OSError (as the RuntimeError's context).
    with path.open("wb") as fh:
        torch.save(obj, fh)


def _write_failure(final: Path, path: Path, exc: BaseException) -> str:
    """What went wrong writing `path` of checkpoint `final`, how much space is left, and what is still safe."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.errno is not None:
        reason = f"{cause.strerror} ({errno.errorcode.get(cause.errno, cause.errno)})"
    else:
        reason = str(exc).strip() or type(exc).__name__
    try:
        free = f"{shutil.disk_usage(final.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    previous = latest_checkpoint(final.parent)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return (f"could not write checkpoint {final}: writing {path.name} failed: {reason} ({free}); the partial "
            f"checkpoint was removed and {kept}; free disk space (or raise the file size limit) and continue with "
            "--resume")


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories with a manifest, oldest first (contents not yet verified)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path, skipped: list[tuple[Path, str]] | None = None) -> Path | None:
    """The newest checkpoint whose files match their manifest. Damaged ones are skipped with a warning, or,
    when a `skipped` list is given, appended to it as (path, problem) for the caller to report."""
    for path in reversed(complete_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            return path
        if skipped is None:
            log.warning("skipping damaged checkpoint %s: %s; trying the one before it", path, problem)
        else:
            skipped.append((path, problem))
    return None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore trainable weights, optimizer, scheduler and RNG states; return the saved loop state."""
    if is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is sharded (written with train.distributed.strategy=fsdp); resume it with "
                              "that strategy, or gather its shards with torch.distributed.checkpoint.format_utils")
    load_trainable_state(model, load_file(path / WEIGHTS))
    optimizer.load_state_dict(_torch_load(path / "optimizer.pt"))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    set_rng_state(_torch_load(path / "rng.pt"))
    return json.loads((path / "state.json").read_text())


def save_sharded_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                            scheduler: Any, state: dict[str, Any], keep_last: int, keep: tuple[int, ...] = ()
                            ) -> Path | None:
    """`save_checkpoint` for an FSDP-sharded model; every process calls it. Each process writes its shard of the
    trainable weights and optimizer state (torch.distributed.checkpoint) into the temporary directory; once all
    have finished, the main process adds the loop's files and the manifest and renames it into place. Returns
    the checkpoint's path on the main process, None on the others."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    main = dist.get_rank() == 0
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        dcp.save(sharded_state(model, optimizer), checkpoint_id=tmp)  # collective: returns when all shards are written
    except Exception as exc:  # DCP gathers every process's failure into one CheckpointException, raised on all
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_write_failure(final, tmp / f"__{dist.get_rank()}_0.distcp", exc)) from exc
    path = _complete(root, step, _loop_files(scheduler, state, step), keep_last, keep) if main else None
    dist.barrier()  # nobody goes on (or reads the checkpoint) before it is in place
    return path


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This process's shards of the trainable weights and of the optimizer state (DTensors, keyed by name)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optim = get_state_dict(model, getattr(optimizer, "optimizer", optimizer),  # accelerate's wrapper
                                    options=StateDictOptions(ignore_frozen_params=True))
    return {"model": weights, "optimizer": optim}


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / ".metadata").is_file()


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                            scheduler: Any = None) -> dict[str, Any]:
    """Restore a sharded checkpoint into an FSDP-sharded model (and optimizer, scheduler and RNG states when
    given; weights only otherwise, e.g. the best checkpoint at the end); every process calls it. Returns the
    saved loop state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict, set_state_dict)

    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is not sharded (written without train.distributed.strategy=fsdp); resume it "
                              "with the strategy it was written with")
    options = StateDictOptions(ignore_frozen_params=True, strict=False)  # frozen weights are not in it
    if optimizer is None:
        state = {"model": get_model_state_dict(model, options=options)}
        dcp.load(state, checkpoint_id=path)  # reads only the keys asked for: the weights
        set_model_state_dict(model, state["model"], options=options)
        return json.loads((path / "state.json").read_text())
    state = sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, getattr(optimizer, "optimizer", optimizer), model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=options)
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    set_rng_state(_torch_load(path / "rng.pt"))
    return json.loads((path / "state.json").read_text())


def _torch_load(path: Path) -> Any:
    """Tensors and plain containers only (`weights_only=True`): a pickle that would build other objects, and so
    could run code, is refused."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: refused by weights_only loading, as it holds more than tensors and plain "
                              f"containers (unpickling it could run code): {reason}") from None


def prune(root: Path, keep_last: int, keep: tuple[int, ...] = ()) -> None:
    for path in complete_checkpoints(root)[:-keep_last]:
        if int(STEP_DIR.match(path.name).group(1)) not in keep:
            shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(".tmp-step-*"):  # left by a run killed mid-write
        shutil.rmtree(path, ignore_errors=True)


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
