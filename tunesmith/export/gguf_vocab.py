"""The tokenizer as GGUF metadata: token list, types, merges or scores, special ids and the chat template.

Two tokenizer kinds map onto what llama.cpp runs:

    byte-level BPE (GPT-2, Llama 3, Qwen2)          tokenizer.ggml.model = "gpt2": tokens + merges
    SentencePiece-style BPE with byte fallback      tokenizer.ggml.model = "llama": tokens + scores
      (Llama 2, Mistral)

Anything else (WordPiece, Unigram, a slow-only tokenizer) is refused with a message.

A byte-level BPE file also names its pre-tokenizer (tokenizer.ggml.pre): how llama.cpp cuts text into words before
the merges. llama.cpp knows each by its own name and refuses a file with any other (LLAMA_CPP_PRE_TOKENIZERS).
Its converter recognises a published tokenizer by hashing the tokens of a check text, which finds nothing for a
tokenizer trained here; the name is read instead from what the tokenizer.json pre-tokenizer does:

    ByteLevel with its regex, or Split(GPT-2 regex)        gpt-2
    Digits(individual) then ByteLevel (SmolLM, StarCoder)  smollm (starcoder when decoding cleans up spaces)
    Split(Llama 3 regex): digits in groups of 1-3           llama-bpe
    Split(Qwen2 regex): single digits                       qwen2
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from tunesmith.errors import ModelError
from tunesmith.model.stops import end_of_turn_id

log = logging.getLogger(__name__)

# The names llama.cpp accepts in tokenizer.ggml.pre (llama.cpp b11434, src/llama-vocab.cpp, llama_vocab::impl::load;
# any other name is "unknown pre-tokenizer type" and the file does not load).
LLAMA_CPP_PRE_TOKENIZERS = frozenset("""
    default minicpm5 llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano deepseek-llm
    deepseek-coder deepseek-v3 spark2_5 youtu falcon mpt starcoder gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es
    jina-v2-de a.x-4.0 mellum modern-bert jais-2 gemma4 granite-embed-multi-311m mmbert sarvam-moe jina-v1-en
    jina-v2-code roberta-bpe whitespace refact command-r qwen2 deepseek-r1-qwen kormo f2llmv2 qwen35 stablelm2 olmo
    dbrx smaug-bpe poro-chat chatglm-bpe glm4 glm5 viking jais tekken smollm codeshell bloom gpt3-finnish exaone
    exaone4 exaone-moe chameleon minerva-7b megrez gpt-4o llama4 kanana2 talkie granite-embed-multi-97m tiny_aya
    cohere2moe superbpe trillion granite-docling bailingmoe bailingmoe2 llada-moe seed-coder hunyuan hunyuan-dense
    hy_v4 joyai-llm kimi-k2 ufakzeka grok-2 afmoe laguna minimax-m2 solar-open mellum2
""".split())

# Split patterns as tokenizer.json spells them -> the llama.cpp pre-tokenizer whose regex cuts text the same way
# (llama.cpp writes the case-insensitive group out as [sS]-style classes, which matches the same text).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
SPLIT_PRE_TOKENIZERS = {GPT2_PATTERN: "gpt-2", LLAMA3_PATTERN: "llama-bpe", QWEN2_PATTERN: "qwen2"}
BYTE_LEVEL_PRE_TOKENIZER = "gpt-2"  # ByteLevel's own regex is GPT-2's
# Every digit its own word, then GPT-2's regex: llama.cpp's smollm, or starcoder where decoding cleans up spaces.
DIGITS_PRE_TOKENIZERS = {False: "smollm", True: "starcoder"}


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
    clean_spaces = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
    return Vocab(kind, pre_tokenizer_name(spec, kind, clean_spaces), tokens, [int(t) for t in types], merges, scores)


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


def pre_tokenizer_name(spec: dict, kind: str, clean_spaces: bool = False) -> str:
    """The name llama.cpp knows the pre-tokenizer of `spec` (a parsed tokenizer.json) by.

    Args:
        kind: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style, where llama.cpp ignores the name and its
            converter writes "default").
        clean_spaces: whether decoding removes the space before punctuation (clean_up_tokenization_spaces).
    """
    if kind == "llama":
        return "default"
    parts = _pre_tokenizer_parts(spec.get("pre_tokenizer"))
    families = [name for name in map(_family, parts) if name]
    digits = any(map(_splits_digits, parts))
    extra = [p for p in parts if not (_family(p) or _splits_digits(p) or p.get("type") == "ByteLevel")]
    if len(set(families)) != 1 or (digits and families[0] != BYTE_LEVEL_PRE_TOKENIZER):
        log.warning("no llama.cpp pre-tokenizer splits text like %s: the GGUF file says 'default', and llama.cpp "
                    "may tokenize differently from transformers", json.dumps(spec.get("pre_tokenizer"))[:200])
        return "default"
    if extra:
        log.warning("llama.cpp has no pre-tokenizer for %s: the GGUF file says %r, which splits the same text "
                    "more coarsely (the tokens agree where the vocabulary has no merge across the extra split, as "
                    "in one trained with it)", json.dumps(extra)[:200], families[0])
    return DIGITS_PRE_TOKENIZERS[clean_spaces] if digits else families[0]


def _pre_tokenizer_parts(pre: dict | None) -> list[dict]:
    """The steps of a pre-tokenizer, a Sequence flattened."""
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [p for child in pre.get("pretokenizers", []) for p in _pre_tokenizer_parts(child)]
    return [pre]


def _splits_digits(part: dict) -> bool:
    return part.get("type") == "Digits" and bool(part.get("individual_digits"))


def _family(part: dict) -> str | None:
    """The llama.cpp pre-tokenizer whose regex this step applies, or None for a step that applies none."""
    if part.get("type") == "ByteLevel" and part.get("use_regex", True):
        return BYTE_LEVEL_PRE_TOKENIZER
    if part.get("type") == "Split":
        return SPLIT_PRE_TOKENIZERS.get((part.get("pattern") or {}).get("Regex"))
    return None
