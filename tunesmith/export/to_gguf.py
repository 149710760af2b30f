"""Write a Llama, Mistral or Qwen2 model as one GGUF file through the `gguf` package's writer.

Tensors get GGUF's names (gguf.TensorNameMap: `model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`).
Llama and Mistral run in llama.cpp with "normal" RoPE, which rotates adjacent pairs (x0, x1), (x2, x3), ...,
while Hugging Face checkpoints rotate each head's two halves (x_i, x_{i+d/2}); so the rows of each head of q_proj
and k_proj are permuted, half i -> position 2i, half i + d/2 -> 2i + 1 (`rope_permute`). Qwen2 runs with NEOX
RoPE, which rotates halves like Hugging Face: no permutation.

Tensor types: f32 keeps everything in float32; f16 and q8_0 convert the matrices and keep 1-D tensors (norms,
biases) in float32, as llama.cpp expects; q8_0 (blocks of 32 values sharing one fp16 scale) falls back to f16 for
a matrix whose rows are not a multiple of 32 long.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from tunesmith.errors import ConfigError, ModelError
from tunesmith.export.gguf_vocab import add_tokenizer

log = logging.getLogger(__name__)

GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # HF model_type -> GGUF arch
PERMUTED_ARCHITECTURES = ("llama",)
QUANTS = ("f32", "f16", "q8_0")


def write_gguf(model, tokenizer, path: str | Path, quant: str = "f16") -> Path:
    """Write `model` (a plain transformers model, adapters merged) and its tokenizer to the GGUF file `path`.

    Args:
        quant: "f32", "f16" or "q8_0".
    Returns:
        The path written.
    Raises:
        ModelError for an architecture, RoPE scaling or tokenizer GGUF export does not support.
    """
    import gguf

    if quant not in QUANTS:
        raise ConfigError(f"--quant: {quant!r} is not one of {', '.join(QUANTS)}")
    config = model.config
    arch = gguf_architecture(config.model_type)
    path = Path(path)
    plan = tensor_plan(model, arch, quant)
    writer = gguf.GGUFWriter(str(path), arch)
    add_hyperparameters(writer, config, quant, path.stem)
    add_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0])
    for name, _, shape, qtype in plan:
        nbytes = _nbytes(shape, qtype)
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            writer.add_tensor_info(name, gguf.quants.quant_shape_to_byte_shape(shape, qtype), np.dtype(np.uint8),
                                   nbytes, raw_dtype=qtype)
        else:
            writer.add_tensor_info(name, shape, np.dtype(_numpy_dtype(qtype)), nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, tensor_fn, _, qtype in plan:  # one tensor in memory at a time
        writer.write_tensor_data(convert(tensor_fn(), qtype))
    writer.close()
    log.info("wrote %s: %d tensors, %s, %.1f MB", path, len(plan), quant, path.stat().st_size / 1e6)
    return path


def gguf_architecture(model_type: str) -> str:
    if model_type not in GGUF_ARCHITECTURES:
        raise ModelError(f"GGUF export supports {', '.join(sorted(GGUF_ARCHITECTURES))}; model_type "
                         f"{model_type!r} is not supported (export --format hf and convert it with llama.cpp's "
                         "convert_hf_to_gguf.py)")
    return GGUF_ARCHITECTURES[model_type]


def tensor_plan(model, arch: str, quant: str) -> list[tuple[str, callable, tuple[int, ...], int]]:
    """(GGUF name, a function giving the fp32 numpy tensor, numpy shape, GGML type) for every tensor to write."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    tied = getattr(config, "tie_word_embeddings", False)
    plan = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name.startswith("lm_head."):
            continue  # llama.cpp reads a missing output.weight as tied to token_embd
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"GGUF export: no GGUF name for tensor {hf_name} of a {config.model_type} model")
        n_heads = {"q_proj": heads, "k_proj": kv_heads}.get(hf_name.split(".")[-2])
        permute = n_heads if arch in PERMUTED_ARCHITECTURES else None
        plan.append((name, _loader(tensor, permute), tuple(tensor.shape), _ggml_type(tensor.shape, quant)))
    factors = rope_freq_factors(config)
    if factors is not None:
        plan.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", lambda: factors,
                     tuple(factors.shape), gguf.GGMLQuantizationType.F32))
    return plan


def rope_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of each head reordered from halves (x_i, x_{i+d/2}) to adjacent pairs (x_2i, x_2i+1).

    Args:
        weight: (n_heads * head_dim, in) or (n_heads * head_dim,) q/k projection weight or bias.
    """
    head_dim = weight.shape[0] // n_heads
    return (weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def rope_unpermute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of rope_permute."""
    head_dim = weight.shape[0] // n_heads
    return (weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def add_hyperparameters(writer, config, quant: str, name: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope_parameters(config).get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        log.warning("the model attends within a sliding window of %d tokens; llama.cpp's %s architecture "
                    "attends to the whole context", window, config.model_type)


def rope_parameters(config) -> dict:
    return getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {
        "rope_theta": getattr(config, "rope_theta", 10000.0), "rope_type": "default"}


def rope_freq_factors(config) -> np.ndarray | None:
    """Llama 3 RoPE scaling as llama.cpp reads it: one divisor per rotary frequency (the rope_freqs tensor),
    the original inverse frequencies over the scaled ones. None for unscaled or linear RoPE."""
    rope = rope_parameters(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type in ("default", "linear"):
        return None
    if rope_type != "llama3":
        raise ModelError(f"GGUF export: RoPE scaling {rope_type!r} is not supported (default, linear and llama3 "
                         "are)")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    dim = scaled.shape[0] * 2
    original = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return (original / scaled.double()).float().numpy()


def convert(tensor: np.ndarray, qtype: int) -> np.ndarray:
    """A float32 array in the GGML type `qtype` (F32, F16 or Q8_0 bytes)."""
    import gguf

    if qtype == gguf.GGMLQuantizationType.Q8_0:
        return gguf.quants.quantize(tensor, qtype)
    return tensor.astype(_numpy_dtype(qtype))


def _loader(tensor: torch.Tensor, permute_heads: int | None):
    def load() -> np.ndarray:
        array = tensor.detach().to(torch.float32).cpu().numpy()
        return rope_permute(array, permute_heads) if permute_heads else array
    return load


def _ggml_type(shape, quant: str) -> int:
    import gguf

    t = gguf.GGMLQuantizationType
    if quant == "f32" or len(shape) == 1:
        return t.F32
    if quant == "q8_0":
        block = gguf.GGML_QUANT_SIZES[t.Q8_0][0]
        if shape[-1] % block == 0:
            return t.Q8_0
        log.info("a %s tensor's rows are not a multiple of %d long: stored as f16", tuple(shape), block)
    return t.F16


def _numpy_dtype(qtype: int):
    import gguf

    return {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}[qtype]


def _nbytes(shape, qtype: int) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size
