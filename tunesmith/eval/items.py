"""Eval set files -> items, read one record at a time by the training data readers.

Generation sets use the training formats (`tunesmith.data.formats`): a conversation is asked its turns before
the last and answered by the last assistant turn; a completion row is asked its prompt (plain text) and
answered by its completion; a classification row is asked its text and answered by its label.

Classification sets (`kind: classify`) are text + label rows (`read_labelled`); for a causal LM each becomes a
multiple-choice item whose options are the set's labels (`label_item`).

Multiple-choice records carry a prompt, options and the correct one:

    {"prompt": "The capital of Peru is", "options": [" Lima", " Paris"], "label": " Lima"}
    {"question": "2 + 2 =", "choices": ["3", "4"], "answer": 1}

prompt: `prompt` (text, or chat turns), `text` or `question`; options: `options` or `choices`, else the set's
fixed list; the correct option: `label` or `answer`, as its text or its 0-based index. Field names map as for
training data (`fields: {prompt: stem}`). A text `prompt` is plain text, as in completion data; `text` and
`question` are a user's question. Every problem names `file:line` and the field.
"""

from __future__ import annotations

from itertools import islice
from typing import Any, Iterator, Sequence

from tunesmith.data.formats import Row, iter_rows, rename_fields
from tunesmith.data.sources import iter_records
from tunesmith.errors import DataError
from tunesmith.eval.prompting import Item

PROMPT_FIELDS = ("prompt", "text", "question")
OPTION_FIELDS = ("options", "choices")
ANSWER_FIELDS = ("label", "answer")


def read_rows(path: str, fmt: str = "auto", fields: dict[str, str] | None = None, limit: int | None = None,
              system_prompt: str | None = None) -> Iterator[Row]:
    """The first `limit` rows of a file in a training format, streamed."""
    return islice(iter_rows(path, fmt, system_prompt, fields), limit)


def read_items(path: str, kind: str, fmt: str = "auto", fields: dict[str, str] | None = None,
               options: Sequence[str] = (), limit: int | None = None) -> Iterator[Item]:
    """The first `limit` items of a generation ("generate") or multiple-choice ("choice") file, streamed; a
    classification ("classify") file gives its rows' texts and labels as questions and answers."""
    if kind == "choice":
        items = (choice_item(rename_fields(obj, fields, where), where, options)
                 for where, obj in _records(path))
    else:
        items = (item_from_row(row) for row in iter_rows(path, fmt, None, fields))
    return islice(items, limit)


def read_labelled(path: str, fmt: str = "auto", fields: dict[str, str] | None = None, limit: int | None = None
                  ) -> Iterator[Row]:
    """The first `limit` text + label rows of a classification set, streamed; any other row is an error."""
    for row in read_rows(path, fmt, fields, limit):
        if row.kind != "classification":
            raise DataError(f"{row.source}: a classify set needs text + label rows, got a {row.kind} row (set the "
                            "set's format: classification, and fields if the file names them otherwise)")
        yield row


def set_labels(path: str, fmt: str = "auto", fields: dict[str, str] | None = None, limit: int | None = None
               ) -> list[str]:
    """The distinct labels of a classification set's first `limit` rows, sorted (one streamed pass)."""
    return sorted({row.label for row in read_labelled(path, fmt, fields, limit)})


def label_item(row: Row, labels: Sequence[str]) -> Item:
    """A text + label row as a multiple-choice item over `labels`: the text is the user's question, the labels
    are the options and the row's label is the correct one."""
    if row.label not in labels:
        raise DataError(f"{row.source}: label: {row.label!r} is not one of the set's labels {list(labels)!r:.80}")
    return Item(row.source, ({"role": "user", "content": row.text},), row.label, tuple(labels))


def item_from_row(row: Row) -> Item:
    """A training-format row as a question and its reference answer."""
    if row.kind == "chat":
        return Item(row.source, tuple(row.messages[:-1]), row.messages[-1]["content"])
    if row.kind == "completion":
        return Item(row.source, row.prompt, row.completion)
    if row.kind == "classification":
        return Item(row.source, ({"role": "user", "content": row.text},), row.label)
    raise DataError(f"{row.source}: a {row.kind} row has no prompt and reference answer to evaluate against; "
                    "use conversations, alpaca, prompt/completion or text/label rows")


def choice_item(obj: dict[str, Any], where: str, fixed_options: Sequence[str] = ()) -> Item:
    """A multiple-choice record (see the module doc) as an Item whose answer is the correct option."""
    prompt = _prompt(obj, where)
    options = _options(obj, where, fixed_options)
    return Item(where, prompt, _correct(obj, where, options), tuple(options))


def _records(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, obj in iter_records(path):
        if isinstance(obj, DataError):
            raise obj
        yield where, obj


def _prompt(obj: dict[str, Any], where: str):
    name = next((f for f in PROMPT_FIELDS if obj.get(f) is not None), None)
    if name is None:
        raise DataError(f"{where}: prompt: missing field (a choice record needs one of {', '.join(PROMPT_FIELDS)})")
    value = obj[name]
    if name == "prompt" and isinstance(value, list):
        return tuple(_turn(t, where, f"prompt[{i}]") for i, t in enumerate(value))
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {name}: expected non-empty text, got {value!r:.40}")
    return value if name == "prompt" else ({"role": "user", "content": value},)


def _turn(turn: Any, where: str, field: str) -> dict[str, str]:
    if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
        raise DataError(f"{where}: {field}: expected {{'role': ..., 'content': ...}}, got {turn!r:.60}")
    return {"role": turn["role"], "content": turn["content"]}


def _options(obj: dict[str, Any], where: str, fixed: Sequence[str]) -> list[str]:
    name = next((f for f in OPTION_FIELDS if obj.get(f) is not None), None)
    if name is None:
        if not fixed:
            raise DataError(f"{where}: options: missing field, and the eval set has no fixed `options` list")
        return list(fixed)
    value = obj[name]
    if not (isinstance(value, list) and len(value) >= 2 and all(isinstance(v, str) and v for v in value)):
        raise DataError(f"{where}: {name}: expected a list of at least two non-empty strings, got {value!r:.60}")
    return value


def _correct(obj: dict[str, Any], where: str, options: list[str]) -> str:
    """The correct option: its text, or its 0-based index (an int, or digits that are not an option's text)."""
    name = next((f for f in ANSWER_FIELDS if obj.get(f) is not None), None)
    if name is None:
        raise DataError(f"{where}: label: missing field (the correct option, as its text or 0-based index)")
    value = obj[name]
    if isinstance(value, str) and value in options:
        return value
    index = value if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(value, str) and value.strip().isdigit():
        index = int(value)
    if index is None or not 0 <= index < len(options):
        raise DataError(f"{where}: {name}: {value!r:.40} is neither one of the options {options!r:.80} nor an "
                        f"index below {len(options)}")
    return options[index]
