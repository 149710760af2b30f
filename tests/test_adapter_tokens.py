"""A LoRA run whose template adds tokens to the vocabulary saves the new rows, not the whole embedding matrix, and
the adapter reloads with plain peft after the one documented line (`resize_token_embeddings`)."""

from __future__ import annotations

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import CORPUS, chat_rows, write_jsonl
from tunesmith.config import config_from_dict, load_config
from tunesmith.demo.tiny import build_model, save_tiny, train_tokenizer
from tunesmith.eval.models import load_trained
from tunesmith.train.run import train


def test_added_template_tokens_save_only_their_rows_and_reload_with_plain_peft(tmp_path):
    tokenizer = train_tokenizer(CORPUS, vocab_size=400, extra_special_tokens=())  # no chatml markers
    base_dir = save_tiny(tmp_path / "base", build_model("llama", vocab_size=len(tokenizer)), tokenizer)
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    cfg = config_from_dict({
        "model": {"name_or_path": str(base_dir)},
        "data": {"train": [str(data)], "template": "chatml", "max_seq_len": 64, "cache_dir": str(tmp_path / "c")},
        "strategy": {"name": "lora", "lora": {"r": 4}},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "micro_batch_size": 4, "lr": 1e-2},
        "tracking": {"progress_bar": False}})
    train(cfg)
    final = tmp_path / "run" / "final"
    with safe_open(final / "adapter_model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    vocab = len(tokenizer) + 2
    assert not [k for k, s in shapes.items() if vocab in s and "token_adapter" not in k], shapes  # no full matrix
    rows = [s for k, s in shapes.items() if "trainable_tokens" in k]
    assert rows and all(s[0] == 2 for s in rows), shapes  # the two new tokens' rows

    tuned_tok = AutoTokenizer.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base.resize_token_embeddings(len(tuned_tok))  # the one line the README shows
    reloaded = PeftModel.from_pretrained(base, final).eval()
    ids = tuned_tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}],
                                        add_generation_prompt=True, return_tensors="pt")["input_ids"]
    assert ids.max().item() >= len(tokenizer)  # the prompt uses the added markers
    model = load_trained(load_config(tmp_path / "run" / "config.yaml"), final, tuned_tok)  # tunesmith's loader
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
