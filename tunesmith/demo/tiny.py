"""Tiny models and tokenizers built offline: for the demo and for tests (no download anywhere).

    tok = train_tokenizer(texts, vocab_size=512)
    model = build_model("llama", vocab_size=len(tok), hidden_size=64, num_layers=2)
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.model.scratch import architecture_config as model_config  # noqa: F401 (tests use it)
from tunesmith.model.tokenizer import train_tokenizer  # noqa: F401 (the demo and tests use it)


def build_model(
    family: str,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    tie_embeddings: bool = False,
    seed: int = 0,
):
    """A randomly initialised causal LM of the given family ("llama", "qwen2", "mistral" or "gpt2")."""
    from transformers import AutoModelForCausalLM

    config = model_config(family, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads,
                          intermediate_size or 2 * hidden_size, max_positions, tie_embeddings)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def save_tiny(path: Path, model, tokenizer) -> Path:
    """Save model (safetensors) and tokenizer together, like a hub checkpoint."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
