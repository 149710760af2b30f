"""The real llama.cpp runs what `tunesmith export` writes: SmolLM2-135M-Instruct tuned with LoRA, merged, exported
to GGUF (f16 and q8_0), answered by `llama-completion` as transformers answers, with the tokenizer metadata and
tensors that llama.cpp's own `convert_hf_to_gguf.py` writes for the same merged model.

llama.cpp is built once into the cache (`make llama-cpp`, ~8 min on 2 cores; `.ci/run` does it); where it is
not built these tests skip with that command.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_jsonl
from tunesmith.cli import main
from tunesmith.export import llama_cpp

pytestmark = [pytest.mark.slow, pytest.mark.interop]

# Questions with one clear answer (SmolLM2 has near ties on others, e.g. the capital of France).
PROMPTS = ["What is 2+2?", "What is the capital of Germany?", "How many days are there in a week?",
           "What color is the sky on a clear day?", "What is the opposite of hot?",
           "How many legs does a spider have?", "What is the largest planet in our solar system?",
           "What language is spoken in Spain?"]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def llama():
    found = llama_cpp.find()
    if found is None or found.converter is None:
        pytest.skip("llama.cpp is not built: make llama-cpp")
    return found


@pytest.fixture(scope="module")
def merged(smollm2_dir, tmp_path_factory):
    """SmolLM2 after a short LoRA SFT run, merged into a plain Hugging Face directory."""
    root = tmp_path_factory.mktemp("smollm2-tuned")
    rows = [{"messages": [{"role": "user", "content": f"What is the code word number {i}?"},
                          {"role": "assistant", "content": f"The code word number {i} is tangerine-{i}."}]}
            for i in range(16)]
    data = write_jsonl(root / "train.jsonl", rows)
    assert main(["train", "configs/sft_lora.yaml", f"model.name_or_path={smollm2_dir}", f"data.train={data}",
                 "data.split.validation=0", "data.max_seq_len=96", f"train.output_dir={root / 'run'}",
                 "train.max_steps=4", "train.micro_batch_size=4", "train.grad_accum=1", "train.lr=1e-4",
                 f"data.cache_dir={root / 'cache'}", "tracking.progress_bar=false"]) == 0
    assert main(["merge", str(root / "run"), "--output", str(root / "merged")]) == 0
    return root / "merged"


@pytest.fixture(scope="module")
def exported(merged, tmp_path_factory):
    """type -> the GGUF file `tunesmith export` wrote for the merged model."""
    root = tmp_path_factory.mktemp("gguf")
    files = {}
    for quant in ("f16", "q8_0"):
        files[quant] = root / f"tuned-{quant}.gguf"
        assert main(["export", str(merged), "--output", str(files[quant]), "--format", "gguf", "--quant", quant]) == 0
    return files


def transformers_answers(model_dir) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    answers = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def llama_answers(llama, gguf) -> list[str]:
    return [llama_cpp.complete(llama, gguf, prompt, max_tokens=MAX_TOKENS) for prompt in PROMPTS]


def test_llama_cpp_answers_as_transformers_f16_exactly_and_q8_0_mostly(llama, merged, exported, capsys):
    want = transformers_answers(merged)
    assert any("4" in a for a in want[:1]) and "Berlin" in want[1], want  # the tuned model still knows these
    f16 = llama_answers(llama, exported["f16"])
    assert f16 == want
    q8 = llama_answers(llama, exported["q8_0"])
    agree = sum(a == b for a, b in zip(q8, want))
    with capsys.disabled():
        print(f"\nllama.cpp q8_0 greedy answers equal to transformers' on {agree}/{len(PROMPTS)} prompts")
    assert agree >= len(PROMPTS) // 2


def _read(path):
    from gguf import GGUFReader

    return GGUFReader(str(path))


def _field_value(reader, key):
    field = reader.fields[key]
    parts = [field.parts[i] for i in field.data]
    if len(parts) == 1 and parts[0].dtype != np.uint8:
        return parts[0].tolist()
    if all(p.dtype == np.uint8 for p in parts):  # strings (or an array of strings)
        texts = [bytes(p).decode("utf-8") for p in parts]
        return texts[0] if len(texts) == 1 and field.types[0].name == "STRING" else texts
    return [p.tolist() for p in parts]


def test_metadata_and_tensors_equal_llama_cpps_own_converter(llama, merged, exported, tmp_path):
    theirs = tmp_path / "converted-f16.gguf"
    subprocess.run([sys.executable, str(llama.converter), str(merged), "--outfile", str(theirs), "--outtype", "f16"],
                   check=True, capture_output=True, env=llama.converter_env(), timeout=600)
    ours, ref = _read(exported["f16"]), _read(theirs)
    tokenizer_keys = [k for k in ref.fields if k.startswith("tokenizer.")]
    assert {"tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
            "tokenizer.chat_template"} <= set(tokenizer_keys)
    for key in tokenizer_keys:
        assert key in ours.fields, f"{key} missing"
        assert _field_value(ours, key) == _field_value(ref, key), key
    assert _field_value(ours, "tokenizer.ggml.pre") == "smollm"
    ours_t = {t.name: t for t in ours.tensors}
    ref_t = {t.name: t for t in ref.tensors}
    assert sorted(ours_t) == sorted(ref_t)
    for name, t in ref_t.items():
        mine = ours_t[name]
        assert list(mine.shape) == list(t.shape), name
        a, b = np.asarray(mine.data, dtype=np.float32), np.asarray(t.data, dtype=np.float32)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * max(1.0, float(np.abs(b).max())), err_msg=name)
