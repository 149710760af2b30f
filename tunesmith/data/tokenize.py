"""Tokenise normalised rows into `input_ids` and `labels` (-100 where no loss is taken).

Chat rows are rendered with the tokenizer's chat template. The supervised spans are found by rendering
growing prefixes of the conversation: for assistant turn k, everything between
`render(messages[:k], add_generation_prompt=True)` and `render(messages[:k+1])` is the assistant's reply and
its end-of-turn token (trailing whitespace after it is not supervised). Token ids come from tokenising the
whole conversation once; each prefix must tokenise to a prefix of those ids, so the prompt the model is
trained on is exactly what `apply_chat_template(..., add_generation_prompt=True)` gives at inference.

Text in message content that spells a control token is encoded as ordinary text (`encode_rendered`), never as
the token, so data cannot forge a turn; `eval.generate.prompt_ids` encodes prompts the same way. For content
without such text the ids are exactly `apply_chat_template`'s; with it, they differ from it only there.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Sequence

from tunesmith.data.formats import Row
from tunesmith.data.templates import (MARK_END, MARK_START, control_pattern, control_tokens, end_of_turn_marker,
                                      mark_control_text, render)
from tunesmith.errors import DataError

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX where no loss is taken
    source: str = ""
    position_ids: list[int] | None = None  # set for packed sequences: restart at 0 for every document
    # A preference pair keeps the chosen conversation in input_ids/labels and the rejected one here.
    rejected_ids: list[int] | None = None
    rejected_labels: list[int] | None = None
    desirable: bool | None = None  # an unpaired (KTO) example: is its completion a good one?
    ref_logps: list[float] | None = None  # reference log-probs computed before training: [chosen(, rejected)]

    @property
    def num_loss_tokens(self) -> int:
        # labels[0] is never predicted (nothing precedes it), so it never counts.
        return sum(1 for labels in (self.labels, self.rejected_labels or ()) for t in labels[1:] if t != IGNORE_INDEX)


@dataclass
class DataReport:
    """What tokenisation did to the rows: nothing is dropped without being counted here."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_no_loss_tokens: int = 0
    dropped_sources: list[str] = field(default_factory=list)  # first few, for the log
    tokens: int = 0
    loss_tokens: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)  # tokens per kept example

    def as_dict(self) -> dict:
        summary = {k: v for k, v in self.__dict__.items() if k != "lengths"}
        return {**summary, "length": length_stats(self.lengths)}


def length_stats(lengths: Sequence[int]) -> dict:
    """min / mean / percentiles / max of token lengths (empty dict for no examples)."""
    if not lengths:
        return {}
    ordered = sorted(lengths)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"min": ordered[0], "mean": round(sum(ordered) / len(ordered), 1), "p50": pct(0.5), "p90": pct(0.9),
            "p99": pct(0.99), "max": ordered[-1]}


