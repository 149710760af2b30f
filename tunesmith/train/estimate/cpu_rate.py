"""The FLOP/s a CPU gives one of a model's blocks, measured once per machine and block shape and kept.

Measuring trains one block for a few passes (`speed.block_seconds`), which needs torch and transformers: seconds
of imports and of work. The rate depends on the CPU, the threads, OpenMP's wait policy, torch's version and the
block's shape and dtype, not on the weights or the data, so it is kept in $TUNESMITH_CACHE/cpu_rates.json under
all of those and a later estimate of the same shape reads it instead (`tunesmith estimate` then imports neither
torch nor transformers). The rate is the one of the moment it was measured, and a machine busy then gives a low one
(with two threads on two shared cores, several times lower): a rate is measured again when the load average has
dropped by at least one since (the estimate shows the load it was measured at); delete the file to measure anew.
"""

from __future__ import annotations

import json
import logging
import os
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

from tunesmith.hardware import cpu_info
from tunesmith.paths import cache_home

log = logging.getLogger(__name__)

RATES_FILE = "cpu_rates.json"
QUIETER = 1.0  # a kept rate is measured again once the 1-minute load average is this much lower than it was then


def expected_threads(info: dict | None = None) -> int:
    """The intra-op threads torch will use, without importing it: OMP_NUM_THREADS or MKL_NUM_THREADS where set,
    else one per physical core (torch's default). `info`: `cpu_info()`, when the caller has it."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    info = info or cpu_info()
    return info["physical_cores"] or info["usable_cores"] or 1


def rate_key(block: dict) -> str:
    """The cache key of a block shape (`block`: what decides its speed, JSON-serialisable) on this machine."""
    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = None
    info = cpu_info()
    machine = {"cpu": info["model"], "threads": expected_threads(info), "torch": torch_version,
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "").upper() or None}
    return json.dumps(machine | block, sort_keys=True)


def cached_rate(block: dict, measure: Callable[[], float], path: Path | None = None) -> tuple[float, str]:
    """(FLOP/s, when and at what load it was measured) of `block` on this CPU: the kept figure, else `measure()`
    now, then kept."""
    path = path or cache_home() / RATES_FILE
    key = rate_key(block)
    rates = read_rates(path)
    load = os.getloadavg()[0]  # before measuring, which adds its own
    if key not in rates or rates[key]["load"] - load >= QUIETER:
        rate = measure()
        rates = read_rates(path)  # another process may have written meanwhile
        rates[key] = {"flops": rate, "measured": time.strftime("%Y-%m-%d %H:%M"), "load": load}
        write_rates(path, rates)
    entry = rates[key]
    return entry["flops"], f"{entry['measured']}, load average {entry['load']:.1f}"


def write_rates(path: Path, rates: dict) -> None:
    """Replace the file at once: a reader sees the old rates or the new ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(rates, indent=1), encoding="utf-8")
    partial.replace(path)


def read_rates(path: Path) -> dict:
    """The kept rates; an unreadable file counts as empty (and is rewritten), with a warning."""
    if not path.is_file():
        return {}
    try:
        rates = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(rates, dict) and all(isinstance(v, dict) and {"flops", "measured", "load"} <= v.keys()
                                           for v in rates.values()):
            return rates
    except (OSError, ValueError):
        pass
    log.warning("%s: not a file of CPU rates; measuring again", path)
    return {}
