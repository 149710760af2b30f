"""New, randomly initialised causal LMs described by an architecture: pretraining from scratch.

    config = architecture_config("llama", vocab_size=len(tokenizer), hidden_size=256, num_layers=4, num_heads=4)
    model = init_model(config, seed=0)          # the same seed gives the same weights, bit for bit

The model is a plain `transformers` model, so `save_pretrained` writes a config.json that `from_pretrained`
rebuilds exactly; nothing about a from-scratch run needs tunesmith to be loaded again.
"""

from __future__ import annotations

import math

import torch

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
GATED_FAMILIES = ("llama", "qwen2", "mistral")  # SwiGLU MLP: gate, up and down projections


def default_intermediate_size(family: str, hidden_size: int, multiple_of: int = 256) -> int:
    """The MLP width the reference models use for a given width.

    GPT-2: 4 * hidden. Gated (SwiGLU) families: LLaMA's rule, two thirds of 4 * hidden (so the three gated
    matrices cost what GPT-2's two do), rounded up to a multiple of `multiple_of` (hidden 4096 -> 11008).
    """
    if family == "gpt2":
        return 4 * hidden_size
    return multiple_of * math.ceil(int(8 * hidden_size / 3) / multiple_of)


def architecture_config(
    family: str,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    tie_embeddings: bool = False,
    *,
    bos_token_id: int | None = 1,
    eos_token_id: int | None = 2,
    pad_token_id: int | None = None,
):
    """The `transformers` config of a causal LM of `family` ("llama", "qwen2", "mistral" or "gpt2").

    Args:
        num_kv_heads: key/value heads (grouped-query attention); None: as many as query heads. GPT-2 has no
            grouped-query attention.
        intermediate_size: the MLP width; None: `default_intermediate_size`.
        bos_token_id, eos_token_id, pad_token_id: the tokenizer's special ids, written to config.json (and so to
            the generation config) for whoever loads the saved model.
    """
    intermediate_size = intermediate_size or default_intermediate_size(family, hidden_size)
    from transformers import AutoConfig

    special = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    if family == "gpt2":
        if num_kv_heads not in (None, num_heads):
            raise ValueError("gpt2 has no grouped-query attention: num_kv_heads must equal num_heads")
        return AutoConfig.for_model(
            "gpt2", vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
            n_positions=max_positions, n_inner=intermediate_size, tie_word_embeddings=tie_embeddings, **special,
        )
    if family not in GATED_FAMILIES:
        raise ValueError(f"unknown model family {family!r} (one of {', '.join(FAMILIES)})")
    return AutoConfig.for_model(
        family, vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings, **special,
    )


def init_model(
    config,
    seed: int,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
):
    """A randomly initialised causal LM of `config`, the same for the same seed.

    The weights are drawn in fp32 on the CPU from a private generator state (the global RNG is left as it was,
    so the rest of a run draws the same numbers whether its model was loaded or built), then cast to `dtype`:
    a bf16 model is the fp32 one rounded, not a different draw.
    """
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
    return model.to(dtype)
