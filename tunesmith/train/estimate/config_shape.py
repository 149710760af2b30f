"""A model's shape read from its config.json alone, without importing torch or transformers (seconds each).

`tunesmith estimate` asks here first: for the families below the parameter counts are closed formulas of the config,
equal to what `shape.model_shape` counts on a meta-device model. Anything else (another model_type, remote code, a
multimodal config nesting its text model) gives None, and the caller builds the model on the meta device instead.

The config classes' defaults are copied from transformers 5 (models/<family>/configuration_<family>.py): a config.json
may hold only the values that differ from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunesmith.train.estimate.shape import ModelShape, dtype_bytes


@dataclass(frozen=True)
class Family:
    """How one model_type builds a block: its config class's defaults and which optional parameters it has.
    A bias is True/False, or the config key that switches it on."""

    defaults: dict = field(default_factory=dict)
    qkv_bias: bool | str = False  # biases of q/k/v (or the fused qkv_proj)
    o_bias: bool | str = False
    mlp_bias: bool | str = False
    norms: int = 2  # RMSNorms of hidden size in a block (Gemma 2 and 3 add pre/post feed-forward norms)
    head_norms: bool = False  # q_norm and k_norm over head_dim
    fused: bool = False  # Phi-3: qkv_proj and gate_up_proj


def _defaults(vocab, hidden, intermediate, layers, heads, kv_heads, head_dim, tied, **more) -> dict:
    """A config class's defaults under their config.json names."""
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                tie_word_embeddings=tied, **more)


# kv_heads / head_dim None: the class derives them (num_attention_heads, hidden_size // num_attention_heads).
FAMILIES = {
    "llama": Family(_defaults(32000, 4096, 11008, 32, 32, None, None, False, attention_bias=False, mlp_bias=False),
                    qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias"),
    "mistral": Family(_defaults(32000, 4096, 14336, 32, 32, 8, None, False)),
    "qwen2": Family(_defaults(151936, 4096, 22016, 32, 32, 32, None, False), qkv_bias=True),
    "qwen3": Family(_defaults(151936, 4096, 22016, 32, 32, 32, 128, False, attention_bias=False),
                    qkv_bias="attention_bias", o_bias="attention_bias", head_norms=True),
    "gemma": Family(_defaults(256000, 3072, 24576, 28, 16, 16, 256, True, attention_bias=False),
                    qkv_bias="attention_bias", o_bias="attention_bias"),
    "gemma2": Family(_defaults(256000, 2304, 9216, 26, 8, 4, 256, True, attention_bias=False),
                     qkv_bias="attention_bias", o_bias="attention_bias", norms=4),
    "gemma3_text": Family(_defaults(262208, 2304, 9216, 26, 8, 4, 256, True, attention_bias=False),
                          qkv_bias="attention_bias", o_bias="attention_bias", norms=4, head_norms=True),
    "phi3": Family(_defaults(32064, 3072, 8192, 32, 32, None, None, False), fused=True),
}

GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                 "n_inner": None, "tie_word_embeddings": True, "add_cross_attention": False}
GPT2_ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
                "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}  # GPT2Config.attribute_map


def shape_from_dict(config: dict, vocab: int | None = None) -> ModelShape | None:
    """The shape `shape.model_shape` gives for this config.json (as a dict), or None when it cannot be read here.
    `vocab`: the tokenizer's size, when it outgrows the embeddings."""
    model_type = config.get("model_type")
    if "auto_map" in config or "text_config" in config:
        return None
    if model_type == "gpt2":
        return _gpt2_shape(config, vocab)
    family = FAMILIES.get(model_type)
    return None if family is None else _decoder_shape(config, family, vocab)


def _decoder_shape(config: dict, family: Family, vocab: int | None) -> ModelShape:
    """Llama-style blocks: attention (q/k/v/o or fused qkv), a gated MLP, RMSNorms without bias."""
    get = _getter(config, family.defaults)
    hidden, inter, heads = get("hidden_size"), get("intermediate_size"), get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    if family.fused:  # declared in this order in Phi3Attention / Phi3MLP
        linears = {"o_proj": (q, hidden), "qkv_proj": (hidden, q + 2 * kv),
                   "gate_up_proj": (hidden, 2 * inter), "down_proj": (inter, hidden)}
    else:
        linears = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
                   "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    biases = ((q + 2 * kv) * _switch(get, family.qkv_bias) + hidden * _switch(get, family.o_bias)
              + (2 * inter + hidden) * _switch(get, family.mlp_bias))
    norms = family.norms * hidden + (2 * head_dim if family.head_norms else 0)
    return ModelShape(
        model_type=config["model_type"], layers=get("num_hidden_layers"), hidden=hidden, intermediate=inter,
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=max(vocab or 0, get("vocab_size")),
        tied=bool(get("tie_word_embeddings")), block_params=_weights(linears) + biases + norms,
        other_params=hidden,  # the final norm
        block_linears=linears, stored_bytes=stored_bytes(config), norms=family.norms, head_norms=family.head_norms,
    )


def _gpt2_shape(config: dict, vocab: int | None) -> ModelShape | None:
    """GPT-2: Conv1D linears with biases, LayerNorms with biases, learned position embeddings."""
    config = {**{GPT2_ALIASES[k]: v for k, v in config.items() if k in GPT2_ALIASES}, **config}  # n_embd wins
    get = _getter(config, GPT2_DEFAULTS)
    if get("add_cross_attention"):
        return None  # a cross-attention block: left to the meta-device count
    hidden, heads, positions = get("n_embd"), get("n_head"), get("n_positions")
    inter = get("n_inner") or 4 * hidden
    # model_shape keys linears by short name: the attention's c_proj (hidden -> hidden) is overwritten by the MLP's
    # c_proj (inter -> hidden), which keeps the attention's place in the order. Kept so that the two agree.
    linears = {"c_attn": (hidden, 3 * hidden), "c_proj": (inter, hidden), "c_fc": (hidden, inter)}
    attention = 3 * hidden * hidden + 3 * hidden + hidden * hidden + hidden
    mlp = 2 * hidden * inter + inter + hidden
    return ModelShape(
        model_type="gpt2", layers=get("n_layer"), hidden=hidden, intermediate=inter, heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads, head_dim=config.get("head_dim") or hidden // heads,
        vocab=max(vocab or 0, get("vocab_size")), tied=bool(get("tie_word_embeddings")),
        block_params=attention + mlp + 2 * 2 * hidden,  # ln_1, ln_2: weight and bias
        other_params=positions * hidden + 2 * hidden,  # wpe and ln_f
        block_linears=linears, stored_bytes=stored_bytes(config),
    )


def stored_bytes(config: dict) -> int:
    """Bytes per weight of the checkpoint from the config's dtype (older configs: torch_dtype); 0 when unknown."""
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype_bytes(dtype) if isinstance(dtype, str) else 0


def _getter(config: dict, defaults: dict):
    """A key's value in `config`, its class default when absent or null."""
    return lambda key: defaults.get(key) if config.get(key) is None else config[key]


def _switch(get, bias: bool | str) -> int:
    """1 when the bias is on (always, or by its config key), else 0."""
    return int(bool(get(bias))) if isinstance(bias, str) else int(bias)


def _weights(linears: dict[str, tuple[int, int]]) -> int:
    """Weights of the linears (in x out each)."""
    return sum(i * o for i, o in linears.values())
