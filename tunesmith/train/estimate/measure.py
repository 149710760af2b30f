"""`--measure`: train a few steps of a config in a fresh process (`python -m tunesmith.train.estimate CONFIG
RESULT`, which runs `measure_child`) and report its peak memory."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from tunesmith.config import Config, save_config
from tunesmith.errors import TunesmithError
from tunesmith.hardware import cuda_available
from tunesmith.model.run_tokenizer import build_tokenizer


def measure_peak(cfg: Config, steps: int = 3, malloc_mmap_threshold: int | None = 65536) -> dict:
    """Train `steps` optimizer steps of `cfg` (into a temporary directory) in a fresh process and return its peak
    memory above what that process held just before training (see `measure_child`).

    On CPU glibc keeps freed blocks below its mmap threshold (which grows up to 32 MiB as tensors are freed) in
    its heap, so the resident set stays above the tensors alive by whatever the heap retained. A fixed threshold
    (`malloc_mmap_threshold` bytes; None: glibc's default) maps every tensor buffer on its own and unmaps it when
    freed: the resident set then follows the tensors alive, as CUDA's max_memory_allocated does."""
    with tempfile.TemporaryDirectory(prefix="tunesmith-estimate-") as tmp:
        run = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, output_dir=str(Path(tmp) / "run"), max_steps=steps,
                                           resume=False, save_every=None),
            tracking=dataclasses.replace(cfg.tracking, progress_bar=False, sinks=[], log_level="warning"))
        save_config(run, Path(tmp) / "config.yaml")
        result = Path(tmp) / "measured.json"
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        if malloc_mmap_threshold is not None and not cuda_available():
            env["MALLOC_MMAP_THRESHOLD_"] = str(malloc_mmap_threshold)
        child = [sys.executable, "-m", "tunesmith.train.estimate", str(Path(tmp) / "config.yaml"), str(result)]
        done = subprocess.run(child, capture_output=True, text=True, env=env)
        if done.returncode:
            raise TunesmithError(f"--measure: the training run failed:\n{done.stderr[-4000:]}")
        measured = json.loads(result.read_text())
        if "MALLOC_MMAP_THRESHOLD_" in env:
            measured["method"] += f" (glibc mmap threshold {int(env['MALLOC_MMAP_THRESHOLD_']) // 1024} KiB)"
        return measured


def measure_child(config_path: str, result_path: str) -> None:
    """Prepare the data, import the model's code, then train with the peak counter reset; the peak minus the memory
    held at that moment is what training added: weights, gradients, optimizer, activations, logits, the memory
    probe, evaluation and checkpoint writing; not the interpreter, libraries, tokenizer or prepared data.
    CPU: the resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs), allocator overhead
    included; CUDA: torch.cuda.max_memory_allocated (tensors only, not the caching allocator's reserve)."""
    import torch
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    from tunesmith.config import load_config
    from tunesmith.data.build import prepare_from_config
    from tunesmith.model.build import architecture
    from tunesmith.track.metrics import read_metrics
    from tunesmith.train import run as run_module
    from tunesmith.train.run import train

    cfg = load_config(config_path)
    built = build_tokenizer(cfg)
    prepare_from_config(cfg, built[0])
    # train() gets this tokenizer instead of building a second one after the baseline: building Gemma 3's (262k
    # entries) peaks ~410 MiB above where it started and keeps ~250 MiB; the estimate leaves the tokenizer out.
    run_module.build_tokenizer = lambda _: built
    config = architecture(cfg, built[0])
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # imports the model's code
    _warm_up(cfg.train.mixed_precision != "no")
    cuda = torch.cuda.is_available()
    base = torch.cuda.memory_allocated() if cuda else _proc_status("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    train(cfg)
    peak = torch.cuda.max_memory_allocated() if cuda else _proc_status("VmHWM")
    rates = [r["tokens_per_s"] for r in read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl")
             if "tokens_per_s" in r][1:]  # the first step pays for warm-up
    method = "CUDA max_memory_allocated" if cuda else "CPU peak RSS minus RSS before training"
    Path(result_path).write_text(json.dumps({"peak_bytes": peak - base, "baseline_bytes": base, "method": method,
                                             "tokens_per_s": sum(rates) / len(rates) if rates else None}))


def _warm_up(amp: bool) -> None:
    """Load the libraries training uses and run each kind of kernel once on tiny tensors, so that their code,
    thread pools and the plotting library are resident before the baseline is taken."""
    import matplotlib.pyplot  # noqa: F401  (the data report's and the loss curve's plots)
    import peft  # noqa: F401
    import torch
    import torch.nn.functional as F

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.float32, torch.bfloat16):
        layer = torch.nn.Linear(64, 64, device=device, dtype=dtype)
        x = torch.randn(2, 8, 64, device=device, dtype=dtype, requires_grad=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            q = layer(x).view(2, 8, 4, 16).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, q, q, is_causal=True).reshape(16, 64)
            loss = F.cross_entropy(out.float(), torch.zeros(16, dtype=torch.long, device=device))
        loss.backward()
        torch.optim.AdamW(layer.parameters(), fused=True).step()


def _proc_status(name: str) -> int:
    """A memory field of /proc/self/status, in bytes (Linux)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{name}:\s+(\d+) kB", text, re.M).group(1)) * 1024
