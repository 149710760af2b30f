"""The tokenizer as GGUF metadata: token list, types, merges or scores, special ids and the chat template.

Two tokenizer kinds map onto what llama.cpp runs:

    byte-level BPE (GPT-2, Llama 3, Qwen2)          tokenizer.ggml.model = "gpt2": tokens + merges
    SentencePiece-style BPE with byte fallback      tokenizer.ggml.model = "llama": tokens + scores
      (Llama 2, Mistral)

Anything else (WordPiece, Unigram, a slow-only tokenizer) is refused with a message.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from tunesmith.errors import ModelError
from tunesmith.export.loading import end_of_turn_id

log = logging.getLogger(__name__)


@dataclass
class Vocab:
    model: str  # "gpt2" or "llama"
    pre: str  # the pre-tokenizer llama.cpp should use
    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    merges: list[str]  # "a b" (gpt2 model only)
    scores: list[float]  # llama model only


def tokenizer_vocab(tokenizer, num_rows: int) -> Vocab:
    """The tokenizer's vocabulary padded to the model's `num_rows` embedding rows (llama.cpp needs one token per
    row; rows beyond the tokenizer become unused "[PADn]" tokens)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError("GGUF export needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ModelError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')}")
    kind = "llama" if model.get("byte_fallback") else "gpt2"
    if len(tokenizer) > num_rows:
        raise ModelError(f"the tokenizer has {len(tokenizer)} tokens but the model only {num_rows} embedding rows")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(num_rows):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(_normal_type(by_id[i], kind, tokenizer))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])] if kind == "gpt2" else []
    scores = [-float(i) for i in range(num_rows)] if kind == "llama" else []  # earlier merges rank higher
    return Vocab(kind, _pre_tokenizer(spec, kind), tokens, [int(t) for t in types], merges, scores)


def add_tokenizer(writer, tokenizer, num_rows: int) -> None:
    """Write the vocabulary, special token ids and chat template into `writer` (a gguf.GGUFWriter)."""
    vocab = tokenizer_vocab(tokenizer, num_rows)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.scores:
        writer.add_token_scores(vocab.scores)
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id),
                          (writer.add_eot_token_id, end_of_turn_id(tokenizer))):
        if token_id is not None:
            add(token_id)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    else:
        log.warning("the tokenizer has no chat template: the GGUF file has none either")


def _normal_type(token: str, kind: str, tokenizer) -> int:
    import gguf

    if kind == "llama" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return gguf.TokenType.BYTE
    if token == tokenizer.unk_token:
        return gguf.TokenType.UNKNOWN
    return gguf.TokenType.NORMAL


def _pre_tokenizer(spec: dict, kind: str) -> str:
    """The name llama.cpp knows the pre-tokenizer by, read from the split pattern of tokenizer.json."""
    if kind == "llama":
        return "default"
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [p for p in parts if p.get("type") == "Split"]
    if not splits and any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts):
        return "gpt2"  # ByteLevel's own regex is GPT-2's
    pattern = (splits[0].get("pattern") or {}).get("Regex", "") if splits else ""
    if r"\p{N}{1,3}" in pattern:
        return "llama-bpe"  # digits in groups of up to three (Llama 3)
    if r"\p{N}" in pattern and r"[^\r\n\p{L}\p{N}]?\p{L}+" in pattern:
        return "qwen2"  # single digits (Qwen2)
    log.warning("unknown pre-tokenizer %s: the GGUF file says 'default', and llama.cpp may split text "
                "differently from transformers", json.dumps(pre)[:200])
    return "default"
