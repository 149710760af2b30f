"""Tiny models and tokenizers built offline: for the demo and for tests (no download anywhere).

    tok = train_tokenizer(texts, vocab_size=512)
    model = build_model("llama", vocab_size=len(tok), hidden_size=64, num_layers=2)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from tunesmith.model.scratch import architecture_config as model_config  # noqa: F401 (tests use it)

BOS, EOS, PAD, UNK = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|unk|>"
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    extra_special_tokens: tuple[str, ...] = CHATML_TOKENS,
    pad: bool = True,
    add_bos: bool = False,
    bare_names: bool = False,
):
    """A byte-level BPE tokenizer trained on `texts` (deterministic), as a transformers fast tokenizer.

    Args:
        extra_special_tokens: added as special tokens (e.g. chat-template markers).
        pad: give it a dedicated pad token (False to test tokenizers that have none).
        add_bos: prepend BOS when encoding with add_special_tokens=True (Llama style).
        bare_names: a space before a capital letter or a digit becomes a token of its own, so "Marnburg" and
            "12" have the same tokens inside a sentence and at the start of an answer (after the chat
            template's newline), where a copied name would otherwise need another spelling.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [UNK, BOS, EOS] + ([PAD] if pad else []) + list(extra_special_tokens)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if bare_names:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r" (?=[\p{Lu}\p{N}])"), behavior="isolated"), tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs = {"pad_token": PAD} if pad else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=list(extra_special_tokens), **kwargs,
    )
    return fast


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
