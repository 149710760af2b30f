"""Load a causal LM and its tokenizer through `transformers`, safely.

Safe by default: weights only from safetensors unless the caller opts in to pickle files, and
`trust_remote_code` off unless asked. A GGUF file or a packaged model's short name loads from its converted
Hugging Face directory (model/sources.py), so every command accepts them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tunesmith.errors import ModelError
from tunesmith.model.sources import first_line as _first_line
from tunesmith.model.sources import resolve_model_path

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_dtype(name: str) -> torch.dtype:
    """`auto`: bf16 on a CUDA device that supports it, else fp32 (CPU training stays in fp32)."""
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of a directory, hub id, GGUF file or packaged model (its chat template included)."""
    from transformers import AutoTokenizer

    name_or_path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {name_or_path!r}: {_first_line(exc)}") from None


def load_model(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    quantization_config=None,
    head: str = "causal",
):
    """`from_pretrained` with safetensors enforced unless `allow_pickle`.

    Args:
        name_or_path: a model directory, hub id, GGUF file or packaged model's short name.
        head: "causal" (the language-model head) or "score" (one scalar per sequence, read at its last
            token: a reward model; the head is new unless the checkpoint is already one).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    name_or_path = resolve_model_path(name_or_path)
    check_weight_files(name_or_path, allow_pickle)
    kwargs = {}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map=_quantized_device_map())
    auto = AutoModelForCausalLM
    if head == "score":
        auto, kwargs["num_labels"] = AutoModelForSequenceClassification, 1
    try:
        model = auto.from_pretrained(
            name_or_path,
            dtype=dtype,
            attn_implementation=attn_implementation,
            revision=revision,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            **kwargs,
        )
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(f"cannot load a model from {name_or_path!r}: {_first_line(exc)}") from None
    return model


def check_weight_files(name_or_path: str, allow_pickle: bool) -> None:
    """A local directory with only pickle weights is refused unless the user opts in."""
    path = Path(name_or_path)
    if allow_pickle or not path.is_dir():
        return
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"{path}: only pickle weights ({', '.join(pickles)}), which can run arbitrary code when loaded; "
            "convert them to safetensors or set model.allow_pickle=true if you trust the source"
        )


def resize_embeddings(model, tokenizer) -> None:
    """Grow the embedding matrix only when the tokenizer no longer fits in it (many models have spare rows).

    New rows (input embeddings, and the output head when untied) start at the mean of the existing rows:
    deterministic, so a model rebuilt on resume or for evaluation has exactly the rows it was trained with.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())
                      if m is not None}.values():
            layer.weight[rows:] = layer.weight[:rows].mean(dim=0, keepdim=True)
    log.info("resized the embeddings from %d to %d rows", rows, len(tokenizer))


def _quantized_device_map():
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
