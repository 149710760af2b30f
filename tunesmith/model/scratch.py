"""New, randomly initialised causal LMs described by an architecture: pretraining from scratch.

    config = architecture_config("llama", vocab_size=len(tokenizer), hidden_size=256, num_layers=4, num_heads=4)
    model = init_model(config, seed=0)          # the same seed gives the same weights, bit for bit

The model is a plain `transformers` model, so `save_pretrained` writes a config.json that `from_pretrained`
rebuilds exactly; nothing about a from-scratch run needs tunesmith to be loaded again.
"""

from __future__ import annotations

import math

from tunesmith.errors import ConfigError

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


def architecture_config(family: str, vocab_size: int, *args, **kwargs):
    """The `transformers` config of a causal LM of `family` ("llama", "qwen2", "mistral" or "gpt2"): the fields
    of `architecture_fields` (same arguments)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**architecture_fields(family, vocab_size, *args, **kwargs))


def architecture_fields(
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
) -> dict:
    """The config.json fields (model_type first) of a causal LM of `family`, read without `transformers`.

    Args:
        num_kv_heads: key/value heads (grouped-query attention); None: as many as query heads. GPT-2 has no
            grouped-query attention.
        intermediate_size: the MLP width; None: `default_intermediate_size`.
        bos_token_id, eos_token_id, pad_token_id: the tokenizer's special ids, written to config.json (and so to
            the generation config) for whoever loads the saved model.
    """
    intermediate_size = intermediate_size or default_intermediate_size(family, hidden_size)
    special = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    if family == "gpt2":
        if num_kv_heads not in (None, num_heads):
            raise ValueError("gpt2 has no grouped-query attention: num_kv_heads must equal num_heads")
        return dict(model_type="gpt2", vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers,
                    n_head=num_heads, n_positions=max_positions, n_inner=intermediate_size,
                    tie_word_embeddings=tie_embeddings, **special)
    if family not in GATED_FAMILIES:
        raise ValueError(f"unknown model family {family!r} (one of {', '.join(FAMILIES)})")
    return dict(model_type=family, vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
                intermediate_size=intermediate_size, max_position_embeddings=max_positions,
                tie_word_embeddings=tie_embeddings, **special)


def init_fields(init, tokenizer) -> dict:
    """`architecture_fields` of model.init (a ModelInitConfig) for `tokenizer`.

    Raises:
        ConfigError when model.init.vocab_size is smaller than the tokenizer.
    """
    i = init
    if i.vocab_size is not None and i.vocab_size < len(tokenizer):
        raise ConfigError(f"model.init.vocab_size: {i.vocab_size} is smaller than the tokenizer ({len(tokenizer)} "
                          "tokens); raise it or leave it null (the tokenizer's length)")
    # The pad id becomes the embedding's padding_idx (a zero row that never trains): only a dedicated pad token
    # may have it, never an EOS or BOS that a tokenizer also uses for padding.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id) \
        else None
    return architecture_fields(
        i.family, i.vocab_size or len(tokenizer), i.hidden_size, i.num_layers, i.num_heads, i.num_kv_heads,
        i.intermediate_size, i.max_position_embeddings, i.tie_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
    )


def init_model(config, seed: int, dtype=None, attn_implementation: str | None = None):
    """A randomly initialised causal LM of `config`, the same for the same seed.

    The weights are drawn in fp32 on the CPU from a private generator state (the global RNG is left as it was,
    so the rest of a run draws the same numbers whether its model was loaded or built), then cast to `dtype`:
    a bf16 model is the fp32 one rounded, not a different draw (`dtype`: a torch dtype, None: fp32).
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
    return model.to(dtype or torch.float32)
