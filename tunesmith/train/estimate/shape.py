"""The model's side of the estimate: the shapes that memory and FLOPs depend on, read from a `transformers` config."""

from __future__ import annotations

from dataclasses import dataclass

# Which tensor of a Llama-style block feeds each linear: norm outputs (n1, n2), attention output, MLP product.
LINEAR_INPUTS = {"q_proj": "n1", "k_proj": "n1", "v_proj": "n1", "qkv_proj": "n1", "c_attn": "n1",
                 "o_proj": "attn", "gate_proj": "n2", "up_proj": "n2", "gate_up_proj": "n2", "c_fc": "n2",
                 "down_proj": "mlp", "c_proj": "mlp"}


@dataclass(frozen=True)
class ModelShape:
    """What memory and FLOPs depend on, read from a model config (plus its meta-device parameter counts)."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    block_params: int  # one block
    other_params: int  # final norm and anything else outside the blocks and the embeddings
    block_linears: dict[str, tuple[int, int]]  # short name -> (in, out) of one block's linears
    stored_bytes: int = 0  # bytes per weight in the checkpoint (the config's dtype); 0: not known
    norms: int = 2  # norms of hidden size in a block: 4 where post-attention and post-MLP norms follow (Gemma 2, 3)
    head_norms: bool = False  # q_norm and k_norm over each head (Qwen3, Gemma 3)

    @property
    def params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * self.block_params + self.other_params

    @property
    def matmul_params(self) -> int:
        """Parameters used in matmuls: the blocks' linears and the LM head (the embedding is a lookup)."""
        return self.layers * self.block_matmul_params + self.vocab * self.hidden

    @property
    def block_matmul_params(self) -> int:
        """Weights of one block's linears."""
        return sum(i * o for i, o in self.block_linears.values())

    def linears_reading(self, source: str) -> list[str]:
        """The block's linears whose input is `source` (a key's value of LINEAR_INPUTS)."""
        return [n for n in self.block_linears if LINEAR_INPUTS.get(n) == source]


def model_shape(config, vocab: int | None = None, trust_remote_code: bool = False) -> ModelShape:
    """The shape of a `transformers` config; parameters counted on a meta-device model (no memory, no weights).
    `vocab`: the tokenizer's size, when it outgrows the embeddings (training then resizes them)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.model.blocks import transformer_blocks

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    blocks = transformer_blocks(model)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is None or head.weight is embed
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in blocks[0].parameters())
    linears = {name.rsplit(".", 1)[-1]: _in_out(m) for name, m in blocks[0].named_modules() if _in_out(m)}
    hidden, config_vocab = embed.shape[1], embed.shape[0]
    heads = _attr(config, "num_attention_heads", "n_head")
    return ModelShape(
        model_type=config.model_type, layers=len(blocks), hidden=hidden,
        intermediate=_attr(config, "intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden,
        heads=heads, kv_heads=_attr(config, "num_key_value_heads", default=heads) or heads,
        head_dim=_attr(config, "head_dim", default=hidden // heads) or hidden // heads,
        vocab=max(vocab or 0, config_vocab), tied=tied, block_params=block,
        other_params=total - len(blocks) * block - config_vocab * hidden * (1 if tied else 2),
        block_linears=linears, stored_bytes=_stored_bytes(config), **_norms(blocks[0], hidden),
    )


def _norms(block, hidden: int) -> dict:
    """ModelShape's norms and head_norms for a block: its norm modules over the hidden size, and whether it has a
    q_norm."""
    norms = {n.rsplit(".", 1)[-1]: getattr(m, "weight", None) for n, m in block.named_modules()
             if "norm" in type(m).__name__.lower()}
    widths = [w is None or w.numel() == hidden for n, w in norms.items() if n not in ("q_norm", "k_norm")]
    return {"norms": sum(widths), "head_norms": "q_norm" in norms}


def _stored_bytes(config) -> int:
    """Bytes per weight of the checkpoint, from the dtype its config records (0 when it records none)."""
    return dtype_bytes(getattr(config, "dtype", None))


def dtype_bytes(dtype) -> int:
    """Bytes of a floating-point dtype given as a torch dtype or its name ("bfloat16", "torch.float32"); 0 for
    anything else."""
    name = str(dtype).removeprefix("torch.")
    return FLOAT_BYTES.get(name, 0)


FLOAT_BYTES = {"float64": 8, "float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def _in_out(module) -> tuple[int, int] | None:
    """(in, out) features of a linear layer, else None."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2 stores (in, out)
        return tuple(module.weight.shape)
    return None


def _attr(config, *names: str, default=None):
    """The first of `names` that `config` sets (not None), else `default`."""
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), default)
