"""`tunesmith tokenizer`: a byte-level BPE tokenizer trained on a corpus, for a model built from scratch.

    tokenizer = train_corpus_tokenizer(corpus_texts(["corpus.jsonl"]), vocab_size=8000, chat_template="chatml")
    tokenizer.save_pretrained("tok")       # AutoTokenizer.from_pretrained("tok") loads it, chat template included

The vocabulary starts with the special tokens (unknown, BOS, EOS, pad, then the chat template's markers, each a
single token that text never produces), then the 256 byte symbols, then the learned merges. Training is
deterministic: the same files give the same tokenizer.json, byte for byte.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Iterator

from tunesmith.data.sources import iter_records
from tunesmith.data.templates import TEMPLATES, install_template
from tunesmith.errors import ConfigError, DataError

log = logging.getLogger(__name__)

BOS, EOS, PAD, UNK = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|unk|>"
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
BYTE_SYMBOLS = 256  # the byte-level alphabet every vocabulary holds before any merge
BASE_SPECIALS = (UNK, BOS, EOS, PAD)


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


def corpus_texts(paths: Iterable[str], field: str = "text", text_unit: str = "file") -> Iterator[str]:
    """The documents of `paths` (files, folders or globs in any format the data pipeline reads), streamed.

    Args:
        field: the record field holding the text (plain text files give it as "text").
        text_unit: plain text files: one document per file ("file") or per non-blank line ("line").
    Raises:
        DataError naming file, line and field for a record that cannot be read or has no text.
    """
    for path in paths:
        for where, record in iter_records(path, text_unit):
            if isinstance(record, DataError):
                raise record
            text = record.get(field)
            if not isinstance(text, str):
                found = "missing" if text is None else f"a {type(text).__name__}, not a string"
                raise DataError(f"{where}: field {field!r}: {found}")
            if text.strip():
                yield text


def special_tokens(chat_template: str | None) -> tuple[str, ...]:
    """The chat template's special tokens that the base specials (unknown, BOS, EOS, pad) do not already hold."""
    if chat_template is None:
        return ()
    return tuple(t for t in TEMPLATES[chat_template].special_tokens if t not in BASE_SPECIALS)


def train_corpus_tokenizer(texts: Iterable[str], vocab_size: int, chat_template: str | None = None):
    """A byte-level BPE tokenizer of `vocab_size` tokens trained on `texts`, with `chat_template` installed.

    Args:
        texts: the documents (streamed; read once).
        vocab_size: tokens in all: specials, the 256 byte symbols, and merges.
        chat_template: "chatml", "llama3", "alpaca", "gemma" or None (no template).
    Returns:
        A `transformers` fast tokenizer with BOS, EOS, unknown and pad tokens.
    Raises:
        ConfigError when `vocab_size` leaves no room beyond the specials and the byte symbols.
    """
    if chat_template is not None and chat_template not in TEMPLATES:
        raise ConfigError(f"--chat-template: {chat_template!r} is not one of {', '.join(TEMPLATES)}")
    extra = special_tokens(chat_template)
    smallest = len(BASE_SPECIALS) + len(extra) + BYTE_SYMBOLS + 1
    if vocab_size < smallest:
        raise ConfigError(f"--vocab-size: at least {smallest} (the special tokens, the {BYTE_SYMBOLS} byte symbols "
                          f"and one merge), got {vocab_size}")
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, extra_special_tokens=extra)
    if chat_template is not None:
        install_template(tokenizer, chat_template)  # its tokens are specials already: nothing is added
    return tokenizer


def tokenizer_command(
    paths: list[str],
    output: str | Path,
    vocab_size: int = 8000,
    chat_template: str | None = None,
    field: str = "text",
    text_unit: str = "file",
) -> Path:
    """Train a tokenizer on the documents of `paths` and save it to `output` (`save_pretrained`).

    Returns:
        The output directory.
    Raises:
        DataError when the corpus has no text; see `corpus_texts` and `train_corpus_tokenizer`.
    """
    counted = _Counted(corpus_texts(paths, field, text_unit))
    tokenizer = train_corpus_tokenizer(counted, vocab_size, chat_template)
    if not counted.count:
        raise DataError(f"{', '.join(paths)}: no text to train a tokenizer on (field {field!r})")
    out = Path(output)
    tokenizer.save_pretrained(out)
    print(f"trained a byte-level BPE tokenizer of {len(tokenizer)} tokens on {counted.count} documents"
          f"{f', chat template {chat_template}' if chat_template else ''}: {out}")
    return out


class _Counted:
    """An iterable that counts what passes through it (the corpus is streamed, read once)."""

    def __init__(self, items: Iterable[str]) -> None:
        self.items, self.count = items, 0

    def __iter__(self) -> Iterator[str]:
        for item in self.items:
            self.count += 1
            yield item