def encode_chat(
    tokenizer, messages: Sequence[dict[str, str]], train_on_prompt: bool = False, last_turn_only: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one conversation (not truncated).

    Args:
        last_turn_only: supervise only the final assistant turn (few-shot rows: the exemplars' answers are
            part of the prompt, as in FLAN).

    Raises:
        DataError when the template is not prefix-stable (a prefix renders or tokenises differently
        inside the whole conversation), since then no exact mask exists; or when an assistant turn
        comes first, since no prompt can be rendered for it.
    """
    texts, turns = chat_texts(tokenizer, messages, train_on_prompt, last_turn_only)
    return chat_mask([encode_rendered(tokenizer, t) for t in texts], turns)


def chat_texts(
    tokenizer, messages: Sequence[dict[str, str]], train_on_prompt: bool = False, last_turn_only: bool = False
) -> tuple[list[str], list[int]]:
    """The texts whose token ids give a conversation's ids and mask, and the supervised turns' indices. The
    texts are rendered with control-token text in the content marked: tokenise them with `encode_rendered`.

    Returns:
        [whole conversation, then per supervised assistant turn k: the prompt before it (with the generation
        prompt) and the conversation up to its end-of-turn token], and the turn indices k.
    """
    marked = mark_control_text(tokenizer, messages)
    full_text = render(tokenizer, marked)
    texts, turns = [full_text], []
    if train_on_prompt:
        return texts, turns
    for k, message in enumerate(messages):
        if message["role"] != "assistant" or (last_turn_only and k != len(messages) - 1):
            continue
        if k == 0:
            raise DataError(
                "messages[0]: the conversation starts with an assistant turn, so there is no prompt to "
                "answer (a chat template cannot render an empty conversation); add a user or system turn first"
            )
        prompt_text = render(tokenizer, marked[:k], add_generation_prompt=True)
        turn_text = render(tokenizer, marked[: k + 1]).rstrip()
        if not (turn_text.startswith(prompt_text) and full_text.startswith(turn_text)):
            raise DataError(
                f"messages[{k}]: the chat template is not prefix-stable: the conversation rendered up to this "
                "assistant turn is not a prefix of the whole conversation (earlier turns render differently "
                "when more turns follow), so no exact loss mask exists; use a built-in data.template"
            )
        texts += [prompt_text, turn_text]
        turns.append(k)
    return texts, turns


def chat_mask(token_ids: list[list[int]], turns: list[int]) -> tuple[list[int], list[int]]:
    """Ids and labels from the tokenised `chat_texts`: each supervised span lies between a prompt prefix
    and a turn prefix, both of which must tokenise to a prefix of the whole conversation's ids."""
    ids = token_ids[0]
    if not turns and len(token_ids) == 1:  # train_on_prompt
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for i, k in enumerate(turns):
        start = _prefix_len(token_ids[1 + 2 * i], ids, k)
        end = _prefix_len(token_ids[2 + 2 * i], ids, k)
        labels[start:end] = ids[start:end]
    return ids, labels


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """A raw document: BOS (if the tokenizer adds one) + text + EOS, loss on every token. BOS and EOS appear once
    each, also when the document already spells them (`<bos>Paris ...`)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos]:  # the tokenizer's BOS, then the one the text spells
        ids = ids[1:]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return ids, list(ids)


def _ids(tokenizer, text: str) -> list[int]:
    # The template already wrote BOS (if any) as text: adding special tokens again would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Token ids of a conversation rendered by `templates.render_marked` (or `chat_texts`): the template's control
    tokens are tokens, the control-token text the marks enclose is ordinary text, and the marks are dropped.

    Text without marks is tokenised as a whole, exactly as `apply_chat_template` does. Otherwise the text is cut
    at the marks: the first piece is tokenised as usual, each later piece as a continuation (after a newline that
    is then removed, so a SentencePiece tokenizer adds no word-start space), marked tokens without any added-token
    matching. Text on the two sides of a marked token therefore never merges with it into one token.

    Raises:
        DataError when the tokenizer produces a control token even from its plain text.
    """
    if not _is_marked(text):
        return _ids(tokenizer, text)
    tokens = control_tokens(tokenizer)
    marked = _marked_pattern(control_pattern(tokens).pattern)
    pieces = marked.split(text)  # [text, marked token or None (a lone mark), text, ...]
    ids = _ids(tokenizer, pieces[0])
    for i, piece in enumerate(pieces[1:], start=1):
        if not piece:
            continue
        if i % 2:  # a marked control token: ordinary text
            plain = _continuation_ids(lambda t: _plain_ids(tokenizer, t), piece)
            if tokenizer.convert_tokens_to_ids(piece) in plain:
                raise DataError(f"{piece!r} in a message cannot be kept as ordinary text: this tokenizer encodes "
                                "it as its control token even then; remove it from the data")
            ids += plain
        else:
            ids += _continuation_ids(lambda t: _ids(tokenizer, t), piece)
    return ids


def _is_marked(text: str) -> bool:
    return MARK_START in text or MARK_END in text


@functools.lru_cache(maxsize=64)
def _marked_pattern(tokens_pattern: str) -> re.Pattern:
    # A marked token (captured), or a lone mark that a template's string handling separated from its token.
    return re.compile(f"{MARK_START}({tokens_pattern}){MARK_END}|[{MARK_START}{MARK_END}]")


def _continuation_ids(encode, text: str) -> list[int]:
    """`encode(text)` as text that continues a line: encoded after a newline whose ids are then removed."""
    newline = encode("\n")
    ids = encode("\n" + text)
    return ids[len(newline):] if ids[: len(newline)] == newline else encode(text)


def _plain_ids(tokenizer, text: str) -> list[int]:
    """Ids of `text` with no added token (special or not) recognised. Through the backend's own normaliser,
    pre-tokenizer and model, so no shared tokenizer state is switched (`split_special_tokens=True` flips a flag
    on the shared Rust tokenizer, which a concurrent request would see)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a Python tokenizer takes the option per call
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
    return [token.id for word in words for token in backend.model.tokenize(word)]


def _prefix_len(prefix: list[int], ids: list[int], turn: int) -> int:
    if ids[: len(prefix)] != prefix:
        raise DataError(
            f"messages[{turn}]: a turn boundary falls inside a token (the template's prompt does not end on a "
            "token boundary), so the prompt would tokenise differently at inference"
        )
    return len(prefix)


TRUNCATION = ("right", "left", "drop")


CHAT_KINDS = ("chat", "preference", "unpaired")  # rows rendered with the chat template


def conversations(row: Row) -> list[tuple[tuple[dict[str, str], ...], bool]]:
    """The conversations a chat-template row is encoded as, each with whether only its last turn is supervised:
    a chat row is one; a preference row is two (prompt + chosen, prompt + rejected); an unpaired row is one."""
    if row.kind == "chat":
        return [(row.messages, row.task is not None)]
    if row.kind == "preference":
        return [(row.messages + ({"role": "assistant", "content": answer},), True)
                for answer in (row.chosen, row.rejected)]
    return [(row.messages + ({"role": "assistant", "content": row.completion},), True)]


def encode_row(tokenizer, row: Row, train_on_prompt: bool = False) -> tuple[list[int], ...]:
    """Token ids and labels for a row: (ids, labels), or for a preference row (chosen ids, chosen labels,
    rejected ids, rejected labels). Only the answers are supervised in preference and unpaired rows."""
    kind = row.kind
    if kind in CHAT_KINDS:
        encoded = []
        for messages, last_turn_only in conversations(row):
            encoded += encode_chat(tokenizer, messages, train_on_prompt and kind == "chat", last_turn_only)
        return tuple(encoded)
    if kind == "text":
        return encode_text(tokenizer, row.text)
    if kind == "completion":
        return encode_completion(tokenizer, row.prompt, row.completion, train_on_prompt)
    raise DataError("a classification row (text + label) has no answer to train on: turn it into instruction "
                    "data with data.instruct, or use a classification strategy")


def encode_rows(tokenizer, rows: Sequence[Row], train_on_prompt: bool = False):
    """`encode_row` for many rows, with every chat text tokenised in one call (one pass through the Rust
    tokenizer instead of three per conversation). Returns `encode_row`'s tuple or the row's DataError, per row."""
    results: list = [None] * len(rows)
    pending = []  # (row index, [(texts, turns) per conversation])
    for i, row in enumerate(rows):
        try:
            if row.kind in CHAT_KINDS:
                prompt_too = train_on_prompt and row.kind == "chat"
                pending.append((i, [chat_texts(tokenizer, messages, prompt_too, last_turn_only)
                                    for messages, last_turn_only in conversations(row)]))
            else:
                results[i] = encode_row(tokenizer, row, train_on_prompt)
        except DataError as exc:
            results[i] = DataError(f"{row.source}: {exc}")
    flat = [t for _, convs in pending for texts, _ in convs for t in texts]
    # Texts with control-token text in their content (marked, rare) are encoded one by one, below.
    plain = [t for t in flat if not _is_marked(t)]
    plain_ids = iter(tokenizer(plain, add_special_tokens=False)["input_ids"] if plain else [])
    ids = [None if _is_marked(t) else next(plain_ids) for t in flat]
    offset = 0
    for i, convs in pending:
        encoded = []
        for texts, turns in convs:
            try:
                conv_ids = [encode_rendered(tokenizer, t) if ids[offset + k] is None else ids[offset + k]
                            for k, t in enumerate(texts)]
                encoded += chat_mask(conv_ids, turns)
            except DataError as exc:
                results[i] = DataError(f"{rows[i].source}: {exc}")
            offset += len(texts)
        if results[i] is None:
            results[i] = tuple(encoded)
    return results


def encode_completion(tokenizer, prompt: str, completion: str, train_on_prompt: bool = False):
    """Prompt (BOS if the tokenizer adds one) + completion + EOS, loss on the completion and EOS.

    Prompt and completion are tokenised separately, so the prompt ids are exactly what inference feeds.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    ids = prompt_ids + completion_ids
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return ids, labels


def truncate(ids: list[int], labels: list[int], max_seq_len: int, policy: str):
    """Fit an example into `max_seq_len` tokens, or None when the policy drops it.

    right: keep the start (a long answer is cut); left: keep the end (the prompt loses its oldest tokens);
    drop: drop the example.
    """
    if len(ids) <= max_seq_len:
        return ids, labels
    if policy == "drop":
        return None
    if policy == "left":
        return ids[-max_seq_len:], labels[-max_seq_len:]
    return ids[:max_seq_len], labels[:max_seq_len]


def fit_example(ids: list[int], labels: list[int], max_seq_len: int, policy: str):
    """`truncate`, then None also when no loss-bearing token is left (such an example is dropped and counted)."""
    fitted = truncate(ids, labels, max_seq_len, policy)
    if fitted is None or all(t == IGNORE_INDEX for t in fitted[1][1:]):
        return None
    return fitted


def fit_row(row: Row, encoded: tuple[list[int], ...], max_seq_len: int, policy: str) -> Example | None:
    """The example a row's encoding becomes after `fit_example` (both sides of a preference pair must fit),
    or None when it is dropped."""
    fitted = [fit_example(encoded[k], encoded[k + 1], max_seq_len, policy) for k in range(0, len(encoded), 2)]
    if any(f is None for f in fitted):
        return None
    example = Example(*fitted[0], row.source, desirable=row.desirable)
    if len(fitted) == 2:
        example.rejected_ids, example.rejected_labels = fitted[1]
    return example


def example_length(example: Example) -> int:
    return len(example.input_ids) + len(example.rejected_ids or ())


def check_template(tokenizer, rows: Sequence[Row]) -> None:
    """Fail before any tokenising on a chat template that never ends a turn (the model would never stop)."""
    if any(r.kind in CHAT_KINDS for r in rows):
        end_of_turn_marker(tokenizer)


def tokenize_rows(
    tokenizer, rows: Sequence[Row], max_seq_len: int, train_on_prompt: bool = False, truncation: str = "right"
) -> tuple[list[Example], DataReport]:
    """In memory: tokenise, fit to `max_seq_len` by the truncation policy, and drop examples without loss
    tokens (the pipeline does the same through `datasets.map`). Every drop is counted in the report."""
    report = DataReport(rows=len(rows))
    check_template(tokenizer, rows)
    examples = []
    for row, encoded in zip(rows, encode_rows(tokenizer, rows, train_on_prompt)):
        if isinstance(encoded, DataError):
            raise encoded
        example = fit_row(row, encoded, max_seq_len, truncation)
        report.truncated += max(len(ids) for ids in encoded[::2]) > max_seq_len
        if example is None:
            report.dropped_no_loss_tokens += 1
            if len(report.dropped_sources) < 10:
                report.dropped_sources.append(row.source)
            continue
        examples.append(example)
        report.lengths.append(example_length(example))
        report.tokens += example_length(example)
        report.loss_tokens += example.num_loss_tokens
    report.examples = len(examples)
    return examples, report
